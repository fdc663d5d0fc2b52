"""Pictures of a trained run: rank lists, flare masks and an embedding map.

  python scripts/visualize.py --workdir /runs/wmveid863
  python scripts/main.py --config configs/synthetic.py --workdir /tmp/facenet \
      --mode visualize

Made from the run's final (or a given) checkpoint on its evaluation split
(config.eval.split: query vs gallery, or the val pair), for any dataset the
trainer evaluates; PNGs in WORKDIR/figures/:

  ranks_flare.png, ranks_clean.png
      A row per query (a few flare queries, a few clean ones): the query
      triplet (RGB, NI, TI side by side), then its top-k gallery triplets,
      framed green for the query's identity and red for another, the
      distance under each. The ranking is the evaluation's: the same
      distances (re-ranked with config.eval.rerank), the gallery entries of
      the query's identity and camera (scene, on MSVR310) removed. A query is
      a flare query when the pseudo-label delta of its RGB or NI image is 1,
      as in the flare / clean rows of the results; its frame is orange and
      its caption says FLARE.
  masks.png
      RGB and NI of a few images (flare ones first), each beside itself with
      the predicted mask M_S (mean over its channels, upsampled) as a heat
      overlay; under it delta and the mask coverage. Models with MFMP only.
  tsne.png
      A 2-D t-SNE of the query and gallery embeddings, coloured by identity,
      flare samples drawn as crosses, clean ones as discs. Needs scikit-learn
      (the viz extra, pip install -e ".[viz]"); skipped without it.

Images are shown as the model reads them before resizing: after CLAHE when
the run used it.

One file, though long: the three figures share the restored run, the
evaluation's embeddings and ranking, and the image-drawing helpers.
"""

import colorsys
import dataclasses
import io
import os
from typing import Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageDraw

from facenet_jax import checkpointing
from facenet_jax import console as console_lib
from facenet_jax import evaluation
from facenet_jax import mask_quality
from facenet_jax.train import evaluate
from facenet_jax.train import extract
from facenet_jax.train import feed
from facenet_jax.train import mesh
from facenet_jax.train import train_state
from facenet_jax.constants import FLARE_MODALITIES, MODALITIES
from input_pipeline import pipeline

FIGURES = ("ranks", "masks", "tsne")
FIGURES_DIR = "figures"
TSNE_HINT = ('t-SNE needs scikit-learn, which is not installed: '
             'pip install -e ".[viz]"')

# Frame colours of the rank lists.
MATCH = (0, 160, 0)
NON_MATCH = (215, 25, 25)
CLEAN_QUERY = (90, 90, 90)
FLARE_QUERY = (255, 140, 0)
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
# Mask captions must fit under a tile: tiles are at least this wide.
_MIN_MASK_TILE_WIDTH = 96
# The embedding map, in pixels: the side of its square, the margin inside it,
# and the title strip above it.
_MAP_SIZE = 720
_MAP_MARGIN = 16
_MAP_TITLE = 30


@dataclasses.dataclass(frozen=True)
class Options:
  """What visualize_run draws (the flags of scripts/visualize.py).

  Attributes:
    figures: which of FIGURES to make.
    num_queries: rank-list rows per figure, drawn at random (seeded) from the
      queries that have a true match, when `queries` is empty.
    queries: query indices (positions in the query split) to show instead;
      each goes to the flare or the clean figure by its pseudo-labels.
    topk: gallery entries per row.
    seed: seed of every random choice (queries, images, t-SNE).
    num_masks: images in the mask figure.
    max_points: the most embeddings in the t-SNE map (a seeded sample).
    tile_height: pixels of an image's height in the figures.
  """
  figures: Sequence[str] = FIGURES
  num_queries: int = 4
  queries: Sequence[int] = ()
  topk: int = 5
  seed: int = 0
  num_masks: int = 8
  max_points: int = 2000
  tile_height: int = 128

  def check(self) -> None:
    """Raises ValueError naming the flag of a bad value."""
    unknown = [f for f in self.figures if f not in FIGURES]
    if unknown or not self.figures:
      raise ValueError(f"--figures must name some of {', '.join(FIGURES)}, "
                       f"got {list(self.figures)}")
    for name, low in (("num_queries", 1), ("topk", 1), ("num_masks", 1),
                      ("max_points", 4), ("tile_height", 16)):
      value = getattr(self, name)
      if value < low:
        raise ValueError(f"--{name} must be >= {low}, got {value}")
    negative = [q for q in self.queries if q < 0]
    if negative:
      raise ValueError(f"--queries must be query indices >= 0, got {negative}")


