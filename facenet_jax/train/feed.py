"""The data a run reads: its splits, and the training batches on the devices.

Splits are loaded through TFDS (`input_pipeline.pipeline`), with validation
identities carved from train when config.val_ids asks; the training split is
decoded into memory or streamed (config.input.cache) and its batches are put
on the mesh ahead of the step (`device_prefetch`). Importing this module loads
TensorFlow, with its accelerators hidden.
"""

import functools
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from facenet_jax.train import mesh
import input_pipeline  # noqa: F401  (hides accelerators from TensorFlow)
from input_pipeline import deflare
from input_pipeline import pipeline


def check_config(config: ml_collections.ConfigDict,
                 sharding: mesh.Sharding) -> None:
  """The data, batch and input fields, before the training split is read.

  Also opens the evaluation split when it is the dataset's own validation
  split, so that a dataset without one fails before training, not after.

  Raises:
    ValueError: naming the field.
    pipeline.MissingSplitError: config.eval.split = "val" on a dataset with
      no validation split and config.val_ids = 0.
  """
  _check_batch(config, sharding)
  _check_flare(config)
  _check_input(config)
  _check_eval_split(config)


def val_ids(config: ml_collections.ConfigDict) -> int:
  """config.val_ids, validated: training identities held out as val."""
  value = config.val_ids
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"config.val_ids must be a non-negative integer (0 = "
                     f"no held-out identities), got {value!r}")
  return value


