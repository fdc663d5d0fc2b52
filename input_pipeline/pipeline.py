"""tf.data training and evaluation pipelines for aligned RGB/NI/TI triplets.

The core works on a split held in memory with its images still encoded
(`SplitData`); `load_split` is the thin TFDS reader that produces one.

Training draws identity-balanced P x K batches (torchreid's
RandomIdentitySampler): P distinct ids, K examples each. The sample order is
computed in NumPy from (seed, epoch) and the augmentation is seeded from
(seed, global sample position), so the batch at global step s is a pure
function of (seed, s): `start_step` resumes exactly without replaying earlier
steps, and the batches of all processes concatenate to the single-process one.

One file, though long: training and evaluation share the decoding, resizing,
normalisation and pseudo-labels of a SplitData, which must stay the same
code for both.
"""

import contextlib
import dataclasses
import io
from typing import Iterator, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import ops
from input_pipeline.datasets import features

MODALITIES = ops.MODALITIES
# The TFDS builders of this project (input_pipeline/datasets).
KNOWN_DATASETS = ("wmveid863", "rgbnt100", "msvr310", "synthetic_flare")
# The (query, gallery) splits ranked by each evaluation split.
EVAL_SPLITS = {"test": ("query", "gallery"), "val": features.VAL_SPLITS}
# Seed of the identities `carve_val` holds out. Fixed (not the run's seed):
# every seed of a study trains and is compared on the same identities.
VAL_IDS_SEED = 0
_LABEL_FIELDS = ("pid", "camid", "sceneid")
_FEATURES = MODALITIES + _LABEL_FIELDS + ("flare_ratio", "file")


@dataclasses.dataclass(frozen=True)
class SplitData:
  """One split in memory; images stay encoded (PNG or JPEG bytes).

  Attributes:
    rgb: (N,) object array of encoded RGB images.
    ni: (N,) object array of encoded NI images.
    ti: (N,) object array of encoded TI images.
    pid: (N,) int64 original vehicle ids.
    camid: (N,) int64 camera indices.
    sceneid: (N,) int64 scene indices (-1 where the dataset has none).
    flare_ratio: (N, 2) float32 saturated fraction of the raw RGB and NI image.
    file: (N,) str relative paths, used in error messages and by evaluators.
  """
  rgb: np.ndarray
  ni: np.ndarray
  ti: np.ndarray
  pid: np.ndarray
  camid: np.ndarray
  sceneid: np.ndarray
  flare_ratio: np.ndarray
  file: np.ndarray

  def __post_init__(self):
    file = np.asarray(self.file)
    if file.ndim != 1:
      raise ValueError(f"SplitData.file must have shape (N,), got {file.shape}")
    n = file.shape[0]
    object.__setattr__(self, "file", file.astype(str))
    for name in MODALITIES:
      images = np.asarray(getattr(self, name), dtype=object)
      if images.shape != (n,):
        raise ValueError(f"SplitData.{name} must have shape ({n},) like file, "
                         f"got {images.shape}")
      for i, encoded in enumerate(images):
        if not isinstance(encoded, bytes) or not encoded:
          raise ValueError(
              f"SplitData.{name}[{i}] ({self.file[i]}) must be non-empty "
              f"encoded image bytes, got {type(encoded).__name__}")
      object.__setattr__(self, name, images)
    for name in _LABEL_FIELDS:
      values = np.asarray(getattr(self, name))
      if values.shape != (n,):
        raise ValueError(f"SplitData.{name} must have shape ({n},) like file, "
                         f"got {values.shape}")
      if n and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"SplitData.{name} must hold integers, got {values.dtype}")
      object.__setattr__(self, name, values.astype(np.int64))
    ratio = np.asarray(self.flare_ratio, dtype=np.float32)
    if ratio.shape != (n, 2):
      raise ValueError(f"SplitData.flare_ratio must have shape ({n}, 2), got "
                       f"{ratio.shape}")
    bad = np.flatnonzero(~np.all((ratio >= 0) & (ratio <= 1), axis=1))
    if bad.size:
      raise ValueError(f"SplitData.flare_ratio must lie in [0, 1]; example "
                       f"{bad[0]} ({self.file[bad[0]]}) has {ratio[bad[0]]}")
    object.__setattr__(self, "flare_ratio", ratio)

  @property
  def num_examples(self) -> int:
    return int(self.pid.shape[0])

  @property
  def num_ids(self) -> int:
    return int(np.unique(self.pid).size)


