"""Embedding API for deployment: raw uint8 triplets in, unit vectors out.

  embedder = Embedder.from_workdir("/runs/wmveid863")
  emb = embedder(rgb, ni, ti)    # (B, 3 * D) float32, rows of norm 1
  out = embedder.embed(rgb, ni, ti)  # {"embedding", "weights" (B, 3)}
  d = fusion.numpy_distances(q["embedding"], q["weights"],
                             g["embedding"], g["weights"])

Two embeddings are compared with the run's fusion (facenet_jax/fusion.py):
the pair-normalised distance of the per-segment unit vectors, weighted by
each image's segment weights; with the paper's "concat" fusion the weights
are all 1 and it is the Euclidean distance of the embeddings.

The embedder computes the flare evidence from the raw images itself,
applies the run's resize and normalisation (the same tf ops as the evaluation
pipeline), and runs the model in eval mode. Segments are [RGB | NI | TI].
`embedder.inputs(rgb, ni, ti)` (or `network_inputs`, which needs the run's
config only) stops before the model: it returns the four arrays the network
takes (INPUT_NAMES), which is how a model exported by scripts/export.py is
fed in any runtime (docs/export.md).
"""

import functools
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from facenet_jax import checkpointing
from facenet_jax.train import steps
from facenet_jax.train import train_state
from facenet_jax.constants import FLARE_MODALITIES, MODALITIES
from facenet_jax.models import FACENet

# The network's inputs, in the order of an exported model's inputs: the three
# preprocessed images, the (B, 2) flare pseudo-labels and the (B, 2)
# saturated fractions they come from.
INPUT_NAMES = (*MODALITIES, "flare", "flare_ratio")


