"""Re-identification ranking metrics (CMC, mAP, mINP) and Euclidean distances.

This is the project's single implementation of the ranking metrics (never
two code paths for one metric). Only a query's same-identity gallery
entries (its true matches and the entries its protocol removes) affect its
metrics, so rather than sorting the whole gallery for every query, only those
entries are placed in the query's ranking (`_stable_positions`): the gallery
is counted in value bins and only the few entries sharing a bin with one of
them are sorted, which gives exactly the positions of a stable sort. Queries
are ranked a chunk at a time, chunks in parallel threads; memory per thread is
a (chunk, G) NaN mask of 1 byte per pair (~5 MB for 256 x 20,000; float16 and
integer distances add a float copy of the chunk) plus O(G) per query. A
2,000 x 20,000 float32 evaluation with 500 identities took 0.25 s on two CPU
cores shared with a training job, 14x faster than the usual per-query
stable-argsort loop in the same run (scripts/benchmark_rank.py). Distances
with few distinct values (rounded, integer) put many entries in shared bins
and slow it to about the loop's speed; the results stay exact.

Protocols:
  * Market-1501 (WMVeID863, RGBNT100): for each query, gallery entries with the
    same identity AND the same camera are removed before ranking.
  * MSVR310 (scene ids given): gallery entries with the same identity AND the
    same scene are removed instead; the camera is ignored.

Ties in distance are broken by gallery index (as a stable sort would), so
results are deterministic and independent of the sorting algorithm.

`pairwise_distance` computes the distances with JAX on the default device.

One file, though long: the distances and the metrics are the one ranking
path that evaluation, pictures and the fusion study all call.
"""

import concurrent.futures
import os
from typing import NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from facenet_jax import fusion

# Queries ranked together; bounds the (chunk, num_gallery) temporaries.
DEFAULT_QUERY_CHUNK = 256


class NoValidQueryError(ValueError):
  """No query has a true match left in the gallery under the protocol."""


class _Gallery(NamedTuple):
  """Gallery ids, with the gallery grouped by identity once for all queries.

  Attributes:
    pids: (G,) identities.
    groups: (G,) camera (or scene) ids.
    by_pid: (G,) gallery indices sorted by identity; stable, so each
      identity's indices are ascending.
    sorted_pids: (G,) pids[by_pid].
  """
  pids: np.ndarray
  groups: np.ndarray
  by_pid: np.ndarray
  sorted_pids: np.ndarray


def _as_ids(name: str, ids: np.ndarray, expected_len: int,
            expected_from: str) -> np.ndarray:
  """Checks that `ids` is 1-D with `expected_len` entries and returns it."""
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {ids.shape}")
  if ids.shape[0] != expected_len:
    raise ValueError(
        f"{name} has {ids.shape[0]} entries but {expected_from} is "
        f"{expected_len}")
  return ids


