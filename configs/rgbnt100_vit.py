"""FACENet on RGBNT100 with the official code's ViT-B/16 streams and recipe.

See configs/wmveid863_vit.py for the recipe and the source of each value;
only the dataset's own values differ.

  python scripts/main.py --config configs/rgbnt100_vit.py \
      --workdir /runs/rgbnt100_vit --config.manual_dir=/data/RGBNT100 \
      --config.model.pretrained=/weights/jx_vit_base_p16_224-80ecf9dd.pth
"""

from configs import paper
from configs import wmveid863_vit


def get_config():
  config = paper.get_config()
  config.dataset = "rgbnt100"
  config.dataset_config = ""
  # Official code, RGBNT100: base lr 0.001, 120 epochs, 10 warmup, input
  # 128 x 256 (H x W, the images' own aspect; an 8 x 16 token grid).
  return wmveid863_vit.apply_official_vit_recipe(
      config, learning_rate=0.001, warmup_epochs=10, num_epochs=120,
      input_size=(128, 256))
