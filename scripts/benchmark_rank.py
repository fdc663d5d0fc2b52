"""Times `evaluate_rank` on random distance matrices and prints a table.

Each size is "QUERIESxGALLERY". Distances are uniform random float32, ids are
drawn from --num_ids identities and --num_cams cameras, so a realistic share of
gallery entries are true matches and some are removed as same-camera. Peak MB is
the largest NumPy allocation traced by tracemalloc while evaluate_rank runs
(the input matrix itself excluded).

Run:
  python scripts/benchmark_rank.py
  python scripts/benchmark_rank.py --sizes=500x5000,2000x20000 --repeats=3
"""

import time
import tracemalloc
from typing import Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

from facenet_jax import evaluation

_SIZES = flags.DEFINE_list(
    "sizes", ["2000x20000"], "Comma-separated QUERIESxGALLERY sizes.")
_NUM_IDS = flags.DEFINE_integer("num_ids", 1000, "Identities to draw from.")
_NUM_CAMS = flags.DEFINE_integer("num_cams", 8, "Cameras to draw from.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Timed runs per size; the fastest is reported.")
_CHUNK = flags.DEFINE_integer(
    "query_chunk_size", evaluation.DEFAULT_QUERY_CHUNK,
    "Queries ranked at once by evaluate_rank.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


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


def _benchmark(num_q: int, num_g: int,
               rng: np.random.Generator) -> Tuple[float, float, float]:
  """Returns (best seconds, peak MB, mAP) of evaluate_rank at one size."""
  distmat = rng.random((num_q, num_g), dtype=np.float32)
  q_pids = rng.integers(0, _NUM_IDS.value, num_q)
  g_pids = rng.integers(0, _NUM_IDS.value, num_g)
  q_camids = rng.integers(0, _NUM_CAMS.value, num_q)
  g_camids = rng.integers(0, _NUM_CAMS.value, num_g)
  best = float("inf")
  for _ in range(_REPEATS.value):
    # Timing and tracing are separate runs: tracemalloc slows allocation.
    start = time.perf_counter()
    evaluation.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids,
                             query_chunk_size=_CHUNK.value)
    best = min(best, time.perf_counter() - start)
  tracemalloc.start()
  _, mean_ap = evaluation.evaluate_rank(distmat, q_pids, g_pids, q_camids,
                                        g_camids,
                                        query_chunk_size=_CHUNK.value)
  peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
  tracemalloc.stop()
  return best, peak_mb, mean_ap


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _REPEATS.value < 1:
    raise app.UsageError(f"--repeats must be >= 1, got {_REPEATS.value}")
  sizes = [_parse_size(s) for s in _SIZES.value]
  rng = np.random.default_rng(_SEED.value)
  print(f"{'queries':>8} {'gallery':>8} {'seconds':>8} {'peak MB':>8} "
        f"{'mAP':>7}")
  for num_q, num_g in sizes:
    seconds, peak_mb, mean_ap = _benchmark(num_q, num_g, rng)
    print(f"{num_q:>8} {num_g:>8} {seconds:>8.2f} {peak_mb:>8.1f} "
          f"{mean_ap:>7.4f}")


if __name__ == "__main__":
  app.run(main)
