"""Times the gallery's faiss backends against NumPy brute force; prints a table.

For each dimension (--dims) and gallery size (--sizes) a synthetic gallery of
fused embeddings is made, and one query set is searched by:

  * brute: NumPy brute force, the baseline: N = X V^T (one matrix product of
    the weighted query and gallery segments), Z = W_q W_g^T, score N / Z and
    `argpartition` for the top k;
  * flat: the gallery's exact backend (faiss IndexFlatIP and the exactness
    loop of facenet_jax/gallery.py), the reference of every recall;
  * ivf: IVF-Flat (--nprobe of about sqrt(n) lists), reranked exactly;
  * hnsw: an HNSW graph (M 32, efSearch 256), the default beyond the exact
    threshold, up to --hnsw_max entries (its build takes about 5 minutes at
    10^6 x 384 on two cores).

The synthetic captures are what a re-ID gallery holds: identities of
--per_id captures each, every capture a noisy copy of its identity's three
unit segments, with saturation-fusion weights in [0.5, 1] for RGB and NI (a
flared segment noisier); queries are new captures of gallery identities.
--data=uniform draws independent uniform unit segments instead (no
neighbourhood structure: the hardest case for an approximate index).
With --real_workdir, a trained run's test split (its query and gallery
embeddings, inference.Embedder) is measured too, at its own size.

Columns: build (s) of the index (brute: none), memory per embedding (bytes:
the faiss index, serialised, plus the gallery's float32 copy for the exact
rerank with its weights and labels, 4 D + 28; brute: that copy alone, the
matrix it multiplies with),
queries/s over the query set in batches of --batch, recall@10 against flat,
and the speed-up over brute. Everything runs in one process on the CPU cores
faiss finds (OMP_NUM_THREADS).

Run:
  python scripts/benchmark_search.py
  python scripts/benchmark_search.py --sizes=10000,100000,1000000 \
      --dims=384,6144 --real_workdir=/tmp/facenet_demo
"""

import os
import sys
import time

# TensorFlow (the real run's split) without its C++ start-up lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The repository root, so that the packages import from a clone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

from facenet_jax import gallery as gallery_lib  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["10000", "100000", "1000000"],
                           "Gallery sizes.")
_DIMS = flags.DEFINE_list(
    "dims", ["384", "6144"], "Fused embedding dimensions (384: the demo "
    "model, 3 x 128; 6144: the paper's ResNet50, 3 x 2048).")
_QUERIES = flags.DEFINE_integer("queries", 1000, "Queries per gallery.")
_K = flags.DEFINE_integer("k", 10, "Neighbours per query (recall@k).")
_BATCH = flags.DEFINE_integer("batch", 256, "Queries per search call.")
_PER_ID = flags.DEFINE_integer("per_id", 10, "Captures per identity.")
_PER_TYPE = flags.DEFINE_integer("per_type", 10,
                                 "Identities per vehicle type.")
_DATA = flags.DEFINE_enum("data", "clustered", ["clustered", "uniform"],
                          "Synthetic embeddings (see the docstring).")
_NPROBE = flags.DEFINE_integer("nprobe", 32, "IVF lists searched.")
_HNSW_MAX = flags.DEFINE_integer("hnsw_max", 1_000_000,
                                 "Largest gallery given an HNSW index.")
_MAX_GB = flags.DEFINE_float(
    "max_gb", 12.0, "Skip a size whose float32 gallery copies (about three: "
    "the gallery, the flat index, the brute-force matrix) exceed this.")
