"""Times `evaluate_rank` against the classic per-query loop; prints a table.

Each size is "QUERIESxGALLERY". Distances are uniform random float32, ids are
drawn from --num_ids identities and --num_cams cameras, so a realistic share of
gallery entries are true matches and some are removed as same-camera. Both
implementations rank the same matrix in the same run:

  * project: `evaluation.evaluate_rank` (--num_threads ranking threads);
  * classic: the loop most re-ID code ships (`classic_rank` below): one full
    stable argsort per query.

The table gives the best of --repeats timed runs of each, their ratio
(classic / project), the project's peak MB (the largest NumPy allocation
traced by tracemalloc while evaluate_rank runs, the input matrix itself
excluded) and the largest absolute difference between the two in CMC, mAP and
mINP. The script exits with status 1 if that difference exceeds 1e-9.

Run:
  python scripts/benchmark_rank.py
  python scripts/benchmark_rank.py --sizes=500x5000,2000x20000 --repeats=3
"""

import sys
import time
import tracemalloc
from typing import Callable, Optional, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

from facenet_jax import evaluation

_SIZES = flags.DEFINE_list(
    "sizes", ["2000x20000"], "Comma-separated QUERIESxGALLERY sizes.")
_NUM_IDS = flags.DEFINE_integer("num_ids", 500, "Identities to draw from.")
_NUM_CAMS = flags.DEFINE_integer("num_cams", 8, "Cameras to draw from.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Timed runs per size; the fastest is reported.")
_CHUNK = flags.DEFINE_integer(
    "query_chunk_size", evaluation.DEFAULT_QUERY_CHUNK,
    "Queries ranked at once by evaluate_rank.")
_THREADS = flags.DEFINE_integer(
    "num_threads", 0, "Ranking threads of evaluate_rank (0: one per CPU).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

# Largest accepted difference between the two implementations' metrics.
_TOLERANCE = 1e-9

Metrics = Tuple[np.ndarray, float, float]


def classic_rank(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                 q_camids: np.ndarray, g_camids: np.ndarray,
                 max_rank: int = 50,
                 q_sceneids: Optional[np.ndarray] = None,
                 g_sceneids: Optional[np.ndarray] = None) -> Metrics:
  """CMC, mAP and mINP by the classic per-query loop, as a baseline.

  Each query's gallery is fully sorted (stable), its same-id same-camera (or,
  with scene ids, same-id same-scene) entries dropped, and the metrics read
  off the remaining 0/1 match vector. Queries with no match are skipped.

  Args:
    distmat: (Q, G) distances.
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.
    max_rank: CMC length (capped at G).
    q_sceneids: optional (Q,) query scenes (then cameras are ignored).
    g_sceneids: optional (G,) gallery scenes.

  Returns:
    (cmc (min(max_rank, G),), mAP, mINP).
  """
  if q_sceneids is not None:
    q_groups, g_groups = q_sceneids, g_sceneids
  else:
    q_groups, g_groups = q_camids, g_camids
  num_ranks = min(max_rank, distmat.shape[1])
  cmc_sum = np.zeros(num_ranks)
  aps, inps = [], []
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind="stable")
    same_pid = g_pids[order] == q_pids[i]
    keep = ~(same_pid & (g_groups[order] == q_groups[i]))
    matches = same_pid[keep].astype(np.int64)
    if not matches.any():
      continue
    match_at = np.flatnonzero(matches)
    # CMC: a hit at every rank from the first match's onwards.
    cmc_sum[match_at[0]:] += 1
    # AP: mean precision (matches so far / rank) at the ranks of the matches.
    hits = np.cumsum(matches)
    precision = hits / np.arange(1, matches.size + 1)
    aps.append(np.sum(precision * matches) / hits[-1])
    # INP: matches / rank of the last match.
    inps.append(hits[-1] / (match_at[-1] + 1))
  return cmc_sum / len(aps), float(np.mean(aps)), float(np.mean(inps))


def _parse_size(text: str) -> Tuple[int, int]:
  """Parses "QxG" into (Q, G), raising a flag-naming error otherwise."""
  parts = text.lower().split("x")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise app.UsageError(
        f"--sizes entries must look like 2000x20000, got {text!r}")
  num_q, num_g = (int(p) for p in parts)
  if num_q < 1 or num_g < 1:
    raise app.UsageError(f"--sizes entries must be positive, got {text!r}")
  return num_q, num_g


def _best_time(fn: Callable[[], Metrics]) -> Tuple[float, Metrics]:
  """Fastest of --repeats calls of fn() and the result of the last one."""
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return best, result


def _benchmark(num_q: int, num_g: int, rng: np.random.Generator) -> dict:
  """Times both implementations at one size and compares their metrics."""
  distmat = rng.random((num_q, num_g), dtype=np.float32)
  args = (distmat, rng.integers(0, _NUM_IDS.value, num_q),
          rng.integers(0, _NUM_IDS.value, num_g),
          rng.integers(0, _NUM_CAMS.value, num_q),
          rng.integers(0, _NUM_CAMS.value, num_g))

  def project() -> Metrics:
    return evaluation.evaluate_rank(
        *args, return_minp=True, query_chunk_size=_CHUNK.value,
        num_threads=_THREADS.value)

  project_s, ours = _best_time(project)
  classic_s, theirs = _best_time(lambda: classic_rank(*args))
  # Tracing is a separate run: tracemalloc slows allocation.
  tracemalloc.start()
  project()
  peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
  tracemalloc.stop()
  return {
      "project_s": project_s,
      "classic_s": classic_s,
      "peak_mb": peak_mb,
      "cmc_diff": float(np.max(np.abs(ours[0] - theirs[0]))),
      "map_diff": abs(ours[1] - theirs[1]),
      "minp_diff": abs(ours[2] - theirs[2]),
  }


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _REPEATS.value < 1:
    raise app.UsageError(f"--repeats must be >= 1, got {_REPEATS.value}")
  if _THREADS.value < 0:
    raise app.UsageError(f"--num_threads must be >= 0, got {_THREADS.value}")
  sizes = [_parse_size(s) for s in _SIZES.value]
  rng = np.random.default_rng(_SEED.value)
  print(f"{'queries':>8} {'gallery':>8} {'project s':>10} {'classic s':>10} "
        f"{'ratio':>6} {'peak MB':>8} {'|dCMC|':>8} {'|dmAP|':>8} "
        f"{'|dmINP|':>8}")
  worst = 0.0
  for num_q, num_g in sizes:
    r = _benchmark(num_q, num_g, rng)
    print(f"{num_q:>8} {num_g:>8} {r['project_s']:>10.3f} "
          f"{r['classic_s']:>10.3f} {r['classic_s'] / r['project_s']:>6.1f} "
          f"{r['peak_mb']:>8.1f} {r['cmc_diff']:>8.1e} {r['map_diff']:>8.1e} "
          f"{r['minp_diff']:>8.1e}")
    worst = max(worst, r["cmc_diff"], r["map_diff"], r["minp_diff"])
  if worst > _TOLERANCE:
    print(f"FAIL: the implementations differ by {worst:.3e} > {_TOLERANCE}")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