def _same_pid_pairs(q_pids: np.ndarray, gallery: _Gallery
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every (query, gallery entry) pair of equal identity.

  Args:
    q_pids: (B,) query identities.
    gallery: the gallery, grouped by identity.

  Returns:
    rows: (P,) int query row of each pair, ascending.
    cols: (P,) int gallery index of each pair, ascending within a row.
    counts: (B,) int pairs per query row.
  """
  lo = np.searchsorted(gallery.sorted_pids, q_pids, side="left")
  hi = np.searchsorted(gallery.sorted_pids, q_pids, side="right")
  counts = hi - lo
  rows = np.repeat(np.arange(q_pids.shape[0]), counts)
  # Offset of each pair inside its row's run of by_pid.
  offset = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
  cols = gallery.by_pid[np.repeat(lo, counts) + offset]
  # A sort places equal ids together, but a run may also hold ids that are
  # not == (NaN ids, ids of another dtype); == decides, as it always has.
  same = gallery.pids[cols] == q_pids[rows]
  if not np.all(same):
    rows, cols = rows[same], cols[same]
    counts = np.bincount(rows, minlength=q_pids.shape[0])
  return rows, cols, counts


def _bin_scales(key: np.ndarray, cols: np.ndarray, bounds: np.ndarray,
                num_bins: int) -> Tuple[np.ndarray, np.ndarray]:
  """Per-row offset and scale putting about one entry per bin near cols.

  Args:
    key: (B, G) float distances (see _stable_positions), no NaN.
    cols: (P,) gallery indices, row b's in cols[bounds[b]:bounds[b + 1]].
    bounds: (B + 1,) row boundaries in cols.
    num_bins: bins between the smallest and largest finite key[b, cols].

  Returns:
    lo: (B,) finite offsets, key.dtype.
    scale: (B,) positive finite scales, key.dtype.
  """
  # Runs under _stable_positions' errstate: spans of extreme float64 values
  # may overflow to inf, handled below.
  num_rows = key.shape[0]
  counts = np.diff(bounds)
  nonempty = counts > 0
  values = key[np.repeat(np.arange(num_rows), counts), cols]
  finite = np.isfinite(values)
  lo = np.zeros(num_rows, key.dtype)
  hi = np.zeros(num_rows, key.dtype)
  if values.size:
    # reduceat over the non-empty rows' starts: each segment is one row.
    starts = bounds[:-1][nonempty]
    lo[nonempty] = np.minimum.reduceat(np.where(finite, values, np.inf),
                                       starts)
    hi[nonempty] = np.maximum.reduceat(np.where(finite, values, -np.inf),
                                       starts)
  no_finite = ~(lo <= hi)
  lo[no_finite] = hi[no_finite] = 0
  span = hi.astype(np.float64) - lo
  # A single distinct finite chosen value (or an overflowing span): size the
  # bins by the row's spread instead.
  for b in np.flatnonzero(nonempty & ~((span > 0) & (span < np.inf))):
    finite_row = key[b][np.isfinite(key[b])]
    span[b] = (float(finite_row.max()) - float(finite_row.min())
               if finite_row.size else 0.0)
  # Positive and finite, so that 0 * scale and inf * scale are never NaN.
  finfo = np.finfo(key.dtype)
  scale = np.ones(num_rows)
  spread = span > 0
  scale[spread] = np.clip(num_bins / span[spread], finfo.tiny, finfo.max)
  return lo, scale.astype(key.dtype)


def _stable_positions(dist: np.ndarray, cols: np.ndarray,
                      bounds: np.ndarray) -> np.ndarray:
  """Positions of chosen entries in their row's stable ascending order.

  For each row b and c in cols[bounds[b]:bounds[b + 1]], the position of
  dist[b, c] in inverse(np.argsort(dist[b], kind="stable")), found without
  sorting the row. Entries are put in bins by a non-decreasing function of
  their value; an entry in a lower bin than dist[b, c] ranks ahead of it and
  one in a higher bin behind it, so only the entries sharing a bin with a
  chosen one are ordered exactly (a stable argsort of those few). The bins
  decide how many entries take that exact step, never the result: with any
  finite offset and positive scale, rounding, truncation and clipping keep
  the order.

  Args:
    dist: (B, G) distances, no NaN.
    cols: (P,) gallery indices; row b's are cols[bounds[b]:bounds[b + 1]],
      distinct and ascending.
    bounds: (B + 1,) int, non-decreasing from 0 to P.

  Returns:
    (P,) int64 0-based positions.
  """
  num_g = dist.shape[1]
  # Complex numbers sort by real part first, so binning the real part keeps
  # the order; the exact step compares the full values.
  key = dist.real if np.iscomplexobj(dist) else dist
  work = np.float32 if key.dtype in (np.float16, np.float32) else np.float64
  key = key.astype(work, copy=False)
  # About one entry per bin between a row's smallest and largest chosen
  # value; bin 0 and the last bin collect everything beyond.
  num_bins = num_g
  top = work(num_bins + 2)
  position = np.empty(cols.size, np.int64)
  # Extreme values may overflow to inf (which the clip handles) or underflow
  # to 0; neither can produce NaN.
  with np.errstate(over="ignore", under="ignore"):
    lo, scale = _bin_scales(key, cols, bounds, num_bins)
    for b in np.flatnonzero(np.diff(bounds)):
      seg = slice(bounds[b], bounds[b + 1])
      bins = key[b] - lo[b]
      bins *= scale[b]
      bins += work(1)
      np.maximum(bins, 0, out=bins)
      np.minimum(bins, top, out=bins)
      bins = bins.astype(np.intp)
      # Entries in bins below a chosen one's all rank ahead of it.
      hist = np.bincount(bins, minlength=num_bins + 3)
      chosen_bins = bins[cols[seg]]
      ahead = np.cumsum(hist)[chosen_bins] - hist[chosen_bins]
      shared = np.zeros(num_bins + 3, bool)
      shared[chosen_bins] = True
      close = np.flatnonzero(shared[bins])
      # Stable: equal distances keep gallery-index order.
      order = np.argsort(dist[b, close], kind="stable")
      rank_in_close = np.empty(close.size, np.intp)
      rank_in_close[order] = np.arange(close.size)
      # In value order the close entries' bins ascend; those in lower bins
      # are already counted in `ahead`.
      close_ahead = np.searchsorted(bins[close[order]], chosen_bins,
                                    side="left")
      position[seg] = (ahead - close_ahead +
                       rank_in_close[np.searchsorted(close, cols[seg])])
  return position


def _rank_chunk(dist: np.ndarray, first_row: int, q_pids: np.ndarray,
                q_groups: np.ndarray, gallery: _Gallery
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Ranks a chunk of queries and measures where their true matches land.

  Args:
    dist: (B, G) distances of B queries to the whole gallery.
    first_row: distmat row of dist[0], for the NaN error message.
    q_pids: (B,) query identities.
    q_groups: (B,) query camera (or scene) ids; a gallery entry with the
      query's identity and group is removed from that query's ranking.
    gallery: the gallery, grouped by identity.

  Returns:
    num_matches: (B,) int, true matches left after removal.
    first_rank: (B,) int, 1-based rank of the first true match (0 if none).
    last_rank: (B,) int, 1-based rank of the last true match (0 if none).
    ap: (B,) float64 average precision (0 where num_matches is 0).

  Raises:
    ValueError: if dist contains NaN.
  """
  num_rows, num_g = dist.shape
  # NaN has no place in an order; it would silently sink to the bottom.
  has_nan = np.isnan(dist).any(axis=1)
  if np.any(has_nan):
    bad = first_row + int(np.argmax(has_nan))
    raise ValueError(f"distmat contains NaN (first in query row {bad})")

  rows, cols, counts = _same_pid_pairs(q_pids, gallery)
  removed = gallery.groups[cols] == q_groups[rows]
  # 0-based position of each pair in its row's stable ranking.
  bounds = np.concatenate(([0], np.cumsum(counts)))
  position = _stable_positions(dist, cols, bounds)

  # Each row's pairs in ranked order (positions are unique within a row).
  order = np.argsort(rows * num_g + position)
  position, removed = position[order], removed[order]
  # Removed entries are all same-id pairs, so the kept entries ranked ahead
  # of a pair are its position minus the removed pairs ranked ahead in-row.
  removed_before = np.concatenate(([0], np.cumsum(removed)))
  removed_ahead = removed_before[:-1] - removed_before[bounds[:-1]][rows]
  kept = ~removed
  match_rows = rows[kept]
  match_rank = (position - removed_ahead + 1)[kept]
  num_matches = np.bincount(match_rows, minlength=num_rows)

  # The j-th true match (1-based, in ranked order) at filtered rank r has
  # precision j / r; match_rows lists each row's matches in ranked order.
  row_start = np.cumsum(num_matches) - num_matches
  match_index = np.arange(match_rows.size) - row_start[match_rows] + 1
  ap = (np.bincount(match_rows, weights=match_index / match_rank,
                    minlength=num_rows) / np.maximum(num_matches, 1))

  has_match = num_matches > 0
  first_rank = np.zeros(num_rows, np.int64)
  last_rank = np.zeros(num_rows, np.int64)
  first_rank[has_match] = match_rank[row_start[has_match]]
  last_rank[has_match] = match_rank[row_start[has_match]
                                    + num_matches[has_match] - 1]
  return num_matches, first_rank, last_rank, ap


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    q_sceneids: Optional[np.ndarray] = None,
    g_sceneids: Optional[np.ndarray] = None,
    return_minp: bool = False,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK,
    num_threads: int = 0,
) -> Union[Tuple[np.ndarray, float], Tuple[np.ndarray, float, float]]:
  """CMC, mAP (and mINP) of a query-to-gallery distance matrix.

  For each query the gallery is ranked by ascending distance, equal distances
  in gallery-index order (as a stable sort). Gallery entries with the query's
  identity and camera (or, when both scene id arrays are given, the query's
  identity and scene, camera ignored) are removed. Queries with no true match
  left are skipped and do not count in any average.

  AP of a query is the mean, over its true matches, of the precision at that
  match's rank. INP (Ye et al., 2021) is num_matches / rank of its last match.

  Args:
    distmat: (num_query, num_gallery) distances; smaller is more similar.
    q_pids: (num_query,) query identities.
    g_pids: (num_gallery,) gallery identities; must sort consistently with ==
      (numbers, strings).
    q_camids: (num_query,) query camera ids.
    g_camids: (num_gallery,) gallery camera ids.
    max_rank: number of CMC ranks to report (capped at num_gallery).
    q_sceneids: optional (num_query,) query scene ids (MSVR310 protocol).
    g_sceneids: optional (num_gallery,) gallery scene ids; required together
      with q_sceneids.
    return_minp: also return mINP.
    query_chunk_size: queries ranked at once; bounds the (chunk, G) NaN
      mask. The results do not depend on it.
    num_threads: chunks ranked in parallel (0: one per CPU); the results do
      not depend on it.

  Returns:
    cmc: float64 (min(max_rank, num_gallery),), cmc[k] = fraction of valid
      queries whose first true match is within the top k + 1.
    mAP: mean AP over valid queries, a float in [0, 1].
    mINP: (only with return_minp) mean INP over valid queries, in [0, 1].

  Raises:
    ValueError: on malformed inputs, or if no query has a true match left.
  """
  distmat = np.asarray(distmat)
  if distmat.ndim != 2:
    raise ValueError(
        f"distmat must be 2-D (num_query, num_gallery), got shape "
        f"{distmat.shape}")
  if not np.issubdtype(distmat.dtype, np.number):
    raise ValueError(f"distmat must be numeric, got dtype {distmat.dtype}")
  num_q, num_g = distmat.shape
  if num_q == 0 or num_g == 0:
    raise ValueError(f"distmat must be non-empty, got shape {distmat.shape}")
  q_pids = _as_ids("q_pids", q_pids, num_q, "distmat.shape[0]")
  g_pids = _as_ids("g_pids", g_pids, num_g, "distmat.shape[1]")
  q_camids = _as_ids("q_camids", q_camids, num_q, "distmat.shape[0]")
  g_camids = _as_ids("g_camids", g_camids, num_g, "distmat.shape[1]")
  if (q_sceneids is None) != (g_sceneids is None):
    raise ValueError(
        "q_sceneids and g_sceneids must be given together (MSVR310 protocol) "
        "or both left as None (Market-1501 protocol)")
  if q_sceneids is not None:
    q_group = _as_ids("q_sceneids", q_sceneids, num_q, "distmat.shape[0]")
    g_group = _as_ids("g_sceneids", g_sceneids, num_g, "distmat.shape[1]")
  else:
    q_group, g_group = q_camids, g_camids
  if (isinstance(max_rank, bool) or
      not isinstance(max_rank, (int, np.integer)) or max_rank < 1):
    raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
  if query_chunk_size < 1:
    raise ValueError(
        f"query_chunk_size must be positive, got {query_chunk_size}")
  if (isinstance(num_threads, bool) or
      not isinstance(num_threads, (int, np.integer)) or num_threads < 0):
    raise ValueError(
        f"num_threads must be a non-negative integer, got {num_threads!r}")
  num_ranks = min(int(max_rank), num_g)

  by_pid = np.argsort(g_pids, kind="stable")
  gallery = _Gallery(pids=g_pids, groups=g_group, by_pid=by_pid,
                     sorted_pids=g_pids[by_pid])

  def rank_chunk(start: int) -> Tuple[np.ndarray, ...]:
    stop = min(start + query_chunk_size, num_q)
    return _rank_chunk(distmat[start:stop], start, q_pids[start:stop],
                       q_group[start:stop], gallery)

  starts = range(0, num_q, query_chunk_size)
  workers = min(num_threads or os.cpu_count() or 1, len(starts))
  if workers > 1:
    # NumPy releases the GIL in its array loops, the bulk of the work; map
    # keeps chunk order, so the results (and the first NaN row reported)
    # match one thread's.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      chunks = list(pool.map(rank_chunk, starts))
  else:
    chunks = [rank_chunk(start) for start in starts]
  num_matches, first_rank, last_rank, ap = (
      np.concatenate(parts) for parts in zip(*chunks))
  valid = num_matches > 0
  num_valid = int(valid.sum())
  if num_valid == 0:
    protocol = "scene" if q_sceneids is not None else "camera"
    raise NoValidQueryError(
        f"No query has a true match in the gallery after removing same-id, "
        f"same-{protocol} entries ({num_q} queries, {num_g} gallery); check "
        f"that query and gallery identities overlap")

  # Count queries whose first match is at each rank, then accumulate.
  hits = np.bincount(np.minimum(first_rank[valid], num_ranks + 1) - 1,
                     minlength=num_ranks + 1)[:num_ranks]
  cmc = np.cumsum(hits) / num_valid
  mean_ap = float(ap[valid].mean())
  if not return_minp:
    return cmc, mean_ap
  inp = num_matches[valid] / last_rank[valid]
  return cmc, mean_ap, float(inp.mean())