def load_split(dataset: str, split: str, *, builder_config: str = "",
               data_dir: Optional[str] = None,
               manual_dir: Optional[str] = None) -> SplitData:
  """Reads one split of a FACENet TFDS dataset into memory, images encoded.

  Prepares the dataset first if needed (real datasets read their original
  layout from manual_dir).

  Args:
    dataset: TFDS name (wmveid863 | rgbnt100 | msvr310 | synthetic_flare).
    split: split name (train | query | gallery; synthetic_flare also has
      val_query | val_gallery).
    builder_config: builder config name; "" for the builder's default.
    data_dir: where TFDS keeps prepared datasets; None or "" for its default.
    manual_dir: root of a manually downloaded dataset; None or "" for none.

  Returns:
    The split as SplitData.

  Raises:
    MissingSplitError: the dataset has no such split.
  """
  # Importing the package registers the project's builders with TFDS.
  # pylint: disable-next=g-import-not-at-top,unused-import
  import input_pipeline.datasets

  name = f"{dataset}/{builder_config}" if builder_config else dataset
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    registered = set(tfds.list_builders(with_community_datasets=False))
    known = [d for d in KNOWN_DATASETS if d in registered]
    raise ValueError(
        f"unknown dataset {dataset!r}; known datasets: {known}") from e
  missing = [k for k in _FEATURES if k not in builder.info.features]
  if missing:
    raise ValueError(f"dataset {name} lacks the triplet features {missing} "
                     "(see input_pipeline/datasets/features.py)")
  if not builder.is_prepared():
    logging.info("Preparing %s in %s (manual_dir=%s)...", name,
                 builder.data_dir, manual_dir)
    # TFDS prints its own progress lines: they go to the log, not stdout.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              manual_dir=manual_dir or None))
    logging.info("Prepared %s. %s", name, printed.getvalue().strip())
  if split not in builder.info.splits:
    raise MissingSplitError(f"dataset {name} has no split {split!r}; it has "
                            f"{sorted(builder.info.splits)}")
  wanted = {k: True for k in _FEATURES}
  decoders = tfds.decode.PartialDecoding(
      wanted, decoders={k: tfds.decode.SkipDecoding() for k in MODALITIES})
  ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  columns = {k: [] for k in wanted}
  for batch in tfds.as_numpy(ds.batch(1024)):
    for k, values in batch.items():
      columns[k].append(values)
  if not columns["pid"]:
    raise ValueError(f"split {split!r} of {name} is empty")
  arrays = {k: np.concatenate(v) for k, v in columns.items()}
  arrays["file"] = np.array([f.decode("utf-8") for f in arrays["file"]])
  data = SplitData(**arrays)
  logging.info("Loaded %s[%s]: %d triplets, %d ids.", name, split,
               data.num_examples, data.num_ids)
  return data


def is_prepared(dataset: str, builder_config: str = "",
                data_dir: Optional[str] = None) -> bool:
  """Whether the TFDS dataset is already prepared (False if unknown)."""
  # pylint: disable-next=g-import-not-at-top,unused-import
  import input_pipeline.datasets  # noqa: F401

  name = f"{dataset}/{builder_config}" if builder_config else dataset
  try:
    return tfds.builder(name, data_dir=data_dir or None).is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    return False


class MissingSplitError(ValueError):
  """The dataset has no split of the requested name."""


def subset(data: SplitData, index: np.ndarray) -> SplitData:
  """The examples data[index], in the order of index."""
  return SplitData(**{f.name: getattr(data, f.name)[index]
                      for f in dataclasses.fields(SplitData)})


def val_identities(pid: np.ndarray, num_ids: int) -> np.ndarray:
  """The training identities `carve_val` holds out, sorted.

  A fixed-seed (VAL_IDS_SEED) random choice among the distinct pids: it
  depends only on the set of pids, not on their order or the run's seed; it
  is spread over the whole id range (datasets often number vehicles in
  capture order); and the ids held out for n are among those held out for
  n + 1.

  Args:
    pid: (N,) pids of the training split.
    num_ids: how many identities to hold out, in [1, #ids - 1].

  Returns:
    (num_ids,) int64 pids.
  """
  ids = np.unique(np.asarray(pid, np.int64))
  if not 1 <= num_ids < ids.size:
    raise ValueError(f"num_ids (validation identities) must be in [1, "
                     f"{ids.size - 1}] for a split of {ids.size} ids, got "
                     f"{num_ids}")
  chosen = np.random.default_rng(VAL_IDS_SEED).permutation(ids.size)[:num_ids]
  return np.sort(ids[chosen])


