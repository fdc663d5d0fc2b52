"""A flare rendered onto RGB and NI images at evaluation (beyond the paper).

`config.eval.rendered_flare` renders it onto the query or gallery images, to
rank under a flare that no model was trained on (TI never gets one: thermal
cameras do not see it). The flare is drawn from a family of its own,
deliberately unlike synthetic_flare's generator
(input_pipeline/datasets/synthetic_render.py: headlamp cores with halos and
streaks, sun discs with rays and ghosts): one or two rotated anisotropic
super-Gaussian blobs with flat saturated cores, a random tint, a faint veil
over the frame and independent RGB / NI gains. (Restoration training, which
rendered it onto training copies, lost on the validation split and was
retired: docs/studies.md.)

Everything is a pure function of a key, jittable, on raw images in [0, 1]
(NHWC, 3 channels; NI is stored as three equal channels).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Blobs per image at most; each after the first is present with
# probability 1/2.
MAX_BLOBS = 2


class RenderedFlare(NamedTuple):
  """What `add_flare` returns; n = number of images.

  Attributes:
    rgb, ni: (n, H, W, 3) images with the flare added, capped at 1.
    saturation: (n, H, W, 2) per pixel, the share of [RGB, NI] channel values
      at or above the saturation bar (the pipeline's saturation map).
    flare: (n, 2) pseudo-labels delta of [RGB, NI]: the share of saturated
      channel values of the whole image above the ratio threshold.
  """
  rgb: Array
  ni: Array
  saturation: Array
  flare: Array


def flare_layer(key: Array, height: int, width: int) -> tuple[Array, Array,
                                                               Array]:
  """One image's additive flare intensity, tint and [RGB, NI] gains.

  Returns:
    layer: (H, W) intensity in [0, 1] units (its core exceeds 1, so it
      saturates).
    tint: (3,) RGB colour of the flare, brightest channel 1.
    gains: (2,) multipliers of the layer for RGB and NI.
  """
  keys = jax.random.split(key, 10)
  # Pixel centres in units of the image height, origin at the top left.
  ys = (jnp.arange(height) + 0.5) / height
  xs = (jnp.arange(width) + 0.5) / height
  y, x = jnp.meshgrid(ys, xs, indexing="ij")
  n = MAX_BLOBS
  cx = jax.random.uniform(keys[0], (n,), minval=0.1, maxval=0.9) * (
      width / height)
  cy = jax.random.uniform(keys[1], (n,), minval=0.1, maxval=0.9)
  major = jax.random.uniform(keys[2], (n,), minval=0.08, maxval=0.25)
  minor = major * jax.random.uniform(keys[3], (n,), minval=0.35, maxval=1.0)
  angle = jax.random.uniform(keys[4], (n,), maxval=jnp.pi)
  # Exponent of the super-Gaussian: 1 is a Gaussian, larger is flatter-topped.
  power = jax.random.uniform(keys[5], (n,), minval=1.0, maxval=2.5)
  peak = jax.random.uniform(keys[6], (n,), minval=1.2, maxval=2.5)
  present = jnp.concatenate(
      [jnp.ones((1,)), jax.random.bernoulli(keys[7], 0.5, (n - 1,))])
  dx = x[None] - cx[:, None, None]
  dy = y[None] - cy[:, None, None]
  cos, sin = jnp.cos(angle)[:, None, None], jnp.sin(angle)[:, None, None]
  u = (dx * cos + dy * sin) / major[:, None, None]
  v = (-dx * sin + dy * cos) / minor[:, None, None]
  rho2 = u * u + v * v
  blobs = peak[:, None, None] * jnp.exp(-rho2 ** power[:, None, None])
  veil = jax.random.uniform(keys[8], (), maxval=0.1)
  layer = jnp.sum(present[:, None, None] * blobs, axis=0) + veil
  colour_key, gain_key, weak_key, which_key = jax.random.split(keys[9], 4)
  tint = 1.0 - jax.random.uniform(colour_key, (3,), maxval=0.25)
  tint = tint / jnp.max(tint)
  gains = jax.random.uniform(gain_key, (2,), minval=0.7, maxval=1.3)
  # Sometimes one modality is barely hit.
  weak = jax.random.bernoulli(weak_key, 0.15)
  which = jax.random.randint(which_key, (), 0, 2)
  gains = gains * jnp.where(weak & (jnp.arange(2) == which), 0.2, 1.0)
  return layer, tint, gains


def _saturated(image: Array, bar: int) -> Array:
  """(n, H, W, 3) in [0, 1] -> (n, H, W) share of uint8 channel values >= bar."""
  return jnp.mean((jnp.round(image * 255.0) >= bar).astype(jnp.float32),
                  axis=-1)


def add_flare(key: Array, rgb: Array, ni: Array, pixel_low: int = 250,
              ratio_threshold: float = 0.1) -> RenderedFlare:
  """Adds one independent rendered flare to each image pair.

  Args:
    key: random key.
    rgb, ni: (n, H, W, 3) raw images in [0, 1].
    pixel_low: the uint8 value from which a channel counts as saturated
      (config.flare.pixel_low).
    ratio_threshold: share of saturated channel values above which an image
      is flared (config.flare.ratio_threshold).

  Returns:
    RenderedFlare.
  """
  return add_flare_each(jax.random.split(key, rgb.shape[0]), rgb, ni,
                        pixel_low, ratio_threshold)


def add_flare_by_index(key: Array, index: Array, rgb: Array, ni: Array,
                       pixel_low: int = 250,
                       ratio_threshold: float = 0.1) -> RenderedFlare:
  """add_flare_each with image i's key fold_in(key, index[i]): an image's
  flare is a function of its index in its split alone."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
  return add_flare_each(keys, rgb, ni, pixel_low, ratio_threshold)


def add_flare_each(keys: Array, rgb: Array, ni: Array, pixel_low: int = 250,
                   ratio_threshold: float = 0.1) -> RenderedFlare:
  """add_flare with one key per image pair (keys (n,)), so that an image's
  flare does not depend on the other images it is rendered with."""
  height, width = rgb.shape[1:3]
  layer, tint, gains = jax.vmap(
      lambda k: flare_layer(k, height, width))(keys)
  layer = layer[..., None]
  # Light only adds, and saturates at 1; pixels outside [0, 1] (random
  # erasing draws such values) are left as they are where nothing is added.
  add = lambda image, light: jnp.minimum(image + light,
                                         jnp.maximum(image, 1.0))
  rgb = add(rgb, layer * tint[:, None, None, :] * gains[:, 0, None, None, None])
  ni = add(ni, layer * gains[:, 1, None, None, None])
  saturation = jnp.stack([_saturated(rgb, pixel_low),
                          _saturated(ni, pixel_low)], axis=-1)
  flare = (jnp.mean(saturation, axis=(1, 2)) > ratio_threshold).astype(
      jnp.float32)
  return RenderedFlare(rgb=rgb, ni=ni, saturation=saturation, flare=flare)
