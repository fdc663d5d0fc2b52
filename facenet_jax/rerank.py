"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification
with k-reciprocal Encoding", CVPR 2017), in NumPy.

Queries and gallery are pooled into one set of N = Q + G samples, so queries
also serve as neighbours of each other. For a sample p, N(p, k) is p itself
together with its k nearest other samples (the paper's probe is not part of its
gallery; counting p separately keeps k genuine neighbours). Then:

  R(p, k)  = {g in N(p, k) : p in N(g, k)}                 (k-reciprocal set)
  R*(p, k) = R(p, k) united with every R(q, k/2), q in R(p, k), for which
             |R(p, k) & R(q, k/2)| >= 2/3 |R(q, k/2)|      (robust expansion)
  V_p[g]   = exp(-d(p, g)) if g in R*(p, k1) else 0        (k-reciprocal code)
  V_p     <- mean of V_q over q in N(p, k2)           (local query expansion)
  d_J(p, g) = 1 - sum_j min(V_p[j], V_g[j]) / sum_j max(V_p[j], V_g[j])
  d*(p, g)  = (1 - lambda) d_J(p, g) + lambda d(p, g)

Distances are divided by the largest pooled distance first, so exp(-d) and the
lambda blend do not depend on the scale of the embeddings (the ranking by d
alone is unchanged by that division).