class Embedder:
  """Maps raw image triplets to L2-normalised retrieval embeddings."""

  def __init__(self, model: FACENet, variables: Any,
               config: ml_collections.ConfigDict, batch_size: int = 64):
    """Use `from_workdir` unless you hold a model and variables already.

    Args:
      model: the FACENet module.
      variables: {"params", "batch_stats"}.
      config: the run's config (input size, normalisation, flare bar).
      batch_size: images embedded per device call.
    """
    self.model = model
    self.variables = variables
    self.config = config
    self.batch_size = batch_size
    self._embed = jax.jit(lambda v, b: steps.embed_step(
        v, b, model=model, flip_average=config.eval.flip_average))

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None,
                   batch_size: int = 64) -> "Embedder":
    """Loads the run's config and its latest (or `step`) checkpoint."""
    config = checkpointing.load_config(workdir)
    model, state, _ = train_state.restore_for_eval(config, workdir, step)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return cls(model, variables, config, batch_size)

  @property
  def dim(self) -> int:
    """Embedding size D_total = 3 x per-stream feature dimension."""
    # Shapes only: an eager forward pass would take seconds on a CPU.
    h, w = self.config.input_size
    images = {m: np.zeros((1, h, w, 3), np.float32) for m in MODALITIES}
    flare = np.zeros((1, 2), np.float32)
    return int(jax.eval_shape(
        functools.partial(self.model.apply, train=False, flare_ratio=flare),
        self.variables, images, flare).embedding.shape[-1])

  def inputs(self, rgb: np.ndarray, ni: np.ndarray,
             ti: np.ndarray) -> dict[str, np.ndarray]:
    """The network's inputs for raw uint8 images: `network_inputs`."""
    return network_inputs(rgb, ni, ti, self.config)

  def __call__(self, rgb: np.ndarray, ni: np.ndarray,
               ti: np.ndarray) -> np.ndarray:
    """Embeds one triplet (H, W, 3) or a batch (B, H, W, 3) of raw uint8 images.

    The images are read as by `network_inputs`.

    Returns:
      (B, D_total) float32 embeddings with unit L2 norm (`embed` also gives
      the segment weights the run's fusion compares them with).
    """
    return self.embed(rgb, ni, ti)["embedding"]

  def embed(self, rgb: np.ndarray, ni: np.ndarray,
            ti: np.ndarray) -> dict[str, np.ndarray]:
    """Embeddings and segment weights of raw uint8 triplets.

    Returns:
      "embedding" (B, D_total) float32 with unit L2 norm; "weights" (B, 3)
      float32, the [RGB | NI | TI] segment weights of the run's fusion (all 1
      for "concat"). fusion.numpy_distances (or fused_distances) compares
      two such sets as evaluation ranks them.
    """
    batch = self.inputs(rgb, ni, ti)
    out = {"embedding": [], "weights": []}
    for start in range(0, len(batch["flare"]), self.batch_size):
      part = {k: v[start:start + self.batch_size] for k, v in batch.items()}
      embedding, weights = self._embed(self.variables, part)
      out["embedding"].append(np.asarray(embedding))
      out["weights"].append(np.asarray(weights))
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def network_inputs(rgb: np.ndarray, ni: np.ndarray, ti: np.ndarray,
                   config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The network's inputs for raw uint8 images: what an exported model takes.

  Needs the run's config only (checkpointing.load_config), not its weights.
  Images of one call must share a size; any size is resized to the run's
  input size. Single-channel NI/TI (H, W) or (H, W, 1) are repeated to 3.

  Args:
    rgb: one (H, W, 3) or a batch (B, H, W, 3) of raw uint8 images.
    ni: the same for near infrared.
    ti: the same for thermal infrared.
    config: the run's config (input size, normalisation, flare bar, CLAHE).

  Returns:
    A dict keyed by INPUT_NAMES: "rgb", "ni", "ti" (B, H', W', 3) float32
    at the run's input size (H', W'), normalised per modality; "flare_ratio"
    (B, 2) float32 saturated fraction of the raw [RGB, NI] images (channel
    values >= flare.pixel_low, before CLAHE or resizing) and "flare" (B, 2)
    the pseudo-labels delta in {0, 1} it gives.
  """
  raw = {m: _as_batch(m, x) for m, x in zip(MODALITIES, (rgb, ni, ti))}
  sizes = {m: x.shape[0] for m, x in raw.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"rgb, ni and ti hold different numbers of images: "
                     f"{sizes}")
  ratios = flare_ratios(raw, config.flare.pixel_low)
  images = preprocess(raw, config)
  out = {m: images[m].astype(np.float32, copy=False) for m in MODALITIES}
  out["flare"] = (ratios > config.flare.ratio_threshold).astype(np.float32)
  out["flare_ratio"] = ratios
  return out


def _as_batch(name: str, images: np.ndarray) -> np.ndarray:
  """One raw image or a batch as (B, H, W, 3) uint8; ValueError naming `name`."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    hint = (" (floats in [0, 1]? pass (x * 255).round().astype(np.uint8))"
            if images.dtype.kind == "f" else "")
    raise ValueError(f"{name}: expected raw uint8 images, got "
                     f"{images.dtype}{hint}")
  if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3)):
    # One image: (H, W), (H, W, 1) or (H, W, 3).
    images = images[None] if images.ndim == 3 else images[None, ..., None]
  if images.ndim != 4:
    raise ValueError(f"{name}: expected (H, W, 3) or (B, H, W, 3) uint8 "
                     f"images, got shape {images.shape}")
  if images.shape[-1] not in (1, 3):
    raise ValueError(f"{name}: expected 3 channels (or 1, repeated), got "
                     f"{images.shape[-1]} in shape {images.shape}")
  if 0 in images.shape:
    raise ValueError(f"{name}: no pixels or no images, shape {images.shape}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def check_network_inputs(inputs: Mapping[str, np.ndarray],
                         config: ml_collections.ConfigDict) -> None:
  """Refuses what `network_inputs` could not have made, naming the input.

  What an exported model is fed (export.runner calls it): the INPUT_NAMES
  and no others, float32, (B, H, W, 3) images at the run's input size and
  within the range its normalisation gives raw pixels, finite, and (B, 2)
  flare_ratio in [0, 1] with flare its pseudo-labels.

  Raises:
    ValueError: the first input that breaks the contract, and how.
  """
  names = set(inputs)
  if names != set(INPUT_NAMES):
    raise ValueError(f"inputs: expected {list(INPUT_NAMES)}, missing "
                     f"{sorted(set(INPUT_NAMES) - names)}, unknown "
                     f"{sorted(names - set(INPUT_NAMES))}")
  h, w = config.input_size
  batch = None
  for name in INPUT_NAMES:
    x = inputs[name]
    shape = ((None, h, w, 3) if name in MODALITIES else
             (None, len(FLARE_MODALITIES)))
    if not isinstance(x, np.ndarray) and hasattr(x, "__array__"):
      x = np.asarray(x)
    if getattr(x, "dtype", None) != np.float32:
      raise ValueError(f"{name}: expected float32, got "
                       f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(x.shape, shape)):
      wanted = ", ".join(map(str, shape[1:]))
      raise ValueError(f"{name}: expected shape (B, {wanted}), got {x.shape}")
    batch = x.shape[0] if batch is None else batch
    if x.shape[0] != batch:
      raise ValueError(f"{name}: {x.shape[0]} rows, but {INPUT_NAMES[0]} "
                       f"has {batch}")
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{name}: {np.size(x) - np.isfinite(x).sum()} values "
                       "are NaN or infinite")
    if name in MODALITIES:
      row = MODALITIES.index(name)
      mean = np.asarray(config.normalization.mean[row], np.float32)
      std = np.asarray(config.normalization.std[row], np.float32)
      low, high = (0.0 - mean) / std - 1e-3, (1.0 - mean) / std + 1e-3
      if np.any(x < low) or np.any(x > high):
        raise ValueError(
            f"{name}: values in [{x.min():.3g}, {x.max():.3g}], outside the "
            f"[{low.min():.3g}, {high.max():.3g}] that normalising uint8 "
            "pixels gives (raw pixels? use inference.network_inputs)")
  ratio, flare = inputs["flare_ratio"], inputs["flare"]
  if np.any(ratio < 0) or np.any(ratio > 1):
    raise ValueError("flare_ratio: saturated fractions must be in [0, 1], "
                     f"got [{ratio.min():.3g}, {ratio.max():.3g}]")
  expected = (ratio > config.flare.ratio_threshold).astype(np.float32)
  if not np.array_equal(flare, expected):
    raise ValueError("flare: must be flare_ratio > flare.ratio_threshold "
                     f"({config.flare.ratio_threshold}) as 0/1; differs in "
                     f"{int(np.sum(flare != expected))} of {flare.size} values")