@jax.jit
def _distance_chunk(query: jax.Array, gallery: jax.Array) -> jax.Array:
  """(C, G) float32 Euclidean distances of a query chunk to the gallery."""
  query_sq = jnp.sum(query * query, axis=1)
  gallery_sq = jnp.sum(gallery * gallery, axis=1)
  # HIGHEST: by default TPUs and recent GPUs multiply float32 in bfloat16 or
  # TF32, far coarser than the gaps between neighbours' distances.
  cross = jnp.dot(query, gallery.T, precision=jax.lax.Precision.HIGHEST)
  squared = query_sq[:, None] + gallery_sq[None, :] - 2.0 * cross
  # Cancellation can leave a slightly negative square for near-equal vectors.
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def pairwise_distance(query_features: np.ndarray,
                      gallery_features: np.ndarray,
                      query_chunk_size: int = 1024) -> np.ndarray:
  """Euclidean distances between two sets of embeddings, on the JAX device.

  Uses |q|^2 + |g|^2 - 2 q.g in float32 (clipped at 0 before the square
  root), one chunk of queries at a time. The last chunk is padded to the
  chunk size so that a single shape is compiled per gallery.

  Args:
    query_features: (Q, D) embeddings.
    gallery_features: (G, D) embeddings.
    query_chunk_size: query rows computed at once (capped at Q).

  Returns:
    (Q, G) float32 NumPy distances.
  """
  query_features = np.asarray(query_features)
  gallery_features = np.asarray(gallery_features)
  if query_features.ndim != 2:
    raise ValueError(
        f"query_features must be 2-D (Q, D), got shape {query_features.shape}")
  if gallery_features.ndim != 2:
    raise ValueError(
        f"gallery_features must be 2-D (G, D), got shape "
        f"{gallery_features.shape}")
  if query_features.shape[1] != gallery_features.shape[1]:
    raise ValueError(
        f"query_features has dimension {query_features.shape[1]} but "
        f"gallery_features has {gallery_features.shape[1]}")
  if query_chunk_size < 1:
    raise ValueError(
        f"query_chunk_size must be positive, got {query_chunk_size}")
  return _by_query_chunks(_distance_chunk, (query_features,),
                          (gallery_features,), query_chunk_size)


