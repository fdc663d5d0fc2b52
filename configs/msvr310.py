"""FACENet on MSVR310 (same-scene protocol): the paper's reading and recipe.

On the paper's data the paper's choices are the reference, so this is
configs/paper.py (every flare-mechanism choice as the paper reads) with the
dataset set. The mechanism chosen on synthetic_flare's validation split is
`--config configs/chosen.py:msvr310` (docs/training.md).

Point manual_dir at the dataset root ({bounding_box_train,query3,bounding_box_test}/<vid>/{vis,ni,th}/):
  python scripts/main.py --config configs/msvr310.py --workdir /runs/msvr310 \
      --config.manual_dir=/data/msvr310 \
      --config.model.pretrained=/weights/resnet50.safetensors
"""

from configs import paper


def get_config():
  config = paper.get_config()
  config.dataset = "msvr310"
  config.dataset_config = ""
  return config
