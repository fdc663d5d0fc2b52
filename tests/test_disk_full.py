"""A disk that fills up while scripts/main.py trains.

WORKDIR/checkpoints is a 64 MiB tmpfs (a separate checkpoint volume). Once
the first checkpoint is on it, the rest of the volume is filled. The next
save must stop the run with one line naming the directory, the step and the
intact checkpoints, status 2; the checkpoint already there must restore.
Mounting needs root: elsewhere the test skips, saying so
(tests/test_train.py's CheckpointWriteTest simulates the error without it).
"""

import os
import re
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import jax
import numpy as np
import pytest

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax.train import train_state
import subprocess_env

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mount_tmpfs(path: str) -> str:
  """Mounts a 64 MiB tmpfs at `path`; returns why not ("" if mounted)."""
  if os.geteuid() != 0:
    return "mounting a tmpfs needs root"
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs",
                         path], capture_output=True, text=True, check=False)
  return "" if done.returncode == 0 else f"mount failed: {done.stderr}"


class DiskFullTest(absltest.TestCase):

  def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(self):
    workdir = tempfile.mkdtemp(prefix="disk_full_")
    volume = os.path.join(workdir, "volume")
    os.makedirs(volume)
    why_not = _mount_tmpfs(volume)
    if why_not:
      self.skipTest(why_not)
    self.addCleanup(subprocess.run, ["umount", volume], check=False)
    os.symlink(volume, os.path.join(workdir, "checkpoints"))
    data_dir = os.path.join(absltest.get_default_test_tmpdir(), "tfds")
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", "main.py"),
         "--config", os.path.join(ROOT, "configs", "tiny.py"),
         "--workdir", workdir, f"--config.data_dir={data_dir}",
         # The length of tests/test_interrupt.py's runs: the same programs
         # (the suite's compilation cache compiles them once per worker).
         # The disk is full within a step or two of the first checkpoint.
         "--config.num_train_steps=16", "--config.checkpoint_every_steps=3",
         "--config.log_every_steps=1"],
        env=subprocess_env.script_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not checkpointing.checkpoint_steps(workdir):
      if process.poll() is not None:
        self.fail(f"the run ended early: {process.communicate()}")
      self.assertLess(time.time(), deadline, "no checkpoint was written")
      time.sleep(0.1)
    with open(os.path.join(volume, "filler"), "wb") as f:
      with self.assertRaises(OSError):
        while True:
          f.write(b"\0" * (1 << 20))
          f.flush()
    out, err = process.communicate(timeout=600)

    self.assertEqual(process.returncode, 2, out[-3000:] + err[-3000:])
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    self.assertLen(lines, 1, err[-3000:])
    self.assertRegex(
        lines[0], rf"^error: Could not write the checkpoint of step \d+ to "
        rf"{re.escape(os.path.join(workdir, 'checkpoints'))} \(No space left "
        r"on device\); the checkpoints already there \[3\] are intact\. Free "
        "space or fix the permissions, then run the same command again")
    config = tiny.get_config()
    config.data_dir = data_dir
    _, state, _ = train_state.restore_for_eval(config, workdir)
    self.assertEqual(int(state.step), 3)
    self.assertTrue(all(np.all(np.isfinite(x))
                        for x in jax.tree.leaves(state.params)))


if __name__ == "__main__":
  absltest.main()
