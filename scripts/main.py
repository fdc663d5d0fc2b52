"""Entry point: train then evaluate, or evaluate a checkpoint.

  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet
  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet \
      --mode eval [--step 500]

Any config field can be overridden, e.g. --config.num_train_steps=200.
Multi-process (several hosts, or several GPUs with one process each): start the
same command on every process with JAX's coordinator settings in the
environment (see README, "Several GPUs or hosts"); jax.distributed.initialize()
is called when they are present.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# The repository root, so that `configs` and the packages import from a clone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import input_pipeline  # noqa: E402,F401  (hides GPUs from TensorFlow)
from facenet_jax import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Configuration file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (resuming) then evaluate; "
                          "eval: evaluate a checkpoint of the workdir.")
_STEP = flags.DEFINE_integer("step", None,
                             "--mode eval: checkpoint step (default latest).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process: host:port of process 0 (or set JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-process: index of this process.")
flags.mark_flags_as_required(["config", "workdir"])

# Launchers whose environment jax.distributed.initialize() reads by itself.
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _multi_process() -> bool:
  if _COORDINATOR.value or "JAX_COORDINATOR_ADDRESS" in os.environ:
    return True
  return any(int(os.environ.get(k, "1")) > 1 for k in _CLUSTER_SIZE_ENV)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _multi_process():
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  logging.info("JAX process %d of %d; %d local of %d devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  config = _CONFIG.value
  if _MODE.value == "train":
    train.train_and_evaluate(config, _WORKDIR.value)
  else:
    train.evaluate_checkpoint(config, _WORKDIR.value, _STEP.value)


if __name__ == "__main__":
  app.run(main)
