"""How well the predicted flare masks match synthetic_flare's ground truth.

The paper shows masks only as pictures (Figure 5). synthetic_flare stores the
pixels its flare rendering touched (`flare_mask_rgb`, `flare_mask_ni`), so the
masks can be scored. FACENet's mask M_S is (h, w, C) at the plug-in
resolution, one decision per channel; the ground truth is (H, W) per image.
We bring the ground truth to (h, w) by area averaging (a cell is flare when
at least `min_fraction` of its pixels are) and score M_S against it broadcast
over the channels:

  IoU = sum_c |M_c & G| / sum_c |M_c | G|

over the images whose ground truth is non-empty at (h, w). Two references go
with it: the IoU of an all-ones mask (what "everything is flare" scores) and
the mask coverage (fraction of ones) on flare and on flare-free images.
"""

import io
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

from facenet_jax.constants import FLARE_MODALITIES, MODALITIES

GT_FEATURES = {m: f"flare_mask_{m}" for m in FLARE_MODALITIES}


def load_with_masks(dataset: str, split: str, builder_config: str = "",
                    data_dir: Optional[str] = None) -> dict:
  """Raw images, flare ratios and ground-truth masks of a prepared split.

  Returns:
    {"rgb"/"ni"/"ti": uint8 (N, H, W, 3), "gt_rgb"/"gt_ni": uint8 (N, H, W)
     in {0, 1}, "flare_ratio": float32 (N, 2), "pid": int64 (N,)}.

  Raises:
    ValueError: the dataset has no ground-truth masks (real datasets).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top,unused-import
  import input_pipeline.datasets

  name = f"{dataset}/{builder_config}" if builder_config else dataset
  builder = tfds.builder(name, data_dir=data_dir or None)
  missing = [f for f in GT_FEATURES.values() if f not in builder.info.features]
  if missing:
    raise ValueError(f"dataset {name} has no ground-truth flare masks "
                     f"{missing}; only synthetic_flare stores them")
  if not builder.is_prepared():
    builder.download_and_prepare()
  keys = MODALITIES + tuple(GT_FEATURES.values()) + ("flare_ratio", "pid")
  columns = {k: [] for k in keys}
  ds = builder.as_dataset(split=split, shuffle_files=False)
  for example in tfds.as_numpy(ds):
    for k in keys:
      columns[k].append(example[k])
  out = {}
  for m in MODALITIES:
    images = np.stack(columns[m])
    out[m] = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
  for m, feature in GT_FEATURES.items():
    out[f"gt_{m}"] = np.stack(columns[feature])[..., 0]
  out["flare_ratio"] = np.stack(columns["flare_ratio"]).astype(np.float32)
  out["pid"] = np.asarray(columns["pid"], np.int64)
  return out


def load_eval_split_with_masks(dataset: str, split: str,
                               builder_config: str = "",
                               data_dir: Optional[str] = None,
                               val_ids: int = 0) -> dict:
  """`load_with_masks` of the query + gallery images of an evaluation split.

  Args:
    dataset: TFDS name (synthetic_flare: the only one with masks).
    split: "test" (query + gallery) or "val" (val_query + val_gallery; with
      val_ids > 0, the training images of the identities carved out as the
      validation split, as training does it).
    builder_config: builder config name; "" for the builder's default.
    data_dir: where TFDS keeps prepared datasets; None for its default.
    val_ids: the run's config.val_ids.

  Returns:
    The `load_with_masks` dict of the query images, then the gallery's.
  """
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  if split not in pipeline.EVAL_SPLITS:
    raise ValueError(f"split must be one of {sorted(pipeline.EVAL_SPLITS)}, "
                     f"got {split!r}")
  if split == "val" and val_ids:
    data = load_with_masks(dataset, "train", builder_config, data_dir)
    keep = np.isin(data["pid"], pipeline.val_identities(data["pid"], val_ids))
    return {k: v[keep] for k, v in data.items()}
  parts = [load_with_masks(dataset, s, builder_config, data_dir)
           for s in pipeline.EVAL_SPLITS[split]]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# The rendered flare's ground truth, as synthetic_flare defines its own: the
# pixels it saturated where it added at least this much light ([0, 1] units).
RENDERED_MIN_LIGHT = 0.05


def with_rendered_flare(data: Mapping[str, np.ndarray], seed: int = 0,
                        pixel_low: int = 250,
                        batch_size: int = 256) -> dict:
  """`data` with a flare of flare_render's family on every RGB / NI image.

  The flare is not synthetic_flare's (see facenet_jax/flare_render.py), so
  masks scored on it are scored on a flare their training never showed.
  Image i gets the flare of key
  fold_in(PRNGKey(seed), i); the ground truth becomes the pixels the
  rendered flare saturated (a channel >= pixel_low where it added at least
  RENDERED_MIN_LIGHT), and flare_ratio the rendered images' share of
  saturated channel values, from which the pseudo-labels follow.
  """
  # pylint: disable-next=g-import-not-at-top
  from facenet_jax import flare_render
  n = len(data["pid"])
  key = jax.random.PRNGKey(seed)
  render = jax.jit(lambda idx, rgb, ni: flare_render.add_flare_by_index(
      key, idx, rgb, ni, pixel_low=pixel_low))
  out = dict(data)
  parts = {k: [] for k in ("rgb", "ni", "gt_rgb", "gt_ni", "flare_ratio")}
  for start in range(0, n, batch_size):
    # Pad the last chunk so that one shape is compiled.
    idx = np.minimum(np.arange(start, start + batch_size), n - 1)
    raw = {m: data[m][idx].astype(np.float32) / 255.0
           for m in FLARE_MODALITIES}
    rendered = render(idx.astype(np.int32), raw["rgb"], raw["ni"])
    keep = slice(0, min(n, start + batch_size) - start)
    for m, image in zip(FLARE_MODALITIES, (rendered.rgb, rendered.ni)):
      image = np.asarray(image)[keep]
      image8 = np.round(image * 255.0).astype(np.uint8)
      light = (image - raw[m][keep]).max(axis=-1)
      parts[m].append(image8)
      parts[f"gt_{m}"].append(((image8.max(axis=-1) >= pixel_low) &
                               (light >= RENDERED_MIN_LIGHT)).astype(np.uint8))
    parts["flare_ratio"].append(
        np.asarray(rendered.saturation)[keep].mean(axis=(1, 2)))
  for k, v in parts.items():
    out[k] = np.concatenate(v)
  out["flare_ratio"] = out["flare_ratio"].astype(np.float32)
  return out


def gt_at_resolution(gt: np.ndarray, size: Sequence[int],
                     min_fraction: float = 0.5) -> np.ndarray:
  """Area-pooled ground truth: (N, H, W) {0, 1} -> (N, h, w) bool.

  A cell is flare when at least min_fraction of the pixels it covers are.
  """
  if not 0 < min_fraction <= 1:
    raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
  gt = np.asarray(gt)
  if gt.ndim != 3:
    raise ValueError(f"gt must be (N, H, W), got {gt.shape}")
  h, w = size
  pooled = np.stack([
      np.asarray(Image.fromarray(g.astype(np.float32)).resize(
          (w, h), Image.Resampling.BOX)) for g in gt]) if len(gt) else (
              np.zeros((0, h, w), np.float32))
  return pooled >= min_fraction - 1e-6


def mask_scores(pred: np.ndarray, gt: np.ndarray,
                any_flare: np.ndarray) -> dict:
  """Scores (N, h, w, C) {0, 1} masks against (N, h, w) bool ground truth.

  Args:
    pred: predicted hard masks.
    gt: ground truth at the mask resolution.
    any_flare: (N,) whether the full-resolution ground truth has any flare
      pixel; images without any are the flare-free ones.

  Returns:
    iou: mean IoU over images with non-empty gt (broadcast over channels).
    iou_all_ones: the same for an all-ones prediction, the reference.
    coverage_flare / coverage_clean: mean fraction of ones in the predicted
      mask on images with non-empty gt / on flare-free images.
    num_flare / num_clean: the number of images in each group.
  """
  pred = np.asarray(pred).astype(bool)
  gt = np.asarray(gt).astype(bool)
  if pred.ndim != 4 or pred.shape[:3] != gt.shape:
    raise ValueError(f"pred (N, h, w, C) {pred.shape} does not match gt "
                     f"(N, h, w) {gt.shape}")
  g = gt[..., None]
  inter = np.sum(pred & g, axis=(1, 2, 3))
  union = np.sum(pred | g, axis=(1, 2, 3))
  flare = gt.any(axis=(1, 2))
  clean = ~np.asarray(any_flare, bool)
  coverage = pred.mean(axis=(1, 2, 3))
  nan = float("nan")

  def mean(x, where):
    return float(np.mean(x[where])) if np.any(where) else nan

  return {
      "iou": mean(inter / np.maximum(union, 1), flare),
      "iou_all_ones": mean(gt.mean(axis=(1, 2)), flare),
      "coverage_flare": mean(coverage, flare),
      "coverage_clean": mean(coverage, clean),
      "num_flare": int(flare.sum()),
      "num_clean": int(clean.sum()),
  }


def predict_masks(model, variables, images: Mapping[str, np.ndarray],
                  flare: np.ndarray, batch_size: int = 128) -> dict:
  """Hard masks {modality: uint8 (N, h, w, C)} of a model with MFMP.

  Args:
    model: a FACENet with use_mfmp.
    variables: its params and batch_stats.
    images: normalised float32 (N, H, W, 3) per modality.
    flare: (N, 2) pseudo-labels.
    batch_size: examples per forward pass.
  """
  if not model.use_mfmp:
    raise ValueError("the model has no MFMP, so it predicts no masks")
  if not len(flare):
    raise ValueError("predict_masks got no images")
  # The masks do not depend on the fusion's evidence: delta stands in for
  # the saturated fraction a learned fusion reads.
  fn = jax.jit(lambda v, x, f: model.apply(v, x, f, train=False,
                                           flare_ratio=f).masks)
  n = len(flare)
  out = {m: [] for m in FLARE_MODALITIES}
  for start in range(0, n, batch_size):
    stop = min(n, start + batch_size)
    # Pad the last batch so that one shape is compiled.
    idx = np.minimum(np.arange(start, start + batch_size), n - 1)
    masks = fn(variables, {m: images[m][idx] for m in MODALITIES}, flare[idx])
    for m in FLARE_MODALITIES:
      out[m].append(np.asarray(masks[m][:stop - start]).astype(np.uint8))
  return {m: np.concatenate(v) for m, v in out.items()}


def tile(image: np.ndarray, height: int, width: int,
         resample: Image.Resampling = Image.Resampling.NEAREST) -> Image.Image:
  """uint8 (h, w[, 3]) or float (h, w) in [0, 1] -> RGB tile of height x width.

  Nearest by default, so that mask cells stay sharp; photographs shrink
  better with Image.Resampling.BILINEAR.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.round(255 * np.clip(image, 0, 1)).astype(np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return Image.fromarray(image).resize((width, height), resample)


def to_png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


# The figure's layout in pixels: column-title strip, gap between tiles, and
# the strip under each tile that holds its caption.
TITLE_HEIGHT = 14
GAP = 4
CAPTION_HEIGHT = 13


def figure(rows: Sequence[Sequence[np.ndarray]], columns: Sequence[str],
           row_labels: Sequence[str], scale: int = 2,
           captions: Optional[Sequence[Sequence[str]]] = None) -> bytes:
  """A labelled grid of images as PNG bytes (like the paper's Figure 5).

  Args:
    rows: per row, one image per column: uint8 (H, W, 3) images, or float
      (h, w) maps in [0, 1] (masks, mask coverage) shown in grey.
    columns: column titles.
    row_labels: a label per row, drawn over its first tile.
    scale: tile size = scale x the first image's size.
    captions: optional text under each tile, one per column of every row
      ("" for none); each tile then has a CAPTION_HEIGHT strip below it.
  """
  if not rows or any(len(r) != len(columns) for r in rows):
    raise ValueError("every row needs one image per column")
  if captions is not None and (len(captions) != len(rows) or any(
      len(c) != len(columns) for c in captions)):
    raise ValueError("captions needs one text per tile")
  height, width = (scale * s for s in np.asarray(rows[0][0]).shape[:2])
  below = CAPTION_HEIGHT if captions is not None else 0
  canvas = Image.new("RGB", (len(columns) * (width + GAP) + GAP,
                             TITLE_HEIGHT + len(rows) * (height + below + GAP)
                             + GAP), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for j, name in enumerate(columns):
    draw.text((GAP + j * (width + GAP), 1), name, fill=(0, 0, 0))
  for i, row in enumerate(rows):
    y = TITLE_HEIGHT + GAP + i * (height + below + GAP)
    for j, image in enumerate(row):
      x = GAP + j * (width + GAP)
      canvas.paste(tile(image, height, width), (x, y))
      if captions is not None and captions[i][j]:
        draw.text((x, y + height + 1), captions[i][j], fill=(0, 0, 0))
    draw.text((GAP + 2, y + 2), row_labels[i], fill=(255, 255, 0))
  return to_png(canvas)


def score_run(config, workdir: str, data: Mapping[str, np.ndarray],
              min_fraction: float = 0.5, batch_size: int = 128) -> dict:
  """Mask scores of a finished run's final checkpoint on `data`.

  Args:
    config: the run's config (must have model.use_mfmp).
    workdir: the run directory.
    data: `load_with_masks` output.
    min_fraction: see gt_at_resolution.
    batch_size: examples per forward pass.

  Returns:
    {modality: mask_scores(...)} plus "masks": {modality: float32 (N, h, w)
    channel-mean coverage} and "gt": {modality: bool (N, h, w)}.
  """
  return score_run_sets(config, workdir, {"": data}, min_fraction,
                        batch_size)[""]


def score_run_sets(config, workdir: str,
                   datasets: Mapping[str, Mapping[str, np.ndarray]],
                   min_fraction: float = 0.5,
                   batch_size: int = 128) -> dict:
  """score_run on several image sets, restoring the checkpoint once.

  Returns:
    {name: score_run(config, workdir, data)} for each (name, data) of
    `datasets`.
  """
  # pylint: disable=g-import-not-at-top
  from facenet_jax import inference
  from facenet_jax.train import mesh
  from facenet_jax.train import train_state
  model, state, _ = train_state.restore_for_eval(config, workdir)
  variables = {"params": mesh.to_host(state.params),
               "batch_stats": mesh.to_host(state.batch_stats)}
  scores = {}
  for name, data in datasets.items():
    images = inference.preprocess({m: data[m] for m in MODALITIES}, config)
    flare = (data["flare_ratio"] > config.flare.ratio_threshold).astype(
        np.float32)
    masks = predict_masks(model, variables, images, flare, batch_size)
    out = {"masks": {}, "gt": {}}
    for m in FLARE_MODALITIES:
      gt = gt_at_resolution(data[f"gt_{m}"], masks[m].shape[1:3],
                            min_fraction)
      out[m] = mask_scores(masks[m], gt, data[f"gt_{m}"].any(axis=(1, 2)))
      out["masks"][m] = masks[m].mean(axis=-1, dtype=np.float32)
      out["gt"][m] = gt
    scores[name] = out
  return scores