def carve_val(data: SplitData, num_ids: int) -> dict[str, SplitData]:
  """Holds out `num_ids` training identities as a validation query/gallery.

  Market-1501 style: of each held-out identity, the first example in file
  order (sorted `file` paths) seen by each camera is a query, all its other
  examples go to the gallery. The held-out identities (`val_identities`)
  leave the training split entirely. A query whose identity has no gallery
  example from another camera has no true match and is skipped by the
  ranking, as in the test protocol.

  Args:
    data: the training split.
    num_ids: identities to hold out, in [1, data.num_ids - 1].

  Returns:
    {"train": the remaining examples (in their order), "val_query",
     "val_gallery": the held-out ones (in file order)}.
  """
  held = np.isin(data.pid, val_identities(data.pid, num_ids))
  query, gallery, seen = [], [], set()
  for i in np.argsort(data.file, kind="stable"):
    if not held[i]:
      continue
    key = (int(data.pid[i]), int(data.camid[i]))
    (gallery if key in seen else query).append(i)
    seen.add(key)
  val_query, val_gallery = features.VAL_SPLITS
  return {"train": subset(data, np.flatnonzero(~held)),
          val_query: subset(data, np.asarray(query, np.int64)),
          val_gallery: subset(data, np.asarray(gallery, np.int64))}


def train_label_map(data: SplitData) -> dict[int, int]:
  """Maps each pid to its contiguous class index (position in sorted pids)."""
  return {int(p): i for i, p in enumerate(np.unique(data.pid))}


