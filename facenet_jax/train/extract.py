"""What evaluation feeds the network, and the embeddings it gets back.

`extract` embeds one split, every example exactly once, on any number of
devices and hosts. What is fed can differ from the images on disk: a set of
missing modalities blanked on the query or gallery side (config.eval.missing,
the protocol of TOP-ReID, DeMo and IDEA), or a rendered flare
(config.eval.rendered_flare, beyond the paper). Ranking and results files are
`train.evaluate`'s.
"""

import functools
import itertools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from facenet_jax import console as console_lib
from facenet_jax import flare_render
from facenet_jax.constants import FLARE_MODALITIES, MODALITIES
from facenet_jax.models import FACENet
from facenet_jax.train import feed
from facenet_jax.train import mesh
from facenet_jax.train import steps
from input_pipeline import pipeline


# Per-example fields of an evaluation batch that the ranking needs.
EVAL_METADATA = ("pid", "camid", "sceneid", "flare", "valid", "index")


# config.eval.missing_in: the side(s) of the ranking the missing modalities
# are blanked on.
MISSING_SIDES = ("query", "gallery", "both")


# config.eval.missing="all": every modality, then every non-empty proper
# subset missing (one or two of the three), the rows of a missing-modality
# table in TOP-ReID, DeMo and IDEA.
MISSING_SWEEP = tuple(
    missing for size in range(len(MODALITIES))
    for missing in itertools.combinations(MODALITIES, size))


def is_sweep(value: Any) -> bool:
  """config.eval.missing asks for the sweep of every missing set ("all")."""
  return isinstance(value, str) and value.strip().lower() == "all"


def parse_missing(value: Any) -> tuple[str, ...]:
  """One value of config.eval.missing -> the missing modalities.

  Args:
    value: "none", or a comma-separated set of modalities, e.g. "rgb,ni"
      (case and spaces ignored).

  Returns:
    The set in MODALITIES order ("ni,rgb" and "rgb,ni" are one set), () for
    "none".

  Raises:
    ValueError: naming config.eval.missing, for a name that is not a
      modality, a name given twice, or all three modalities.
  """
  expected = (f"expected 'none', 'all' or a comma-separated set of "
              f"{', '.join(MODALITIES)} (e.g. 'rgb,ni')")
  if not isinstance(value, str):
    raise ValueError(f"config.eval.missing must be a string, {expected}; got "
                     f"{value!r}")
  if value.strip().lower() == "none":
    return ()
  names = [name.strip() for name in value.lower().split(",")]
  for name in names:
    if name not in MODALITIES:
      raise ValueError(f"config.eval.missing={value!r}: {name!r} is not a "
                       f"modality; {expected}")
  for name in MODALITIES:
    if names.count(name) > 1:
      raise ValueError(f"config.eval.missing={value!r} names {name!r} "
                       f"{names.count(name)} times; name each missing "
                       "modality once")
  if len(names) == len(MODALITIES):
    raise ValueError(f"config.eval.missing={value!r} blanks every modality, "
                     "leaving nothing to embed; name at most two of "
                     f"{', '.join(MODALITIES)}")
  return tuple(m for m in MODALITIES if m in names)


def missing_label(missing: Sequence[str]) -> str:
  """The config.eval.missing value of a set: "none", "ni", "rgb,ti", ..."""
  return ",".join(missing) or "none"


def missing_side(config: ml_collections.ConfigDict) -> str:
  """config.eval.missing_in, validated."""
  side = config.eval.missing_in
  if side not in MISSING_SIDES:
    raise ValueError(f"config.eval.missing_in must be one of {MISSING_SIDES} "
                     f"(where config.eval.missing is blanked), got {side!r}")
  return side


