"""Classical de-flare preprocessing: CLAHE on the flare-susceptible images.

The paper's Table 3 compares FACENet with a baseline whose RGB and NI inputs
are first enhanced by CLAHE (contrast-limited adaptive histogram
equalisation). We use scikit-image's implementation, which equalises the V
channel of HSV for colour images. CLAHE is a deterministic per-image transform,
so it is applied once to the encoded images of a split (`clahe_split`) or to a
raw uint8 batch at inference (`clahe_batch`), before resizing, exactly as a
camera-side enhancement would be. The flare pseudo-labels keep coming from the
raw images' stored flare_ratio: CLAHE changes what the network sees, not which
images count as flare-corrupted.
"""

import dataclasses
import io
import time
from typing import Sequence

from absl import logging
import numpy as np
from PIL import Image
from skimage import exposure

from facenet_jax.constants import FLARE_MODALITIES, MODALITIES

# skimage's default clip limit.
DEFAULT_CLIP_LIMIT = 0.01


def _check(clip_limit: float, modalities: Sequence[str]) -> None:
  if not 0 < clip_limit <= 1:
    raise ValueError(f"CLAHE clip_limit must be in (0, 1], got {clip_limit}")
  unknown = [m for m in modalities if m not in MODALITIES]
  if unknown:
    raise ValueError(f"CLAHE modalities {unknown} are not among {MODALITIES}")


def clahe(image: np.ndarray, clip_limit: float = DEFAULT_CLIP_LIMIT
          ) -> np.ndarray:
  """CLAHE of one uint8 image.

  Args:
    image: uint8 (H, W, 3) or (H, W).
    clip_limit: skimage's normalised clip limit in (0, 1].

  Returns:
    uint8 array of the same shape.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError("CLAHE needs a uint8 (H, W) or (H, W, 3) image, got "
                     f"{image.dtype} {image.shape}")
  _check(clip_limit, ())
  gray = image.ndim == 3 and np.all(image == image[..., :1])
  # A grey image stored as 3 equal channels (NI, TI) is equalised as grey, so
  # it stays grey; skimage's HSV path would do the same, at thrice the cost.
  source = image[..., 0] if gray else image
  out = exposure.equalize_adapthist(source, clip_limit=clip_limit)
  out = np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(out[..., None], 3, axis=-1) if gray else out


def _decode(encoded: bytes, where: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(encoded)) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # PIL raises several unrelated types.
    raise ValueError(f"cannot decode image {where}: {e}") from e


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def clahe_split(data, clip_limit: float = DEFAULT_CLIP_LIMIT,
                modalities: Sequence[str] = FLARE_MODALITIES):
  """A copy of a SplitData whose `modalities` images went through CLAHE.

  Args:
    data: pipeline.SplitData with encoded images.
    clip_limit: skimage's normalised clip limit in (0, 1].
    modalities: which images to enhance (the paper: RGB and NI).

  Returns:
    A new SplitData; enhanced images are re-encoded as PNG (lossless), every
    other field is unchanged.
  """
  _check(clip_limit, modalities)
  start = time.time()
  replaced = {}
  for m in modalities:
    images = getattr(data, m)
    out = np.empty_like(images)
    for i, encoded in enumerate(images):
      where = f"{m}[{i}] ({data.file[i]})"
      out[i] = _png(clahe(_decode(encoded, where), clip_limit))
    replaced[m] = out
  logging.info("CLAHE (clip %.3g) on %s of %d triplets in %.1fs.", clip_limit,
               "/".join(modalities), data.num_examples, time.time() - start)
  return dataclasses.replace(data, **replaced)


def clahe_batch(images: np.ndarray,
                clip_limit: float = DEFAULT_CLIP_LIMIT) -> np.ndarray:
  """CLAHE of every image of a uint8 (B, H, W, 3) batch."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"clahe_batch needs (B, H, W, 3), got {images.shape}")
  return np.stack([clahe(image, clip_limit) for image in images])
