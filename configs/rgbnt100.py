"""FACENet on RGBNT100: the paper's reading and recipe.

On the paper's data the paper's choices are the reference, so this is
configs/paper.py (every flare-mechanism choice as the paper reads) with the
dataset set. The mechanism chosen on synthetic_flare's validation split is
`--config configs/chosen.py:rgbnt100` (docs/training.md).

Point manual_dir at the dataset root (rgbir/{bounding_box_train,query,bounding_box_test}/*.jpg, RGB|NI|TI side by side):
  python scripts/main.py --config configs/rgbnt100.py --workdir /runs/rgbnt100 \
      --config.manual_dir=/data/rgbnt100 \
      --config.model.pretrained=/weights/resnet50.safetensors
"""

from configs import paper


def get_config():
  config = paper.get_config()
  config.dataset = "rgbnt100"
  config.dataset_config = ""
  return config
