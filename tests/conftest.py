"""Test-wide settings: 8 fake CPU devices for JAX, quicker XLA compiles
(tests/subprocess_env.py), TensorFlow kept small.

This runs before any test module imports JAX, so the XLA flag takes effect.
"""

import os

import subprocess_env

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=8").strip()
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + subprocess_env.COMPILE_FLAGS

import input_pipeline  # noqa: E402,F401  (configures TensorFlow)

import tempfile  # noqa: E402

import jax  # noqa: E402

# XLA compiles dominate this suite on small CPUs. Tests build the same tiny
# programs many times (every train_and_evaluate makes new jit wrappers), so a
# session-wide persistent compilation cache compiles each program once.
jax.config.update("jax_compilation_cache_dir",
                  tempfile.mkdtemp(prefix="facenet_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
