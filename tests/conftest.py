"""Test-wide settings: 8 fake CPU devices for JAX, TensorFlow kept small.

This runs before any test module imports JAX, so the XLA flag takes effect.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=8").strip()

import input_pipeline  # noqa: E402,F401  (configures TensorFlow)
