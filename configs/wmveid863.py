"""FACENet on WMVeID863 (the paper's dataset): the paper's reading and recipe.

On the paper's data the paper's choices are the reference, so this is
configs/paper.py (every flare-mechanism choice as the paper reads) with the
dataset set. The mechanism chosen on synthetic_flare's validation split is
`--config configs/chosen.py:wmveid863` (docs/training.md).

Point manual_dir at the dataset root ({train,query,test}/<vid>/{vis,ni,th}/):
  python scripts/main.py --config configs/wmveid863.py --workdir /runs/wmveid863 \
      --config.manual_dir=/data/wmveid863 \
      --config.model.pretrained=/weights/resnet50.safetensors
"""

from configs import paper


def get_config():
  config = paper.get_config()
  config.dataset = "wmveid863"
  config.dataset_config = ""
  return config
