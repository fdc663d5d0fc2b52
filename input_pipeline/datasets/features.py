"""The feature spec every FACENet TFDS builder shares, and the flare ratio.

Each example is one aligned triplet:
  rgb, ni, ti    uint8 (H, W, 3) images (single-channel NI/TI repeated to 3).
  pid            int64, the dataset's original vehicle id.
  camid          int64, 0-based camera index.
  sceneid        int64, scene index (MSVR310), -1 where the dataset has none.
  flare_ratio    float32 [2]: fraction of raw uint8 channel values in
                 [FLARE_PIXEL_LOW, 255] of the RGB and of the NI image.
  file           relative path of the sample (its RGB file, or its one file).
Builders may add features (synthetic_flare adds ground-truth flare masks).
"""

from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

# Pixel values at or above this count as saturated (docs/model.md: [250, 255]).
FLARE_PIXEL_LOW = 250
# The splits of every builder.
SPLITS = ("train", "query", "gallery")
# Validation query/gallery of identities disjoint from train and test, only in
# builders that generate them (synthetic_flare). The real datasets have none;
# for them a validation split is carved from train (input_pipeline.pipeline).
VAL_SPLITS = ("val_query", "val_gallery")


def flare_ratio(image: np.ndarray, pixel_low: int = FLARE_PIXEL_LOW) -> float:
  """Fraction of channel values of a raw uint8 image that are >= pixel_low.

  Args:
    image: uint8 array of any shape, the decoded image before any resizing.
    pixel_low: lowest value counted as saturated.

  Returns:
    A float in [0, 1].
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"flare_ratio needs a raw uint8 image, got {image.dtype}")
  return float(np.count_nonzero(image >= pixel_low)) / float(image.size)


def triplet_features(extra: Optional[dict] = None,
                     encoding_format: str = "jpeg") -> tfds.features.FeaturesDict:
  """The FeaturesDict of a triplet example.

  Args:
    extra: builder-specific features to add (e.g. ground-truth flare masks).
    encoding_format: "jpeg" (datasets distributed as JPEG: original bytes are
      stored as they are) or "png" (lossless, for generated or cropped images).

  Returns:
    The FeaturesDict.
  """
  spec = {
      "rgb": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
      "ni": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
      "ti": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
      "pid": np.int64,
      "camid": np.int64,
      "sceneid": np.int64,
      "flare_ratio": tfds.features.Tensor(shape=(2,), dtype=np.float32),
      "file": tfds.features.Text(),
  }
  spec.update(extra or {})
  return tfds.features.FeaturesDict(spec)
