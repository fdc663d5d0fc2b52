"""TFDS builder of `synthetic_flare`, the embedded multi-spectral flare dataset.

None of the real multi-spectral vehicle re-ID datasets can be downloaded by a
program, so the demo, the tests and the ablation study run on this generated
one. See `synthetic_render` for what an image contains and docs/data.md for
the knobs, the configs and a picture grid.

Build (after importing this module, which registers the builder):
  tfds.builder("synthetic_flare/small", data_dir=...).download_and_prepare()
"""

import collections
import dataclasses
import itertools
import multiprocessing
import os
import struct
import sys
from typing import Iterator, Optional
import warnings
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.datasets import features
from input_pipeline.datasets import synthetic_render

# Test pids start here, whatever the number of train ids, so that changing
# `num_train_ids` leaves the test identities unchanged.
TEST_PID_OFFSET = 5000
# Validation pids start here, after any test pid, for the same reason.
VAL_PID_OFFSET = 8000
# The builder's splits: the shared ones, then validation query/gallery.
SPLITS = features.SPLITS + features.VAL_SPLITS
# Separates the random stream of the split layout from the renderer's streams.
_TAG_LAYOUT = 404
# Splits with at least this many samples are rendered by worker processes
# (`render_examples`); smaller ones, e.g. every split of `tiny`, in-process.
PARALLEL_MIN_SAMPLES = 256
_MAX_PROCESSES = 8
_CHUNK = 16
# A worker that delivers nothing for this long is taken as hung.
WORKER_TIMEOUT_S = 120


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticFlareConfig(tfds.core.BuilderConfig):
  """Sizes, layout and rendering knobs of one synthetic_flare variant.

  Attributes:
    num_train_ids: identities in `train` (pids 0 .. num_train_ids - 1).
    num_test_ids: identities shared by `query` and `gallery` (pids from
      TEST_PID_OFFSET on).
    num_val_ids: identities shared by `val_query` and `val_gallery` (pids
      from VAL_PID_OFFSET on), disjoint from train and test; model and
      design choices are made on them, never on the test identities.
    cameras_per_id: (min, max) number of cameras that see an identity,
      inclusive; the cameras are drawn at random per identity.
    samples_per_camera: (min, max) samples per (identity, camera), inclusive.
    query_cameras: for each test (and validation) identity, this many of its
      cameras give one query sample each; everything else goes to the
      gallery. Must be smaller than cameras_per_id[0] so that each query
      has a gallery match from another camera.
    seed: the dataset is a pure function of (this config, seed).
    render: image size and difficulty knobs (see RenderConfig).
  """
  num_train_ids: int = 150
  num_test_ids: int = 100
  num_val_ids: int = 50
  cameras_per_id: tuple[int, int] = (4, 7)
  samples_per_camera: tuple[int, int] = (1, 5)
  query_cameras: int = 2
  seed: int = 0
  render: synthetic_render.RenderConfig = dataclasses.field(
      default_factory=synthetic_render.RenderConfig)

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field."""
    name = f"SyntheticFlareConfig({self.name!r})"
    if not 1 <= self.num_train_ids <= TEST_PID_OFFSET:
      raise ValueError(f"{name}.num_train_ids must be in [1, {TEST_PID_OFFSET}], "
                       f"got {self.num_train_ids}")
    max_test = VAL_PID_OFFSET - TEST_PID_OFFSET
    if not 1 <= self.num_test_ids <= max_test:
      raise ValueError(f"{name}.num_test_ids must be in [1, {max_test}], "
                       f"got {self.num_test_ids}")
    if self.num_val_ids < 1:
      raise ValueError(f"{name}.num_val_ids must be >= 1, got {self.num_val_ids}")
    lo, hi = self.cameras_per_id
    if not 1 <= lo <= hi <= self.render.num_cameras:
      raise ValueError(f"{name}.cameras_per_id must satisfy 1 <= min <= max <= "
                       f"render.num_cameras ({self.render.num_cameras}), got {self.cameras_per_id}")
    lo_s, hi_s = self.samples_per_camera
    if not 1 <= lo_s <= hi_s:
      raise ValueError(f"{name}.samples_per_camera must satisfy 1 <= min <= max, "
                       f"got {self.samples_per_camera}")
    if not 1 <= self.query_cameras < lo:
      raise ValueError(f"{name}.query_cameras must be in [1, cameras_per_id[0]) = "
                       f"[1, {lo}), got {self.query_cameras}")
    self.render.validate()


@dataclasses.dataclass(frozen=True)
class PlannedSample:
  """Where one sample goes and which render call makes it."""
  split: str
  pid: int
  camid: int
  index: int  # Sample index within (pid, camid): the render_sample argument.
  number: int  # Running number within the pid, for the file name.

  @property
  def file(self) -> str:
    return f"{self.split}/{self.pid:04d}/c{self.camid}_{self.number:04d}.png"


def _identity_layout(config: SyntheticFlareConfig, pid: int):
  """Cameras (in draw order) and sample counts of one identity."""
  rng = np.random.default_rng([config.seed, _TAG_LAYOUT, pid])
  num_cams = int(rng.integers(config.cameras_per_id[0], config.cameras_per_id[1] + 1))
  cameras = rng.permutation(config.render.num_cameras)[:num_cams]
  counts = rng.integers(config.samples_per_camera[0], config.samples_per_camera[1] + 1,
                        size=num_cams)
  return [int(c) for c in cameras], [int(n) for n in counts]


def plan_split(config: SyntheticFlareConfig, split: str) -> list[PlannedSample]:
  """Lists the samples of one split, in a fixed order.

  Train holds identities 0 .. num_train_ids - 1. Each test identity gives
  `query_cameras` queries (sample 0 of each of its first-drawn cameras) and
  all its other samples to the gallery; validation identities are split the
  same way into val_query and val_gallery. An identity's samples depend only
  on (config.seed, pid), so adding the validation splits (version 1.1.0)
  left train, query and gallery unchanged.

  Args:
    config: the dataset config.
    split: one of SPLITS.

  Returns:
    The planned samples.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if split == "train":
    pids = range(config.num_train_ids)
  elif split in features.VAL_SPLITS:
    pids = range(VAL_PID_OFFSET, VAL_PID_OFFSET + config.num_val_ids)
  else:
    pids = range(TEST_PID_OFFSET, TEST_PID_OFFSET + config.num_test_ids)
  planned = []
  for pid in pids:
    cameras, counts = _identity_layout(config, pid)
    query_cams = set(cameras[:config.query_cameras])
    number = 0
    for camid, count in sorted(zip(cameras, counts)):
      for index in range(count):
        if split == "train":
          keep = True
        else:
          is_query = camid in query_cams and index == 0
          keep = is_query == (split in ("query", "val_query"))
        if keep:
          planned.append(PlannedSample(split, pid, camid, index, number))
        number += 1
  return planned


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + tag + data +
          struct.pack(">I", zlib.crc32(tag + data)))