class IdentitySampler:
  """Identity-balanced P x K batch indices, a pure function of (seed, step).

  An epoch, as in torchreid's RandomIdentitySampler: every id's examples are
  shuffled and cut into chunks of K (remainder dropped); an id with fewer than
  K examples gives one chunk drawn with replacement. Batches take P chunks of
  distinct ids. Unlike torchreid's greedy draw, whose number of batches varies
  between epochs, every epoch has the same number of batches B: the largest B
  with sum_i min(chunks_i, B) >= P * B, the most batches of P distinct ids the
  chunks can fill. Surplus chunks are dropped at random, from ids that keep
  another chunk first, so every id is seen each epoch whenever B * P >= #ids.
  """

  def __init__(self, pid: np.ndarray, ids_per_batch: int, instances_per_id: int,
               seed: int):
    """Builds the sampler.

    Args:
      pid: (N,) ids of the split's examples.
      ids_per_batch: P, distinct ids per batch.
      instances_per_id: K, examples per id in a batch.
      seed: non-negative seed of the sample order.
    """
    if ids_per_batch < 1 or instances_per_id < 1:
      raise ValueError(f"ids_per_batch ({ids_per_batch}) and instances_per_id "
                       f"({instances_per_id}) must be positive")
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")
    self.ids_per_batch = ids_per_batch
    self.instances_per_id = instances_per_id
    self.seed = seed
    _, labels = np.unique(np.asarray(pid), return_inverse=True)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    self._members = np.split(order, np.cumsum(counts)[:-1])
    self._chunks = np.maximum(counts // instances_per_id, 1)
    if len(counts) < ids_per_batch:
      raise ValueError(f"the split has {len(counts)} ids but a batch needs "
                       f"ids_per_batch={ids_per_batch} distinct ids")
    batches = np.arange(1, self._chunks.sum() // ids_per_batch + 1)
    usable = np.minimum(self._chunks[None, :], batches[:, None]).sum(axis=1)
    # usable - P * B is concave in B and 0 at B = 0: the feasible Bs are 0..max.
    self.steps_per_epoch = int(batches[usable >= ids_per_batch * batches].max())
    self._cached_epoch = -1
    self._cached_plan = np.zeros((0,), np.int64)

  def epoch(self, epoch: int) -> np.ndarray:
    """Returns the (steps_per_epoch, P * K) example indices of an epoch.

    Each row holds P groups of K consecutive examples of one id.
    """
    p, k, b = self.ids_per_batch, self.instances_per_id, self.steps_per_epoch
    rng = np.random.default_rng([self.seed, epoch])
    chunks = []
    for members in self._members:
      if len(members) < k:
        picked = rng.choice(members, size=k, replace=True)
      else:
        picked = rng.permutation(members)[:len(members) // k * k]
      chunks.append(picked.reshape(-1, k)[:b])
    kept = np.array([len(c) for c in chunks])
    surplus = kept.sum() - p * b
    # Drop the surplus among chunks beyond each id's first, then among firsts.
    extra = [(i, j) for i, n in enumerate(kept) for j in range(1, n)]
    firsts = [(i, 0) for i in range(len(kept))]
    drop_extra = rng.permutation(len(extra))[:surplus]
    drop_first = rng.permutation(len(firsts))[:max(surplus - len(extra), 0)]
    dropped = {extra[d] for d in drop_extra} | {firsts[d] for d in drop_first}
    items = []
    for i in rng.permutation(len(chunks)):
      items.extend(c for j, c in enumerate(chunks[i]) if (i, j) not in dropped)
    # Item j goes to batch j % B: an id's <= B consecutive chunks land in
    # distinct batches, so every batch holds P distinct ids.
    grid = np.stack(items).reshape(p, b, k).transpose(1, 0, 2)
    return grid[rng.permutation(b)].reshape(b, p * k).astype(np.int64)

  def batch(self, step: int) -> np.ndarray:
    """Returns the (P * K,) example indices of the global batch at step."""
    epoch, within = divmod(step, self.steps_per_epoch)
    if epoch != self._cached_epoch:
      self._cached_plan = self.epoch(epoch)
      self._cached_epoch = epoch
    return self._cached_plan[within]


def steps_per_epoch(data: SplitData, ids_per_batch: int,
                    instances_per_id: int) -> int:
  """Number of P x K batches in one training epoch (the same every epoch)."""
  return IdentitySampler(data.pid, ids_per_batch, instances_per_id,
                         seed=0).steps_per_epoch


def _local_slice(global_size: int, process_index: int,
                 process_count: int, what: str) -> tuple[int, int]:
  """The [start, stop) of this process's share of a global batch."""
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} not in [0, {process_count})")
  if global_size % process_count:
    raise ValueError(f"{what} ({global_size}) must be divisible by "
                     f"process_count ({process_count})")
  local = global_size // process_count
  return process_index * local, (process_index + 1) * local


def _signature(batch: dict[str, np.ndarray]) -> dict[str, tf.TensorSpec]:
  return {k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype) if v.dtype != object
                           else tf.string) for k, v in batch.items()}


def _map_batches(generator, first: dict[str, np.ndarray], per_example: ops.Op,
                 per_batch: ops.Op, batch_size: int, prefetch: int,
                 num_threads: int) -> tf.data.Dataset:
  """Per-example then per-batch preprocessing of a stream of row batches."""
  ds = tf.data.Dataset.from_generator(generator,
                                      output_signature=_signature(first))
  parallel = num_threads or tf.data.AUTOTUNE
  ds = ds.unbatch().map(per_example, num_parallel_calls=parallel)
  # Normalising whole uint8 batches costs a few ops per batch, not per example.
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(per_batch, num_parallel_calls=parallel).prefetch(prefetch)
  return ds.with_options(_options(num_threads))


def _options(num_threads: int) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Parallelism comes from processing examples concurrently, not within one.
  options.threading.max_intra_op_parallelism = 1
  if num_threads:
    options.threading.private_threadpool_size = num_threads
  return options


def _check_norm(mean, std) -> None:
  for name, value in (("mean", mean), ("std", std)):
    if np.shape(value) != (len(MODALITIES), 3):
      raise ValueError(f"{name} must be ({len(MODALITIES)}, 3), one RGB row "
                       f"per modality {MODALITIES}, got {np.shape(value)}")


# The decoded-image cache: uint8 (N, H, W, 3) arrays per image key.
DecodedImages = dict[str, np.ndarray]


def decoded_nbytes(data: SplitData, input_size: Sequence[int],
                   saturation: bool = False) -> int:
  """Bytes that `decode_split` would hold for `data` at input_size."""
  h, w = (int(s) for s in input_size)
  planes = len(MODALITIES) + (1 if saturation else 0)
  return data.num_examples * planes * h * w * 3


