"""Preprocessing ops acting on a whole triplet example dict (big_vision style).

Every op is built by a factory, `op = factory(...)`, and maps an example dict to
a new example dict. Acting on the whole dict is what keeps a triplet aligned:
one flip decision, one crop offset and one erased rectangle are drawn per
example and applied to all three images, because FCE moves TI features into the
RGB/NI feature positions and needs the three images to show the same geometry.

Random ops are stateless: they read the seed at `data[RNG_KEY]` (int64 [2]),
split it, use one half and store the other back, so that an example's
augmentation is a pure function of that seed (deterministic resume).

Geometric ops and erasing act on uint8 images (a quarter of the bytes of
float32); `normalize`, `flare_label` and `keep` also act on whole batches.
"""

import math
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from facenet_jax.constants import MODALITIES

# Key of the per-example stateless seed, an int64 tensor of shape [2].
RNG_KEY = "_rng"

Example = dict[str, tf.Tensor]
Op = Callable[[Example], Example]


def chain(*ops: Op) -> Op:
  """Composes ops left to right."""

  def _chain(data: Example) -> Example:
    for op in ops:
      data = op(data)
    return data

  return _chain


def _next_seed(data: Example) -> tuple[Example, tf.Tensor]:
  """Splits data[RNG_KEY]: returns (data with a new seed, a seed to use)."""
  if RNG_KEY not in data:
    raise KeyError(f"random op needs a stateless seed at data['{RNG_KEY}']")
  seeds = tf.random.split(data[RNG_KEY], num=2)
  return {**data, RNG_KEY: seeds[0]}, seeds[1]


def decode(keys: Sequence[str] = MODALITIES) -> Op:
  """Decodes encoded PNG/JPEG strings into uint8 (H, W, 3) images."""

  def _decode(data: Example) -> Example:
    data = dict(data)
    for key in keys:
      image = tf.io.decode_image(data[key], channels=3, expand_animations=False)
      image.set_shape([None, None, 3])
      data[key] = image
    return data

  return _decode


def flare_label(threshold: float) -> Op:
  """Adds `flare` float32 (..., 2): flare_ratio > threshold for [RGB, NI].

  The ratio was measured by the builder on the raw decoded image (docs/model.md),
  so the label does not depend on resizing or augmentation.
  """

  def _flare_label(data: Example) -> Example:
    flare = tf.cast(data["flare_ratio"] > threshold, tf.float32)
    return {**data, "flare": flare}

  return _flare_label


# Key of the saturation pseudo-image that `saturation_map` adds.
SATURATION_KEY = "saturation"


def saturation_map(bar: int, keys: Sequence[str] = ("rgb", "ni")) -> Op:
  """Adds the per-pixel saturation of the raw decoded images as a pseudo-image.

  For each of `keys` (at most 3), channel j of data["saturation"] is
  round(255 * fraction of that image's channel values >= bar) per pixel, the
  per-pixel form of the flare pseudo-label's histogram bar. It is uint8
  (H, W, 3) like an image (unused channels 0), so that `resize`, flips,
  crops and erasing can move it together with the images: the pixel-level
  flare target stays aligned with what the network sees. Must run right
  after `decode`, before anything changes the pixel values.
  """
  if not 1 <= len(keys) <= 3:
    raise ValueError(f"saturation_map takes 1 to 3 keys, got {tuple(keys)}")

  def _saturation(data: Example) -> Example:
    planes = [tf.reduce_mean(tf.cast(data[k] >= bar, tf.float32), axis=-1)
              for k in keys]
    planes += [tf.zeros_like(planes[0])] * (3 - len(planes))
    sat = tf.cast(tf.round(255.0 * tf.stack(planes, axis=-1)), tf.uint8)
    return {**data, SATURATION_KEY: sat}

  return _saturation


def saturation_to_float(channels: int = 2) -> Op:
  """data["saturation"]: uint8 (..., 3) -> float32 (..., channels) in [0, 1]."""

  def _to_float(data: Example) -> Example:
    sat = tf.cast(data[SATURATION_KEY][..., :channels], tf.float32) / 255.0
    return {**data, SATURATION_KEY: sat}

  return _to_float