def missing_sets(
    config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
  """The missing-modality sets config.eval asks for, both fields validated.

  Returns:
    MISSING_SWEEP for config.eval.missing="all", else the one set.
  """
  missing_side(config)
  if is_sweep(config.eval.missing):
    return MISSING_SWEEP
  return (parse_missing(config.eval.missing),)


def missing_by_side(missing: Sequence[str],
                    side: str) -> dict[str, tuple[str, ...]]:
  """What the query and the gallery each lack when `side` loses `missing`."""
  return {s: tuple(missing) if side in (s, "both") else ()
          for s in ("query", "gallery")}


def check_config(config: ml_collections.ConfigDict,
                 training: bool = False) -> None:
  """config.eval's missing-modality and rendered-flare fields.

  Args:
    config: the run configuration.
    training: checked before training, when a sweep ("all", which needs a
      trained run) is refused too.

  Raises:
    ValueError: naming the field.
  """
  missing_sets(config)
  rendered_flare_side(config)
  if training and is_sweep(config.eval.missing):
    raise ValueError(
        "config.eval.missing='all' sweeps the missing-modality sets of a "
        "trained run and needs --mode eval; train with config.eval.missing="
        "none (or one set), then run --mode eval --config.eval.missing=all")


# config.eval.rendered_flare (beyond the paper): the side(s) of the ranking
# whose RGB and NI images get a flare of flare_render's family (neither
# synthetic_flare's generator nor a camera makes it) before they are
# embedded: how a model ranks under flare that it was not trained on. "none"
# leaves every image as it is.
RENDER_SIDES = ("none", "query", "gallery", "both")


def rendered_flare_side(config: ml_collections.ConfigDict) -> str:
  """config.eval.rendered_flare, validated."""
  side = config.eval.rendered_flare
  if side not in RENDER_SIDES:
    raise ValueError(f"config.eval.rendered_flare must be one of "
                     f"{RENDER_SIDES} (where a flare is rendered onto RGB and "
                     f"NI at evaluation), got {side!r}")
  if side != "none" and config.preprocess.clahe:
    raise ValueError(
        f"config.eval.rendered_flare={side!r} with preprocess.clahe: the "
        "flare would be rendered onto the CLAHE-enhanced images, not "
        "enhanced with them; evaluate a run without CLAHE")
  return side


def render_key(config: ml_collections.ConfigDict, split: str) -> np.ndarray:
  """The raw key (uint32 (2,)) of a split's rendered flares.

  Query and gallery splits draw from different streams, so that no query
  gets the same flare as a gallery image of the same index; an image's own
  flare is then keyed by its index (render_eval_flare).
  """
  side = 2 if "gallery" in split else 1
  return np.asarray(jax.random.fold_in(
      jax.random.PRNGKey(config.eval.rendered_flare_seed), side))


def _render_normalised(images: Mapping[str, jax.Array], mean, std,
                       render: Callable) -> tuple[dict, Any]:
  """A flare rendered onto normalised RGB and NI images.

  Args:
    images: {modality: normalised (N, H, W, 3)}, as the pipeline gives them.
    mean, std: (modality, channel) normalisation, rows in MODALITIES order.
    render: (raw rgb, raw ni) -> flare_render.RenderedFlare, on [0, 255]
      pixels.

  Returns:
    ({"rgb", "ni": the rendered images normalised again, in the input
    dtype}, the RenderedFlare).
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  row = {m: i for i, m in enumerate(MODALITIES)}
  rendered = render(*(images[m] * std[row[m]] + mean[row[m]]
                      for m in FLARE_MODALITIES))
  flared = {m: ((image - mean[row[m]]) / std[row[m]]).astype(images[m].dtype)
            for m, image in zip(FLARE_MODALITIES,
                                (rendered.rgb, rendered.ni))}
  return flared, rendered


def render_eval_flare(batch: Mapping[str, jax.Array], key: jax.Array,
                      config: ml_collections.ConfigDict) -> dict:
  """The eval batch with a rendered flare on every RGB and NI image.

  The images are normalised, as the pipeline gives them: the flare is added
  to the raw pixels (flare_render.add_flare_by_index, keyed by example index)
  and the result normalised again. An image is fed as flared where it was
  (the real pseudo-label) or where the rendered image is, measured at the
  network's input size; the original image's own flare, if it had one,
  stays under the rendered one.
  """
  flared, rendered = _render_normalised(
      batch, *feed.normalization(config),
      lambda rgb, ni: flare_render.add_flare_by_index(
          key, batch["index"], rgb, ni, pixel_low=config.flare.pixel_low,
          ratio_threshold=config.flare.ratio_threshold))
  out = {**batch, **flared}
  out["flare"] = jnp.maximum(batch["flare"],
                             rendered.flare.astype(batch["flare"].dtype))
  if "flare_ratio" in batch:
    # Measured at the input size, like the rendered pseudo-label.
    ratio = jnp.mean(rendered.saturation, axis=(1, 2))
    out["flare_ratio"] = jnp.maximum(batch["flare_ratio"],
                                     ratio.astype(batch["flare_ratio"].dtype))
  return out


def input_keep(missing: Sequence[str] = (),
               zero_flare: bool = False) -> dict[str, np.ndarray]:
  """Which network inputs an evaluation feeds, as the arrays blank_inputs reads.

  Args:
    missing: modalities that are missing.
    zero_flare: feed no flare pseudo-label at all (FCE replaces nothing).

  Returns:
    "images": bool (3,) in MODALITIES order, False for a missing modality;
    "flare": bool (2,) in FLARE_MODALITIES order, False for a missing RGB or
    NI (a missing image has no flare), and everywhere with zero_flare.
  """
  unknown = set(missing) - set(MODALITIES)
  if unknown:
    raise ValueError(f"Unknown modalities {sorted(unknown)}; known: "
                     f"{MODALITIES}")
  return {"images": np.array([m not in missing for m in MODALITIES]),
          "flare": np.array([m not in missing and not zero_flare
                             for m in FLARE_MODALITIES])}


def blank_inputs(batch: Mapping[str, jax.Array],
                 keep: Mapping[str, jax.Array]) -> dict:
  """The batch as the network sees it: what `keep` leaves out is zero.

  Applied to normalised images, so a missing image is a network input of
  exactly 0 (every pixel at the normalisation mean), and its flare
  pseudo-label is 0.

  Args:
    batch: rgb, ni, ti (B, H, W, 3) normalised, flare (B, 2), anything else.
    keep: input_keep's "images" (3,) and "flare" (2,) booleans; arrays, so
      that one compilation serves every missing set.

  Returns:
    The batch with those images and pseudo-label columns zeroed; the other
    entries are the same arrays.
  """
  out = dict(batch)
  for i, m in enumerate(MODALITIES):
    # A Python 0 is weakly typed: the images keep their dtype.
    out[m] = jnp.where(keep["images"][i], batch[m], 0)
  out["flare"] = jnp.where(keep["flare"], batch["flare"], 0)
  if "flare_ratio" in batch:
    out["flare_ratio"] = jnp.where(keep["flare"], batch["flare_ratio"], 0)
  return out


def embedding_function(config: ml_collections.ConfigDict, model: FACENet,
                       sharding: mesh.Sharding,
                       render: bool = False) -> Callable:
  """extract's jitted (variables, batch, keep) -> (embedding, metadata).

  What is fed (`keep`, from input_keep) is an input, not a constant, so one
  compilation serves both splits and every set of a missing-modality sweep.
  The metadata goes through the same jit with replicated outputs: that is the
  all-gather that gives every process every example on multiple hosts. It
  holds the real "flare" labels and the "flare_input" fed.

  With `render`, a flare is rendered onto RGB and NI first
  (render_eval_flare, keyed by keep["render_key"]); missing modalities are
  blanked after that.
  """
  embed = functools.partial(steps.embed_step, model=model,
                            flip_average=config.eval.flip_average)

  def run(variables, batch, keep):
    seen = render_eval_flare(batch, keep["render_key"], config) if render \
        else batch
    fed = blank_inputs(seen, keep)
    metadata = {k: batch[k] for k in EVAL_METADATA}
    metadata["flare_input"] = fed["flare"]
    metadata["flare_ratio_input"] = fed["flare_ratio"]
    return embed(variables, fed), metadata

  jitted = jax.jit(run, in_shardings=(sharding.replicated, sharding.data,
                                      sharding.replicated),
                   out_shardings=sharding.replicated)

  def embed_fn(variables, batch, keep):
    return jitted(variables, batch, keep)

  embed_fn.render = render  # What extract checks against its own `render`.
  return embed_fn


def extract(config: ml_collections.ConfigDict, model: FACENet, variables: Any,
            split: str, sharding: mesh.Sharding, zero_flare: bool = False,
            console: console_lib.Console = console_lib.SILENT,
            missing: Sequence[str] = (),
            embed_fn: Optional[Callable] = None,
            data: Optional[pipeline.SplitData] = None,
            render: bool = False) -> dict:
  """Embeddings and metadata of one split, every example exactly once.

  Args:
    config: the run configuration.
    model: the network.
    variables: its params and batch_stats, replicated.
    split: query | gallery | val_query | val_gallery.
    sharding: the mesh the batches are sharded on.
    zero_flare: feed flare pseudo-labels of 0, so that FCE replaces nothing
      (a diagnostic).
    console: where the progress bar goes.
    missing: modalities to blank (blank_inputs): input 0, and delta 0 for a
      missing RGB or NI.
    embed_fn: embedding_function(config, model, sharding), to share one
      compilation between calls; built here when None.
    data: split_data(config, split), for a caller that holds it already;
      loaded here when None.
    render: render a flare onto every RGB and NI image first
      (render_eval_flare); a given embed_fn must be built with the same
      `render`.

  Returns:
    "embedding" (N, 3D) and the EVAL_METADATA fields, in split order;
    with a flare-aware fusion also "weights" (N, 3), the segment weights
    (the embedding is then fusion.normalized_segments').
    "flare" (N, 2) stays the real images' pseudo-labels, so the flare and
    clean queries are the same whatever is fed; "flare_input" and
    "flare_ratio_input" (N, 2) are the pseudo-labels and saturated fractions
    the model was fed.
  """
  # embedding_function marks what it built; another callable is trusted.
  if getattr(embed_fn, "render", render) != render:
    raise ValueError(f"extract(render={render}) was given an embed_fn built "
                     f"with render={not render}")
  if data is None:
    data = feed.split_data(config, split)
  if not data.num_examples:
    held_out = (f"; config.val_ids={config.val_ids} held out too few "
                "identities (or cameras) to make one, try more"
                if split.startswith("val") and config.val_ids else "")
    raise ValueError(f"The {split} split of {config.dataset} has no triplets "
                     f"to embed{held_out}")
  if model.num_cameras and len(data.camid) and (
      data.camid.max() >= model.num_cameras):
    raise ValueError(
        f"model.camera_embedding: {split} has camera {int(data.camid.max())}, "
        f"but the training split, which sized the embedding, has cameras "
        f"0-{model.num_cameras - 1} only")
  mean, std = feed.normalization(config)
  if embed_fn is None:
    embed_fn = embedding_function(config, model, sharding, render=render)
  keep = input_keep(missing, zero_flare)
  if render:
    keep["render_key"] = render_key(config, split)
  keep = mesh.put_replicated(keep, sharding.replicated)
  # Round the batch up to a multiple of the devices; padding is masked out.
  batch_size = -(-config.eval_batch_size // sharding.mesh.size) * (
      sharding.mesh.size)
  out = {k: [] for k in ("embedding", "weights", "flare_input",
                         "flare_ratio_input") + EVAL_METADATA}
  local_batch = batch_size // jax.process_count()
  num_batches = pipeline.num_eval_batches(data.num_examples, local_batch,
                                          jax.process_count())
  desc = f"embed {split} ({data.num_examples})" + (
      f" without {missing_label(missing)}" if missing else "") + (
          " with rendered flare" if render else "")
  with console.progress(num_batches, desc, unit="batch") as bar:
    for b, local in enumerate(pipeline.eval_batches(
        data, batch_size=local_batch,
        input_size=tuple(config.input_size), mean=mean, std=std,
        flare_threshold=config.flare.ratio_threshold,
        process_index=jax.process_index(),
        process_count=jax.process_count()), start=1):
      (embedding, weights), metadata = mesh.to_host(
          embed_fn(variables, sharding.global_batch(local), keep))
      out["embedding"].append(np.asarray(embedding))
      out["weights"].append(np.asarray(weights))
      for key, value in metadata.items():
        out[key].append(np.asarray(value))
      bar.update(b)
  result = {k: np.concatenate(v) for k, v in out.items()}
  if model.fusion == "concat":
    # The paper's Euclidean ranking: evaluation.distance_matrix ranks with
    # the fused distance where the weights are given.
    del result["weights"]
  valid = result["valid"].astype(bool)
  result = {k: v[valid] for k, v in result.items()}
  order = np.argsort(result["index"])
  return {k: v[order] for k, v in result.items()}