_REAL = flags.DEFINE_string(
    "real_workdir", "", "A trained run whose test split is measured too.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

# Noise per coordinate of a unit segment of 128 (scaled by sqrt(128 / the
# segment's size), so that the similarities do not depend on the dimension):
# of an identity around its vehicle type (--per_type identities share one),
# and of a capture around its identity (cosine about 0.8 at weight 1; a
# flared segment, weight 0.5, gets twice the noise).
_TYPE_NOISE = 0.08
_NOISE = 0.06
_NOISE_SEGMENT = 128


def synthetic(rng: np.random.Generator, num: int, dim: int, centres,
              kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(num, dim) fused embeddings, (num, 3) weights, (num,) identities."""
  m = 3
  seg = dim // m
  weights = np.ones((num, m), np.float32)
  weights[:, :2] = rng.uniform(0.5, 1.0, (num, 2)).astype(np.float32)
  out = np.empty((num, dim), np.float32)
  pids = rng.integers(0, len(centres), num) if kind == "clustered" else (
      np.full(num, -1))
  for start in range(0, num, 65536):
    stop = min(start + 65536, num)
    x = rng.standard_normal((stop - start, m, seg), dtype=np.float32)
    if kind == "clustered":
      noise = _NOISE * np.sqrt(_NOISE_SEGMENT / seg) * (
          1.0 + 2.0 * (1.0 - weights[start:stop]))[..., None]
      x = centres[pids[start:stop]] + noise * x
    x /= np.linalg.norm(x, axis=-1, keepdims=True) * np.float32(np.sqrt(m))
    out[start:stop] = x.reshape(stop - start, dim)
  return out, weights, pids


def identity_centres(rng: np.random.Generator, num_ids: int,
                     dim: int) -> np.ndarray:
  """(num_ids, 3, dim / 3) unit segments, grouped in vehicle types."""
  num_types = max(num_ids // _PER_TYPE.value, 1)
  types = rng.standard_normal((num_types, 3, dim // 3), dtype=np.float32)
  types /= np.linalg.norm(types, axis=-1, keepdims=True)
  spread = _TYPE_NOISE * np.sqrt(_NOISE_SEGMENT / (dim // 3))
  c = types[rng.integers(0, num_types, num_ids)] + spread * (
      rng.standard_normal((num_ids, 3, dim // 3), dtype=np.float32))
  return c / np.linalg.norm(c, axis=-1, keepdims=True)


def index_size(gal: gallery_lib.Gallery) -> int:
  """Bytes of the gallery's faiss index (its serialised form: the vectors,
  lists or graph links it holds)."""
  faiss = gallery_lib.import_faiss()
  return faiss.serialize_index(gal._index).size  # pylint: disable=protected-access


def brute_force(gal: gallery_lib.Gallery, queries: np.ndarray,
                q_weights: np.ndarray, k: int, batch: int
                ) -> tuple[np.ndarray, float]:
  """The baseline's (Q, k) ids and queries/s."""
  arrays = gal.arrays()
  # pylint: disable=protected-access
  matrix = gal._index_rows(arrays["embedding"], arrays["weights"])[
      :, :gal.dim]
  g_weights = arrays["weights"]
  del arrays
  out = np.empty((len(queries), k), np.int64)
  start_time = time.perf_counter()
  for start in range(0, len(queries), batch):
    q = queries[start:start + batch]
    w = q_weights[start:start + batch]
    x = gal._query_rows(q, w, np.zeros(len(q)))[:, :gal.dim]
    score = (x @ matrix.T) / (w @ g_weights.T)
    top = np.argpartition(-score, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(score, top, 1), axis=1)
    out[start:start + batch] = np.take_along_axis(top, order, 1)
  return out, len(queries) / (time.perf_counter() - start_time)


def timed_search(gal, queries, q_weights, k, batch) -> tuple[np.ndarray, float]:
  gal.search(queries[:2], q_weights[:2], k, with_metadata=False)  # Warm-up.
  ids = np.empty((len(queries), k), np.int64)
  start_time = time.perf_counter()
  for start in range(0, len(queries), batch):
    ids[start:start + batch] = gal.search(
        queries[start:start + batch], q_weights[start:start + batch], k,
        with_metadata=False).ids
  return ids, len(queries) / (time.perf_counter() - start_time)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
  hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(np.sum(t >= 0), 1)
          for f, t in zip(found, truth)]
  return float(np.mean(hits))


