r"""Measures training input pipeline throughput (triplets per second).

By default it reads an in-memory split of generated 256x128 JPEG triplets, so it
runs anywhere; --dataset reads a prepared TFDS dataset instead.

Run:
  python scripts/benchmark_input.py --threads=0,1,2
  python scripts/benchmark_input.py --dataset=synthetic_flare \
      --builder_config=small --data_dir=/tmp/tfds
"""

import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

import input_pipeline  # noqa: F401  (configures TensorFlow)
from input_pipeline import generated
from input_pipeline import pipeline

_DATASET = flags.DEFINE_string(
    "dataset", "", "TFDS dataset to read; empty = generated JPEG triplets.")
_BUILDER_CONFIG = flags.DEFINE_string("builder_config", "",
                                      "TFDS builder config.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "TFDS manual_dir.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read from --dataset.")
_NUM_IDS = flags.DEFINE_integer("num_ids", 64, "Generated data: identities.")
_PER_ID = flags.DEFINE_integer("per_id", 8, "Generated data: triplets per id.")
_IDS_PER_BATCH = flags.DEFINE_integer("ids_per_batch", 8, "P.")
_INSTANCES_PER_ID = flags.DEFINE_integer("instances_per_id", 4, "K.")
_HEIGHT = flags.DEFINE_integer("height", 256, "Input height.")
_WIDTH = flags.DEFINE_integer("width", 128, "Input width.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Batches discarded before timing.")
_BATCHES = flags.DEFINE_integer("batches", 30, "Timed batches.")
_THREADS = flags.DEFINE_list(
    "threads", ["0"], "tf.data thread counts to compare; 0 = TF defaults "
    "(AUTOTUNE map on tf.data's shared pool).")


def _measure(data: pipeline.SplitData, num_threads: int) -> float:
  """Returns triplets per second over the timed batches."""
  batches = pipeline.train_batches(
      data, ids_per_batch=_IDS_PER_BATCH.value,
      instances_per_id=_INSTANCES_PER_ID.value,
      input_size=(_HEIGHT.value, _WIDTH.value),
      mean=((0.485, 0.456, 0.406),) * 3, std=((0.229, 0.224, 0.225),) * 3,
      flip_prob=0.5, pad=10, random_erasing_prob=0.5, flare_threshold=0.1,
      seed=0, num_threads=num_threads)
  for _ in range(_WARMUP.value):
    next(batches)
  start = time.perf_counter()
  rows = 0
  for _ in range(_BATCHES.value):
    rows += next(batches)["rgb"].shape[0]
  return rows / (time.perf_counter() - start)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = [int(t) for t in _THREADS.value]
  if any(t < 0 for t in threads):
    raise app.UsageError(f"--threads must be >= 0, got {_THREADS.value}")
  if _DATASET.value:
    data = pipeline.load_split(
        _DATASET.value, _SPLIT.value, builder_config=_BUILDER_CONFIG.value,
        data_dir=_DATA_DIR.value or None, manual_dir=_MANUAL_DIR.value or None)
    source = f"{_DATASET.value}/{_BUILDER_CONFIG.value}[{_SPLIT.value}]"
  else:
    data = generated.generated_split(_NUM_IDS.value, _PER_ID.value, _HEIGHT.value,
                            _WIDTH.value)
    source = f"generated JPEG {_HEIGHT.value}x{_WIDTH.value}"
  mean_bytes = np.mean([len(x) for x in data.rgb])
  logging.info("%s: %d triplets, mean RGB file %.1f kB", source,
               data.num_examples, mean_bytes / 1e3)
  batch = _IDS_PER_BATCH.value * _INSTANCES_PER_ID.value
  print(f"source: {source}, {data.num_examples} triplets, "
        f"mean RGB file {mean_bytes / 1e3:.1f} kB")
  print(f"{'input (HxW)':>12} {'batch':>6} {'threads':>8} {'triplets/s':>11}")
  for num_threads in threads:
    rate = _measure(data, num_threads)
    label = str(num_threads) if num_threads else "auto"
    print(f"{_HEIGHT.value:>6}x{_WIDTH.value:<5} {batch:>6} {label:>8} "
          f"{rate:>11.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