def flare_ratios(raw: dict, pixel_low: int) -> np.ndarray:
  """(B, 2) float32 saturated fractions of [RGB, NI] from raw uint8 batches."""
  from input_pipeline.datasets import features  # pylint: disable=g-import-not-at-top
  return np.array([[features.flare_ratio(image, pixel_low)
                    for image in raw[m]] for m in FLARE_MODALITIES],
                  np.float32).reshape(len(FLARE_MODALITIES), -1).T


def preprocess(raw: dict, config: ml_collections.ConfigDict) -> dict:
  """The evaluation pipeline's preprocessing of raw uint8 batches.

  CLAHE on RGB/NI if the run used it, then resize and per-modality
  normalisation with the pipeline's ops.
  """
  from input_pipeline import deflare  # pylint: disable=g-import-not-at-top
  from input_pipeline import ops  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if config.preprocess.clahe:
    raw = {m: deflare.clahe_batch(x, config.preprocess.clahe_clip_limit)
           if m in FLARE_MODALITIES else x for m, x in raw.items()}
  op = ops.chain(ops.resize(config.input_size),
                 ops.normalize(config.normalization.mean,
                               config.normalization.std))
  dataset = tf.data.Dataset.from_tensor_slices(raw).map(op).batch(256)
  parts = [batch for batch in dataset.as_numpy_iterator()]
  return {m: np.concatenate([p[m] for p in parts]) for m in MODALITIES}