def _by_query_chunks(fn, queries: tuple, gallery: tuple,
                     chunk_size: int, pad_values: tuple = ()) -> np.ndarray:
  """(Q, G) float32 fn(*query chunk, *gallery) over chunks of query rows.

  The gallery arrays go to the device once. The last chunk is padded (with
  `pad_values`, one per query array, default 0) to the chunk size, so that a
  single shape is compiled per gallery; dispatch is asynchronous, so one
  chunk is copied to the host while the device computes the next.
  """
  num_q = len(queries[0])
  out = np.empty((num_q, len(gallery[0])), np.float32)
  if num_q == 0:
    return out
  # A chunk larger than Q would only compute padding.
  chunk = min(chunk_size, num_q)
  gallery = tuple(jax.device_put(np.asarray(g, np.float32)) for g in gallery)
  pad_values = pad_values or (0.0,) * len(queries)
  pending = []
  for start in range(0, num_q, chunk):
    parts = [np.asarray(q[start:start + chunk], np.float32) for q in queries]
    rows = len(parts[0])
    if rows < chunk:
      parts = [np.pad(p, ((0, chunk - rows), (0, 0)), constant_values=v)
               for p, v in zip(parts, pad_values)]
    pending.append((start, rows, fn(*parts, *gallery)))
    if len(pending) == 2:
      done_start, done_rows, done = pending.pop(0)
      out[done_start:done_start + done_rows] = np.asarray(done)[:done_rows]
  start, rows, result = pending.pop()
  out[start:start + rows] = np.asarray(result)[:rows]
  return out


