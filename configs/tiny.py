"""The smallest configuration, for tests: tiny data, tiny model, a few steps.

  python scripts/main.py --config configs/tiny.py --workdir /tmp/facenet_tiny
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "synthetic_flare"
  config.dataset_config = "tiny"
  config.input_size = (64, 32)
  config.ids_per_batch = 4
  config.instances_per_id = 2
  config.eval_batch_size = 16
  config.augment.pad = 2
  # ResNet-10 (one block per stage): the ResNet code of the larger depths,
  # both kinds of block, at two thirds of ResNet-18's compile time.
  config.model.backbone = "resnet10"
  config.model.width_multiplier = 0.125
  config.model.fmi_attention_reduction = 4
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  return config