def _find_corrupt(data: SplitData, index: np.ndarray) -> Optional[str]:
  """Names the first undecodable image among the examples `index`, if any."""
  for i in index:
    for m in MODALITIES:
      try:
        tf.io.decode_image(getattr(data, m)[i], channels=3,
                           expand_animations=False)
      except (tf.errors.InvalidArgumentError, ValueError):
        return f"{m} image of example {i} ({data.file[i]})"
  return None


def decode_split(data: SplitData, input_size: Sequence[int], *,
                 saturation_bar: Optional[int] = None, batch_size: int = 64,
                 num_threads: int = 0) -> DecodedImages:
  """Decodes and resizes every image of the split once, for a memory cache.

  The result holds exactly what the streaming pipeline computes per example
  before its first random op (decode, the optional saturation map, resize),
  so `train_batches(..., cache=...)` yields the same batches as streaming.

  Args:
    data: the split.
    input_size: (H, W) of the network input.
    saturation_bar: also cache the saturation pseudo-image of the raw RGB and
      NI images at this bar (ops.saturation_map); None = no saturation.
    batch_size: examples decoded per tf.data batch.
    num_threads: tf.data threads; 0 = TF defaults.

  Returns:
    {"rgb", "ni", "ti"[, "saturation"]: uint8 (N, H, W, 3)}.

  Raises:
    ValueError: an image cannot be decoded (naming its modality and file).
  """
  size = tuple(int(s) for s in input_size)
  keys = MODALITIES
  first_ops = [ops.decode()]
  if saturation_bar is not None:
    keys = MODALITIES + (ops.SATURATION_KEY,)
    first_ops.append(ops.saturation_map(saturation_bar))
  per_example = ops.chain(*first_ops, ops.resize(size, keys=keys),
                          ops.keep(keys))
  n = data.num_examples
  out = {k: np.empty((n,) + size + (3,), np.uint8) for k in keys}

  def generator():
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      yield {m: getattr(data, m)[start:stop] for m in MODALITIES}

  signature = {m: tf.TensorSpec((None,), tf.string) for m in MODALITIES}
  ds = tf.data.Dataset.from_generator(generator, output_signature=signature)
  parallel = num_threads or tf.data.AUTOTUNE
  ds = ds.unbatch().map(per_example, num_parallel_calls=parallel)
  ds = ds.batch(batch_size).prefetch(2).with_options(
      _options(num_threads))
  start = 0
  batches = ds.as_numpy_iterator()
  while start < n:
    try:
      batch = next(batches)
    except tf.errors.InvalidArgumentError as e:
      corrupt = _find_corrupt(data, np.arange(start, min(start + batch_size,
                                                         n)))
      if corrupt is None:
        raise
      raise ValueError(f"cannot decode the {corrupt}: {e.message}") from None
    stop = start + len(batch[MODALITIES[0]])
    for k in keys:
      out[k][start:stop] = batch[k]
    start = stop
  return out


def _check_cache(cache: DecodedImages, data: SplitData,
                 input_size: Sequence[int], saturation: bool) -> None:
  shape = (data.num_examples,) + tuple(int(s) for s in input_size) + (3,)
  keys = MODALITIES + ((ops.SATURATION_KEY,) if saturation else ())
  for k in keys:
    if k not in cache:
      raise ValueError(f"the decoded-image cache lacks {k!r} (has "
                       f"{sorted(cache)}); build it with decode_split"
                       + (" and saturation_bar" if k == ops.SATURATION_KEY
                          else ""))
    if cache[k].shape != shape or cache[k].dtype != np.uint8:
      raise ValueError(f"the decoded-image cache's {k!r} is {cache[k].dtype} "
                       f"{cache[k].shape}, expected uint8 {shape}")


