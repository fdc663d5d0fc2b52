"""FACENet on MSVR310 with the official code's ViT-B/16 streams and recipe.

See configs/wmveid863_vit.py for the recipe and the source of each value;
only the dataset's own values differ. Evaluated with the same-scene protocol.

  python scripts/main.py --config configs/msvr310_vit.py \
      --workdir /runs/msvr310_vit --config.manual_dir=/data/MSVR310 \
      --config.model.pretrained=/weights/jx_vit_base_p16_224-80ecf9dd.pth
"""

from configs import paper
from configs import wmveid863_vit


def get_config():
  config = paper.get_config()
  config.dataset = "msvr310"
  config.dataset_config = ""
  # Official code, MSVR310: base lr 0.001, 1000 epochs, 100 warmup, input
  # 128 x 256 (H x W; an 8 x 16 token grid).
  return wmveid863_vit.apply_official_vit_recipe(
      config, learning_rate=0.001, warmup_epochs=100, num_epochs=1000,
      input_size=(128, 256))
