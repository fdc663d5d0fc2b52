"""TFDS builders of FACENet's datasets; importing this package registers them.

  wmveid863, msvr310, rgbnt100   manual-download builders of the real datasets
  synthetic_flare                the generated default (configs tiny/small/large)
"""

from input_pipeline.datasets import msvr310
from input_pipeline.datasets import rgbnt100
from input_pipeline.datasets import synthetic_flare
from input_pipeline.datasets import wmveid863

__all__ = ["msvr310", "rgbnt100", "synthetic_flare", "wmveid863"]
