"""Test-wide settings: a test directory per pytest-xdist worker, 8 fake CPU
devices for JAX (runs use one unless a test names more), quicker XLA
compiles (tests/subprocess_env.py), TensorFlow kept small.

This runs before any test module imports JAX, so the XLA flag takes effect.
"""

import atexit
import os
import shutil
import tempfile

# Each pytest-xdist worker (setup.cfg runs two) gets a test directory of its
# own: the tests keep prepared datasets and runs there under fixed names,
# and two workers preparing the same dataset at once would collide when
# TFDS moves its finished build into place.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_BASE = os.environ.get("TEST_TMPDIR") or os.path.join(tempfile.gettempdir(),
                                                     "absl_testing")
if _WORKER and os.path.basename(_BASE) != _WORKER:
  _BASE = os.path.join(_BASE, _WORKER)
os.environ["TEST_TMPDIR"] = _BASE
os.makedirs(_BASE, exist_ok=True)

# Everything else a test process (or a script it starts) puts in a temporary
# directory, the tests' own mkdtemp()s and TensorFlow Datasets' included,
# goes to one directory per process that is removed when the process ends.
_SESSION_TMP = tempfile.mkdtemp(prefix="facenet_jax_tests_")
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
tempfile.tempdir = _SESSION_TMP
os.environ["TMPDIR"] = _SESSION_TMP

# One directory for the whole run, shared by the xdist workers (they inherit
# the variable from the process that starts them, which creates it inside its
# own temporary directory): what several test files can share, made once by
# the first file that needs it (tests/run_fixtures.py's SHARED_ENV, behind a
# file lock).
if "FACENET_JAX_TEST_SHARED" not in os.environ:
  os.environ["FACENET_JAX_TEST_SHARED"] = os.path.join(_SESSION_TMP, "shared")
  os.makedirs(os.environ["FACENET_JAX_TEST_SHARED"])

import subprocess_env  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=8").strip()
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + subprocess_env.COMPILE_FLAGS

# XLA compiles dominate this suite on small CPUs. Tests build the same tiny
# programs many times (every train_and_evaluate makes new jit wrappers, and
# every script a test starts compiles its programs afresh), so one persistent
# compilation cache for the run, read and written by both xdist workers and
# the scripts they start (they inherit these variables), compiles each
# program once. JAX takes no lock on it (it locks only a cache with a size
# limit, and then lists the whole directory at every write): an entry read
# while another process is still writing it cannot be read, and JAX then
# warns and compiles the program (jax._src.compiler._cache_read). Two
# limits, both from JAX's cache keys on a CPU: a test process (8 fake
# devices) and a script (one device) never share an entry, because the key
# holds the client's device topology; and in a two-process run, process 1
# never hits, because its topology differs from process 0's, which alone
# writes the cache.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    os.environ["FACENET_JAX_TEST_SHARED"], "xla_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import input_pipeline  # noqa: E402,F401  (configures TensorFlow)
import jax  # noqa: E402
import pytest  # noqa: E402

from facenet_jax.train import mesh  # noqa: E402

# The 8 fake devices are for the tests of data parallelism, which name the
# devices they use (mesh.Sharding.create(jax.devices()[:n])): the train
# step in tests/test_train.py, the evaluation in tests/test_end_to_end.py.
# Every other run in a test process (train_and_evaluate, its evaluation)
# gets one device, as on a user's CPU and as in the scripts the tests start
# (subprocess_env.script_env): 8 partitions of a tiny batch on two cores
# took the ViT end-to-end test 42-45 s instead of 28-32 s.
_create_sharding = mesh.Sharding.create.__func__


def _first_device_by_default(cls, devices=None):
  return _create_sharding(cls, jax.devices()[:1] if devices is None
                          else devices)


mesh.Sharding.create = classmethod(_first_device_by_default)


# The slowest test files (about 0.5 to 2.5 minutes each here, measured with
# --durations), started first: pytest-xdist hands each worker whole files in
# collection order (setup.cfg keeps that order), so a slow file collected
# last would leave one worker running alone at the end.
_SLOW_FIRST = ("test_peers.py", "test_experiments.py", "test_model.py",
               "test_warm_start.py", "test_interrupt.py", "test_vit.py",
               "test_missing_modality.py", "test_multiprocess.py",
               "test_benchmarks.py", "test_end_to_end.py", "test_export.py",
               "test_train.py", "test_mask_learning.py", "test_visualize.py",
               "test_disk_full.py", "test_damaged_checkpoint.py",
               "test_console.py", "test_rendered_flare.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# .ci/run installs the optional extras after the README's bare test command
# and runs the tests marked `extras` with this variable set: there a skip of
# such a test (a package that did not install) is a failure, not a skip.
_REQUIRE_EXTRAS = "FACENET_JAX_REQUIRE_EXTRAS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del call
  outcome = yield
  report = outcome.get_result()
  if (os.environ.get(_REQUIRE_EXTRAS) and report.skipped
      and item.get_closest_marker("extras") is not None):
    report.outcome = "failed"
    report.longrepr = (f"{item.nodeid}: skipped although {_REQUIRE_EXTRAS} "
                       "asks for every extras test to run: "
                       f"{report.longrepr}")
