"""SIGTERM (a scheduler's preemption) or SIGINT saves the current step and stops.

scripts/main.py on synthetic_flare/tiny: a run is sent SIGTERM once it has
logged a few steps. It must save the step it was in, print one line saying
where, exit with status 75, and on the same command again continue from that
step to the same parameters as a run that was never interrupted.

The finished run's last checkpoint is then damaged (a file cut short):
`--mode eval` says so in one line, and the same training command skips it,
resumes from the step saved at the signal and ends at the same parameters
again.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import jax
import numpy as np
import pytest

from facenet_jax import checkpointing
from facenet_jax import warm_start
from facenet_jax.train import loop
import run_fixtures
import subprocess_env

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The signal comes once step 3 is logged, a step or two before the run
# stops; 16 steps leave it ten more to spare.
STEPS = 16


def _command(workdir: str, data_dir: str) -> list[str]:
  return [sys.executable, os.path.join(ROOT, "scripts", "main.py"),
          "--config", os.path.join(ROOT, "configs", "tiny.py"),
          "--workdir", workdir, f"--config.data_dir={data_dir}",
          f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=1000"]


class InterruptTest(absltest.TestCase):

  def test_sigterm_saves_the_step_and_the_rerun_ends_identical(self):
    root = tempfile.mkdtemp(prefix="interrupt_")
    # The prepared synthetic_flare/tiny that the other test modules share.
    data_dir = os.path.join(absltest.get_default_test_tmpdir(), "tfds")
    env = subprocess_env.script_env()
    interrupted = os.path.join(root, "interrupted")
    process = subprocess.Popen(_command(interrupted, data_dir), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 600
    while (run_fixtures.logged_steps(interrupted) < 3
           and process.poll() is None):
      self.assertLess(time.time(), deadline, "the run logged no steps")
      time.sleep(0.2)
    # A second signal while the step is saved is logged and changes nothing.
    # It is sent once the first is logged: two signals pending together
    # reach Python's handlers in signal-number order, SIGINT first.
    process.send_signal(signal.SIGTERM)
    while ("SIGTERM received" not in run_fixtures.run_log(interrupted)
           and process.poll() is None):
      self.assertLess(time.time(), deadline, "SIGTERM was not logged")
      time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=600)
    self.assertEqual(process.returncode, loop.INTERRUPTED_STATUS,
                     out[-2000:] + err[-2000:])
    match = re.search(r"Stopped by SIGTERM at step (\d+): saved (\S+); run "
                      r"the same command again to continue from it\.", out)
    self.assertIsNotNone(match, out[-2000:])
    stopped = int(match.group(1))
    self.assertBetween(stopped, 3, STEPS - 1)
    self.assertEqual(match.group(2),
                     os.path.join(interrupted, "checkpoints", str(stopped)))
    self.assertTrue(os.path.isdir(match.group(2)))
    self.assertFalse(os.path.exists(os.path.join(interrupted,
                                                 "eval_results.json")))

    # The same command continues from the saved step to the end.
    done = subprocess.run(_command(interrupted, data_dir), env=env,
                          capture_output=True, text=True, timeout=900,
                          check=False)
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    self.assertIn(f"resumed from step {stopped}", done.stdout)

    uninterrupted = os.path.join(root, "uninterrupted")
    done = subprocess.run(_command(uninterrupted, data_dir), env=env,
                          capture_output=True, text=True, timeout=900,
                          check=False)
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    step_a, resumed = warm_start.read_variables(interrupted)
    step_b, straight = warm_start.read_variables(uninterrupted)
    self.assertEqual((step_a, step_b), (STEPS, STEPS))
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)

    # The last checkpoint cut short: evaluation names it ...
    last = os.path.join(interrupted, "checkpoints", str(STEPS))
    run_fixtures.truncate_largest_file(last)
    evaluated = subprocess.run(
        _command(interrupted, data_dir) + ["--mode", "eval"], env=env,
        capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(evaluated.returncode, 2, evaluated.stderr[-2000:])
    self.assertRegex(evaluated.stderr + evaluated.stdout,
                     rf"checkpoints/{STEPS} is damaged and cannot be read .*"
                     rf"pass --step {stopped}")
    # ... and training skips it, keeps it aside and ends the same again.
    redone = subprocess.run(_command(interrupted, data_dir), env=env,
                            capture_output=True, text=True, timeout=900,
                            check=False)
    self.assertEqual(redone.returncode, 0, redone.stderr[-2000:])
    self.assertIn(f"the checkpoint of step {STEPS} is damaged", redone.stdout)
    self.assertIn(f"resumed from step {stopped}", redone.stdout)
    self.assertTrue(os.path.isdir(os.path.join(
        interrupted, checkpointing.DAMAGED_DIRECTORY, str(STEPS))))
    _, again = warm_start.read_variables(interrupted)
    jax.tree.map(np.testing.assert_array_equal, again, straight)


if __name__ == "__main__":
  absltest.main()