def train_batches(data: SplitData, *, ids_per_batch: int, instances_per_id: int,
                  input_size: Sequence[int], mean: Sequence[Sequence[float]],
                  std: Sequence[Sequence[float]], flip_prob: float, pad: int,
                  random_erasing_prob: float, flare_threshold: float, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, prefetch: int = 2,
                  num_threads: int = 0, saturation: bool = False,
                  saturation_bar: int = 250,
                  cache: Optional[DecodedImages] = None,
                  ) -> Iterator[dict[str, np.ndarray]]:
  """The infinite stream of augmented P x K training batches of this process.

  Process i gets ids_per_batch / process_count whole id groups of each global
  batch; concatenating the processes' batches in process order gives the
  single-process batch exactly (augmentation included).

  Args:
    data: the training split.
    ids_per_batch: P, distinct ids per global batch.
    instances_per_id: K, examples per id.
    input_size: (H, W) of the network input.
    mean: (3, 3) per-modality channel means in [0, 1], [RGB, NI, TI] order.
    std: (3, 3) per-modality channel standard deviations.
    flip_prob: horizontal flip probability.
    pad: zero padding before the random crop back to input_size.
    random_erasing_prob: probability of erasing a rectangle.
    flare_threshold: delta = flare_ratio > flare_threshold.
    seed: non-negative seed of sample order and augmentation.
    start_step: global step of the first batch (resume).
    process_index: this process's index.
    process_count: number of processes.
    prefetch: batches prepared ahead.
    num_threads: tf.data threads and parallel map calls; 0 = TF defaults
      (AUTOTUNE map over tf.data's shared pool).
    saturation: also yield the per-pixel saturation maps of the raw RGB and
      NI images (the pixel-level flare target), augmented like the images.
    saturation_bar: the raw uint8 value from which a channel counts as
      saturated (the pseudo-label's bar).
    cache: the split's images already decoded and resized
      (`decode_split(data, input_size, saturation_bar=...)`, with the
      saturation map when `saturation`); None = decode every image as it is
      drawn. Both give the same batches; the cache spares the CPU the decoding.

  Returns:
    An iterator of dicts with b = P * K / process_count rows:
      rgb, ni, ti  float32 (b, H, W, 3), normalised.
      label        int32 (b,), index of the pid in the sorted training pids.
      pid, camid   int64 (b,).
      flare        float32 (b, 2), pseudo-labels delta for [RGB, NI].
      saturation   float32 (b, H, W, 2), with `saturation` only: the share of
                   saturated channel values of [RGB, NI] per pixel.
  """
  _check_norm(mean, std)
  if start_step < 0:
    raise ValueError(f"start_step must be non-negative, got {start_step}")
  if cache is not None:
    _check_cache(cache, data, input_size, saturation)
  sampler = IdentitySampler(data.pid, ids_per_batch, instances_per_id, seed)
  group_start, group_stop = _local_slice(ids_per_batch, process_index,
                                         process_count, "ids_per_batch")
  start = group_start * instances_per_id
  stop = group_stop * instances_per_id
  global_size = ids_per_batch * instances_per_id
  labels = np.unique(data.pid, return_inverse=True)[1].astype(np.int32)
  logging.info("Training input: %d triplets, %d ids, %d steps/epoch, local "
               "batch %d, from step %d.", data.num_examples, data.num_ids,
               sampler.steps_per_epoch, stop - start, start_step)

  # The arrays rows are drawn from: encoded bytes, or the decoded cache (with
  # the saturation map it holds, when it is asked for).
  if cache is None:
    sources = {m: getattr(data, m) for m in MODALITIES}
  else:
    keys = MODALITIES + ((ops.SATURATION_KEY,) if saturation else ())
    sources = {k: cache[k] for k in keys}

  def rows(step: int) -> dict[str, np.ndarray]:
    index = sampler.batch(step)[start:stop]
    position = step * global_size + np.arange(start, stop, dtype=np.int64)
    return {
        **{k: v[index] for k, v in sources.items()},
        "label": labels[index], "pid": data.pid[index],
        "camid": data.camid[index], "flare_ratio": data.flare_ratio[index],
        ops.RNG_KEY: np.stack([np.full_like(position, seed), position], axis=1),
    }

  def generator():
    step = start_step
    while True:
      yield rows(step)
      step += 1

  # The modality's mean colour: ~0 after normalisation.
  fill = np.round(255.0 * np.asarray(mean)).tolist()
  images = MODALITIES
  extra_ops, extra_keys = [], ()
  if saturation:
    # The saturation pseudo-image follows every geometric op; an erased
    # rectangle holds no saturated pixel any more.
    images = MODALITIES + (ops.SATURATION_KEY,)
    fill = fill + [[0.0, 0.0, 0.0]]
    extra_ops, extra_keys = [ops.saturation_to_float()], (ops.SATURATION_KEY,)
  # Without a cache each example is decoded here; the cache holds the output
  # of exactly these first, deterministic ops.
  first_ops = []
  if cache is None:
    first_ops = [ops.decode(),
                 *([ops.saturation_map(saturation_bar)] if saturation else []),
                 ops.resize(input_size, keys=images)]
  per_example = ops.chain(
      *first_ops,
      ops.random_flip_lr(flip_prob, keys=images),
      ops.random_pad_crop(pad, keys=images),
      ops.random_erasing(random_erasing_prob, fill=fill, keys=images),
      ops.keep(images + ("label", "pid", "camid", "flare_ratio")),
  )
  per_batch = ops.chain(
      ops.normalize(mean, std),
      ops.flare_label(flare_threshold),
      *extra_ops,
      ops.keep(MODALITIES + ("label", "pid", "camid", "flare", "flare_ratio")
               + extra_keys),
  )
  ds = _map_batches(generator, rows(start_step), per_example, per_batch,
                    stop - start, prefetch, num_threads)
  return ds.as_numpy_iterator()


