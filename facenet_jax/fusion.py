"""Flare-aware fusion: how the three stream features of two images are compared.

Beyond the paper. The paper ranks by the Euclidean distance of the
concatenated, L2-normalised [RGB | NI | TI] embedding ("concat"). The
flare-aware fusions give each image's RGB and NI segments a reliability
weight w_S in (0, 1] from the image's own flare evidence (TI is always 1),
and compare two images q and g by the pair-normalised distance

  d(q, g)^2 = sum_S w_S(q) w_S(g) |q_S - g_S|^2 / sum_S w_S(q) w_S(g)

over per-segment L2-normalised features q_S, g_S. A flared image's RGB and NI
distances then count less against every image it is compared with, and the
normaliser keeps distances of different weight patterns on one scale. (Scaling
the flared segments of one concatenated vector and ranking it by plain
Euclidean or cosine distance does not: the norm differences of the weight
patterns outweigh identity, docs/model.md.)

Representation. A fused embedding is (N, M * D): each segment L2-normalised
and divided by sqrt(M), so the vector has unit norm and, with all weights 1,
`fused_distances` is the plain Euclidean distance of these vectors. Weights are
(N, M) in MODALITIES order.

Weights (`stream_weights`), from the evidence an image carries at inference:
  fixed       w = weight where the pseudo-label delta_S is 1, else 1;
  saturation  w = 1 - (1 - weight) * min(1, ratio_S / full_ratio): falls
              linearly with the saturated fraction of the raw image (no hard
              threshold) and reaches `weight` at `full_ratio`.
A learned gate over the same evidence, trained by a triplet on this distance,
did not beat the fixed rule on the validation split and was retired
(docs/studies.md).
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from facenet_jax.constants import FLARE_MODALITIES, MODALITIES

Array = jax.Array

# "concat" is the paper's; the others are beyond it. None has parameters:
# a finished run can be ranked with any of them (scripts/fusion.py sweeps
# them on val).
FUSIONS = ("concat", "fixed", "saturation")
_EPS = 1e-12


def check(fusion: str, weight: float, full_ratio: float) -> None:
  """Raises ValueError naming the config field of a bad fusion setting."""
  if fusion not in FUSIONS:
    raise ValueError(f"model.fusion must be one of {FUSIONS}, got {fusion!r}")
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"model.fusion_weight must be in [0, 1], got {weight}")
  if full_ratio <= 0.0:
    raise ValueError(f"model.fusion_full_ratio must be > 0, got {full_ratio}")


def normalized_segments(embedding: Array, num_streams: int = len(MODALITIES)
                        ) -> Array:
  """(N, M * D) stream features -> (N, M * D) fused embedding.

  Each of the M segments is L2-normalised and divided by sqrt(M), so the row
  has unit norm (a zero segment stays zero).
  """
  n, dim = embedding.shape
  parts = jnp.reshape(embedding, (n, num_streams, dim // num_streams))
  norms = jnp.linalg.norm(parts.astype(jnp.float32), axis=-1, keepdims=True)
  parts = parts / jnp.maximum(norms, _EPS) / np.sqrt(num_streams)
  return jnp.reshape(parts, (n, dim)).astype(jnp.float32)


def stream_weights(fusion: str, flare: Array, flare_ratio: Optional[Array],
                   weight: float = 0.5, full_ratio: float = 0.2) -> Array:
  """(B, M) reliability weights of a fusion.

  Args:
    fusion: one of FUSIONS.
    flare: (B, 2) pseudo-labels delta of [RGB, NI] in {0, 1}.
    flare_ratio: (B, 2) saturated fraction of the raw [RGB, NI] images in
      [0, 1]; read by "saturation" only.
    weight: a fully flared stream's weight (fixed: where delta = 1).
    full_ratio: saturation: the fraction at which the weight reaches `weight`.

  Returns:
    (B, M) float32 weights in MODALITIES order; TI's is 1, and every weight
    is 1 for "concat".
  """
  flare = jnp.asarray(flare, jnp.float32)
  if fusion == "concat":
    drop = jnp.zeros_like(flare)
  elif fusion == "fixed":
    drop = (flare > 0.5).astype(jnp.float32)
  elif fusion == "saturation":
    if flare_ratio is None:
      raise ValueError("model.fusion='saturation' needs the images' "
                       "saturated fractions (flare_ratio)")
    drop = jnp.clip(jnp.asarray(flare_ratio, jnp.float32) / full_ratio, 0, 1)
  else:
    raise ValueError(f"model.fusion must be one of {FUSIONS}, got {fusion!r}")
  return with_guide(1.0 - (1.0 - weight) * drop)


def with_guide(flare_weights: Array) -> Array:
  """(B, 2) weights of [RGB, NI] -> (B, M) in MODALITIES order, TI at 1."""
  columns = {m: flare_weights[:, i] for i, m in enumerate(FLARE_MODALITIES)}
  ones = jnp.ones(flare_weights.shape[:1], flare_weights.dtype)
  return jnp.stack([columns.get(m, ones) for m in MODALITIES], axis=-1)


def fused_squared_distances(query: Array, query_weights: Array,
                            gallery: Array, gallery_weights: Array) -> Array:
  """(Q, G) squared pair-normalised distances of fused embeddings.

  Args:
    query: (Q, M * D) fused embeddings (`normalized_segments`).
    query_weights: (Q, M) stream weights.
    gallery: (G, M * D).
    gallery_weights: (G, M).

  Returns:
    (Q, G) float32 sum_S w_S(q) w_S(g) |q_S - g_S|^2 / sum_S w_S(q) w_S(g),
    with |q_S - g_S|^2 taken on the unit segments (M times the stored
    segments' squared distance).
  """
  num_streams = query_weights.shape[-1]
  q = jnp.reshape(query, (query.shape[0], num_streams, -1)).astype(
      jnp.float32)
  g = jnp.reshape(gallery, (gallery.shape[0], num_streams, -1)).astype(
      jnp.float32)
  # Unit segments: |q_S - g_S|^2 = 2 - 2 q_S.g_S, here on segments of norm
  # 1/sqrt(M). HIGHEST: neighbours' distances differ in late digits.
  cross = jnp.einsum("qsd,gsd->qgs", q, g,
                     precision=jax.lax.Precision.HIGHEST) * num_streams
  q_sq = jnp.sum(q * q, axis=-1) * num_streams
  g_sq = jnp.sum(g * g, axis=-1) * num_streams
  square = jnp.maximum(q_sq[:, None, :] + g_sq[None, :, :] - 2.0 * cross, 0.0)
  pair = query_weights.astype(jnp.float32)[:, None, :] * (
      gallery_weights.astype(jnp.float32)[None, :, :])
  return jnp.sum(pair * square, axis=-1) / jnp.maximum(
      jnp.sum(pair, axis=-1), _EPS)


def fused_distances(query: Array, query_weights: Array, gallery: Array,
                    gallery_weights: Array) -> Array:
  """(Q, G) pair-normalised distances: the root of fused_squared_distances.

  The root has a zero (not infinite) gradient where a distance is 0.
  """
  squared = fused_squared_distances(query, query_weights, gallery,
                                    gallery_weights)
  positive = squared > 0.0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def numpy_distances(query: np.ndarray, query_weights: np.ndarray,
                    gallery: np.ndarray, gallery_weights: np.ndarray
                    ) -> np.ndarray:
  """fused_distances in float64 NumPy: the reference and a host-side path."""
  num_streams = query_weights.shape[-1]
  split = lambda x: np.asarray(x, np.float64).reshape(len(x), num_streams, -1)
  q, g = split(query), split(gallery)
  num = np.zeros((len(q), len(g)))
  den = np.zeros_like(num)
  for s in range(num_streams):
    diff = q[:, None, s, :] - g[None, :, s, :]
    square = num_streams * np.sum(diff * diff, axis=-1)
    w = np.outer(query_weights[:, s], gallery_weights[:, s])
    num += w * square
    den += w
  return np.sqrt(num / np.maximum(den, _EPS)).astype(np.float32)
