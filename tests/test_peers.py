"""A two-process run (jax.distributed, Gloo on the CPU) whose processes fail.

scripts/main.py on synthetic_flare/tiny, one CPU device per process, started
three times on one workdir:
  1. Process 1 is killed (SIGKILL) mid-training: process 0 stops within the
     peer timeout with one line naming the lost process and the step to
     resume from, and exit status 76.
  2. The same command on both processes resumes from that step. Process 1
     alone gets SIGTERM: both agree on one step, save it and exit with 75.
  3. The same command again resumes from that step; the coordinator
     (process 0) is killed: JAX ends process 1 at once (its own message).
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import pytest

from facenet_jax import checkpointing
from facenet_jax import peers
from facenet_jax.train import loop
import run_fixtures
import subprocess_env

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_TIMEOUT = 20
# Startup (imports, compile) on a loaded 2-core machine, before a step logs.
START_TIMEOUT = 600


class _Pair:
  """Both processes of one start of the run."""

  def __init__(self, workdir: str, data_dir: str):
    self.workdir = workdir
    try:
      self.log_start = os.path.getsize(os.path.join(workdir, "log.txt"))
    except FileNotFoundError:
      self.log_start = 0
    port = subprocess_env.free_port()
    env = subprocess_env.script_env()
    self.processes = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", "main.py"),
         "--config", os.path.join(ROOT, "configs", "tiny.py"),
         "--workdir", workdir, f"--config.data_dir={data_dir}",
         "--config.num_train_steps=1000", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=2",
         f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={i}", f"--peer_timeout={PEER_TIMEOUT}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]

  def wait_for_step(self, test: absltest.TestCase, step: int,
                    checkpoint: int = 0) -> None:
    """Until `step` is logged and a checkpoint at or after `checkpoint` is on
    disk (a save in flight is finished by both processes together)."""
    deadline = time.time() + START_TIMEOUT
    while (run_fixtures.logged_steps(self.workdir, self.log_start) < step or
           max(checkpointing.checkpoint_steps(self.workdir), default=0)
           < checkpoint):
      for p in self.processes:
        if p.poll() is not None:
          test.fail(f"a process ended early: {p.communicate()}")
      test.assertLess(time.time(), deadline, "no training step was logged")
      time.sleep(0.2)

  def finish(self, index: int, timeout: float) -> tuple[int, str, float]:
    """(status, stdout + stderr, seconds waited) of one process."""
    start = time.time()
    out, err = self.processes[index].communicate(timeout=timeout)
    return self.processes[index].returncode, out + err, time.time() - start


class LostPeerTest(absltest.TestCase):

  def test_a_lost_peer_stops_the_others_and_both_resume(self):
    workdir = os.path.join(tempfile.mkdtemp(prefix="peers_"), "run")
    # The prepared synthetic_flare/tiny that the other test modules share.
    data_dir = os.path.join(absltest.get_default_test_tmpdir(), "tfds")

    # 1. A worker lost mid-training.
    pair = _Pair(workdir, data_dir)
    pair.wait_for_step(self, 3, checkpoint=2)
    pair.processes[1].kill()
    pair.finish(1, 60)
    status, out, waited = pair.finish(0, PEER_TIMEOUT + 60)
    self.assertEqual(status, peers.LOST_PEER_STATUS, out[-3000:])
    self.assertLess(waited, PEER_TIMEOUT + 30)
    match = re.search(
        rf"error: process 1 of 2 stopped responding \(no heartbeat for "
        rf"{PEER_TIMEOUT} s\); stopping this process too \(status 76\)\. Run "
        r"the same command on all 2 processes again to resume from step "
        rf"(\d+) in {re.escape(workdir)}/checkpoints\.", out)
    self.assertIsNotNone(match, out[-3000:])
    saved = int(match.group(1))
    self.assertEqual(checkpointing.checkpoint_steps(workdir)[-1], saved)
    self.assertNotIn("Traceback", out)

    # 2. Both again: they resume from it. A SIGTERM to process 1 alone
    # stops both at one step, saved.
    pair = _Pair(workdir, data_dir)
    pair.wait_for_step(self, saved + 2)
    pair.processes[1].send_signal(signal.SIGTERM)
    results = [pair.finish(i, 300) for i in range(2)]
    self.assertEqual([r[0] for r in results],
                     [loop.INTERRUPTED_STATUS] * 2, results[0][1][-3000:])
    self.assertIn(f"resumed from step {saved}", results[0][1])
    match = re.search(r"Stopped by (SIGTERM|a signal to another process) at "
                      r"step (\d+)", results[0][1])
    self.assertIsNotNone(match, results[0][1][-3000:])
    stopped = int(match.group(2))
    self.assertGreater(stopped, saved)
    self.assertEqual(checkpointing.checkpoint_steps(workdir)[-1], stopped)

    # 3. Both again; the coordinator lost: JAX ends the other at once.
    pair = _Pair(workdir, data_dir)
    pair.wait_for_step(self, stopped + 1)
    pair.processes[0].kill()
    pair.finish(0, 60)
    status, out, waited = pair.finish(1, PEER_TIMEOUT + 60)
    self.assertNotEqual(status, 0)
    self.assertLess(waited, PEER_TIMEOUT + 30)
    self.assertIn("another task died", out)


if __name__ == "__main__":
  absltest.main()
