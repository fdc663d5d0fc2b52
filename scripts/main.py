"""Entry point: train then evaluate, evaluate a checkpoint, or draw pictures.

  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet
  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet \
      --mode eval [--step 500]
  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet \
      --mode eval --config.eval.missing=all    # missing-modality table
  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet \
      --mode visualize    # pictures in WORKDIR/figures (scripts/visualize.py)

Any config field can be overridden, e.g. --config.num_train_steps=200.
The console shows a short header, progress bars and the results; the full log
goes to WORKDIR/log.txt (--verbosity=1 shows it on the console too). A user
error (config typo, unknown backbone, missing dataset, checkpoint/config
mismatch, non-finite loss) prints one line and exits with status 2; its
traceback is in log.txt (and on the console with --verbosity=1).
Multi-process (several hosts, or several GPUs with one process each): start the
same command on every process with JAX's coordinator settings in the
environment (see README, "Several GPUs or hosts"); jax.distributed.initialize()
is called when they are present. If a process is lost, the others stop within
--peer_timeout seconds with one line saying so and exit with status 76; the
same command on every process resumes from the last checkpoint
(docs/training.md, "Faults").
"""

import os
import sys

# The repository root, so that `configs` and the packages import from a clone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facenet_jax import console as console_lib  # noqa: E402  (no JAX, no TF)

with console_lib.quiet_imports() as _STARTUP:
  from absl import app  # noqa: E402
  from absl import flags  # noqa: E402
  from absl import logging  # noqa: E402
  from ml_collections import config_flags  # noqa: E402
  import jax  # noqa: E402
  import input_pipeline  # noqa: E402,F401  (hides GPUs from TensorFlow)
  from facenet_jax import checkpointing  # noqa: E402
  from facenet_jax import peers  # noqa: E402
  from facenet_jax.train import evaluate  # noqa: E402
  from facenet_jax.train import loop  # noqa: E402
  from facenet_jax import visualize  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Configuration file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "visualize"],
                          "train: train (resuming) then evaluate; "
                          "eval: evaluate a checkpoint of the workdir; "
                          "visualize: its pictures in WORKDIR/figures "
                          "(scripts/visualize.py has the options).")
_STEP = flags.DEFINE_integer("step", None,
                             "--mode eval/visualize: checkpoint step "
                             "(default latest).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process: host:port of process 0 (or set JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-process: index of this process.")
_PEER_TIMEOUT = flags.DEFINE_integer(
    "peer_timeout", peers.DEFAULT_TIMEOUT,
    "Multi-process: seconds without a sign of life from another process "
    "before this one stops (exit status 76) instead of waiting for it.")
flags.mark_flags_as_required(["config", "workdir"])

# Launchers whose environment jax.distributed.initialize() reads by itself.
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _multi_process() -> bool:
  if _COORDINATOR.value or "JAX_COORDINATOR_ADDRESS" in os.environ:
    return True
  return any(int(os.environ.get(k, "1")) > 1 for k in _CLUSTER_SIZE_ENV)


def _where(workdir: str, results: str, log_file: str) -> str:
  return "\n".join([
      f"results      {results}",
      f"checkpoints  {os.path.join(workdir, 'checkpoints')}",
      f"log          {log_file}",
      f"TensorBoard  tensorboard --logdir {workdir}",
  ])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with console_lib.session(_WORKDIR.value, _STARTUP) as log_file:
    if _multi_process():
      peers.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                       _PROCESS_ID.value, _PEER_TIMEOUT.value)
    with peers.PeerWatch(_PEER_TIMEOUT.value, _lost_peer_line):
      _run(log_file)


def _lost_peer_line(lost: str) -> str:
  """The line a process prints when it stops because a peer was lost."""
  steps = checkpointing.checkpoint_steps(_WORKDIR.value)
  where = os.path.join(_WORKDIR.value, "checkpoints")
  resume = (f"resume from step {steps[-1]} in {where}" if steps else
            "start again (no checkpoint was saved yet)")
  return (f"error: {lost}; stopping this process too (status "
          f"{peers.LOST_PEER_STATUS}). Run the same command on all "
          f"{jax.process_count()} processes again to {resume}.")


def _run(log_file: str) -> None:
  """The work of one process, after the multi-process start."""
  logging.info("JAX process %d of %d; %d local of %d devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  console = console_lib.Console(enabled=jax.process_index() == 0)
  config = _CONFIG.value
  if _MODE.value == "visualize":
    written = visualize.visualize_run(config, _WORKDIR.value, _STEP.value,
                                      console=console)
    console.print("")
    console.print(visualize.where(written, log_file))
    return
  if _MODE.value == "train":
    try:
      loop.train_and_evaluate(config, _WORKDIR.value, console)
    except loop.Interrupted as e:
      console.print("")
      console.print(str(e))
      sys.exit(loop.INTERRUPTED_STATUS)
  else:
    evaluate.evaluate_checkpoint(config, _WORKDIR.value, _STEP.value, console)
  console.print("")
  console.print(_where(_WORKDIR.value,
                       evaluate.results_path(config, _WORKDIR.value), log_file))


if __name__ == "__main__":
  app.run(main, flags_parser=console_lib.parse_flags)
