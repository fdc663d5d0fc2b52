"""A persistent gallery of fused embeddings, searched with the run's fusion.

  gal = Gallery.for_embedder(embedder, step)   # or Gallery(dim, fusion, ...)
  ids = gal.add(out["embedding"], out["weights"], {"pid": pids, "camid": cams})
  found = gal.search(q["embedding"], q["weights"], k=10)
  gal.save("/data/city_gallery"); gal = Gallery.load("/data/city_gallery")

Distances are the run's (facenet_jax/fusion.py): for per-segment unit
vectors u_S and segment weights w_S,

  d(q, g)^2 = sum_S a_S |u_qS - u_gS|^2 / Z = 2 - 2 N / Z,
  a_S = w_S(q) w_S(g),  N = sum_S a_S u_qS . u_gS,  Z = sum_S a_S.

Ranking by d is ranking by the score N / Z, which is no inner product when
the gallery's weights vary (the "saturation" fusion). But for any s,

  N - s Z = [w_q * u_q, -s w_q] . [w_g * u_g, w_g]

is one: the index holds the "augmented" rows [w_g * u_g, w_g] (dimension
D + 3), and a query is scaled by its own weights and by s. One index serves
every weight pattern; no sub-index per weight level is needed.

The exact backend ("flat", IndexFlatIP) returns provably the evaluation's top
k. A search with parameter s returns the entries of largest N - s Z; an entry
it did not return has N - s Z <= t, the last returned value, so its score is
at most s + t / Z_lo (t >= 0; t / Z_hi for t < 0), Z_lo and Z_hi the query's
smallest and largest normaliser over the gallery. The returned candidates
are reranked by the exact distance; once that bound is below the k-th best
score among them, no other entry can enter the top k. Otherwise s is raised
to that k-th best score (a lower bound of the true one, so that with t < 0
the test passes: Dinkelbach's parametric form of a ratio) and the candidates
are doubled. The first s is the k-th best score over a fixed sample of 1,024
entries, also a lower bound: trained embeddings lie in a narrow cone where
every score is near 1, and s = 0 would rank them by Z, the weights. The
distances are those of fusion.numpy_distances (float64, returned as
float32), ties go to the earlier entry, and entries of the query's identity
and camera are dropped when asked (evaluation.evaluate_rank's Market-1501
protocol); a margin covers faiss's float32 inner products. With "concat"
(all weights 1), Z = 3 for every pair and the index holds the plain unit
rows.

Backends (faiss, the `search` extra): "flat" (exact) under "auto" up to
EXACT_THRESHOLD_FLOATS / D entries; beyond it "hnsw" (a graph: M 32,
efSearch 256; faiss's HNSW cannot remove entries); "ivf" (IVF-Flat,
spherical k-means of about sqrt(n) lists, nprobe 32, removal works) when
asked. An approximate index holds the plain unit rows [u_S] (its graph or
lists then follow what the images show: in a narrow cone, weighted rows are
told apart by their weights more than by their images), is searched with the
query's own weights, sum_S w_S(q) u_qS . u_gS, and its `candidates` x k
entries are reranked by the exact distance. The float32 embeddings are kept
beside the index for the rerank. Recall and speed:
scripts/benchmark_search.py, docs/performance.md.

The saved directory (`save`, docs/search.md): manifest.json (format version,
count, dimension, fusion, the run fingerprint, the backend and its
parameters, and the names of the files below), arrays-<gen>.npz (ids,
embedding, weights, pid, camid), metadata-<gen>.json (time and the source
path of each modality, as columns) and index-<gen>.faiss (faiss.write_index).
A save writes a new generation and then replaces manifest.json, so an
interrupted save leaves the previous gallery readable.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from facenet_jax import fusion as fusion_lib
from facenet_jax.constants import MODALITIES

FORMAT_NAME = "facenet_jax.gallery"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
BACKENDS = ("auto", "flat", "ivf", "hnsw")
# "auto": exact up to this many floats in the index (entries x dimension:
# 208,000 demo embeddings of 384, 13,000 of the paper's 6,144), HNSW beyond.
# A flat search scans them all once or a few times per query: 9 ms a query
# at 10^5 x 384 on two cores, 45 ms at 10^6 (docs/performance.md).
EXACT_THRESHOLD_FLOATS = 80_000_000
SEARCH_HINT = ('the gallery search needs faiss, which is not installed: '
               'pip install -e ".[search]"')
# Metadata columns: integer labels (-1 = unknown), a capture time (a number,
# a string or None) and the source path of each modality.
INT_COLUMNS = ("pid", "camid")
TEXT_COLUMNS = ("time",) + MODALITIES
# Margin on faiss's float32 inner products (|x| |v| <= 6) in the exactness
# test: a larger one costs candidates, never correctness.
_IP_TOLERANCE = 1e-3
# A segment norm further than this from 1/sqrt(3) is not a fused embedding.
_NORM_TOLERANCE = 1e-3
# Queries searched at once (faiss's matrix products want many), and the
# float64 elements of one rerank block (chunk x candidates x D).
_QUERY_CHUNK = 512
_RERANK_ELEMENTS = 1 << 23
# Gallery entries (evenly spaced) scored exactly for each query's first s.
_SAMPLE = 1024
_DEFAULT_PARAMS = {
    "flat": {},
    "ivf": {"nlist": 0, "nprobe": 32, "candidates": 4, "spherical": True},
    "hnsw": {"M": 32, "ef_construction": 64, "ef_search": 256,
             "candidates": 4},
}


class ModelMismatchError(ValueError):
  """Queries (or additions) come from another model than the gallery's."""