# --- Rank lists ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankLayout:
  """Where the cells of a rank-list figure lie, in pixels.

  Row r is one query: its cell in column 0, its top-k gallery cells in
  columns 1..topk. A cell is a triplet of tiles (RGB, NI, TI) side by side
  inside a frame `border` pixels wide, its caption (two lines) under it.
  """
  tile_height: int
  tile_width: int
  topk: int
  border: int = 3
  gap: int = 6
  query_gap: int = 18
  caption: int = 26
  title: int = 18

  @property
  def cell_size(self) -> tuple[int, int]:
    """(width, height) of a framed cell."""
    return (3 * self.tile_width + 2 * self.border,
            self.tile_height + 2 * self.border)

  def cell(self, row: int, col: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a cell's frame; right, bottom exclusive."""
    width, height = self.cell_size
    x = self.gap + col * (width + self.gap) + (
        self.query_gap - self.gap if col else 0)
    y = self.title + self.gap + row * (height + self.caption + self.gap)
    return x, y, x + width, y + height

  def size(self, num_rows: int) -> tuple[int, int]:
    """(width, height) of a figure of num_rows rows."""
    _, height = self.cell_size
    return (self.cell(0, self.topk)[2] + self.gap,
            self.title + self.gap +
            num_rows * (height + self.caption + self.gap))


@dataclasses.dataclass(frozen=True)
class Cell:
  """One framed triplet of a rank list.

  Attributes:
    images: uint8 (H, W, 3) RGB, NI and TI images (any size: resized).
    frame: the frame's colour.
    lines: caption lines under the frame.
    line_colours: one colour per line.
  """
  images: Sequence[np.ndarray]
  frame: tuple[int, int, int]
  lines: Sequence[str]
  line_colours: Sequence[tuple[int, int, int]]


def rank_figure(rows: Sequence[Sequence[Optional[Cell]]], layout: RankLayout,
                title: str) -> bytes:
  """A rank-list figure as PNG bytes.

  Args:
    rows: per query, its cell then up to layout.topk gallery cells (None: an
      empty place, when the gallery has fewer entries).
    layout: the geometry.
    title: the line over the rows.
  """
  if not rows or any(len(r) > layout.topk + 1 for r in rows):
    raise ValueError(f"every row needs 1 to {layout.topk + 1} cells")
  canvas = Image.new("RGB", layout.size(len(rows)), _WHITE)
  draw = ImageDraw.Draw(canvas)
  draw.text((layout.gap, 3), title, fill=_BLACK)
  b = layout.border
  for r, row in enumerate(rows):
    for c, cell in enumerate(row):
      if cell is None:
        continue
      left, top, right, bottom = layout.cell(r, c)
      draw.rectangle((left, top, right - 1, bottom - 1), fill=cell.frame)
      for k, image in enumerate(cell.images):
        canvas.paste(_photo_tile(image, layout.tile_height, layout.tile_width),
                     (left + b + k * layout.tile_width, top + b))
      for k, (line, colour) in enumerate(zip(cell.lines, cell.line_colours)):
        draw.text((left, bottom + 1 + 12 * k), line, fill=colour)
  return mask_quality.to_png(canvas)


def _photo_tile(image: np.ndarray, height: int, width: int) -> Image.Image:
  return mask_quality.tile(image, height, width, Image.Resampling.BILINEAR)


def has_true_match(query: Mapping[str, np.ndarray],
                   gallery: Mapping[str, np.ndarray],
                   group: str) -> np.ndarray:
  """(Q,) bool: the query's identity is in the gallery outside its group."""
  same_id = query["pid"][:, None] == gallery["pid"][None, :]
  same_group = query[group][:, None] == gallery[group][None, :]
  return np.any(same_id & ~same_group, axis=1)


def check_queries(queries: Sequence[int], num_query: int) -> None:
  """Raises ValueError unless every index of --queries is a query."""
  outside = [int(q) for q in queries if q >= num_query]
  if outside:
    raise ValueError(f"--queries {outside}: the query split has {num_query} "
                     f"queries (indices 0 to {num_query - 1})")


def choose_queries(flared: np.ndarray, eligible: np.ndarray,
                   options: Options) -> tuple[np.ndarray, np.ndarray]:
  """The (flare, clean) queries of the two rank lists, by query index.

  options.queries, split by flare; else options.num_queries of each kind
  drawn without replacement (seeded) from the eligible queries.

  Args:
    flared: (Q,) bool, a flare query.
    eligible: (Q,) bool, may be drawn (those with a true match).
    options: num_queries, queries, seed.

  Raises:
    ValueError: an index of options.queries is not a query.
  """
  if len(options.queries):
    check_queries(options.queries, len(flared))
    chosen = np.asarray(options.queries, np.int64)
    return chosen[flared[chosen]], chosen[~flared[chosen]]
  rng = np.random.default_rng(options.seed)
  out = []
  for kind in (flared, ~flared):
    pool = np.flatnonzero(kind & eligible)
    pick = rng.choice(pool, min(options.num_queries, pool.size),
                      replace=False)
    out.append(np.sort(pick).astype(np.int64))
  return out[0], out[1]


def _flare_text(flare: np.ndarray) -> str:
  names = [m.upper() for m, f in zip(FLARE_MODALITIES, flare) if f > 0.5]
  return "FLARE (" + "+".join(names) + ")" if names else "clean"


def rank_rows(chosen: np.ndarray, top: np.ndarray, distmat: np.ndarray,
              query: Mapping[str, np.ndarray],
              gallery: Mapping[str, np.ndarray],
              query_images: Mapping[int, Sequence[np.ndarray]],
              gallery_images: Mapping[int, Sequence[np.ndarray]]
              ) -> list[list[Optional[Cell]]]:
  """The cells of a rank list.

  Args:
    chosen: (R,) query indices, one row each.
    top: (R, k) their ranked gallery indices (evaluation.ranked_gallery;
      -1 = none).
    distmat: (R, G) their distances.
    query: pid, camid, flare (Q, 2) of the query split.
    gallery: the same of the gallery split.
    query_images: query index -> (rgb, ni, ti) uint8 images.
    gallery_images: gallery index -> (rgb, ni, ti).
  """
  rows = []
  for r, q in enumerate(int(q) for q in chosen):
    flared = bool(np.any(query["flare"][q] > 0.5))
    row = [Cell(images=query_images[q],
                frame=FLARE_QUERY if flared else CLEAN_QUERY,
                lines=(f"query {q}  id {query['pid'][q]}  cam "
                       f"{query['camid'][q]}", _flare_text(query["flare"][q])),
                line_colours=(_BLACK, FLARE_QUERY if flared else _BLACK))]
    for k, g in enumerate(int(g) for g in top[r]):
      if g < 0:
        row.append(None)
        continue
      match = gallery["pid"][g] == query["pid"][q]
      extra = "  flare" if np.any(gallery["flare"][g] > 0.5) else ""
      row.append(Cell(images=gallery_images[g],
                      frame=MATCH if match else NON_MATCH,
                      lines=(f"#{k + 1}  d {distmat[r, g]:.3f}",
                             f"id {gallery['pid'][g]}  cam "
                             f"{gallery['camid'][g]}{extra}"),
                      line_colours=(_BLACK, _BLACK)))
    rows.append(row)
  return rows


# --- Masks --------------------------------------------------------------------


def choose_images(flared: np.ndarray, count: int, seed: int) -> np.ndarray:
  """Up to `count` indices: flare ones first (seeded draws), then clean ones."""
  rng = np.random.default_rng(seed)
  picks = []
  for pool in (np.flatnonzero(flared), np.flatnonzero(~flared)):
    take = min(count - sum(p.size for p in picks), pool.size)
    picks.append(np.sort(rng.choice(pool, take, replace=False)))
  return np.concatenate(picks).astype(np.int64)


def heat_overlay(image: np.ndarray, heat: np.ndarray,
                 alpha: float = 0.75) -> np.ndarray:
  """uint8 (H, W, 3) image with a (H, W) map in [0, 1] laid over it.

  The colour runs from red (small) to yellow (1) with opacity alpha x
  sqrt(map): where the map is 0 the image is unchanged, and a map of a few
  percent (a mask set in few of its channels) is still visible.
  """
  heat = np.clip(np.asarray(heat, np.float32), 0, 1)[..., None]
  colour = np.concatenate([np.ones_like(heat), heat, np.zeros_like(heat)],
                          axis=-1) * 255
  weight = alpha * np.sqrt(heat)
  out = (1 - weight) * image.astype(np.float32) + weight * colour
  return np.round(out).astype(np.uint8)


def _upsample(cells: np.ndarray, height: int, width: int) -> np.ndarray:
  """float (h, w) -> (height, width), bilinear."""
  return np.asarray(Image.fromarray(cells.astype(np.float32)).resize(
      (width, height), Image.Resampling.BILINEAR))


def mask_rows(images: Sequence[Sequence[np.ndarray]],
              masks: Mapping[str, np.ndarray], flare: np.ndarray,
              names: Sequence[str], height: int, width: int):
  """The mask figure's (rows, columns, captions) for mask_quality.figure.

  Args:
    images: per image, its (rgb, ni, ti) uint8 images.
    masks: predict_masks output, {modality: uint8 (N, h, w, C)}.
    flare: (N, 2) pseudo-labels.
    names: a caption per image ("query 3  id 7").
    height: tile height.
    width: tile width.
  """
  columns = []
  for m in FLARE_MODALITIES:
    columns += [m.upper(), f"{m.upper()} + M_S"]
  rows, captions = [], []
  for i, triplet in enumerate(images):
    row, caption = [], []
    for j, m in enumerate(FLARE_MODALITIES):
      shown = np.asarray(_photo_tile(triplet[MODALITIES.index(m)], height,
                                     width))
      heat = _upsample(masks[m][i].mean(axis=-1, dtype=np.float32), height,
                       width)
      row += [shown, heat_overlay(shown, heat)]
      coverage = 100 * float(masks[m][i].mean())
      caption += [names[i] if j == 0 else "",
                  f"delta {int(flare[i, j] > 0.5)}, {coverage:.0f}%"]
    rows.append(row)
    captions.append(caption)
  return rows, columns, captions


# --- Embedding map ------------------------------------------------------------


def tsne_2d(embedding: np.ndarray, seed: int) -> np.ndarray:
  """(N, D) embeddings -> (N, 2) t-SNE coordinates (scikit-learn).

  Embeddings wider than 50 are first reduced to 50 by PCA, as usual before
  t-SNE; perplexity 30, or (N - 1) / 3 for fewer points. One thread: t-SNE's
  OpenMP threads meet at each of its 1,000 iterations, and on cores busy
  with other work (a training beside it) two threads took 37 s for 2,000
  points where one took 9 s.

  Raises:
    ImportError: scikit-learn is missing (TSNE_HINT).
  """
  try:
    # pylint: disable-next=g-import-not-at-top
    from sklearn import decomposition, manifold
    import threadpoolctl  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(TSNE_HINT) from e
  x = np.asarray(embedding, np.float64)
  n = x.shape[0]
  if n < 4:
    raise ValueError(f"t-SNE needs at least 4 embeddings, got {n}")
  perplexity = float(min(30.0, (n - 1) / 3))
  with threadpoolctl.threadpool_limits(1):
    if x.shape[1] > 50 and n > 50:
      x = decomposition.PCA(50, random_state=seed).fit_transform(x)
    return manifold.TSNE(2, perplexity=perplexity, init="pca",
                         random_state=seed).fit_transform(x)


def identity_colours(pids: np.ndarray) -> dict[int, tuple[int, int, int]]:
  """A colour per identity: hues a golden angle apart, in sorted-id order."""
  colours = {}
  for k, pid in enumerate(np.unique(pids)):
    r, g, b = colorsys.hsv_to_rgb((0.61803398875 * k) % 1.0, 0.85, 0.85)
    colours[int(pid)] = (round(255 * r), round(255 * g), round(255 * b))
  return colours


def map_pixels(coords: np.ndarray) -> np.ndarray:
  """(N, 2) coordinates -> (N, 2) int pixel (x, y) centres in the map.

  One scale for both axes (the map keeps t-SNE's proportions), the points
  centred in the _MAP_SIZE square below the title.
  """
  coords = np.asarray(coords, np.float64)
  lo, hi = coords.min(axis=0), coords.max(axis=0)
  scale = (_MAP_SIZE - 2 * _MAP_MARGIN) / max(float(np.max(hi - lo)), 1e-12)
  centre = (lo + hi) / 2
  xy = (coords - centre) * scale + _MAP_SIZE / 2
  xy[:, 1] += _MAP_TITLE
  return np.round(xy).astype(np.int64)


def embedding_map(coords: np.ndarray, pids: np.ndarray, flare: np.ndarray,
                  title: str) -> bytes:
  """The t-SNE map as PNG bytes: a disc per clean sample, a cross per flare.

  Args:
    coords: (N, 2) coordinates.
    pids: (N,) identities (the colours: identity_colours).
    flare: (N,) bool.
    title: the lines over the map ("\\n" separates them).
  """
  colours = identity_colours(pids)
  canvas = Image.new("RGB", (_MAP_SIZE, _MAP_SIZE + _MAP_TITLE), _WHITE)
  draw = ImageDraw.Draw(canvas)
  draw.multiline_text((6, 3), title, fill=_BLACK, spacing=2)
  xy = map_pixels(coords)
  # Clean discs first, crosses on top: flare samples stay visible.
  for i in np.argsort(flare, kind="stable"):
    x, y = (int(v) for v in xy[i])
    colour = colours[int(pids[i])]
    if flare[i]:
      draw.line((x - 4, y - 4, x + 4, y + 4), fill=colour, width=2)
      draw.line((x - 4, y + 4, x + 4, y - 4), fill=colour, width=2)
    else:
      draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
  return mask_quality.to_png(canvas)


# --- The run ------------------------------------------------------------------


def _decode(encoded: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def _triplets(data: pipeline.SplitData,
              index: Sequence[int]) -> dict[int, tuple[np.ndarray, ...]]:
  return {int(i): tuple(_decode(getattr(data, m)[i]) for m in MODALITIES)
          for i in index}


def _concat(parts: Sequence[pipeline.SplitData]) -> pipeline.SplitData:
  return pipeline.SplitData(**{
      f.name: np.concatenate([getattr(p, f.name) for p in parts])
      for f in dataclasses.fields(pipeline.SplitData)})


def _tile_size(config: ml_collections.ConfigDict,
               height: int) -> tuple[int, int]:
  """(height, width) of a tile `height` high, in the run's input proportions."""
  h, w = config.input_size
  return height, max(1, round(height * w / h))


class Run:
  """What the figures of one run share: model, state, splits, embeddings.

  Attributes:
    config: the run's config.
    workdir: the run directory.
    model: the network.
    state: its restored TrainState (replicated).
    splits: the (query, gallery) split names of config.eval.split.
    data: their SplitData, as the model reads them.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               step: Optional[int] = None):
    """Restores the checkpoint and loads the evaluation split.

    Args:
      config: the run's config (checked against WORKDIR/config.json).
      workdir: the run directory.
      step: checkpoint step; None = the latest.
    """
    self.config = config
    self.workdir = workdir
    self.model, self.state, self._sharding = train_state.restore_for_eval(
        config, workdir, step)
    self.splits = feed.eval_splits(config)
    self.data = [feed.split_data(config, s) for s in self.splits]
    self._embedded = None

  @property
  def step(self) -> int:
    return int(mesh.to_host(self.state.step))

  def embedded(self, console: console_lib.Console = console_lib.SILENT
               ) -> tuple[dict, dict]:
    """(query, gallery) of extract.extract, computed at the first call.

    Every process must call it (the embeddings are gathered across them).
    """
    if self._embedded is None:
      variables = {"params": self.state.params,
                   "batch_stats": self.state.batch_stats}
      embed_fn = extract.embedding_function(self.config, self.model,
                                          self._sharding)
      self._embedded = tuple(
          extract.extract(self.config, self.model, variables, split,
                        self._sharding, console=console, embed_fn=embed_fn,
                        data=data)
          for split, data in zip(self.splits, self.data))
    return self._embedded


def _dataset_name(config: ml_collections.ConfigDict) -> str:
  return config.dataset + (f"/{config.dataset_config}"
                           if config.dataset_config else "")


def _flare_labels(config: ml_collections.ConfigDict,
                  data: pipeline.SplitData) -> np.ndarray:
  """(N, 2) pseudo-labels delta, as the evaluation pipeline computes them."""
  return (data.flare_ratio > config.flare.ratio_threshold).astype(np.float32)


def _rank_figures(run: Run, options: Options,
                  console: console_lib.Console) -> dict[str, bytes]:
  config = run.config
  query, gallery = run.embedded(console)
  group = "sceneid" if config.dataset in evaluate.MSVR_SCENE_DATASETS else "camid"
  flared = np.any(query["flare"] > 0.5, axis=1)
  chosen = dict(zip(("flare", "clean"), choose_queries(
      flared, has_true_match(query, gallery, group), options)))
  distmat = evaluation.distance_matrix(query, gallery, config.eval.rerank)
  th, tw = _tile_size(config, options.tile_height)
  layout = RankLayout(th, tw, min(options.topk, len(gallery["pid"])))
  out = {}
  for kind, rows in chosen.items():
    name = f"ranks_{kind}"
    if not rows.size:
      _skip(console, f"{name}.png",
            f"none of --queries is a {kind} query" if len(options.queries)
            else f"the {config.eval.split} split ({run.splits[0]}) has no "
            f"{kind} query with a true match in the gallery")
      continue
    top = evaluation.ranked_gallery(
        distmat[rows], query["pid"][rows], gallery["pid"],
        query[group][rows], gallery[group], layout.topk)
    cells = rank_rows(rows, top, distmat[rows], query, gallery,
                      _triplets(run.data[0], rows),
                      _triplets(run.data[1], np.unique(top[top >= 0])))
    title = (f"{_dataset_name(config)} {config.eval.split}: {kind} queries, "
             f"top-{layout.topk} of {len(gallery['pid'])} gallery triplets "
             "(green: same id, red: another; d: distance"
             f"{', re-ranked' if config.eval.rerank else ''})")
    out[name] = rank_figure(cells, layout, title)
  return out


def _mask_figure(run: Run, options: Options,
                 console: console_lib.Console) -> dict[str, bytes]:
  config = run.config
  if not run.model.use_mfmp:
    _skip(console, "masks.png",
          "the model has no MFMP (a baseline), so it predicts no mask")
    return {}
  both = _concat(run.data)
  picked = choose_images(np.any(_flare_labels(config, both) > 0.5, axis=1),
                         options.num_masks, options.seed)
  data = pipeline.subset(both, picked)
  mean, std = feed.normalization(config)
  batch = next(pipeline.eval_batches(
      data, batch_size=len(picked), input_size=tuple(config.input_size),
      mean=mean, std=std, flare_threshold=config.flare.ratio_threshold))
  variables = {"params": mesh.to_host(run.state.params),
               "batch_stats": mesh.to_host(run.state.batch_stats)}
  masks = mask_quality.predict_masks(run.model, variables,
                                     {m: batch[m] for m in MODALITIES},
                                     batch["flare"], batch_size=len(picked))
  num_query = run.data[0].num_examples
  names = [f"{'query' if i < num_query else 'gallery'} "
           f"{i if i < num_query else i - num_query}  id {data.pid[k]}"
           for k, i in enumerate(picked)]
  th, tw = _tile_size(config, options.tile_height)
  if tw < _MIN_MASK_TILE_WIDTH:
    th, tw = (round(th * _MIN_MASK_TILE_WIDTH / tw), _MIN_MASK_TILE_WIDTH)
  images = list(_triplets(data, range(len(picked))).values())
  rows, columns, captions = mask_rows(images, masks, batch["flare"], names,
                                      th, tw)
  return {"masks": mask_quality.figure(rows, columns, [""] * len(rows),
                                       scale=1, captions=captions)}


def _tsne_figure(run: Run, options: Options,
                 console: console_lib.Console) -> dict[str, bytes]:
  config = run.config
  query, gallery = run.embedded(console)
  embedding = np.concatenate([query["embedding"], gallery["embedding"]])
  pids = np.concatenate([query["pid"], gallery["pid"]])
  flared = np.any(np.concatenate([query["flare"], gallery["flare"]]) > 0.5,
                  axis=1)
  keep = np.arange(len(pids))
  if keep.size > options.max_points:
    keep = np.sort(np.random.default_rng(options.seed).choice(
        keep, options.max_points, replace=False))
  console.print(f"t-SNE of {keep.size} embeddings...")
  try:
    coords = tsne_2d(embedding[keep], options.seed)
  except (ImportError, ValueError) as e:
    _skip(console, "tsne.png", str(e))
    return {}
  sampled = (f"{keep.size} of {len(pids)}" if keep.size < len(pids) else
             f"all {len(pids)}")
  title = (f"t-SNE of {sampled} {config.eval.split} embeddings "
           f"({run.splits[0]} + {run.splits[1]}), "
           f"{np.unique(pids[keep]).size} identities, "
           f"{_dataset_name(config)}\n"
           "colour: identity; disc: clean, cross: flare (delta of RGB or NI)")
  return {"tsne": embedding_map(coords, pids[keep], flared[keep], title)}


def _skip(console: console_lib.Console, name: str, why: str) -> None:
  logging.info("Skipped %s: %s", name, why)
  console.print(f"skipped {name}: {why}")


_MAKERS = {"ranks": _rank_figures, "masks": _mask_figure,
           "tsne": _tsne_figure}


def draw(run: Run, options: Options = Options(),
         console: console_lib.Console = console_lib.SILENT) -> dict[str, str]:
  """Draws the figures of options into WORKDIR/figures.

  Every process must call it; process 0 draws and writes.

  Args:
    run: the restored run.
    options: what to draw (checked).
    console: where progress and skipped figures are shown.

  Returns:
    {figure name: path} of the PNGs written ("ranks_flare", "ranks_clean",
    "masks", "tsne", in that order; a skipped figure is absent); {} on the
    other processes.
  """
  options.check()
  check_queries(options.queries, run.data[0].num_examples)
  if {"ranks", "tsne"} & set(options.figures):
    run.embedded(console)
  if jax.process_index():
    return {}
  directory = os.path.join(run.workdir, FIGURES_DIR)
  os.makedirs(directory, exist_ok=True)
  written = {}
  for figure in FIGURES:
    if figure not in options.figures:
      continue
    for name, png in _MAKERS[figure](run, options, console).items():
      path = os.path.join(directory, f"{name}.png")
      with open(path, "wb") as f:
        f.write(png)
      written[name] = path
      logging.info("Wrote %s", path)
  return written


def visualize_run(config: Optional[ml_collections.ConfigDict], workdir: str,
                  step: Optional[int] = None, options: Options = Options(),
                  console: console_lib.Console = console_lib.SILENT
                  ) -> dict[str, str]:
  """The pictures of a run's checkpoint, in WORKDIR/figures (`draw`).

  Args:
    config: the run's config (None: WORKDIR/config.json); config.eval.split
      chooses the split.
    workdir: the run directory.
    step: checkpoint step; None = the latest.
    options: what to draw.
    console: where the header, progress and skipped figures are shown.

  Returns:
    `draw`'s {figure name: path}.

  Raises:
    FileNotFoundError: the workdir holds no run or not that checkpoint.
    ValueError: a bad option or config value.
  """
  options.check()
  checkpointing.check_run_dir(workdir, step)
  if config is None:
    config = checkpointing.load_config(workdir)
  feed.eval_splits(config)  # Config errors before the checkpoint is read.
  run = Run(config, workdir, step)
  (query_split, gallery_split), (query, gallery) = run.splits, run.data
  console.print(
      f"Pictures of step {run.step} of {workdir}: {_dataset_name(config)}, "
      f"{config.eval.split} split ({query_split} {query.num_examples} vs "
      f"{gallery_split} {gallery.num_examples} triplets)")
  return draw(run, options, console)


def where(written: Mapping[str, str], log_file: str) -> str:
  """The console's closing lines: every PNG written, then the log."""
  width = max([len(n) for n in written] + [len("figures")]) + 2
  lines = [f"{name:<{width}}{path}" for name, path in written.items()]
  if not written:
    lines.append(f"{'figures':<{width}}none written (see above)")
  lines.append(f"{'log':<{width}}{log_file}")
  return "\n".join(lines)