def eval_splits(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The (query, gallery) splits that config.eval.split ranks."""
  if config.eval.split not in pipeline.EVAL_SPLITS:
    raise ValueError(f"config.eval.split must be one of "
                     f"{sorted(pipeline.EVAL_SPLITS)}, got "
                     f"{config.eval.split!r}")
  return pipeline.EVAL_SPLITS[config.eval.split]


def split_data(config: ml_collections.ConfigDict,
               split: str) -> pipeline.SplitData:
  """The split as the model sees it: loaded, then CLAHE'd if configured.

  With config.val_ids > 0, that many training identities are held out
  (pipeline.carve_val): "train" is what remains and "val_query" /
  "val_gallery" are made of the held-out ones, also on datasets that have
  validation splits of their own (synthetic_flare). With val_ids = 0 the
  validation splits are the dataset's.

  Args:
    config: the run configuration.
    split: train | query | gallery | val_query | val_gallery.

  Returns:
    The split.

  Raises:
    pipeline.MissingSplitError: a validation split was asked for, the
      dataset has none and config.val_ids is 0.
  """
  num_val = val_ids(config)
  load = functools.partial(
      pipeline.load_split, config.dataset,
      builder_config=config.dataset_config, data_dir=config.data_dir or None,
      manual_dir=config.manual_dir or None)
  val_splits = pipeline.EVAL_SPLITS["val"]
  if num_val and split in ("train",) + val_splits:
    train = load("train")
    if num_val >= train.num_ids:
      raise ValueError(f"config.val_ids={num_val} must be smaller than the "
                       f"{train.num_ids} training identities of "
                       f"{config.dataset}")
    data = pipeline.carve_val(train, num_val)[split]
  else:
    try:
      data = load(split)
    except pipeline.MissingSplitError as e:
      if split not in val_splits:
        raise
      raise pipeline.MissingSplitError(
          f"{e}. The dataset has no validation split of its own: set "
          "config.val_ids > 0 to hold out that many training identities as "
          "one (docs/data.md, 'Validation splits').") from e
  if config.preprocess.clahe:
    data = deflare.clahe_split(data, config.preprocess.clahe_clip_limit)
  return data


def normalization(config: ml_collections.ConfigDict):
  """Per-modality (mean, std), each float32 (3, 3) in [RGB, NI, TI] order."""
  return (np.asarray(config.normalization.mean, np.float32),
          np.asarray(config.normalization.std, np.float32))


INPUT_CACHE_MODES = ("auto", "memory", "stream")


def _check_input(config: ml_collections.ConfigDict) -> None:
  # config.input: how the batches reach the step.
  if config.input.cache not in INPUT_CACHE_MODES:
    raise ValueError(f"config.input.cache must be one of {INPUT_CACHE_MODES}, "
                     f"got {config.input.cache!r}")
  if not config.input.cache_max_gb >= 0:
    raise ValueError(f"config.input.cache_max_gb must be >= 0, got "
                     f"{config.input.cache_max_gb!r}")
  threads = config.input.threads
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < -1:
    raise ValueError(f"config.input.threads must be an integer >= -1 (-1 = "
                     f"auto), got {threads!r}")
  prefetch = config.input.device_prefetch
  if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
    raise ValueError(f"config.input.device_prefetch must be an integer >= 0, "
                     f"got {prefetch!r}")


def _check_flare(config: ml_collections.ConfigDict) -> None:
  # The builders store flare_ratio measured at FLARE_PIXEL_LOW; only the ratio
  # threshold can change without rebuilding the dataset.
  from input_pipeline.datasets import features  # pylint: disable=g-import-not-at-top
  if config.flare.pixel_low != features.FLARE_PIXEL_LOW:
    raise ValueError(
        f"flare.pixel_low={config.flare.pixel_low}: the datasets store "
        f"flare_ratio measured at {features.FLARE_PIXEL_LOW} (input_pipeline/"
        "datasets/features.py); change FLARE_PIXEL_LOW and rebuild them to "
        "use another bar.")


def _check_eval_split(config: ml_collections.ConfigDict) -> None:
  # Fails before training, not after it, when the split cannot be evaluated.
  query_split, _ = eval_splits(config)
  if query_split in pipeline.EVAL_SPLITS["val"] and not val_ids(config):
    split_data(config, query_split)


def _check_batch(config: ml_collections.ConfigDict,
                 sharding: mesh.Sharding) -> None:
  if config.eval_batch_size < 1:
    raise ValueError(f"eval_batch_size must be >= 1, got "
                     f"{config.eval_batch_size}")
  batch = config.ids_per_batch * config.instances_per_id
  if config.ids_per_batch % jax.process_count():
    raise ValueError(f"ids_per_batch={config.ids_per_batch} must be divisible "
                     f"by the number of processes ({jax.process_count()})")
  if batch % sharding.mesh.size:
    raise ValueError(
        f"The global batch ids_per_batch x instances_per_id = {batch} must be "
        f"divisible by the number of devices ({sharding.mesh.size}).")


def training_cache(config: ml_collections.ConfigDict,
                   data: pipeline.SplitData,
                   saturation: bool) -> Optional[pipeline.DecodedImages]:
  """The training split decoded into memory, if config.input.cache says so.

  "auto" caches when the decoded split fits in config.input.cache_max_gb;
  the choice and its size are logged. None = stream from the encoded bytes.
  """
  size = tuple(config.input_size)
  gigabytes = pipeline.decoded_nbytes(data, size, saturation) / 2**30
  mode = config.input.cache
  if mode == "stream" or (mode == "auto" and
                          gigabytes > config.input.cache_max_gb):
    logging.info("Training input: streaming, decoding every image as it is "
                 "drawn (config.input.cache=%s; decoded split %.2f GB, "
                 "cache_max_gb %.1f).", mode, gigabytes,
                 config.input.cache_max_gb)
    return None
  start = time.perf_counter()
  cache = pipeline.decode_split(
      data, size,
      saturation_bar=config.flare.pixel_low if saturation else None)
  logging.info("Training input: %d triplets decoded into memory, %.2f GB, in "
               "%.1f s (config.input.cache=%s).", data.num_examples,
               gigabytes, time.perf_counter() - start, mode)
  return cache


def input_threads(config: ml_collections.ConfigDict) -> int:
  """tf.data threads of the training input (0 = TF's AUTOTUNE).

  config.input.threads = -1 picks 1 when the step runs on the CPU, where
  more input threads take cores from the step, and AUTOTUNE on accelerators.
  """
  if config.input.threads >= 0:
    return config.input.threads
  return 1 if jax.default_backend() == "cpu" else 0


def input_batches(config: ml_collections.ConfigDict,
                  train_data: pipeline.SplitData, sharding: mesh.Sharding,
                  start_step: int) -> Iterator[dict]:
  """The training batches from start_step on, as sharded device arrays.

  Cached in memory or streamed (config.input.cache), then put on the devices
  config.input.device_prefetch batches ahead of the step.
  """
  mean, std = normalization(config)
  saturation = config.loss.flare_pixel_weight > 0 and config.model.use_mfmp
  batches = pipeline.train_batches(
      train_data, ids_per_batch=config.ids_per_batch,
      instances_per_id=config.instances_per_id,
      input_size=tuple(config.input_size), mean=mean, std=std,
      flip_prob=config.augment.flip_prob, pad=config.augment.pad,
      random_erasing_prob=config.augment.random_erasing_prob,
      flare_threshold=config.flare.ratio_threshold, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(),
      saturation=saturation, saturation_bar=config.flare.pixel_low,
      num_threads=input_threads(config),
      cache=training_cache(config, train_data, saturation))
  return device_prefetch(batches, sharding.global_batch,
                         config.input.device_prefetch)


def device_prefetch(batches: Iterator[Any], put: Callable[[Any], Any],
                    size: int) -> Iterator[Any]:
  """Yields put(batch) for each batch, with `size` of them prepared ahead.

  A background thread draws from `batches` and puts the arrays on the devices
  while the caller runs the previous step, so neither the host-side batch
  nor the transfer waits for the step. Order is kept; an error in the
  thread is raised in the caller at the batch where it happened. size 0
  draws and puts in the caller's thread.
  """
  if size == 0:
    for batch in batches:
      yield put(batch)
    return
  ready = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for batch in batches:
        if not offer(("batch", put(batch))):
          return
    except BaseException as e:  # pylint: disable=broad-except
      offer(("error", e))
      return
    offer(("end", None))

  thread = threading.Thread(target=work, name="device_prefetch", daemon=True)
  thread.start()
  try:
    while True:
      kind, item = ready.get()
      if kind == "error":
        raise item
      if kind == "end":
        return
      yield item
  finally:
    stop.set()

