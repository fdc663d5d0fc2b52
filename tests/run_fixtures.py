"""Workdirs as scripts/main.py leaves them, for tests of what reads one.

make_run: a FACENet of the given config with seeded random weights and
BatchNorm running statistics (so the eval-mode BatchNorm is no identity),
saved through the Checkpointer with its config.json and run_info.json: what a
trained workdir holds, without training (export, pictures).

trained_tiny_run: a copy of configs/tiny.py trained by train_and_evaluate,
once per test session for every file that asks for it.
"""

import fcntl
import io
import os
import re
import shutil
import tempfile

import jax
import numpy as np

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import console
from facenet_jax.train import loop
from facenet_jax.train import train_state

NUM_CLASSES = 4
# The directory tests/conftest.py shares between the xdist workers.
SHARED_ENV = "FACENET_JAX_TEST_SHARED"


def random_state(config, seed: int,
                 num_classes: int = NUM_CLASSES) -> train_state.TrainState:
  """A host TrainState of seeded noise, from shapes only (no eager init).

  Kernels ~ N(0, 1 / fan_in) keep activations of order one through the
  network; BatchNorm variances in [1, 1.5], means, biases and mask
  thresholds ~ N(0, 0.1).
  """
  _, optimizer, abstract = train_state.abstract_state(config, num_classes,
                                                steps_per_epoch=2)
  rng = np.random.default_rng(seed)

  def noise(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if name.endswith("kernel"):
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])),
                         leaf.shape)
    elif name.endswith("var"):
      value = rng.uniform(1.0, 1.5, leaf.shape)
    elif name.endswith("scale"):
      value = 1.0 + rng.normal(0.0, 0.1, leaf.shape)
    else:
      value = rng.normal(0.0, 0.1, leaf.shape)
    return value.astype(leaf.dtype)

  params = jax.tree_util.tree_map_with_path(noise, abstract.params)
  return train_state.TrainState(
      step=np.zeros((), np.int32), params=params,
      batch_stats=jax.tree_util.tree_map_with_path(noise,
                                                   abstract.batch_stats),
      opt_state=optimizer.init(params))


def make_run(workdir: str, config, step: int = 2,
             num_classes: int = NUM_CLASSES) -> None:
  """A workdir as scripts/main.py leaves it: config, run info, checkpoint."""
  checkpointing.check_config(workdir, config, has_state=False)
  checkpointing.write_run_info(workdir, num_classes=num_classes,
                               steps_per_epoch=2)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save(step, random_state(config, seed=step, num_classes=num_classes))
  ckpt.close()


def largest_file(directory: str) -> str:
  """The largest file below `directory` (a checkpoint's array data)."""
  files = [os.path.join(root, name)
           for root, _, names in os.walk(directory) for name in names]
  return max(files, key=os.path.getsize)


def truncate_largest_file(directory: str) -> None:
  """Cuts the largest file below `directory` to half: a copy cut short."""
  path = largest_file(directory)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def run_log(workdir: str, since: int = 0) -> str:
  """WORKDIR/log.txt from byte `since` on ('' before the run writes it)."""
  try:
    with open(os.path.join(workdir, console.LOG_FILE)) as f:
      f.seek(since)
      return f.read()
  except FileNotFoundError:
    return ""


def logged_steps(workdir: str, since: int = 0) -> int:
  """The last step whose metrics a run logged after byte `since` (0: none)."""
  found = re.findall(r"\[(\d+)\] train/", run_log(workdir, since))
  return max((int(s) for s in found), default=0)


def trained_tiny_run(workdir: str, data_dir: str) -> str:
  """A copy at `workdir` of configs/tiny.py trained on `data_dir` (4 steps,
  checkpoints at 2 and 4, evaluated); returns the console's plain lines.

  The run is trained once per test session, in the directory SHARED_ENV
  names (tests/conftest.py shares it between the xdist workers); a file
  lock makes a second worker wait for the first instead of training it
  again. Each caller gets its own copy to change. (The copies record the
  data_dir of the process that trained; configs ignore where the data is.)
  """
  shared = os.environ.get(SHARED_ENV)
  if not shared:
    # A test file run by itself, without tests/conftest.py: this process's.
    shared = tempfile.mkdtemp(prefix="facenet_jax_shared_")
    os.environ[SHARED_ENV] = shared
  source = os.path.join(shared, "tiny_run")
  printed = os.path.join(shared, "tiny_run_console.txt")
  # Held until the file is closed (or its process ends).
  with open(os.path.join(shared, "tiny_run.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(printed):
      shutil.rmtree(source, ignore_errors=True)
      config = tiny.get_config()
      config.data_dir = data_dir
      out = io.StringIO()
      # What a person would see, as plain lines (not a terminal), one per
      # step.
      loop.train_and_evaluate(config, source,
                              console.Console(out, live=False, interval=0.0))
      with open(printed + ".tmp", "w") as f:
        f.write(out.getvalue())
      os.replace(printed + ".tmp", printed)
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(source, workdir)
  with open(printed) as f:
    return f.read()
