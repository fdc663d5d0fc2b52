"""CPU-friendly demo on the generated synthetic_flare dataset.

A narrow ResNet18 per stream on 128x64 inputs, a few hundred steps: trains and
evaluates in minutes on a 2-core CPU.

  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet_demo
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "synthetic_flare"
  config.dataset_config = "small"
  config.input_size = (128, 64)
  config.model.backbone = "resnet18"
  config.model.width_multiplier = 0.25
  config.augment.pad = 5
  config.num_train_steps = 600
  config.log_every_steps = 25
  config.checkpoint_every_steps = 200
  config.eval_batch_size = 128
  return config