class EmptyGalleryError(ValueError):
  """A search of a gallery that holds no entry."""


def import_faiss():
  """faiss, or an ImportError naming the extra that installs it."""
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(SEARCH_HINT) from e
  return faiss


# --- The run fingerprint --------------------------------------------------------

# The config fields that decide what an image embeds to (and how two
# embeddings compare): the model with its fusion, the input and the flare
# evidence. Training-only fields (optimizer, batch, augmentation) are not in.
_FINGERPRINT_FIELDS = ("model", "input_size", "normalization", "preprocess",
                       "flare")


def run_fingerprint(config: Any, step: int, dim: int) -> dict:
  """What identifies the embeddings of one checkpoint of one run.

  Args:
    config: the run's ConfigDict (checkpointing.load_config: with the fusion
      chosen on val, if any).
    step: the checkpoint step.
    dim: the embedding dimension (Embedder.dim).

  Returns:
    {"id": 16 hex digits hashing the rest, "step", "dim", "fusion" {fusion,
    fusion_weight, fusion_full_ratio}, "flip_average"}.
  """
  fields = {name: _plain(config[name]) for name in _FINGERPRINT_FIELDS}
  fields["flip_average"] = bool(config.eval.flip_average)
  described = {"config": fields, "step": int(step), "dim": int(dim)}
  digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
  model = config.model
  return {"id": digest.hexdigest()[:16], "step": int(step), "dim": int(dim),
          "fusion": {"fusion": model.fusion,
                     "fusion_weight": float(model.fusion_weight),
                     "fusion_full_ratio": float(model.fusion_full_ratio)},
          "flip_average": fields["flip_average"]}


