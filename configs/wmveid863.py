"""FACENet on WMVeID863 (the paper's dataset), paper recipe.

Point manual_dir at the dataset root ({train,query,test}/<vid>/{vis,ni,th}/):
  python scripts/main.py --config configs/wmveid863.py --workdir /runs/wmveid863 \
      --config.manual_dir=/data/WMVeID863 \
      --config.model.pretrained=/weights/resnet50.safetensors
"""

from configs import default


def get_config():
  config = default.get_config()
  # The paper's ranking; a flare-aware fusion (beyond the paper) is chosen
  # on the run's val_ids split afterwards: scripts/fusion.py --split val.
  config.model.fusion = "concat"
  config.dataset = "wmveid863"
  config.dataset_config = ""
  return config
