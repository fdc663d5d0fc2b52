"""What scripts/search.py reads, indexes and shows: runs, triplets, tables.

A `Source` is an ordered set of triplets with their metadata: a split of the
run's TFDS dataset, a folder of image files in the builders' per-identity
layout (or without identities), or image paths given one by one. Each
triplet has a key, its RGB source ("tfds:<dataset>:<split>:<file>" or the RGB
file's path), which is what a resumed indexing run skips.

Bad input is a ValueError (or FileNotFoundError) naming the file: a missing
modality, an image that does not decode (layout.BadSampleError), a gallery of
another model (gallery.ModelMismatchError), an empty gallery
(gallery.EmptyGalleryError). The scripts show each as one line.
"""

import dataclasses
import io
import os
from typing import Any, Callable, Optional, Sequence

from etils import epath
import ml_collections
import numpy as np
from PIL import Image

from facenet_jax import checkpointing
from facenet_jax import console as console_lib
from facenet_jax import gallery as gallery_lib
from facenet_jax.constants import MODALITIES
from input_pipeline.datasets import layout

_TFDS = "tfds:"
# The default pair of splits of config.eval.split-style names.
_SPLIT_PAIRS = {"test": {"query": "query", "gallery": "gallery"},
                "val": {"query": "val_query", "gallery": "val_gallery"}}


@dataclasses.dataclass
class Run:
  """A checkpoint of a run, ready to embed.

  Attributes:
    workdir: the run directory.
    step: the checkpoint step.
    config: its config (with the fusion chosen on val, if any).
    embedder: inference.Embedder of that step.
    fingerprint: gallery.run_fingerprint.
  """
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  embedder: Any
  fingerprint: dict

  def describe(self) -> str:
    return f"model {gallery_lib.describe_fingerprint(self.fingerprint)}"


def load_run(workdir: str, step: Optional[int] = None) -> Run:
  """The run's latest (or `step`) checkpoint as an Embedder, fingerprinted."""
  from facenet_jax import inference  # pylint: disable=g-import-not-at-top
  steps = checkpointing.check_run_dir(workdir, step)
  step = steps[-1] if step is None else step
  embedder = inference.Embedder.from_workdir(workdir, step)
  dim = embedder.dim
  return Run(workdir, step, embedder.config, embedder,
             gallery_lib.run_fingerprint(embedder.config, step, dim))


# --- Sources of triplets ---------------------------------------------------------


@dataclasses.dataclass
class Source:
  """Triplets to embed, in order.

  Attributes:
    description: for the console ("synthetic_flare/small gallery split").
    keys: (N,) the RGB source of each triplet (its identity in a gallery).
    columns: metadata columns of N values (gallery.INT_COLUMNS and
      TEXT_COLUMNS).
    reader: index -> (rgb, ni, ti) raw uint8 images.
  """
  description: str
  keys: list
  columns: dict
  reader: Callable[[int], tuple]

  def __len__(self) -> int:
    return len(self.keys)

  def metadata(self, indices: Sequence[int]) -> dict:
    return {c: [v[i] for i in indices] for c, v in self.columns.items()}

  def read(self, indices: Sequence[int]) -> list:
    return [self.reader(int(i)) for i in indices]

  def subset(self, indices: Sequence[int]) -> "Source":
    indices = [int(i) for i in indices]
    outside = [i for i in indices if not 0 <= i < len(self)]
    if outside:
      raise ValueError(f"--queries {outside}: the source has {len(self)} "
                       f"triplets (indices 0 to {len(self) - 1})")
    return Source(self.description, [self.keys[i] for i in indices],
                  self.metadata(indices),
                  lambda i, read=self.reader: read(indices[i]))


def split_name(config: ml_collections.ConfigDict, split: str,
               part: str) -> str:
  """The TFDS split of --split: test / val name a pair, else as given."""
  if split in _SPLIT_PAIRS:
    return _SPLIT_PAIRS[split][part]
  return split


def dataset_name(config: ml_collections.ConfigDict) -> str:
  return config.dataset + (f"/{config.dataset_config}"
                           if config.dataset_config else "")