def _png(image: np.ndarray) -> bytes:
  """Lossless, deterministic PNG bytes of a uint8 (H, W, 3) or (H, W, 1) image.

  Written directly (no row filters, fast zlib level) rather than letting TFDS
  run a TensorFlow op per image or PIL pick filters: both cost more than
  rendering the image. Any PNG decoder reads the result.
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"_png needs a uint8 (H, W, 1|3) image, got {image.dtype} {image.shape}")
  h, w, c = image.shape
  color_type = 0 if c == 1 else 2  # Greyscale or truecolour.
  # Each row starts with filter type 0 (none).
  rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * c)], axis=1)
  header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) +
          _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + _png_chunk(b"IEND", b""))


def make_example(config: SyntheticFlareConfig, planned: PlannedSample) -> dict:
  """Renders one planned sample into a feature dict of the builder.

  Images are given as PNG bytes; `flare_ratio` is computed on the same uint8
  arrays, so it equals `features.flare_ratio` of the decoded images.
  """
  sample = synthetic_render.render_sample(config.render, config.seed, planned.pid,
                                          planned.camid, planned.index)
  return {
      "rgb": _png(sample.rgb),
      "ni": _png(sample.ni),
      "ti": _png(sample.ti),
      "pid": planned.pid,
      "camid": planned.camid,
      "sceneid": -1,
      "flare_ratio": np.array([features.flare_ratio(sample.rgb),
                               features.flare_ratio(sample.ni)], np.float32),
      "file": planned.file,
      "flare_mask_rgb": _png(sample.flare_mask_rgb),
      "flare_mask_ni": _png(sample.flare_mask_ni),
      "night": sample.night,
  }


def _usable_cpus() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _render_chunk(config: SyntheticFlareConfig,
                  chunk: list[PlannedSample]) -> list[dict]:
  return [make_example(config, sample) for sample in chunk]


def render_examples(config: SyntheticFlareConfig, planned: list[PlannedSample],
                    processes: Optional[int] = None) -> Iterator[dict]:
  """`make_example` of every planned sample, in the plan's order.

  Rendering is most of a build's time and a pure function of the config and
  the sample, so on Linux a large split is rendered by forked worker
  processes, one per usable CPU: the examples (and the PNG bytes) are the
  same whatever the number of processes. Elsewhere (fork is unsafe on
  macOS, missing on Windows), or if the workers cannot start, it renders
  in-process; if they deliver nothing for WORKER_TIMEOUT_S (a hung or
  killed worker), they are stopped and the rest is rendered in-process. A
  warning in the log says when either happens.

  Args:
    config: the builder config.
    planned: the split's samples (`plan_split`).
    processes: worker processes; default one per usable CPU (at most 8) for
      a split of at least PARALLEL_MIN_SAMPLES samples, else none.
  """
  if processes is None:
    processes = (min(_usable_cpus(), _MAX_PROCESSES)
                 if len(planned) >= PARALLEL_MIN_SAMPLES else 1)
  done = 0
  pool = None
  if processes > 1 and sys.platform.startswith("linux"):
    # fork, not spawn: a spawned worker would import TensorFlow and the
    # calling script again (seconds per worker). JAX warns that forking a
    # multi-threaded process can deadlock a child that uses it; these
    # workers only run NumPy and zlib, so that warning is silenced here.
    try:
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        pool = multiprocessing.get_context("fork").Pool(processes)
    except (OSError, ValueError, AssertionError) as e:
      logging.warning("synthetic_flare: no worker processes (%s); rendering "
                      "in-process", e)
  if pool is not None:
    chunks = (planned[i:i + _CHUNK] for i in range(0, len(planned), _CHUNK))

    def submit(chunk):
      return pool.apply_async(_render_chunk, (config, chunk))

    # At most two chunks per worker wait, rendered or not; each one taken
    # makes room for the next.
    in_flight = collections.deque(
        submit(c) for c in itertools.islice(chunks, 2 * processes))
    try:
      while in_flight:
        examples = in_flight.popleft().get(timeout=WORKER_TIMEOUT_S)
        in_flight.extend(submit(c) for c in itertools.islice(chunks, 1))
        for example in examples:
          yield example
        done += len(examples)
    except multiprocessing.TimeoutError:
      logging.warning("synthetic_flare: worker processes delivered nothing "
                      "for %s s; rendering the remaining %d samples "
                      "in-process", WORKER_TIMEOUT_S, len(planned) - done)
    finally:
      pool.terminate()
      pool.join()
  for sample in planned[done:]:
    yield make_example(config, sample)


_SMALL = SyntheticFlareConfig(
    name="small",
    description="Demo: 128x64 images, 150 train / 100 test / 100 val ids, ~2.5k train "
                "triplets.",
    num_train_ids=150,
    num_test_ids=100,
    # As many as test: with 50, val had 24 flare queries, too few to tell
    # design choices apart.
    num_val_ids=100,
    cameras_per_id=(4, 7),
    samples_per_camera=(1, 5))
# A robustness condition, not a replacement for `small`: the same identities,
# splits, cameras and scenes (each knob draws from its own random stream),
# with every flare 2.5x as intense, so that a flared image has about twice
# the saturated share (median 0.32 of the RGB and 0.37 of the NI channel
# values, against 0.15 and 0.20; docs/data.md) and glare covers more of what
# identifies a vehicle.
_SEVERE = dataclasses.replace(
    _SMALL, name="small_severe",
    description="Robustness: `small` with 2.5x flare intensity (same ids, splits and "
                "scenes; more of each flared image saturated).",
    render=synthetic_render.RenderConfig(flare_strength=2.5))


class SyntheticFlare(tfds.core.GeneratorBasedBuilder):
  """Procedurally generated RGB/NI/TI vehicle re-ID triplets with flare.

  Vehicles (car, van and truck silhouettes with per-identity proportions,
  colours, decals, lamps, grille and plate; per-identity NIR materials and
  heat signatures) seen by eight cameras with their own viewpoints and
  backgrounds, by day and night, sometimes motion-blurred, and with headlamp
  glare or sun flare on a configurable share of samples. Flare saturates
  regions of RGB and NI (values >= 250) but never TI; the saturated pixels are
  kept as ground-truth masks `flare_mask_rgb` / `flare_mask_ni`.

  Splits: `train` (train identities), `query` and `gallery` (disjoint test
  identities; per test identity one query for each of a few cameras, the rest
  in the gallery), `val_query` and `val_gallery` (validation identities
  disjoint from both, split like the test ones). Nothing is downloaded: the
  data is a pure function of the config and its seed, and the PNG bytes are
  identical between builds.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Splits val_query and val_gallery (num_val_ids identities from "
               "pid 8000); train, query and gallery unchanged (same samples, "
               "same PNG bytes).",
  }
  BUILDER_CONFIGS = [
      SyntheticFlareConfig(
          name="tiny",
          description="Unit tests: 64x32 images, 10 train / 6 test / 4 val ids, builds in "
                      "seconds.",
          num_train_ids=10,
          num_test_ids=6,
          num_val_ids=4,
          cameras_per_id=(3, 4),
          samples_per_camera=(1, 2),
          query_cameras=2,
          render=synthetic_render.RenderConfig(height=64, width=32, flare_prob=0.5)),
      _SMALL,
      _SEVERE,
      SyntheticFlareConfig(
          name="large",
          description="Experiments: 128x64 images, 400 train / 300 test / 100 val ids, ~10k "
                      "train triplets.",
          num_train_ids=400,
          num_test_ids=300,
          num_val_ids=100,
          cameras_per_id=(4, 8),
          samples_per_camera=(2, 6)),
  ]
  DEFAULT_CONFIG_NAME = "small"

  def _info(self) -> tfds.core.DatasetInfo:
    extra = {
        "flare_mask_rgb": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "flare_mask_ni": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "night": np.bool_,
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=features.triplet_features(extra, encoding_format="png"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    planned = plan_split(self.builder_config, split)
    for sample, example in zip(planned,
                               render_examples(self.builder_config, planned)):
      yield sample.file, example