def _plain(value: Any) -> Any:
  """A ConfigDict value as JSON types (tuples as lists)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def describe_fingerprint(fingerprint: Optional[Mapping[str, Any]]) -> str:
  """'3f2a... (step 568, dim 384, saturation)' or 'none'."""
  if not fingerprint:
    return "none"
  return (f"{fingerprint['id']} (step {fingerprint['step']}, dim "
          f"{fingerprint['dim']}, {fingerprint['fusion']['fusion']})")


# --- Search results -------------------------------------------------------------


class SearchResult(NamedTuple):
  """The top k of each query, best first.

  Attributes:
    distances: (Q, k) float32 fused distances; inf where a query has fewer
      than k entries left.
    ids: (Q, k) int64 gallery ids; -1 there.
    metadata: per query, a list of k dicts (pid, camid, time, rgb, ni, ti;
      None where the id is -1); [] when not asked for.
  """
  distances: np.ndarray
  ids: np.ndarray
  metadata: list


@dataclasses.dataclass
class _Backend:
  """The index type: what was asked, what was built, its parameters."""
  requested: str = "auto"
  kind: str = ""
  params: dict = dataclasses.field(default_factory=dict)
  trained_on: int = 0


class Gallery:
  """Fused embeddings, their segment weights and metadata, with a faiss index.

  Entries keep the order they were added in; an id is never reused. The
  faiss index is built when a search (or a save) first needs it, and grows
  with later additions.
  """

  def __init__(self, dim: int, fusion: str = "concat",
               fingerprint: Optional[Mapping[str, Any]] = None,
               backend: str = "auto", params: Optional[Mapping] = None,
               exact_threshold: Optional[int] = None):
    """An empty gallery.

    Args:
      dim: D, the fused embedding's dimension (3 segments of D / 3).
      fusion: the run's fusion (fusion.FUSIONS); "concat" needs no weights.
      fingerprint: the run's (`run_fingerprint`); None for arrays of no run.
      backend: one of BACKENDS.
      params: the backend's parameters over _DEFAULT_PARAMS (ivf: nlist (0:
        about sqrt(n)), nprobe, candidates, spherical; hnsw: M,
        ef_construction, ef_search, candidates).
      exact_threshold: "auto" is flat up to this many entries (default
        EXACT_THRESHOLD_FLOATS / dim).
    """
    if fusion not in fusion_lib.FUSIONS:
      raise ValueError(f"fusion must be one of {fusion_lib.FUSIONS}, got "
                       f"{fusion!r}")
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dim <= 0 or dim % len(MODALITIES):
      raise ValueError(f"dim must be a positive multiple of "
                       f"{len(MODALITIES)}, got {dim}")
    self.dim = int(dim)
    self.fusion = fusion
    self.fingerprint = dict(fingerprint) if fingerprint else None
    self.exact_threshold = int(exact_threshold or
                               EXACT_THRESHOLD_FLOATS // self.dim)
    self._backend = _Backend(requested=backend, params=dict(params or {}))
    self._ids = np.zeros((0,), np.int64)
    self._embedding = np.zeros((0, self.dim), np.float32)
    self._weights = np.zeros((0, len(MODALITIES)), np.float32)
    self._ints = {c: np.zeros((0,), np.int64) for c in INT_COLUMNS}
    self._texts = {c: [] for c in TEXT_COLUMNS}
    self._pending = []  # Added chunks not yet concatenated.
    self._next_id = 0
    self._index = None
    self._indexed = 0  # Rows (in order) already in the index.

  @classmethod
  def for_embedder(cls, embedder: Any, step: int, **kwargs) -> "Gallery":
    """An empty gallery for an inference.Embedder of checkpoint `step`."""
    dim = embedder.dim
    return cls(dim, embedder.config.model.fusion,
               run_fingerprint(embedder.config, step, dim), **kwargs)

  def add_images(self, embedder: Any, rgb: np.ndarray, ni: np.ndarray,
                 ti: np.ndarray, metadata: Optional[Mapping] = None,
                 fingerprint: Optional[Mapping[str, Any]] = None
                 ) -> np.ndarray:
    """Embeds raw uint8 triplets (Embedder.embed) and adds them; their ids."""
    self.check_model(fingerprint, "the images' embeddings")
    out = embedder.embed(rgb, ni, ti)
    return self.add(out["embedding"], out["weights"], metadata)

  # --- Contents -----------------------------------------------------------------

  @property
  def size(self) -> int:
    return len(self._ids) + sum(len(p[0]) for p in self._pending)

  def __len__(self) -> int:
    return self.size

  @property
  def exact(self) -> bool:
    """The index is the flat one, searched exactly."""
    return self.backend == "flat"

  @property
  def augmented(self) -> bool:
    """The index rows are [w_S * u_S, w_S]: the flat index of a fusion with
    weights. (Approximate indexes hold the plain unit rows [u_S].)"""
    return self.fusion != "concat" and self.exact

  @property
  def index_dim(self) -> int:
    return self.dim + (len(MODALITIES) if self.augmented else 0)

  @property
  def backend(self) -> str:
    """The index type built (or that would be built now)."""
    return self._backend.kind or self._resolve_kind()

  @property
  def backend_params(self) -> dict:
    kind = self.backend
    return {**_DEFAULT_PARAMS[kind], **{
        k: v for k, v in self._backend.params.items()
        if k in _DEFAULT_PARAMS[kind]}}

  def ids(self) -> np.ndarray:
    self._consolidate()
    return self._ids.copy()

  def arrays(self) -> dict:
    """{"ids", "embedding", "weights", "pid", "camid"} (copies)."""
    self._consolidate()
    return {"ids": self._ids.copy(), "embedding": self._embedding.copy(),
            "weights": self._weights.copy(),
            **{c: v.copy() for c, v in self._ints.items()}}

  def metadata(self, ids: Sequence[int]) -> list:
    """A dict per id (pid, camid, time, rgb, ni, ti); None for -1."""
    rows = self._rows(np.asarray(ids, np.int64).ravel(), allow_missing=True)
    return [self._entry(r) if r >= 0 else None for r in rows]

  def keys(self, column: str = "rgb") -> set:
    """The set of a text column's values (what an indexing run skips)."""
    self._consolidate()
    return set(self._texts[column])

  def _entry(self, row: int) -> dict:
    out = {"id": int(self._ids[row])}
    out.update({c: int(v[row]) for c, v in self._ints.items()})
    out.update({c: v[row] for c, v in self._texts.items()})
    return out

  def _consolidate(self) -> None:
    if not self._pending:
      return
    chunks, self._pending = self._pending, []
    parts = list(zip(*chunks))
    self._ids = np.concatenate([self._ids, *parts[0]])
    self._embedding = np.concatenate([self._embedding, *parts[1]])
    self._weights = np.concatenate([self._weights, *parts[2]])
    for i, c in enumerate(INT_COLUMNS):
      self._ints[c] = np.concatenate([self._ints[c], *parts[3 + i]])
    for texts in parts[3 + len(INT_COLUMNS)]:
      for c in TEXT_COLUMNS:
        self._texts[c].extend(texts[c])

  def _rows(self, ids: np.ndarray, allow_missing: bool = False) -> np.ndarray:
    """Row positions of ids (ascending ids, so a binary search); -1 if none."""
    self._consolidate()
    if not len(self._ids):
      found, rows = np.zeros(ids.shape, bool), np.zeros(ids.shape, np.int64)
    else:
      rows = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
      found = self._ids[rows] == ids
    if not allow_missing and not np.all(found):
      raise KeyError(f"ids not in the gallery: {ids[~found][:10].tolist()}")
    return np.where(found & (ids >= 0), rows, -1)

  # --- Adding and removing ------------------------------------------------------

  def check_model(self, fingerprint: Optional[Mapping[str, Any]],
                  what: str = "the queries") -> None:
    """Raises ModelMismatchError unless fingerprint is the gallery's.

    A gallery without a fingerprint (built from arrays) accepts anything.
    """
    if not self.fingerprint or not fingerprint:
      return
    if fingerprint["id"] != self.fingerprint["id"]:
      raise ModelMismatchError(
          f"{what} come from another model than the gallery: gallery model "
          f"{describe_fingerprint(self.fingerprint)}, {what} "
          f"{describe_fingerprint(fingerprint)}; embed them with the run and "
          "checkpoint the gallery was built with, or index the gallery again")

  def _check_rows(self, embedding: np.ndarray, weights: Optional[np.ndarray],
                  what: str) -> tuple[np.ndarray, np.ndarray]:
    embedding = np.asarray(embedding, np.float32)
    if embedding.ndim == 1:
      embedding = embedding[None]
    if embedding.ndim != 2 or embedding.shape[1] != self.dim:
      raise ModelMismatchError(
          f"{what}: expected (N, {self.dim}) embeddings (the gallery's "
          f"dimension), got shape {embedding.shape}")
    m = len(MODALITIES)
    if self.fusion == "concat":
      # The paper's distance: every weight is 1, whatever was passed.
      weights = None
    elif weights is None:
      raise ValueError(f"{what}: the {self.fusion} fusion needs the "
                       "segment weights (Embedder.embed's 'weights')")
    if weights is None:
      weights = np.ones((len(embedding), m), np.float32)
    weights = np.asarray(weights, np.float32)
    if weights.ndim == 1:
      weights = weights[None]
    if weights.shape != (len(embedding), m):
      raise ValueError(f"{what}: weights must be ({len(embedding)}, {m}), "
                       f"got {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0) or np.any(
        weights > 1):
      raise ValueError(f"{what}: segment weights must be in (0, 1]")
    norms = np.linalg.norm(embedding.reshape(len(embedding), m, -1), axis=-1)
    bad = np.abs(norms * np.sqrt(m) - 1.0) > _NORM_TOLERANCE
    if np.any(bad):
      raise ValueError(
          f"{what}: row {int(np.flatnonzero(bad.any(axis=1))[0])} is not a "
          f"fused embedding: each of its {m} segments must have norm "
          f"1/sqrt({m}) (fusion.normalized_segments)")
    return embedding, weights

  def add(self, embedding: np.ndarray, weights: Optional[np.ndarray] = None,
          metadata: Optional[Mapping[str, Sequence]] = None) -> np.ndarray:
    """Adds entries; returns their ids.

    Args:
      embedding: (B, D) fused embeddings (Embedder.embed's "embedding").
      weights: (B, 3) segment weights (its "weights"); None with "concat".
      metadata: columns of B values each, all optional: "pid", "camid"
        (ints, default -1), "time" (numbers or strings, default None),
        "rgb", "ni", "ti" (source paths, default "").

    Returns:
      (B,) int64 ids, increasing.
    """
    embedding, weights = self._check_rows(embedding, weights, "add")
    n = len(embedding)
    metadata = dict(metadata or {})
    unknown = set(metadata) - set(INT_COLUMNS) - set(TEXT_COLUMNS)
    if unknown:
      raise ValueError(f"unknown metadata columns {sorted(unknown)}; known: "
                       f"{INT_COLUMNS + TEXT_COLUMNS}")
    ints = []
    for c in INT_COLUMNS:
      values = np.asarray(metadata.get(c, np.full(n, -1)), np.int64)
      if values.shape != (n,):
        raise ValueError(f"metadata {c!r} must have {n} values")
      ints.append(values)
    texts = {}
    for c in TEXT_COLUMNS:
      values = list(metadata.get(c, [None if c == "time" else ""] * n))
      if len(values) != n:
        raise ValueError(f"metadata {c!r} must have {n} values")
      texts[c] = [_json_value(v) for v in values]
    ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
    self._next_id += n
    self._pending.append((ids, embedding, weights, *ints, texts))
    return ids.copy()

  def remove(self, ids: Sequence[int]) -> int:
    """Removes entries by id; returns how many were removed.

    Raises:
      NotImplementedError: the index is "hnsw", which cannot remove entries
        (build the gallery with "flat" or "ivf", or index it again).
      KeyError: an id is not in the gallery.
    """
    ids = np.unique(np.asarray(ids, np.int64))
    if self._backend.kind == "hnsw":
      raise NotImplementedError(
          "the hnsw index cannot remove entries (faiss's HNSW graph has no "
          "removal); use the flat or ivf backend, or index the gallery again")
    rows = self._rows(ids)
    if self._index is not None:
      faiss = import_faiss()
      self._sync_index()
      self._index.remove_ids(faiss.IDSelectorBatch(ids))
      self._indexed -= len(rows)
    keep = np.ones(len(self._ids), bool)
    keep[rows] = False
    self._ids = self._ids[keep]
    self._embedding = self._embedding[keep]
    self._weights = self._weights[keep]
    for c in INT_COLUMNS:
      self._ints[c] = self._ints[c][keep]
    for c in TEXT_COLUMNS:
      self._texts[c] = [v for v, k in zip(self._texts[c], keep) if k]
    return len(rows)

  # --- The faiss index ----------------------------------------------------------

  def _resolve_kind(self) -> str:
    if self._backend.requested != "auto":
      return self._backend.requested
    return "flat" if self.size <= self.exact_threshold else "hnsw"

  def _index_rows(self, embedding: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """The rows the index holds.

    Flat: [w_S * u_S], and [w_S] when augmented. Approximate: [u_S], so that
    the graph or the lists follow what the images show; trained features lie
    in a narrow cone, where weighted rows would be told apart by their
    weights more than by their images.
    """
    m = len(MODALITIES)
    scale = np.float32(np.sqrt(m)) * (weights[:, :, None] if self.exact else
                                      np.ones_like(weights)[:, :, None])
    rows = (embedding.reshape(len(embedding), m, -1) * scale).reshape(
        len(embedding), -1)
    if self.augmented:
      rows = np.concatenate([rows, weights], axis=1)
    return np.ascontiguousarray(rows, np.float32)

  def _query_rows(self, embedding: np.ndarray, weights: np.ndarray,
                  s: np.ndarray) -> np.ndarray:
    """[w_S * u_S] (+ [-s w_S]): N - s Z as an inner product with _index_rows.

    For an approximate index, sum_S w_S(q) u_qS . u_gS: the query's own
    weights only (the candidates are reranked exactly).
    """
    m = len(MODALITIES)
    parts = embedding.reshape(len(embedding), m, -1) * (
        np.float32(np.sqrt(m)) * weights[:, :, None])
    rows = parts.reshape(len(embedding), -1)
    if self.augmented:
      rows = np.concatenate(
          [rows, -np.asarray(s, np.float32)[:, None] * weights], axis=1)
    return np.ascontiguousarray(rows, np.float32)

  def _build_index(self) -> None:
    """A new index of the resolved kind over every entry (trained on them)."""
    faiss = import_faiss()
    self._consolidate()
    kind = self._resolve_kind()
    self._backend.kind = kind
    params = self.backend_params
    d, n = self.index_dim, self.size
    if kind == "flat":
      index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "hnsw":
      graph = faiss.IndexHNSWFlat(d, int(params["M"]),
                                  faiss.METRIC_INNER_PRODUCT)
      graph.hnsw.efConstruction = int(params["ef_construction"])
      index = faiss.IndexIDMap2(graph)
    else:
      # About sqrt(n) lists of about sqrt(n) rows, a power of two.
      nlist = int(params["nlist"]) or int(np.clip(
          2 ** round(np.log2(max(np.sqrt(max(n, 1)), 1))), 16, 65536))
      # k-means needs about 39 points per list; fewer lists on a small gallery.
      nlist = max(1, min(nlist, n // 39))
      self._backend.params["nlist"] = nlist
      quantizer = faiss.IndexFlatIP(d)
      index = faiss.IndexIVFFlat(quantizer, d, nlist,
                                 faiss.METRIC_INNER_PRODUCT)
      index.cp.spherical = bool(params["spherical"])
      # 64 rows per list: k-means over more costs minutes at 10^6 and moves
      # the recall little (scripts/benchmark_search.py).
      sample = self._training_sample(min(n, 64 * nlist))
      index.train(self._index_rows(self._embedding[sample],
                                   self._weights[sample]))
      index.quantizer_trains_alone = 0
      self._quantizer = quantizer  # The IVF index does not own it.
    self._backend.trained_on = n
    self._index = index
    self._indexed = 0
    self._sync_index()

  def _training_sample(self, count: int) -> np.ndarray:
    if count >= self.size:
      return np.arange(self.size)
    return np.sort(np.random.default_rng(0).choice(self.size, count,
                                                   replace=False))

  def _sync_index(self) -> None:
    """Adds the entries added since the index last grew."""
    self._consolidate()
    chunk = 65536
    for start in range(self._indexed, self.size, chunk):
      stop = min(start + chunk, self.size)
      self._index.add_with_ids(
          self._index_rows(self._embedding[start:stop],
                           self._weights[start:stop]),
          self._ids[start:stop])
    self._indexed = self.size

  def _ensure_index(self) -> None:
    if self._index is None or (self._backend.requested == "auto" and
                               self._backend.kind != self._resolve_kind()):
      self._build_index()
    else:
      self._sync_index()

  def _configure_search(self) -> None:
    params = self.backend_params
    faiss = import_faiss()
    if self._backend.kind == "ivf":
      self._index.nprobe = int(params["nprobe"])
    elif self._backend.kind == "hnsw":
      faiss.downcast_index(self._index.index).hnsw.efSearch = int(
          params["ef_search"])

  # --- Search -------------------------------------------------------------------

  def search(self, embedding: np.ndarray,
             weights: Optional[np.ndarray] = None, k: int = 10,
             exclude_same_camera: Optional[tuple] = None,
             fingerprint: Optional[Mapping[str, Any]] = None,
             with_metadata: bool = True) -> SearchResult:
    """The k nearest entries of each query under the run's fused distance.

    Args:
      embedding: (Q, D) query embeddings (Embedder.embed's "embedding").
      weights: (Q, 3) their segment weights; None with "concat".
      k: entries per query.
      exclude_same_camera: None, or (q_pids, q_camids) (Q,) each: entries
        with the query's pid AND camid are left out, as evaluation ranks
        (entries of unknown pid, -1, are never left out).
      fingerprint: the queries' run (`run_fingerprint`); another model's
        raises ModelMismatchError naming both.
      with_metadata: fill SearchResult.metadata.

    Returns:
      A SearchResult.

    Raises:
      EmptyGalleryError: the gallery holds no entry.
      ModelMismatchError: another model's queries (fingerprint, dimension).
    """
    self.check_model(fingerprint)
    if self.size == 0:
      raise EmptyGalleryError("the gallery is empty: index some captures "
                              "first (scripts/search.py index)")
    if k < 1:
      raise ValueError(f"k must be positive, got {k}")
    embedding, weights = self._check_rows(embedding, weights, "the queries")
    num_q = len(embedding)
    excluded = None
    if exclude_same_camera is not None:
      q_pids, q_cams = (np.asarray(a, np.int64).ravel()
                        for a in exclude_same_camera)
      if q_pids.shape != (num_q,) or q_cams.shape != (num_q,):
        raise ValueError(f"exclude_same_camera needs ({num_q},) query pids "
                         "and camids")
      excluded = (q_pids, q_cams)
    self._ensure_index()
    self._configure_search()
    dist = np.full((num_q, k), np.inf, np.float32)
    rows = np.full((num_q, k), -1, np.int64)
    for start in range(0, num_q, _QUERY_CHUNK):
      part = slice(start, min(start + _QUERY_CHUNK, num_q))
      ex = None if excluded is None else (excluded[0][part],
                                          excluded[1][part])
      search = (self._search_exact if self._backend.kind == "flat" else
                self._search_approximate)
      dist[part], rows[part] = search(embedding[part], weights[part], k, ex)
    ids = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
    metadata = []
    if with_metadata:
      metadata = [[self._entry(r) if r >= 0 else None for r in row]
                  for row in rows]
    return SearchResult(distances=dist, ids=ids, metadata=metadata)

  def _faiss_search(self, embedding, weights, s, width):
    """(Q, width) inner products N - s Z and gallery rows (-1: none)."""
    width = int(min(width, self.size))
    scores, labels = self._index.search(
        self._query_rows(embedding, weights, s), width)
    rows = np.where(labels >= 0, self._rows(np.maximum(labels, 0),
                                            allow_missing=True), -1)
    return scores, rows

  def exact_distances(self, embedding: np.ndarray, weights: np.ndarray,
                      rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fusion.numpy_distances of each query to its candidate rows.

    The same float64 arithmetic in the same order, so that the values (and
    their float32 ties) are those of the evaluation's reference.

    Args:
      embedding: (B, D) float32 queries.
      weights: (B, 3) float32.
      rows: (B, C) gallery rows, -1 for none.

    Returns:
      (B, C) float32 distances (inf at -1) and (B, C) float64 squared ones.
    """
    step = max(1, _RERANK_ELEMENTS // max(rows.shape[1] * self.dim, 1))
    if len(rows) > step:
      parts = [self.exact_distances(embedding[i:i + step],
                                    weights[i:i + step], rows[i:i + step])
               for i in range(0, len(rows), step)]
      return (np.concatenate([p[0] for p in parts]),
              np.concatenate([p[1] for p in parts]))
    m = len(MODALITIES)
    b, c = rows.shape
    safe = np.maximum(rows, 0)
    q = embedding.astype(np.float64).reshape(b, 1, m, -1)
    g = self._embedding[safe].astype(np.float64).reshape(b, c, m, -1)
    gw = self._weights[safe]
    num = np.zeros((b, c))
    den = np.zeros_like(num)
    for s in range(m):
      diff = q[:, :, s, :] - g[:, :, s, :]
      square = m * np.sum(diff * diff, axis=-1)
      w = weights[:, None, s] * gw[:, :, s]
      num += w * square
      den += w
    squared = num / np.maximum(den, 1e-12)
    dist = np.sqrt(squared).astype(np.float32)
    dist[rows < 0] = np.inf
    squared[rows < 0] = np.inf
    return dist, squared

  def _valid(self, rows: np.ndarray, excluded: Optional[tuple]) -> np.ndarray:
    valid = rows >= 0
    if excluded is not None:
      safe = np.maximum(rows, 0)
      q_pids, q_cams = excluded
      same = ((self._ints["pid"][safe] == q_pids[:, None]) &
              (self._ints["camid"][safe] == q_cams[:, None]) &
              (q_pids[:, None] >= 0))
      valid &= ~same
    return valid

  def _top(self, dist: np.ndarray, rows: np.ndarray, valid: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best valid candidates per row: by distance, then gallery row."""
    d = np.where(valid, dist, np.inf)
    r = np.where(valid, rows, np.iinfo(np.int64).max)
    order = np.lexsort((r, d), axis=-1)[:, :k]
    top_d = np.take_along_axis(d, order, -1)
    top_r = np.take_along_axis(r, order, -1)
    top_r = np.where(np.isfinite(top_d), top_r, -1)
    out_d = np.full((len(d), k), np.inf, np.float32)
    out_r = np.full((len(d), k), -1, np.int64)
    out_d[:, :top_d.shape[1]] = top_d
    out_r[:, :top_r.shape[1]] = top_r
    return out_d, out_r

  def _sample_bound(self, embedding: np.ndarray, weights: np.ndarray, k: int,
                    excluded: Optional[tuple]) -> np.ndarray:
    """(B,) the k-th best score N / Z over a fixed sample of the gallery.

    A lower bound of the true k-th best score, and the first search's s: on
    embeddings that all lie in a narrow cone (trained re-ID features: every
    score near 1), s = 0 would rank by Z, i.e. by the weights, not by the
    images. -1 (the least score) where the sample has fewer than k valid
    entries.
    """
    n, m = self.size, len(MODALITIES)
    rows = np.unique(np.linspace(0, n - 1, min(n, _SAMPLE)).astype(np.int64))
    g = self._embedding[rows].astype(np.float64).reshape(len(rows), m, -1)
    gw = self._weights[rows].astype(np.float64)
    q = embedding.astype(np.float64).reshape(len(embedding), m, -1)
    w = weights.astype(np.float64)
    num = np.zeros((len(q), len(rows)))
    for seg in range(m):
      num += m * np.outer(w[:, seg], gw[:, seg]) * (q[:, seg] @ g[:, seg].T)
    score = num / (w @ gw.T)
    sample = np.broadcast_to(rows, score.shape)
    score = np.where(self._valid(sample, excluded), score, -np.inf)
    if score.shape[1] < k:
      return np.full(len(q), -1.0)
    kth = -np.partition(-score, k - 1, axis=1)[:, k - 1]
    # Rounding of this product against the reference's: far below margins.
    return np.maximum(kth - 1e-9, -1.0)

  def _search_exact(self, embedding, weights, k, excluded):
    """The flat index's provably exact top k (the module docstring's loop)."""
    num_q, n = len(embedding), self.size
    out_d = np.full((num_q, k), np.inf, np.float32)
    out_r = np.full((num_q, k), -1, np.int64)
    todo = np.arange(num_q)
    # A lower bound of each query's k-th best score N / Z (-1 is the least),
    # and the s of the first search.
    bound = self._sample_bound(embedding, weights, k, excluded)
    s_used = bound.copy()
    width = max(2 * k, k + 16)
    passes = 0
    # The range of each query's normaliser Z = sum_S w_S(q) w_S(g) over the
    # gallery (float64, as the scores).
    w64 = weights.astype(np.float64)
    z_lo = w64 @ self._weights.min(axis=0).astype(np.float64)
    z_hi = w64 @ self._weights.max(axis=0).astype(np.float64)
    while todo.size:
      ex = None if excluded is None else (excluded[0][todo],
                                          excluded[1][todo])
      scores, rows = self._faiss_search(embedding[todo], weights[todo],
                                        s_used[todo], width)
      dist, squared = self.exact_distances(embedding[todo], weights[todo],
                                           rows)
      valid = self._valid(rows, ex)
      score = np.where(valid, 1.0 - squared / 2.0, -np.inf)
      if score.shape[1] >= k:
        kth = -np.partition(-score, k - 1, axis=1)[:, k - 1]
        bound[todo] = np.maximum(bound[todo], kth)
      everything = rows.shape[1] >= n
      # An entry the pass did not return has N - s Z <= the last candidate's
      # value t, so its score N / Z is at most s + t / Z <= s + t / Z_lo
      # (t >= 0) or s + t / Z_hi (t < 0). Below the k-th best score found,
      # no such entry can be in the top k: the pass returned all of it.
      # (With s at that score, any t < 0 passes: Dinkelbach's test. With
      # "concat", Z = 3 for every entry.) The margin covers faiss's float32.
      last = scores[:, -1].astype(np.float64) + _IP_TOLERANCE
      z = np.where(last >= 0, z_lo[todo], z_hi[todo])
      proven = s_used[todo] + last / z < bound[todo]
      done = proven | everything
      out_d[todo[done]], out_r[todo[done]] = self._top(
          dist[done], rows[done], valid[done], k)
      left = todo[~done]
      # Next pass: s up to the bound where it is below (so that the test can
      # pass), and twice the candidates where it was already there (or after
      # two passes without growing, which bounds the number of passes).
      raised = s_used[left] < bound[left]
      s_used[left] = np.maximum(s_used[left], bound[left])
      passes += 1
      if np.any(~raised) or passes >= 2:
        width, passes = 2 * width, 0
      todo = left
    return out_d, out_r

  def _search_approximate(self, embedding, weights, k, excluded):
    """candidates x k of the approximate index, reranked exactly."""
    width = max(int(self.backend_params["candidates"]) * k, k)
    _, rows = self._faiss_search(embedding, weights, None, width)
    dist, _ = self.exact_distances(embedding, weights, rows)
    return self._top(dist, rows, self._valid(rows, excluded), k)

  # --- Saving and loading -------------------------------------------------------

  def manifest(self) -> dict:
    """The manifest.json of a save (without its "files")."""
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "count": self.size, "next_id": int(self._next_id),
        "dim": self.dim, "num_streams": len(MODALITIES),
        "modalities": list(MODALITIES), "fusion": self.fusion,
        "fingerprint": self.fingerprint,
        "distance": "fusion.numpy_distances (pair-normalised fused distance)",
        "index": {"requested": self._backend.requested,
                  "kind": self._backend.kind or None,
                  "params": self.backend_params if self._backend.kind else
                            dict(self._backend.params),
                  "index_dim": self.index_dim,
                  "rows": ("[w_S * u_S] + [w_S]" if self.augmented else
                           "[u_S]") + ", inner product",
                  "trained_on": int(self._backend.trained_on),
                  "exact_threshold": self.exact_threshold},
    }

  def save(self, directory: str, with_index: bool = True) -> str:
    """Writes the gallery to a directory (a new generation, then the manifest).

    Args:
      directory: created if missing; a previous save there is replaced.
      with_index: also write the faiss index (built if needed); without it,
        a load rebuilds it at the first search.

    Returns:
      The manifest's path.
    """
    os.makedirs(directory, exist_ok=True)
    self._consolidate()
    previous = _read_manifest(directory, missing_ok=True)
    generation = (previous or {}).get("generation", 0) + 1
    files = {"arrays": f"arrays-{generation:06d}.npz",
             "metadata": f"metadata-{generation:06d}.json", "index": None}
    with open(os.path.join(directory, files["arrays"]), "wb") as f:
      np.savez(f, ids=self._ids, embedding=self._embedding,
               weights=self._weights, **self._ints)
    with open(os.path.join(directory, files["metadata"]), "w") as f:
      json.dump(self._texts, f)
    if with_index and self.size:
      faiss = import_faiss()
      self._ensure_index()
      files["index"] = f"index-{generation:06d}.faiss"
      faiss.write_index(self._index, os.path.join(directory, files["index"]))
    manifest = {**self.manifest(), "generation": generation, "files": files}
    path = os.path.join(directory, MANIFEST_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    for name in (previous or {}).get("files", {}).values():
      if name and name not in files.values():
        try:
          os.remove(os.path.join(directory, name))
        except FileNotFoundError:
          pass
    return path

  @classmethod
  def load(cls, directory: str, with_index: bool = True) -> "Gallery":
    """Reads a saved gallery.

    Raises:
      FileNotFoundError: no manifest.json (not a gallery directory).
      ValueError: another format version, or files that disagree with it.
    """
    manifest = _read_manifest(directory)
    index = manifest["index"]
    gallery = cls(manifest["dim"], manifest["fusion"],
                  manifest["fingerprint"], index["requested"],
                  index["params"], index["exact_threshold"])
    files = manifest["files"]
    with np.load(os.path.join(directory, files["arrays"])) as arrays:
      ids = arrays["ids"]
      chunk = (ids, arrays["embedding"], arrays["weights"],
               *(arrays[c] for c in INT_COLUMNS))
    with open(os.path.join(directory, files["metadata"])) as f:
      texts = json.load(f)
    if len(ids) != manifest["count"] or any(
        len(texts[c]) != len(ids) for c in TEXT_COLUMNS):
      raise ValueError(f"{directory}: the saved arrays do not match "
                       f"{MANIFEST_FILE} ({len(ids)} rows, manifest says "
                       f"{manifest['count']})")
    gallery._pending.append((*chunk, texts))  # pylint: disable=protected-access
    gallery._next_id = int(manifest["next_id"])  # pylint: disable=protected-access
    if with_index and files.get("index"):
      faiss = import_faiss()
      # pylint: disable=protected-access
      gallery._index = faiss.read_index(os.path.join(directory,
                                                     files["index"]))
      gallery._backend.kind = index["kind"]
      gallery._backend.trained_on = int(index["trained_on"])
      gallery._indexed = gallery._index.ntotal
      if gallery._indexed != len(ids):
        raise ValueError(f"{directory}: the index holds "
                         f"{gallery._indexed} rows, the arrays {len(ids)}")
    return gallery


def _read_manifest(directory: str, missing_ok: bool = False
                   ) -> Optional[dict]:
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.exists(path):
    if missing_ok:
      return None
    raise FileNotFoundError(f"{path} not found: {directory} is not a gallery "
                            "directory (scripts/search.py index makes one)")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT_NAME:
    raise ValueError(f"{path} is not a facenet_jax gallery manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: gallery format version "
                     f"{manifest.get('format_version')}, this code reads "
                     f"version {FORMAT_VERSION}")
  return manifest


def _json_value(value: Any) -> Any:
  """A metadata value as a JSON scalar (NumPy scalars, paths as str)."""
  if value is None or isinstance(value, (str, bool)):
    return value
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value)
  return str(value)