def split_source(config: ml_collections.ConfigDict, split: str,
                 part: str) -> Source:
  """A split of the run's dataset (the raw images, as a deployment sees them).

  Args:
    config: the run's config (dataset, data_dir, manual_dir).
    split: test | val (the `part` of that pair) or a split name.
    part: "query" or "gallery".
  """
  name = split_name(config, split, part)
  data = _load_split(config, name)
  stem = f"{_TFDS}{dataset_name(config)}:{name}:"
  keys = [stem + f for f in data.file]
  columns = {"pid": data.pid.tolist(), "camid": data.camid.tolist(),
             "time": [None] * len(keys), "rgb": keys}
  for m in MODALITIES[1:]:
    columns[m] = [k + f"#{m}" for k in keys]
  return Source(f"{dataset_name(config)} {name} split ({len(keys)} "
                "triplets)", keys, columns,
                lambda i: tuple(_decode(getattr(data, m)[i])
                                for m in MODALITIES))


_SPLITS_READ = {}


def _load_split(config: ml_collections.ConfigDict, name: str):
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  key = (config.dataset, config.dataset_config, config.data_dir, name)
  if key not in _SPLITS_READ:
    _SPLITS_READ[key] = pipeline.load_split(
        config.dataset, name, builder_config=config.dataset_config,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None)
  return _SPLITS_READ[key]


def _decode(encoded: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def _camera(name: str) -> int:
  """The v<digit> camera token of a file name (WMVeID863's), -1 if none."""
  from input_pipeline.datasets import wmveid863  # pylint: disable=g-import-not-at-top
  found = set(wmveid863._CAMERA_TOKEN.findall(  # pylint: disable=protected-access
      epath.Path(name).stem))
  return int(found.pop()) if len(found) == 1 else -1


def folder_source(folder: str) -> Source:
  """Triplets of a folder: <vid>/{vis,ni,th}/<file> or {vis,ni,th}/<file>.

  Raises:
    FileNotFoundError: no such folder.
    layout.DatasetLayoutError: neither layout.
    layout.BadSampleError: a triplet lacks a modality (the message names the
      missing file).
  """
  root = epath.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f"--images {folder}: no such directory")
  dirs = layout.MODALITY_DIRS
  expected = ("  <vid>/vis/<file>, <vid>/ni/<file>, <vid>/th/<file> (the "
              "same <file> name; <vid> a number, the vehicle id)\n  or "
              "vis/<file>, ni/<file>, th/<file> without identities")
  if all((root / dirs[m]).is_dir() for m in MODALITIES):
    names = {m: sorted(p.name for p in (root / dirs[m]).iterdir()
                       if p.suffix.lower() in layout.IMAGE_SUFFIXES)
             for m in MODALITIES}
    every = sorted(set().union(*map(set, names.values())))
    refs = []
    for name in every:
      paths = tuple(root / dirs[m] / name for m in MODALITIES)
      missing = [str(p) for m, p in zip(MODALITIES, paths)
                 if name not in names[m]]
      refs.append(layout.SampleRef(
          file=name, paths=paths,
          problem=("missing modality image(s): " + ", ".join(missing)
                   if missing else "")))
    if not refs:
      raise layout.DatasetLayoutError(f"--images {folder}: no images in its "
                                      "vis/, ni/ and th/ folders")
  else:
    refs = layout.scan_id_folders(root.parent, root.name, expected)
  bad = [r for r in refs if r.problem]
  if bad:
    raise layout.BadSampleError(f"--images {folder}: {bad[0].problem}"
                                + (f" (and {len(bad) - 1} more triplets)"
                                   if len(bad) > 1 else ""))
  keys = [str(r.paths[0]) for r in refs]
  columns = {
      "pid": [int(r.folder) if r.folder else -1 for r in refs],
      "camid": [_camera(r.paths[0].name) for r in refs],
      # The capture time is unknown: the RGB file's modification time.
      "time": [os.path.getmtime(r.paths[0]) for r in refs],
      **{m: [str(r.paths[i]) for r in refs] for i, m in enumerate(MODALITIES)}}
  return Source(f"{folder} ({len(refs)} triplets)", keys, columns,
                lambda i: read_files(refs[i].paths))