Memory: the pooled (N, N) distance and code matrices are held in full; peak
use is about 20 bytes per pair (measured: N = 5,000 peaks near 0.5 GB, so
N = 10,000 needs about 2 GB); `max_samples` guards it.
"""

import numpy as np

# Default guard on Q + G; about 2 GB of working memory at this size.
DEFAULT_MAX_SAMPLES = 10_000
# Measured peak working memory per pooled pair, for the error message.
_BYTES_PER_PAIR = 20
# Bytes of (query chunk x gallery x code width) float32 temporaries in the
# Jaccard step.
_JACCARD_CHUNK_BYTES = 64 * 2**20


def _check_square_parts(q_g_dist: np.ndarray, q_q_dist: np.ndarray,
                        g_g_dist: np.ndarray) -> None:
  """Raises ValueError unless the three blocks form a (Q+G, Q+G) matrix."""
  for name, value in (("q_g_dist", q_g_dist), ("q_q_dist", q_q_dist),
                      ("g_g_dist", g_g_dist)):
    if value.ndim != 2:
      raise ValueError(f"{name} must be 2-D, got shape {value.shape}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{name} must contain only finite distances")
    if value.size and value.min() < 0:
      raise ValueError(f"{name} must contain non-negative distances")
  num_q, num_g = q_g_dist.shape
  if q_q_dist.shape != (num_q, num_q):
    raise ValueError(
        f"q_q_dist must have shape ({num_q}, {num_q}) to match q_g_dist "
        f"{q_g_dist.shape}, got {q_q_dist.shape}")
  if g_g_dist.shape != (num_g, num_g):
    raise ValueError(
        f"g_g_dist must have shape ({num_g}, {num_g}) to match q_g_dist "
        f"{q_g_dist.shape}, got {g_g_dist.shape}")
  if num_q == 0 or num_g == 0:
    raise ValueError(f"q_g_dist must be non-empty, got {q_g_dist.shape}")


def _nearest(dist: np.ndarray, k: int, row_chunk: int = 512) -> np.ndarray:
  """Indices of each sample and its k nearest others, nearest first.

  Args:
    dist: (N, N) symmetric distances.
    k: neighbours per sample besides itself; k + 1 <= N.
    row_chunk: rows sorted at once, bounding the int64 argsort temporary.

  Returns:
    (N, k + 1) int array; column 0 is the sample itself.
  """
  n = dist.shape[0]
  out = np.empty((n, k + 1), np.int64)
  for start in range(0, n, row_chunk):
    rows = dist[start:start + row_chunk].copy()
    # Self first even when a duplicate sits at distance zero.
    rows[np.arange(rows.shape[0]), np.arange(start, start + rows.shape[0])] = (
        -np.inf)
    out[start:start + rows.shape[0]] = np.argsort(
        rows, axis=1, kind="stable")[:, :k + 1]
  return out


def _reciprocal_mask(neighbours: np.ndarray) -> np.ndarray:
  """(N, k + 1) bool: is neighbours[p, j] k-reciprocal with p."""
  n = neighbours.shape[0]
  forward = np.zeros((n, n), bool)
  forward[np.arange(n)[:, None], neighbours] = True
  # p is in R(p) via column 0; j is reciprocal when p is among j's neighbours.
  return forward[neighbours, np.arange(n)[:, None]]


def _expanded_sets(nearest: np.ndarray, k1: int) -> np.ndarray:
  """R*(p, k1) of every pooled sample as an (N, N) bool membership matrix.

  Args:
    nearest: (N, >= k1 + 1) output of `_nearest`.
    k1: the k-reciprocal neighbourhood size.

  Returns:
    (N, N) bool; row p marks the members of R*(p, k1).
  """
  n = nearest.shape[0]
  rows = np.arange(n)[:, None]
  full_nn = nearest[:, :k1 + 1]
  full_recip = _reciprocal_mask(full_nn)
  in_r = np.zeros((n, n), bool)
  in_r[np.broadcast_to(rows, full_nn.shape)[full_recip],
       full_nn[full_recip]] = True

  half_k = max(1, int(round(k1 / 2)))
  half_nn = nearest[:, :half_k + 1]
  half_recip = _reciprocal_mask(half_nn)
  # For every candidate q = full_nn[p, j]: its half-size reciprocal set and
  # how much of it already lies in R(p, k1). Shapes (N, k1 + 1, half_k + 1).
  cand_half = half_nn[full_nn]
  cand_half_recip = half_recip[full_nn]
  overlap = (cand_half_recip & in_r[rows[:, :, None], cand_half]).sum(-1)
  size = cand_half_recip.sum(-1)
  accepted = full_recip & (3 * overlap >= 2 * size)

  expanded = in_r
  add = accepted[:, :, None] & cand_half_recip
  expanded[np.broadcast_to(rows[:, :, None], add.shape)[add],
           cand_half[add]] = True
  return expanded


def _sum_min(codes: np.ndarray, num_query: int) -> np.ndarray:
  """sum_j min(codes[q, j], codes[Q + g, j]) for every query q and gallery g.

  Query codes are sparse (non-zero only on expanded neighbours of its own
  k2 neighbours), so each query is compared on its non-zero columns only.

  Args:
    codes: (N, N) float32 non-negative codes, queries in the first num_query
      rows.
    num_query: Q.

  Returns:
    (Q, G) float32.
  """
  # Column-major gallery codes: a query's columns become contiguous rows.
  gallery_by_column = np.ascontiguousarray(codes[num_query:].T)
  num_g = gallery_by_column.shape[1]
  query_codes = codes[:num_query]
  width = max(1, int((query_codes > 0).sum(1).max()))
  # Columns sorted by value descending put the non-zeros first; zeros padding
  # the tail contribute min(0, .) = 0.
  cols = np.argsort(-query_codes, axis=1, kind="stable")[:, :width]
  vals = np.take_along_axis(query_codes, cols, axis=1)
  chunk = max(1, _JACCARD_CHUNK_BYTES // (4 * num_g * width))
  out = np.empty((num_query, num_g), np.float32)
  for start in range(0, num_query, chunk):
    c = cols[start:start + chunk]
    v = vals[start:start + chunk]
    # (chunk, width, G): each gallery code read on each query's columns.
    out[start:start + c.shape[0]] = np.minimum(
        gallery_by_column[c], v[:, :, None]).sum(1)
  return out


def k_reciprocal_rerank(q_g_dist: np.ndarray,
                        q_q_dist: np.ndarray,
                        g_g_dist: np.ndarray,
                        k1: int = 20,
                        k2: int = 6,
                        lambda_value: float = 0.3,
                        max_samples: int = DEFAULT_MAX_SAMPLES) -> np.ndarray:
  """Re-ranks query-to-gallery distances with k-reciprocal encoding.

  Args:
    q_g_dist: (Q, G) non-negative query-to-gallery distances.
    q_q_dist: (Q, Q) query-to-query distances.
    g_g_dist: (G, G) gallery-to-gallery distances.
    k1: size of the k-reciprocal neighbourhood (paper: 20).
    k2: size of the local query expansion neighbourhood (paper: 6).
    lambda_value: weight of the original distance in the blend (paper: 0.3).
    max_samples: largest Q + G accepted; memory grows as (Q + G)^2.

  Returns:
    (Q, G) float32 re-ranked distances; smaller is more similar.

  Raises:
    ValueError: on inconsistent shapes, negative or non-finite distances,
      out-of-range parameters, or Q + G above max_samples.
  """
  q_g_dist = np.asarray(q_g_dist, np.float32)
  q_q_dist = np.asarray(q_q_dist, np.float32)
  g_g_dist = np.asarray(g_g_dist, np.float32)
  _check_square_parts(q_g_dist, q_q_dist, g_g_dist)
  num_q, num_g = q_g_dist.shape
  n = num_q + num_g
  if n > max_samples:
    raise ValueError(
        f"k_reciprocal_rerank needs the full (Q+G)^2 = {n}^2 matrix "
        f"(~{_BYTES_PER_PAIR * n * n / 2**30:.1f} GiB); Q+G = {n} exceeds "
        f"max_samples={max_samples}. Raise max_samples if the memory is "
        f"available.")
  if k1 < 1 or k2 < 1:
    raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
  if not 0.0 <= lambda_value <= 1.0:
    raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
  # A set smaller than the neighbourhood size simply uses every sample.
  k1 = min(k1, n - 1)
  k2 = min(k2, n - 1)

  dist = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])
  scale = dist.max()
  if scale > 0:
    dist /= scale

  # One sort serves every neighbourhood: smaller ones are its prefixes.
  nearest = _nearest(dist, max(k1, k2))
  expanded = _expanded_sets(nearest, k1)
  codes = np.where(expanded, np.exp(-dist), np.float32(0.0)).astype(np.float32)
  del expanded
  # Local query expansion over N(p, k2), one neighbour rank at a time so no
  # (N, k2 + 1, N) array is materialised.
  qe_nn = nearest[:, :k2 + 1]
  qe_codes = np.zeros_like(codes)
  for j in range(qe_nn.shape[1]):
    qe_codes += codes[qe_nn[:, j]]
  codes = qe_codes / np.float32(qe_nn.shape[1])
  del qe_codes

  sum_min = _sum_min(codes, num_q)
  row_sum = codes.sum(axis=1)
  # sum max(a, b) = sum a + sum b - sum min(a, b).
  sum_max = row_sum[:num_q, None] + row_sum[None, num_q:] - sum_min
  jaccard = 1.0 - sum_min / np.maximum(sum_max, np.finfo(np.float32).tiny)
  original = dist[:num_q, num_q:]
  return ((1.0 - lambda_value) * jaccard +
          lambda_value * original).astype(np.float32)