# --- Reports over extracted embeddings ------------------------------------------

# Rank-k values reported besides mAP and mINP.
REPORTED_RANKS = (1, 5, 10)


def _subset_metrics(distmat: np.ndarray, query: dict, gallery: dict,
                    keep: np.ndarray, max_rank: int, use_scenes: bool) -> dict:
  """mAP/CMC/mINP over the queries selected by `keep` (a boolean mask)."""
  if not np.any(keep):
    return {"num_query": 0}
  scenes = {}
  if use_scenes:
    scenes = {"q_sceneids": query["sceneid"][keep],
              "g_sceneids": gallery["sceneid"]}
  try:
    cmc, mean_ap, minp = evaluate_rank(
        distmat[keep], query["pid"][keep], gallery["pid"],
        query["camid"][keep], gallery["camid"], max_rank=max_rank,
        return_minp=True, **scenes)
  except NoValidQueryError as e:
    return {"num_query": int(np.sum(keep)), "note": str(e)}
  out = {"num_query": int(np.sum(keep)), "mAP": mean_ap, "mINP": minp}
  for k in REPORTED_RANKS:
    out[f"rank{k}"] = float(cmc[min(k, len(cmc)) - 1])
  return out


def embedding_distances(query: dict, gallery: dict) -> np.ndarray:
  """(Q, G) float32 distances of two sets of embeddings, as the model ranks.

  Euclidean (`pairwise_distance`), or, where both sets carry segment
  "weights" (a flare-aware fusion), the pair-normalised distance of
  fusion.fused_distances.
  """
  has = ("weights" in query, "weights" in gallery)
  if has[0] != has[1]:
    raise ValueError("the query and gallery embeddings come from different "
                     "fusions: one set has segment weights, the other not")
  if has[0]:
    return fused_pairwise_distance(query["embedding"], query["weights"],
                                   gallery["embedding"], gallery["weights"])
  return pairwise_distance(query["embedding"], gallery["embedding"])