def read_files(paths: Sequence[Any]) -> tuple:
  """Decodes (rgb, ni, ti) image files; BadSampleError names a bad one."""
  out = []
  for path in paths:
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such image file")
    out.append(layout.decode_image_file(path)[1])
  return tuple(out)


def path_source(rgb: Sequence[str], ni: Sequence[str],
                ti: Sequence[str]) -> Source:
  """Query triplets given as --rgb, --ni and --ti paths (one or more each).

  Raises:
    ValueError: a modality is missing (or the lists differ in length).
    FileNotFoundError: a path does not exist.
  """
  counts = {"--rgb": len(rgb), "--ni": len(ni), "--ti": len(ti)}
  if len(set(counts.values())) != 1:
    given = ", ".join(f"{n} {flag}" for flag, n in counts.items())
    raise ValueError(f"a query triplet needs an RGB, an NI and a TI image "
                     f"(missing modality): got {given}")
  triplets = list(zip(rgb, ni, ti))
  for paths in triplets:
    for path in paths:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
  columns = {"pid": [-1] * len(triplets),
             "camid": [_camera(os.path.basename(t[0])) for t in triplets],
             "time": [os.path.getmtime(t[0]) for t in triplets],
             **{m: [t[i] for t in triplets] for i, m in enumerate(MODALITIES)}}
  return Source(f"{len(triplets)} query triplet(s)",
                [t[0] for t in triplets], columns,
                lambda i: read_files(triplets[i]))


# --- Embedding and indexing ---------------------------------------------------------


def embed(run: Run, triplets: Sequence[tuple]) -> dict:
  """Embedder.embed of triplets, those of one image size at a time."""
  n = len(triplets)
  out = {"embedding": np.zeros((n, run.embedder.dim), np.float32),
         "weights": np.ones((n, len(MODALITIES)), np.float32)}
  sizes = {}
  for i, triplet in enumerate(triplets):
    sizes.setdefault(tuple(x.shape for x in triplet), []).append(i)
  for rows in sizes.values():
    images = [np.stack([triplets[i][j] for i in rows])
              for j in range(len(MODALITIES))]
    part = run.embedder.embed(*images)
    for key in out:
      out[key][rows] = part[key]
  return out


def open_gallery(directory: str, run: Run,
                 backend: str = "auto") -> gallery_lib.Gallery:
  """The gallery in directory (checked against the run), or a new one."""
  if os.path.exists(os.path.join(directory, gallery_lib.MANIFEST_FILE)):
    gal = gallery_lib.Gallery.load(directory)
    gal.check_model(run.fingerprint, "the run's embeddings")
    return gal
  return gallery_lib.Gallery(run.embedder.dim, run.config.model.fusion,
                             run.fingerprint, backend=backend)


def load_gallery(directory: str) -> gallery_lib.Gallery:
  """A saved gallery; EmptyGalleryError if it holds no entry."""
  gal = gallery_lib.Gallery.load(directory)
  if not len(gal):
    raise gallery_lib.EmptyGalleryError(
        f"--gallery {directory} is empty: index some captures first "
        "(scripts/search.py index)")
  return gal


def index_source(gal: gallery_lib.Gallery, run: Run, source: Source,
                 directory: str, chunk: int,
                 console: console_lib.Console = console_lib.SILENT) -> int:
  """Embeds the triplets of source that gal lacks, saving after each chunk.

  Returns:
    How many were added.
  """
  have = gal.keys("rgb")
  todo = [i for i, key in enumerate(source.keys) if key not in have]
  done = len(source) - len(todo)
  with console.progress(len(source), "index", unit="triplet",
                        initial=done) as progress:
    for start in range(0, len(todo), chunk):
      picked = todo[start:start + chunk]
      out = embed(run, source.read(picked))
      gal.add(out["embedding"], out["weights"], source.metadata(picked))
      gal.save(directory, with_index=False)
      progress.update(done + start + len(picked))
  gal.save(directory)
  return len(todo)


# --- Searching and showing ------------------------------------------------------------


