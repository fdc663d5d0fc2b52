"""Two JAX processes (4 CPU devices each) train like one process with 8.

This exercises the multi-host path for real: jax.distributed, each process
feeding its whole P x K groups through make_array_from_process_local_data,
cross-process BatchNorm statistics and gradient reduction, and fetching
replicated metrics on every host.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest
import jax
import numpy as np

from facenet_jax.train import mesh

sys.path.insert(0, os.path.dirname(__file__))
import multiprocess_worker  # noqa: E402  pylint: disable=g-import-not-at-top
import subprocess_env

# Trains runs, starts scripts or compiles the tiny model: left out of the
# quick loop (-m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



class MultiProcessTest(absltest.TestCase):

  def test_two_processes_match_one(self):
    config = multiprocess_worker.worker_config()
    reference = multiprocess_worker.two_steps(
        config, mesh.Sharding.create(jax.devices()[:8]),
        multiprocess_worker.make_batches(config))

    output = os.path.join(tempfile.mkdtemp(), "result.json")
    port = subprocess_env.free_port()
    env = subprocess_env.script_env()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    workers = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"),
         str(i), str(port), output], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for worker in workers:
      try:
        logs.append(worker.communicate(timeout=600)[0])
      except subprocess.TimeoutExpired:
        for w in workers:
          w.kill()
        self.fail("multi-process workers did not finish in 600 s")
    for worker, log in zip(workers, logs):
      self.assertEqual(worker.returncode, 0, msg=log[-3000:])
    with open(output) as f:
      result = json.load(f)

    self.assertEqual(result["devices"], 8)
    np.testing.assert_allclose(result["losses"], reference["losses"],
                               rtol=1e-5)
    self.assertAlmostEqual(result["checksum"], reference["checksum"],
                           delta=1e-6 * reference["checksum"])


if __name__ == "__main__":
  absltest.main()