def fused_pairwise_distance(query: np.ndarray, query_weights: np.ndarray,
                            gallery: np.ndarray, gallery_weights: np.ndarray,
                            query_chunk_size: int = 256) -> np.ndarray:
  """fusion.fused_distances on the JAX device, a chunk of queries at a time.

  The last chunk is padded so that one shape is compiled per gallery.
  """
  # Padded query rows get weight 1 (a zero weight row has no normaliser).
  return _by_query_chunks(_fused_chunk, (query, query_weights),
                          (gallery, gallery_weights), query_chunk_size,
                          pad_values=(0.0, 1.0))


_fused_chunk = jax.jit(fusion.fused_distances)


def distance_matrix(query: dict, gallery: dict,
                    rerank: bool = False) -> np.ndarray:
  """(Q, G) float32 distances of the query to the gallery embeddings.

  `embedding_distances`, then k-reciprocal re-ranking when rerank is set:
  the distances every ranking of a report is made from.
  """
  distmat = embedding_distances(query, gallery)
  if rerank:
    from facenet_jax import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
    distmat = rerank_lib.k_reciprocal_rerank(
        distmat, embedding_distances(query, query),
        embedding_distances(gallery, gallery))
  return distmat


def ranked_gallery(distmat: np.ndarray, q_pids: np.ndarray,
                   g_pids: np.ndarray, q_groups: np.ndarray,
                   g_groups: np.ndarray, k: int) -> np.ndarray:
  """The first k gallery entries of each query's ranking in evaluate_rank.

  Ascending distance, ties in gallery-index order; the entries with the
  query's identity and group (camera, or scene under the MSVR310 protocol)
  are removed first. For pictures of a few queries: it sorts whole rows.

  Args:
    distmat: (Q, G) distances.
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_groups: (Q,) query camera (or scene) ids.
    g_groups: (G,) gallery camera (or scene) ids.
    k: entries per query (>= 1).

  Returns:
    (Q, min(k, G)) int64 gallery indices, best first; -1 where a query has
    fewer than k entries left.
  """
  distmat = np.asarray(distmat)
  if distmat.ndim != 2:
    raise ValueError(f"distmat must be 2-D, got shape {distmat.shape}")
  num_q, num_g = distmat.shape
  q_pids = _as_ids("q_pids", q_pids, num_q, "distmat.shape[0]")
  g_pids = _as_ids("g_pids", g_pids, num_g, "distmat.shape[1]")
  q_groups = _as_ids("q_groups", q_groups, num_q, "distmat.shape[0]")
  g_groups = _as_ids("g_groups", g_groups, num_g, "distmat.shape[1]")
  if k < 1:
    raise ValueError(f"k must be positive, got {k}")
  width = min(k, num_g)
  out = np.full((num_q, width), -1, np.int64)
  for i in range(num_q):
    order = np.argsort(distmat[i], kind="stable")
    removed = (g_pids[order] == q_pids[i]) & (g_groups[order] == q_groups[i])
    kept = order[~removed][:width]
    out[i, :kept.size] = kept
  return out


