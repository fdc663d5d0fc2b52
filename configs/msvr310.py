"""FACENet on MSVR310 (evaluated with the same-scene protocol).

Point manual_dir at the dataset root
({bounding_box_train,query3,bounding_box_test}/<vid>/{vis,ni,th}/):
  python scripts/main.py --config configs/msvr310.py --workdir /runs/msvr310 \
      --config.manual_dir=/data/MSVR310 \
      --config.model.pretrained=/weights/resnet50.safetensors
"""

from configs import default


def get_config():
  config = default.get_config()
  # The paper's ranking; a flare-aware fusion (beyond the paper) is chosen
  # on the run's val_ids split afterwards: scripts/fusion.py --split val.
  config.model.fusion = "concat"
  config.dataset = "msvr310"
  config.dataset_config = ""
  return config
