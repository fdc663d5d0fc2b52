"""Keeps TensorFlow off the accelerators and within a small thread budget."""

import os

_configured = False


def configure_tensorflow(num_threads: int = 0) -> None:
  """Hides GPUs/TPUs from TensorFlow and caps its thread pools.

  Safe to call more than once; only the first call has an effect.

  Args:
    num_threads: intra- and inter-op threads for TensorFlow; 0 reads the
      FACENET_TF_THREADS environment variable (default 2).
  """
  global _configured
  if _configured:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  num_threads = num_threads or int(os.environ.get("FACENET_TF_THREADS", "2"))
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    pass  # Devices were already initialised or there is no such device type.
  try:
    tf.config.threading.set_intra_op_parallelism_threads(num_threads)
    tf.config.threading.set_inter_op_parallelism_threads(num_threads)
  except RuntimeError:
    pass  # TensorFlow's context already started; its thread pools are fixed.
  _configured = True