def measure(name: str, dim: int, embedding, weights, queries, q_weights,
            backends, rows: list) -> None:
  """Adds the table rows of one gallery: brute, then each backend."""
  k, batch = _K.value, _BATCH.value
  n = len(embedding)
  per_copy = 4 * dim + 28
  results = {}
  for backend in backends:
    params = {"nprobe": _NPROBE.value} if backend == "ivf" else {}
    start = time.perf_counter()
    gal = gallery_lib.Gallery(dim, "saturation", backend=backend,
                              params=params)
    gal.add(embedding, weights)
    gal._ensure_index()  # pylint: disable=protected-access
    build = time.perf_counter() - start
    index_bytes = (index_size(gal) / n) + per_copy
    ids, qps = timed_search(gal, queries, q_weights, k, batch)
    results[backend] = ids
    if backend == "flat":
      brute_ids, brute_qps = brute_force(gal, queries, q_weights, k, batch)
      rows.append((dim, n, name, "brute", None, per_copy, brute_qps,
                   recall(brute_ids, ids), 1.0))
    rows.append((dim, n, name, backend, build, index_bytes, qps,
                 recall(ids, results["flat"]), qps / brute_qps))
    print(_format_row(rows[-1]), flush=True)
    del gal


def _format_row(row) -> str:
  dim, n, data, method, build, mem, qps, rec, speed = row
  build_text = "-" if build is None else f"{build:.1f}"
  return (f"| {dim} | {n:,} | {data} | {method} | {build_text} | "
          f"{mem:,.0f} | {qps:,.0f} | {rec:.3f} | {speed:.1f}x |")


def real_embeddings(workdir: str) -> tuple:
  """The run's (query, gallery) embeddings of its test split."""
  from facenet_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from facenet_jax import inference  # pylint: disable=g-import-not-at-top
  from facenet_jax.train import feed  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  config = checkpointing.load_config(workdir)
  embedder = inference.Embedder.from_workdir(workdir)
  out = []
  for split in feed.eval_splits(config):
    data = pipeline.load_split(config.dataset, split,
                               builder_config=config.dataset_config,
                               data_dir=config.data_dir or None)
    images = [np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                        for b in getattr(data, m)]) for m in ("rgb", "ni",
                                                              "ti")]
    out.append(embedder.embed(*images))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import faiss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(_SEED.value)
  print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; "
        f"{_QUERIES.value} queries, k {_K.value}, batches of {_BATCH.value}, "
        f"{_DATA.value} data; ivf nprobe {_NPROBE.value}", flush=True)
  header = ("| dim | gallery | data | method | build s | bytes/emb | "
            "queries/s | recall@10 | vs brute |")
  print(header + "\n|---:|---:|---|---|---:|---:|---:|---:|---:|", flush=True)
  rows = []
  if _REAL.value:
    query, gal = real_embeddings(_REAL.value)
    dim = query["embedding"].shape[1]
    measure("real", dim, gal["embedding"], gal["weights"], query["embedding"],
            query["weights"], ("flat", "ivf", "hnsw"), rows)
  for dim in (int(d) for d in _DIMS.value):
    for n in (int(s) for s in _SIZES.value):
      if 3 * n * dim * 4 / 2**30 > _MAX_GB.value:
        print(f"| {dim} | {n:,} | {_DATA.value} | skipped: three float32 "
              f"copies take {3 * n * dim * 4 / 2**30:.0f} GiB > --max_gb "
              f"{_MAX_GB.value:g} | | | | | |", flush=True)
        continue
      centres = identity_centres(rng, max(n // _PER_ID.value, 1), dim)
      embedding, weights, _ = synthetic(rng, n, dim, centres, _DATA.value)
      queries, q_weights, _ = synthetic(rng, _QUERIES.value, dim, centres,
                                        _DATA.value)
      del centres
      backends = ("flat", "ivf") + (("hnsw",) if n <= _HNSW_MAX.value
                                    else ())
      measure(_DATA.value, dim, embedding, weights, queries, q_weights,
              backends, rows)
      del embedding, weights
  print("\n" + header + "\n|---:|---:|---|---|---:|---:|---:|---:|---:|")
  for row in rows:
    print(_format_row(row))


if __name__ == "__main__":
  app.run(main)