def rank_report(query: dict, gallery: dict, max_rank: int = 50,
                use_scenes: bool = False, rerank: bool = False,
                distmat: Optional[np.ndarray] = None) -> dict:
  """Ranks the gallery for every query: overall, flare and clean queries.

  Args:
    query: "embedding" (Q, D) L2-normalised, "pid", "camid", "sceneid" (Q,),
      "flare" (Q, 2) pseudo-labels of the query's RGB and NI images, and
      with a flare-aware fusion "weights" (Q, 3) (embedding_distances).
    gallery: the same keys for the gallery.
    max_rank: length of the CMC curve.
    use_scenes: MSVR310 protocol (same id and same scene excluded).
    rerank: apply k-reciprocal re-ranking to the distances first.
    distmat: (Q, G) distances to rank with instead of the embeddings' (a
      diagnostic's); rerank does not apply to them.

  Returns:
    A JSON-ready dict: mAP, mINP, rank1/5/10, num_query, num_gallery, and
    "flare" / "clean" dicts with the same metrics over the queries whose
    RGB or NI pseudo-label is 1 / whose both are 0.
  """
  if distmat is None:
    distmat = distance_matrix(query, gallery, rerank)
  else:
    rerank = False  # Given distances are ranked as they are.
    expected = (len(query["pid"]), len(gallery["pid"]))
    if np.shape(distmat) != expected:
      raise ValueError(f"distmat must be (queries, gallery) {expected}, got "
                       f"{np.shape(distmat)}")
  everyone = np.ones(len(query["pid"]), bool)
  flared = np.any(np.asarray(query["flare"]) > 0.5, axis=-1)
  results = _subset_metrics(distmat, query, gallery, everyone, max_rank,
                            use_scenes)
  if "mAP" not in results:
    raise NoValidQueryError(results.get("note", "No query has a true match."))
  results["num_gallery"] = int(len(gallery["pid"]))
  results["reranked"] = bool(rerank)
  results["flare"] = _subset_metrics(distmat, query, gallery, flared, max_rank,
                                     use_scenes)
  results["clean"] = _subset_metrics(distmat, query, gallery, ~flared,
                                     max_rank, use_scenes)
  return results


def format_results(results: dict) -> str:
  """A small fixed-width table of a rank_report (percentages)."""
  rows = [("all", results), ("flare", results.get("flare", {})),
          ("clean", results.get("clean", {}))]
  lines = [f"{'queries':>8} {'n':>6} {'mAP':>6} {'R-1':>6} {'R-5':>6} "
           f"{'R-10':>6} {'mINP':>6}"]
  for name, r in rows:
    if "mAP" not in r:
      lines.append(f"{name:>8} {r.get('num_query', 0):>6}   (no valid query)")
      continue
    lines.append(
        f"{name:>8} {r['num_query']:>6} {100 * r['mAP']:6.1f} "
        f"{100 * r['rank1']:6.1f} {100 * r['rank5']:6.1f} "
        f"{100 * r['rank10']:6.1f} {100 * r['mINP']:6.1f}")
  return "\n".join(lines)
