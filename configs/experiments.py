"""The paper-experiment study on synthetic_flare (issue 6, docs/results.md).

The demo recipe of configs/synthetic.py (narrow ResNet18 streams, lr 1e-3,
cosine with 1/8 of the run as warmup) at 96x48 inputs for 426 steps (6 epochs
of the `small` split), so that 12 variants x 3 seeds fit in the 2.5-hour
budget on a 2-core CPU. 96x48 is the cheapest size measured here: a training
step takes about 0.32 s against 0.53 s at 128x64 and, oddly, 0.59 s at 64x32.
With num_train_steps set, the schedule keeps its shape: warmup and decay are
scaled to the same fractions of the run. scripts/experiments.py applies each
table's variant on top of this.

  python scripts/experiments.py --config configs/experiments.py \
      --workdir /tmp/facenet_study
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.input_size = (96, 48)
  config.augment.pad = 4
  config.num_train_steps = 426
  config.log_every_steps = 71
  config.checkpoint_every_steps = 142
  config.keep_checkpoints = 1
  return config
