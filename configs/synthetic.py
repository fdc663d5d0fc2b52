"""CPU-friendly demo on the generated synthetic_flare dataset.

A narrow ResNet18 per stream on 128x64 inputs for 8 epochs of the `small`
split (about 570 steps): trains and evaluates in under 10 minutes on a 2-core
CPU. A short run from random initialisation needs a higher learning rate than
the paper's ImageNet-initialised 120 epochs, and a cosine decay that does not
spend most of the run at 1/10 or 1/100 of it.

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
  config.num_epochs = 8
  config.num_train_steps = -1
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_epochs = 1
  config.log_every_steps = 25
  config.checkpoint_every_steps = 200
  config.eval_batch_size = 128
  return config