def num_eval_batches(num_examples: int, batch_size: int,
                     process_count: int = 1) -> int:
  """How many batches `eval_batches` yields on every process."""
  per_process = -(-num_examples // process_count)
  return -(-per_process // batch_size)


def eval_batches(data: SplitData, *, batch_size: int, input_size: Sequence[int],
                 mean: Sequence[Sequence[float]],
                 std: Sequence[Sequence[float]], flare_threshold: float,
                 process_index: int = 0, process_count: int = 1,
                 prefetch: int = 2,
                 num_threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, in order, without augmentation.

  Process i takes the examples with index % process_count == i, batch_size
  rows per batch; all processes yield the same number of batches, the last
  ones padded with valid=False rows (index -1, pid/camid/sceneid -1). Nothing
  is dropped.

  Args:
    data: the split (query or gallery).
    batch_size: rows per batch of this process.
    input_size: (H, W) of the network input.
    mean: (3, 3) per-modality channel means in [0, 1], [RGB, NI, TI] order.
    std: (3, 3) per-modality channel standard deviations.
    flare_threshold: delta = flare_ratio > flare_threshold.
    process_index: this process's index.
    process_count: number of processes.
    prefetch: batches prepared ahead.
    num_threads: tf.data threads and parallel map calls; 0 = TF defaults.

  Returns:
    An iterator of dicts with b = batch_size rows:
      rgb, ni, ti  float32 (b, H, W, 3), normalised.
      pid, camid, sceneid  int64 (b,).
      flare        float32 (b, 2) pseudo-labels; flare_ratio float32 (b, 2).
      valid        bool (b,), False on padding rows.
      index        int64 (b,), position in the split, -1 on padding rows.
  """
  _check_norm(mean, std)
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} not in [0, {process_count})")
  n = data.num_examples
  num_batches = num_eval_batches(n, batch_size, process_count)
  if not num_batches:
    return iter(())
  index = np.full(num_batches * batch_size, -1, np.int64)
  mine = np.arange(process_index, n, process_count, dtype=np.int64)
  index[:mine.size] = mine
  valid = index >= 0
  source = np.where(valid, index, 0)  # Padding rows decode example 0.

  def rows(b: int) -> dict[str, np.ndarray]:
    sl = slice(b * batch_size, (b + 1) * batch_size)
    idx, ok = source[sl], valid[sl]
    return {
        "rgb": data.rgb[idx], "ni": data.ni[idx], "ti": data.ti[idx],
        "pid": np.where(ok, data.pid[idx], -1),
        "camid": np.where(ok, data.camid[idx], -1),
        "sceneid": np.where(ok, data.sceneid[idx], -1),
        "flare_ratio": np.where(ok[:, None], data.flare_ratio[idx], 0.0
                               ).astype(np.float32),
        "valid": ok, "index": index[sl],
    }

  def generator():
    for b in range(num_batches):
      yield rows(b)

  per_example = ops.chain(ops.decode(), ops.resize(input_size))
  per_batch = ops.chain(ops.normalize(mean, std),
                        ops.flare_label(flare_threshold))
  ds = _map_batches(generator, rows(0), per_example, per_batch, batch_size,
                    prefetch, num_threads)
  return ds.as_numpy_iterator()