def search(gal: gallery_lib.Gallery, run: Run, source: Source,
           triplets: Sequence[tuple], k: int,
           exclude_same_camera: bool = True) -> tuple:
  """The gallery's top k of each triplet; (SearchResult, query metadata)."""
  out = embed(run, triplets)
  meta = source.metadata(range(len(source)))
  queries = [{"key": key, **{c: meta[c][i] for c in meta}}
             for i, key in enumerate(source.keys)]
  exclude = ((np.asarray(meta["pid"]), np.asarray(meta["camid"]))
             if exclude_same_camera else None)
  found = gal.search(out["embedding"], out["weights"], k,
                     exclude_same_camera=exclude, fingerprint=run.fingerprint)
  return found, queries


def _label(value: int) -> str:
  return "-" if value is None or value < 0 else str(value)


def _time(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    import datetime  # pylint: disable=g-import-not-at-top
    return datetime.datetime.fromtimestamp(
        value, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
  return str(value)


def format_table(found: gallery_lib.SearchResult,
                 queries: Sequence[dict]) -> str:
  """Per query: a line naming it, then its ranked entries."""
  lines = []
  for q, query in enumerate(queries):
    lines.append(f"\nquery {q}  id {_label(query['pid'])}  cam "
                 f"{_label(query['camid'])}  {query['key']}")
    lines.append(f"{'rank':>5} {'distance':>9} {'id':>7} {'pid':>5} "
                 f"{'cam':>4}  {'time':<19}  source (rgb)")
    for r, entry in enumerate(found.metadata[q]):
      if entry is None:
        continue
      mark = ("" if query["pid"] is None or query["pid"] < 0 or
              entry["pid"] < 0 else
              ("  same id" if entry["pid"] == query["pid"] else ""))
      lines.append(f"{r + 1:>5} {found.distances[q, r]:>9.4f} "
                   f"{entry['id']:>7} {_label(entry['pid']):>5} "
                   f"{_label(entry['camid']):>4}  {_time(entry['time']):<19}"
                   f"  {entry['rgb']}{mark}")
  return "\n".join(lines).lstrip("\n")


def read_entry(config: ml_collections.ConfigDict, entry: dict) -> tuple:
  """The (rgb, ni, ti) images of a gallery entry, from its sources."""
  key = entry["rgb"]
  if key.startswith(_TFDS):
    _, _, split, file = key.split(":", 3)
    data = _load_split(config, split)
    where = np.flatnonzero(data.file == file)
    if not where.size:
      raise FileNotFoundError(f"{key}: not in the {split} split any more")
    return tuple(_decode(getattr(data, m)[where[0]]) for m in MODALITIES)
  return read_files([entry[m] for m in MODALITIES])


def draw(gal: gallery_lib.Gallery, run: Run,
         found: gallery_lib.SearchResult, queries: Sequence[dict],
         triplets: Sequence[tuple], path: str, k: int,
         tile_height: int = 96) -> None:
  """The rank list PNG of scripts/visualize.py's style (green: same id)."""
  from facenet_jax import visualize  # pylint: disable=g-import-not-at-top
  h, w = run.config.input_size
  layout_ = visualize.RankLayout(tile_height, max(1, round(tile_height * w / h)),
                                 k)
  black, grey = (0, 0, 0), visualize.CLEAN_QUERY
  rows = []
  for q, query in enumerate(queries):
    row = [visualize.Cell(
        images=triplets[q], frame=grey,
        lines=(f"query {q}  id {_label(query['pid'])}  cam "
               f"{_label(query['camid'])}", os.path.basename(query["key"])),
        line_colours=(black, black))]
    for r, entry in enumerate(found.metadata[q]):
      if entry is None:
        row.append(None)
        continue
      known = query["pid"] is not None and query["pid"] >= 0 and (
          entry["pid"] >= 0)
      frame = (grey if not known else visualize.MATCH
               if entry["pid"] == query["pid"] else visualize.NON_MATCH)
      row.append(visualize.Cell(
          images=read_entry(run.config, entry), frame=frame,
          lines=(f"#{r + 1}  d {found.distances[q, r]:.3f}",
                 f"id {_label(entry['pid'])}  cam {_label(entry['camid'])}"),
          line_colours=(black, black)))
    rows.append(row)
  title = (f"top-{k} of {len(gal)} gallery entries ({gal.backend} index); "
           "green: same id, red: another, grey: unknown; d: fused distance")
  png = visualize.rank_figure(rows, layout_, title)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(png)