def resize(size: Sequence[int], keys: Sequence[str] = MODALITIES) -> Op:
  """Resizes uint8 images to size = (H, W), bilinear, rounded back to uint8.

  Rounding to uint8 matches PIL-based re-ID pipelines and keeps the following
  geometric ops on 1 byte per value; images already at `size` are untouched.
  """
  size = tuple(int(s) for s in size)

  def _resize_one(image: tf.Tensor) -> tf.Tensor:
    resized = tf.image.resize(image, size, method="bilinear")
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)

  def _resize(data: Example) -> Example:
    data = dict(data)
    for key in keys:
      image = data[key]
      same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
      image = tf.cond(same, lambda im=image: tf.identity(im),
                      lambda im=image: _resize_one(im))
      data[key] = tf.ensure_shape(image, size + (3,))
    return data

  return _resize


def random_flip_lr(prob: float, keys: Sequence[str] = MODALITIES) -> Op:
  """Flips all images of the example horizontally together, with prob."""

  def _flip(data: Example) -> Example:
    data, seed = _next_seed(data)
    do_flip = tf.random.stateless_uniform([], seed) < prob
    images = [data[key] for key in keys]
    images = tf.cond(do_flip,
                     lambda: [tf.reverse(im, axis=[1]) for im in images],
                     lambda: [tf.identity(im) for im in images])
    data.update(zip(keys, images))
    return data

  return _flip


