"""Re-identification ranking metrics (CMC, mAP, mINP) and Euclidean distances.

This is the project's single implementation of the ranking metrics (STYLE.md:
never two code paths for one metric). It is plain NumPy and vectorised over a
chunk of queries at a time, so memory is bounded by the chunk (about 11 bytes
per (query, gallery) pair of a chunk: ~55 MB for 256 x 20,000) and a 2,000 x
20,000 evaluation takes about 5 s on one idle CPU core
(scripts/benchmark_rank.py).

Protocols:
  * Market-1501 (WMVeID863, RGBNT100): for each query, gallery entries with the
    same identity AND the same camera are removed before ranking.
  * MSVR310 (scene ids given): gallery entries with the same identity AND the
    same scene are removed instead; the camera is ignored.

Ties in distance are broken by gallery index (a stable sort), so results are
deterministic and independent of the sorting algorithm.
"""

from typing import Optional, Tuple, Union

import numpy as np

# Queries ranked together; bounds the (chunk, num_gallery) temporaries.
DEFAULT_QUERY_CHUNK = 256


class NoValidQueryError(ValueError):
  """No query has a true match left in the gallery under the protocol."""


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


def _rank_chunk(dist: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                q_group: np.ndarray, g_group: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Ranks a chunk of queries and measures where their true matches land.

  Args:
    dist: (B, G) distances of B queries to the whole gallery.
    q_pids: (B,) query identities.
    g_pids: (G,) gallery identities.
    q_group: (B,) query camera (or scene) ids.
    g_group: (G,) gallery camera (or scene) ids; a gallery entry with the
      query's identity and group is removed from that query's ranking.

  Returns:
    num_matches: (B,) int, true matches left after removal.
    first_rank: (B,) int, 1-based rank of the first true match (0 if none).
    last_rank: (B,) int, 1-based rank of the last true match (0 if none).
    ap: (B,) float64 average precision (0 where num_matches is 0).
  """
  order = np.argsort(dist, axis=1, kind="stable")
  # Masks are built in gallery order and then permuted: gathering booleans
  # costs a byte per pair, gathering the id arrays would cost eight.
  same_pid = np.take_along_axis(g_pids[None, :] == q_pids[:, None], order,
                                axis=1)
  same_group = np.take_along_axis(g_group[None, :] == q_group[:, None], order,
                                  axis=1)
  del order
  keep = ~(same_pid & same_group)
  is_match = same_pid & keep
  del same_pid, same_group

  # 1-based rank of every entry within the filtered (kept-only) ranking; only
  # read at kept positions, where it is exact.
  kept_rank = np.cumsum(keep, axis=1, dtype=np.int32)
  del keep
  match_rows, match_cols = np.nonzero(is_match)
  match_rank = kept_rank[match_rows, match_cols]
  num_rows = dist.shape[0]
  num_matches = np.bincount(match_rows, minlength=num_rows)

  # The j-th true match (1-based, in ranked order) at filtered rank r has
  # precision j / r; np.nonzero lists each row's matches in ranked order.
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
) -> Union[Tuple[np.ndarray, float], Tuple[np.ndarray, float, float]]:
  """CMC, mAP (and mINP) of a query-to-gallery distance matrix.

  For each query the gallery is sorted by ascending distance with a stable
  sort, so equal distances keep gallery-index order. Gallery entries with the
  query's identity and camera (or, when both scene id arrays are given, the
  query's identity and scene, camera ignored) are removed. Queries with no
  true match left are skipped and do not count in any average.

  AP of a query is the mean, over its true matches, of the precision at that
  match's rank. INP (Ye et al., 2021) is num_matches / rank of its last match.

  Args:
    distmat: (num_query, num_gallery) distances; smaller is more similar.
    q_pids: (num_query,) query identities.
    g_pids: (num_gallery,) gallery identities.
    q_camids: (num_query,) query camera ids.
    g_camids: (num_gallery,) gallery camera ids.
    max_rank: number of CMC ranks to report (capped at num_gallery).
    q_sceneids: optional (num_query,) query scene ids (MSVR310 protocol).
    g_sceneids: optional (num_gallery,) gallery scene ids; required together
      with q_sceneids.
    return_minp: also return mINP.
    query_chunk_size: queries ranked at once; trades memory for speed.

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
  num_ranks = min(int(max_rank), num_g)

  chunks = []
  for start in range(0, num_q, query_chunk_size):
    stop = min(start + query_chunk_size, num_q)
    chunk = distmat[start:stop]
    # NaN has no place in an order; it would silently sink to the bottom.
    if np.isnan(chunk).any():
      bad = start + int(np.argwhere(np.isnan(chunk))[0, 0])
      raise ValueError(f"distmat contains NaN (first in query row {bad})")
    chunks.append(_rank_chunk(chunk, q_pids[start:stop], g_pids,
                              q_group[start:stop], g_group))
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


def pairwise_distance(query_features: np.ndarray,
                      gallery_features: np.ndarray,
                      query_chunk_size: int = 1024) -> np.ndarray:
  """Euclidean distances between two sets of embeddings.

  Uses |q|^2 + |g|^2 - 2 q.g in float64 (then clipped at 0, where rounding can
  make it slightly negative), one chunk of queries at a time.

  Args:
    query_features: (Q, D) embeddings.
    gallery_features: (G, D) embeddings.
    query_chunk_size: query rows computed at once.

  Returns:
    (Q, G) float32 distances.
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
  gallery = gallery_features.astype(np.float64)
  gallery_sq = np.sum(gallery * gallery, axis=1)
  out = np.empty((query_features.shape[0], gallery.shape[0]), np.float32)
  for start in range(0, query_features.shape[0], query_chunk_size):
    query = query_features[start:start + query_chunk_size].astype(np.float64)
    sq = (np.sum(query * query, axis=1)[:, None] + gallery_sq[None, :]
          - 2.0 * query @ gallery.T)
    out[start:start + query.shape[0]] = np.sqrt(np.maximum(sq, 0.0))
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


def rank_report(query: dict, gallery: dict, max_rank: int = 50,
                use_scenes: bool = False, rerank: bool = False) -> dict:
  """Ranks the gallery for every query: overall, flare and clean queries.

  Args:
    query: "embedding" (Q, D) L2-normalised, "pid", "camid", "sceneid" (Q,),
      "flare" (Q, 2) pseudo-labels of the query's RGB and NI images.
    gallery: the same keys for the gallery.
    max_rank: length of the CMC curve.
    use_scenes: MSVR310 protocol (same id and same scene excluded).
    rerank: apply k-reciprocal re-ranking to the distances first.

  Returns:
    A JSON-ready dict: mAP, mINP, rank1/5/10, num_query, num_gallery, and
    "flare" / "clean" dicts with the same metrics over the queries whose
    RGB or NI pseudo-label is 1 / whose both are 0.
  """
  distmat = pairwise_distance(query["embedding"], gallery["embedding"])
  if rerank:
    from facenet_jax import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
    distmat = rerank_lib.k_reciprocal_rerank(
        distmat,
        pairwise_distance(query["embedding"], query["embedding"]),
        pairwise_distance(gallery["embedding"], gallery["embedding"]))
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
