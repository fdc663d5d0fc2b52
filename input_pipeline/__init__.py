"""tf.data input pipelines and TFDS builders for FACENet.

TensorFlow is used here for tf.data/TFDS only: importing this package hides
every GPU from TensorFlow (JAX owns the accelerators) and caps its threads.
"""

from input_pipeline import tf_setup

tf_setup.configure_tensorflow()
