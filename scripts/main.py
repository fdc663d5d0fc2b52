"""Entry point: train then evaluate, or evaluate a checkpoint.

  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet
  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet \
      --mode eval [--step 500]
  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet \
      --mode eval --config.eval.missing=all    # missing-modality table

Any config field can be overridden, e.g. --config.num_train_steps=200.
The console shows a short header, progress bars and the results; the full log
goes to WORKDIR/log.txt (--verbosity=1 shows it on the console too). A user
error (config typo, unknown backbone, missing dataset, checkpoint/config
mismatch, non-finite loss) prints one line and exits with status 2; its
traceback is in log.txt (and on the console with --verbosity=1).
Multi-process (several hosts, or several GPUs with one process each): start the
same command on every process with JAX's coordinator settings in the
environment (see README, "Several GPUs or hosts"); jax.distributed.initialize()
is called when they are present.
"""

import ast
import os
import sys
import tempfile


class _NativeStartupLines:
  """Holds back what C++ libraries write to fd 2 while they are imported.

  TensorFlow prints start-up lines (oneDNN, absl::InitializeLog) that no
  environment variable silences; below --verbosity=1 they go to log.txt
  (`text`) instead of the console. If the imports fail, they are printed.
  """

  def __init__(self, active: bool):
    self.active = active
    self.text = ""

  def __enter__(self):
    if self.active:
      sys.stderr.flush()
      self._file = tempfile.TemporaryFile()
      self._saved = os.dup(2)
      os.dup2(self._file.fileno(), 2)
    return self

  def __exit__(self, exc_type, *_):
    if self.active:
      sys.stderr.flush()
      os.dup2(self._saved, 2)
      os.close(self._saved)
      self._file.seek(0)
      self.text = self._file.read().decode("utf-8", "replace")
      self._file.close()
      if exc_type is not None:
        sys.stderr.write(self.text)


_VERBOSE = any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:])
if not _VERBOSE:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# The repository root, so that `configs` and the packages import from a clone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with _NativeStartupLines(active=not _VERBOSE) as _STARTUP:
  import jax  # noqa: E402
  import input_pipeline  # noqa: E402,F401  (hides GPUs from TensorFlow)
  from facenet_jax import console as console_lib  # noqa: E402
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


# Errors that mean "the input is wrong", not "the code is": bad config values,
# datasets, checkpoints (ValueError and its subclasses), a missing file, a
# training that diverged. Shown as one line with exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
USER_ERROR_STATUS = 2


def _one_line(error: BaseException) -> str:
  text = str(error)
  # ml_collections re-raises a KeyError's repr ("'\\'field\\'\\nDid you
  # mean ...'"): unquote it.
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return "; ".join(lines) or type(error).__name__


def _user_error(message: str, log_file: str = "") -> None:
  where = f" (traceback in {log_file})" if log_file else ""
  print(f"error: {message}{where}", file=sys.stderr)
  sys.exit(USER_ERROR_STATUS)


def _parse_flags(argv):
  """absl's flag parsing, but a bad flag or config override is one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _user_error(f"{e}. Try --helpfull.")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # ml_collections raises these for a --config.* value it cannot apply.
    _user_error(f"bad config override: {_one_line(e)}")


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
  verbosity = flags.FLAGS.verbosity
  log_file = console_lib.route_logs(_WORKDIR.value, verbosity)
  if _STARTUP.text.strip():
    logging.info("Start-up output of native libraries:\n%s",
                 _STARTUP.text.rstrip())
  try:
    if _multi_process():
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                 _PROCESS_ID.value)
    logging.info("JAX process %d of %d; %d local of %d devices (%s)",
                 jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    console = console_lib.Console(enabled=jax.process_index() == 0)
    config = _CONFIG.value
    if _MODE.value == "train":
      train.train_and_evaluate(config, _WORKDIR.value, console)
    else:
      train.evaluate_checkpoint(config, _WORKDIR.value, _STEP.value, console)
    console.print("")
    console.print(_where(_WORKDIR.value,
                         train.results_path(config, _WORKDIR.value), log_file))
  except USER_ERRORS as e:
    # The traceback goes to log.txt only (INFO stays off the console).
    logging.info("Stopped by a user error", exc_info=True)
    if verbosity >= 1:
      raise
    _user_error(_one_line(e), log_file)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