def random_pad_crop(pad: int, keys: Sequence[str] = MODALITIES) -> Op:
  """Zero-pads by `pad` pixels on every side, then crops back to the old size.

  One crop offset is drawn per example and shared by all images. The padding
  is 0 in pixel space (black), as in torchreid's Pad + RandomCrop.
  """

  def _pad_crop(data: Example) -> Example:
    if pad <= 0:
      return data
    data, seed = _next_seed(data)
    offset = tf.random.stateless_uniform(
        [2], seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    for key in keys:
      image = data[key]
      padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      cropped = tf.slice(padded, tf.concat([offset, [0]], axis=0),
                         tf.shape(image))
      data[key] = tf.ensure_shape(cropped, image.shape)
    return data

  return _pad_crop


def normalize(mean: Sequence[Sequence[float]], std: Sequence[Sequence[float]],
              keys: Sequence[str] = MODALITIES) -> Op:
  """Per-modality normalisation: (x / 255 - mean[m]) / std[m], float32.

  Acts on the last (channel) axis only, so it serves an example (H, W, 3) or a
  whole batch (b, H, W, 3); the pipelines normalise batches, in one pass.

  Args:
    mean: (len(keys), 3) channel means in [0, 1], one row per key.
    std: (len(keys), 3) channel standard deviations.
    keys: the image keys, in the order of the rows of mean and std.

  Returns:
    The op.
  """
  if len(mean) != len(keys) or len(std) != len(keys):
    raise ValueError(f"normalize needs one mean and one std row per key "
                     f"{tuple(keys)}, got {len(mean)} means, {len(std)} stds")
  for name, rows in (("mean", mean), ("std", std)):
    if any(len(row) != 3 for row in rows):
      raise ValueError(
          f"normalize: every {name} row needs 3 channels, got {rows}")
  if any(s <= 0 for row in std for s in row):
    raise ValueError(f"normalize: std must be positive, got {std}")

  def _normalize(data: Example) -> Example:
    data = dict(data)
    for key, m, s in zip(keys, mean, std):
      # One multiply-add: x * (1 / (255 s)) - m / s.
      scale = tf.constant([1.0 / (255.0 * v) for v in s], tf.float32)
      offset = tf.constant([-a / v for a, v in zip(m, s)], tf.float32)
      data[key] = tf.cast(data[key], tf.float32) * scale + offset
    return data

  return _normalize


def random_erasing(prob: float,
                   fill: Optional[Sequence[Sequence[float]]] = None,
                   area_range: tuple[float, float] = (0.02, 0.4),
                   aspect_range: tuple[float, float] = (0.3, 3.3),
                   max_attempts: int = 100,
                   keys: Sequence[str] = MODALITIES) -> Op:
  """Random erasing (Zhong et al., AAAI 2020) with one rectangle per triplet.

  With probability prob, draws a rectangle of area in area_range (fraction of
  the image) and aspect ratio h/w in aspect_range, retrying up to max_attempts
  times until it fits inside the image (no erasing if none fits), and fills it
  with a constant colour per image. The pipelines fill with each modality's
  mean colour ("mean value" erasing, ~0 after normalisation), which adds no
  noise statistics that differ between modalities, and erase uint8 images
  before normalisation, the cheap place to do it. The same rectangle is used
  for all three images because FCE swaps TI features into RGB/NI positions,
  so an occluder must hide the same part of the vehicle in every modality.
  The aspect ratio is drawn log-uniformly, so tall and wide rectangles are
  equally likely.

  Args:
    prob: probability of erasing an example.
    fill: (len(keys), 3) fill colour of each key's image, in its value range;
      None fills with 0.
    area_range: (min, max) erased fraction of the image area.
    aspect_range: (min, max) height / width of the rectangle.
    max_attempts: number of candidate rectangles drawn per example.
    keys: the images to erase.

  Returns:
    The op.
  """
  if not 0.0 < area_range[0] <= area_range[1] <= 1.0:
    raise ValueError(f"random_erasing: bad area_range {area_range}")
  if not 0.0 < aspect_range[0] <= aspect_range[1]:
    raise ValueError(f"random_erasing: bad aspect_range {aspect_range}")
  fill = [(0.0,) * 3] * len(keys) if fill is None else fill
  if np.shape(fill) != (len(keys), 3):
    raise ValueError(f"random_erasing: fill must be ({len(keys)}, 3), one "
                     f"colour per key {tuple(keys)}, got {fill}")
  log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))

  def _erase(data: Example) -> Example:
    data, seed = _next_seed(data)
    # One draw: [apply, top, left, area x attempts, log aspect x attempts].
    u = tf.random.stateless_uniform([3 + 2 * max_attempts], seed)
    shape = tf.shape(data[keys[0]])
    height, width = shape[0], shape[1]
    area_fraction = (area_range[0] +
                     (area_range[1] - area_range[0]) * u[3:3 + max_attempts])
    aspect = tf.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) *
                    u[3 + max_attempts:])
    target_area = tf.cast(height * width, tf.float32) * area_fraction
    rect_h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    rect_w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (rect_h < height) & (rect_w < width) & (rect_h > 0) & (rect_w > 0)
    # The first attempt that fits, as in the paper's retry loop.
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    rect_h, rect_w = rect_h[first], rect_w[first]
    apply = (u[0] < prob) & fits[first]

    def _erased():
      top = tf.minimum(tf.cast(u[1] * tf.cast(height - rect_h + 1, tf.float32),
                               tf.int32), height - rect_h)
      left = tf.minimum(tf.cast(u[2] * tf.cast(width - rect_w + 1, tf.float32),
                                tf.int32), width - rect_w)
      rows = tf.range(height)
      cols = tf.range(width)
      inside = (((rows >= top) & (rows < top + rect_h))[:, None] &
                ((cols >= left) & (cols < left + rect_w))[None, :])[:, :, None]
      return [tf.where(inside, tf.cast(colour, data[k].dtype), data[k])
              for k, colour in zip(keys, fill)]

    images = tf.cond(apply, _erased,
                     lambda: [tf.identity(data[k]) for k in keys])
    data.update(zip(keys, images))
    return data

  return _erase


def keep(keys: Sequence[str]) -> Op:
  """Keeps only the given keys (drops the seed and unused features)."""

  def _keep(data: Example) -> Example:
    missing = [k for k in keys if k not in data]
    if missing:
      raise KeyError(f"keep: example has no {missing}; it has {sorted(data)}")
    return {k: data[k] for k in keys}

  return _keep
