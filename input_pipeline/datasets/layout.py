"""Scanning, pairing, decoding and bad-input policy of the real-data builders.

WMVeID863, MSVR310 and RGBNT100 are distributed as folders of JPEG files. The
builders in `wmveid863.py`, `msvr310.py` and `rgbnt100.py` only describe their
layout and file-name scheme; everything else lives here once:

  * `TripletReidBuilder`: the TFDS builder skeleton. It reads the dataset root
    from `manual_dir`, scans all three splits before writing anything (so a
    wrong layout fails fast) and applies the bad-sample policy.
  * `scan_id_folders` / `scan_flat_folder`: sorted listings of the two layouts;
    the RGB, NI and TI images of a triplet are paired by identical file name.
  * `decode_image_file`: reads and fully decodes one image (this is what
    catches corrupt files) and decides whether its original bytes can be
    stored unchanged.

Bad input:
  * `DatasetLayoutError` (never skipped): the root is missing or empty, or a
    split / modality folder is missing. The message names the path and states
    the expected layout.
  * `BadSampleError`: one sample is unusable (an image is unreadable or
    corrupt, a modality is missing, its file name does not follow the
    dataset's scheme). By default the build fails with this error. The builder
    config `skip_bad_samples` instead skips such samples, logs a warning for
    each and a per-split summary, and records every skipped sample with its
    reason in `builder.info.metadata["skipped_samples"]` (saved with the
    prepared dataset), so nothing is dropped silently:

      builder = tfds.builder("msvr310", config="skip_bad_samples")
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=root))
"""

import abc
import dataclasses
import inspect
import io
from typing import Callable, Iterator, Mapping, Sequence, Union

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from facenet_jax.constants import MODALITIES
from input_pipeline.datasets import features

# Image files are recognised by suffix (case-insensitive); other files in the
# dataset folders are listed in a warning and otherwise ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Modality folder of each stream in the per-id layouts (WMVeID863, MSVR310).
MODALITY_DIRS = {"rgb": "vis", "ni": "ni", "ti": "th"}
# PIL modes that convert to 8-bit RGB without guessing a value range. 16-bit
# and float images (modes "I", "I;16", "F") have no canonical uint8 form, so
# they are reported as bad samples instead of being clipped.
_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK",
                      "YCbCr")
# pid, camid, sceneid and night of one sample, from its folder and file name.
Labels = Mapping[str, int]
# An image feature value: original encoded bytes, or uint8 (H, W, 3) pixels.
FeatureImage = Union[bytes, np.ndarray]


class DatasetLayoutError(ValueError):
  """The dataset root or a split/modality folder is missing or malformed."""


class BadSampleError(ValueError):
  """One sample cannot be used: unreadable image, missing modality, bad name."""


@dataclasses.dataclass(eq=False)
class TripletReidConfig(tfds.core.BuilderConfig):
  """Builder config of the real multi-spectral re-ID datasets.

  Attributes:
    skip_bad_samples: False (config "strict", the default) fails the build on
      the first bad sample; True (config "skip_bad_samples") skips bad samples
      and reports them (warnings, a summary, `info.metadata`).
  """
  skip_bad_samples: bool = False


def builder_configs() -> list[TripletReidConfig]:
  """The two configs every real-data builder offers, the strict one first."""
  return [
      TripletReidConfig(
          name="strict",
          description="Fails the build on any unreadable or incomplete sample.",
      ),
      TripletReidConfig(
          name="skip_bad_samples",
          description=("Skips unreadable or incomplete samples and records "
                       "them in info.metadata['skipped_samples']."),
          skip_bad_samples=True,
      ),
  ]


@dataclasses.dataclass(frozen=True)
class SampleRef:
  """Where one triplet lives on disk, before anything is read.

  Attributes:
    file: path relative to the dataset root of the sample's RGB image (or of
      its single side-by-side file), POSIX separators. It is the example key
      and the `file` feature.
    paths: (rgb, ni, ti) image paths, or the one side-by-side image.
    folder: name of the `<vid>` folder holding the sample ("" if none).
    problem: a defect found while scanning (e.g. a missing modality); such a
      sample is reported as bad when it is generated.
  """
  file: str
  paths: tuple[epath.Path, ...]
  folder: str = ""
  problem: str = ""


def manual_root(dl_manager: tfds.download.DownloadManager,
                dataset: str) -> epath.Path:
  """The dataset root, i.e. `manual_dir`, as a `DatasetLayoutError` if absent.

  Args:
    dl_manager: the download manager given to `_split_generators`.
    dataset: dataset name for the message.

  Returns:
    The root directory.
  """
  try:
    return epath.Path(dl_manager.manual_dir)
  except AssertionError as e:
    # TFDS asserts that manual_dir exists and is non-empty; its message names
    # the directory and repeats MANUAL_DOWNLOAD_INSTRUCTIONS (the layout).
    raise DatasetLayoutError(
        f"{dataset}: dataset root not found. {e}") from e


def _require_dir(path: epath.Path, what: str, expected_layout: str) -> None:
  if not path.is_dir():
    raise DatasetLayoutError(
        f"Missing {what}: {path} is not a directory.\n"
        f"Expected layout under the dataset root:\n{expected_layout}")


def _list_images(folder: epath.Path) -> tuple[list[str], list[str]]:
  """Sorted image file names and sorted other entries of a folder."""
  images, others = [], []
  for entry in folder.iterdir():
    if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
      images.append(entry.name)
    else:
      others.append(entry.name)
  return sorted(images), sorted(others)


def _warn_ignored(folder: epath.Path, names: Sequence[str]) -> None:
  if names:
    logging.warning("Ignoring %d non-image entries in %s: %s", len(names),
                    folder, ", ".join(names))


def scan_id_folders(root: epath.Path, split_dir: str,
                    expected_layout: str) -> list[SampleRef]:
  """Lists a `<split_dir>/<vid>/{vis,ni,th}/<file>` split, paired by file name.

  Every file name found in any of a `<vid>`'s three modality folders makes one
  sample; if the name is absent from another modality folder the sample gets a
  `problem` naming the missing path(s).

  Args:
    root: dataset root.
    split_dir: the split's folder relative to root.
    expected_layout: text for layout errors.

  Returns:
    The split's samples sorted by `file`.

  Raises:
    DatasetLayoutError: missing split or modality folder, a `<vid>` folder
      whose name is not a number, or no images.
  """
  split_path = root / split_dir
  _require_dir(split_path, f"split folder '{split_dir}'", expected_layout)
  vid_dirs = sorted(p for p in split_path.iterdir() if p.is_dir())
  for vid_dir in vid_dirs:
    # The folder name is the vehicle id, stored as the int64 `pid`.
    if not vid_dir.name.isdigit():
      raise DatasetLayoutError(
          f"{vid_dir}: a <vid> folder name must be a number (the vehicle id).\n"
          f"Expected layout under the dataset root:\n{expected_layout}")
  _warn_ignored(split_path,
                sorted(p.name for p in split_path.iterdir() if not p.is_dir()))
  refs = []
  for vid_dir in vid_dirs:
    names = {}
    for modality in MODALITIES:
      modality_path = vid_dir / MODALITY_DIRS[modality]
      _require_dir(modality_path,
                   f"{modality} folder '{MODALITY_DIRS[modality]}'",
                   expected_layout)
      names[modality], others = _list_images(modality_path)
      _warn_ignored(modality_path, others)
    present = {modality: set(n) for modality, n in names.items()}
    for name in sorted(set().union(*present.values())):
      paths = tuple(vid_dir / MODALITY_DIRS[m] / name for m in MODALITIES)
      missing = [str(path) for m, path in zip(MODALITIES, paths)
                 if name not in present[m]]
      problem = ("missing modality image(s): " + ", ".join(missing)
                 if missing else "")
      refs.append(SampleRef(
          file=f"{split_dir}/{vid_dir.name}/{MODALITY_DIRS['rgb']}/{name}",
          paths=paths, folder=vid_dir.name, problem=problem))
  if not refs:
    raise DatasetLayoutError(
        f"No images found under {split_path}.\n"
        f"Expected layout under the dataset root:\n{expected_layout}")
  return refs


def scan_flat_folder(root: epath.Path, split_dir: str,
                     expected_layout: str) -> list[SampleRef]:
  """Lists a `<split_dir>/<file>` split of one-file-per-triplet images.

  Args:
    root: dataset root.
    split_dir: the split's folder relative to root (may contain '/').
    expected_layout: text for layout errors.

  Returns:
    The split's samples sorted by `file`.

  Raises:
    DatasetLayoutError: missing split folder, or no images in it.
  """
  top = split_dir.split("/")[0]
  if top != split_dir:
    _require_dir(root / top, f"folder '{top}'", expected_layout)
  split_path = root / split_dir
  _require_dir(split_path, f"split folder '{split_dir}'", expected_layout)
  names, others = _list_images(split_path)
  _warn_ignored(split_path, others)
  if not names:
    raise DatasetLayoutError(
        f"No images found under {split_path}.\n"
        f"Expected layout under the dataset root:\n{expected_layout}")
  return [SampleRef(file=f"{split_dir}/{name}", paths=(split_path / name,))
          for name in names]


def decode_image_file(path: epath.Path) -> tuple[bytes, np.ndarray, bool]:
  """Reads one image file and decodes all of it.

  Args:
    path: the image file.

  Returns:
    data: the file's bytes.
    pixels: uint8 (H, W, 3), the raw decoded image (single-channel images are
      repeated to 3 channels, which leaves the flare ratio unchanged).
    keep_bytes: True for a JPEG with 1 or 3 channels: `data` can be stored
      unchanged, since TFDS decodes it to (H, W, 3) (TensorFlow and NumPy
      decoders both repeat a grey channel). Other images must be re-encoded.

  Raises:
    BadSampleError: the file cannot be read or decoded, or has a pixel format
      without a canonical 8-bit RGB form.
  """
  try:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
      # load() decodes every scan line, so truncated files raise here.
      image.load()
      mode, image_format = image.mode, image.format
      if mode not in _CONVERTIBLE_MODES:
        raise BadSampleError(
            f"{path}: unsupported pixel format {mode!r} (need 8-bit images)")
      pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
  except BadSampleError:
    raise
  except Image.UnidentifiedImageError as e:
    raise BadSampleError(
        f"{path}: cannot read or decode image (not a known image format)"
    ) from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadSampleError(f"{path}: cannot read or decode image ({e})") from e
  keep_bytes = image_format == "JPEG" and mode in ("L", "RGB")
  return data, pixels, keep_bytes


def triplet_example(images: Sequence[FeatureImage], raw_rgb: np.ndarray,
                    raw_ni: np.ndarray, labels: Labels,
                    file: str) -> dict[str, object]:
  """Assembles the feature dict of one example.

  Args:
    images: (rgb, ni, ti) feature values (original bytes or uint8 (H, W, 3)).
    raw_rgb: uint8 (H, W, 3) raw decoded RGB image, for the flare ratio.
    raw_ni: uint8 (H, W, 3) raw decoded NI image, for the flare ratio.
    labels: pid, camid, sceneid, night.
    file: the sample's relative path.

  Returns:
    The example dict matching `features.triplet_features(EXTRA_FEATURES)`.
  """
  example = dict(zip(MODALITIES, images))
  example.update(
      pid=labels["pid"], camid=labels["camid"], sceneid=labels["sceneid"],
      night=labels["night"],
      flare_ratio=np.array([features.flare_ratio(raw_rgb),
                            features.flare_ratio(raw_ni)], np.float32),
      file=file)
  return example


def load_triplet_files(ref: SampleRef, labels: Labels) -> dict[str, object]:
  """Builds the example of a sample stored as three files (rgb, ni, ti).

  JPEG files with 1 or 3 channels are stored byte for byte; anything else is
  decoded, converted to RGB and encoded in the feature's format.

  Args:
    ref: the sample, with `paths` = (rgb, ni, ti).
    labels: pid, camid, sceneid, night.

  Returns:
    The example dict.

  Raises:
    BadSampleError: an image cannot be read or decoded.
  """
  decoded = [decode_image_file(path) for path in ref.paths]
  images = [data if keep else pixels for data, pixels, keep in decoded]
  return triplet_example(images, decoded[0][1], decoded[1][1], labels,
                         ref.file)


def load_side_by_side(ref: SampleRef, labels: Labels) -> dict[str, object]:
  """Builds the example of a sample stored as one [RGB | NI | TI] image.

  The image is split into three equal-width crops, left to right RGB, NI, TI.

  Args:
    ref: the sample, with `paths` = (the side-by-side file,).
    labels: pid, camid, sceneid, night.

  Returns:
    The example dict; images are uint8 (H, W/3, 3) arrays, re-encoded by TFDS.

  Raises:
    BadSampleError: unreadable image, or width not divisible by 3.
  """
  _, pixels, _ = decode_image_file(ref.paths[0])
  width = pixels.shape[1]
  if width % 3:
    raise BadSampleError(
        f"{ref.paths[0]}: width {width} is not divisible by 3; expected the "
        "RGB, NI and TI images side by side with equal widths")
  crops = [np.ascontiguousarray(c) for c in np.split(pixels, 3, axis=1)]
  return triplet_example(crops, crops[0], crops[1], labels, ref.file)


def generate_examples(
    refs: Sequence[SampleRef],
    make_example: Callable[[SampleRef], dict[str, object]],
    *,
    skip_bad_samples: bool,
    where: str,
    skipped: list[str],
) -> Iterator[tuple[str, dict[str, object]]]:
  """Yields (key, example) per sample, applying the bad-sample policy.

  Args:
    refs: the split's samples.
    make_example: reads one sample; raises `BadSampleError` if it is bad.
    skip_bad_samples: skip (and report) bad samples instead of raising.
    where: "<dataset>/<split>" for messages.
    skipped: receives one "<file>: <reason>" line per skipped sample (the
      reason names the offending path).

  Yields:
    (the sample's relative path, its example dict).

  Raises:
    BadSampleError: a bad sample while not skipping, or every sample was bad.
  """
  for ref in refs:
    try:
      if ref.problem:
        raise BadSampleError(ref.problem)
      example = make_example(ref)
    except BadSampleError as e:
      report = f"{ref.file}: {e}"
      if not skip_bad_samples:
        raise BadSampleError(
            f"{where}: bad sample {report}\n(Use the builder config "
            "'skip_bad_samples' to skip and report such samples.)") from e
      logging.warning("%s: skipping bad sample %s", where, report)
      skipped.append(report)
      continue
    yield ref.file, example
  if skipped:
    logging.warning("%s: skipped %d of %d samples:\n  %s", where, len(skipped),
                    len(refs), "\n  ".join(skipped))
  else:
    logging.info("%s: all %d samples are valid", where, len(refs))
  if len(skipped) == len(refs):
    raise BadSampleError(f"{where}: every sample is bad ({len(refs)} skipped)")


class TripletReidBuilder(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
  """Skeleton of a manually downloaded multi-spectral re-ID dataset builder.

  Subclasses set the class attributes below and implement `_scan_split` and
  `_make_example`. Splits: train, query, gallery (the test folder).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = builder_configs()
  # "jpeg" when the original files are stored as they are, "png" for crops.
  ENCODING_FORMAT = "jpeg"
  # TFDS split name -> split folder relative to the dataset root.
  SPLIT_DIRS: Mapping[str, str] = {}
  # The expected tree under the dataset root, quoted in layout errors.
  EXPECTED_LAYOUT = ""
  DESCRIPTION = ""
  CITATION = ""
  # night: 0/1 as the dataset labels it (WMVeID863's n<d>), -1 where unknown.
  EXTRA_FEATURES = {"night": np.int64}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9's default probes `importlib_resources.abc`, a package it only
    # requires on Python < 3.9, and fails without it; these builders are
    # plain files, so the class's source file is the answer.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=features.triplet_features(self.EXTRA_FEATURES,
                                           self.ENCODING_FORMAT),
        citation=self.CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(
      self, dl_manager: tfds.download.DownloadManager
  ) -> dict[str, Iterator[tuple[str, dict[str, object]]]]:
    root = manual_root(dl_manager, self.name)
    # Scan every split before generating any: layout errors surface at once.
    refs = {split: self._scan_split(root, split_dir)
            for split, split_dir in self.SPLIT_DIRS.items()}
    for split, split_refs in refs.items():
      logging.info("%s/%s: %d samples found under %s", self.name, split,
                   len(split_refs), root / self.SPLIT_DIRS[split])
    self.info.metadata["skipped_samples"] = {split: [] for split in refs}
    return {split: self._generate_examples(refs=split_refs, split=split)
            for split, split_refs in refs.items()}

  def _generate_examples(
      self, refs: Sequence[SampleRef],
      split: str) -> Iterator[tuple[str, dict[str, object]]]:
    return generate_examples(
        refs, self._make_example,
        skip_bad_samples=self.builder_config.skip_bad_samples,
        where=f"{self.name}/{split}",
        skipped=self.info.metadata["skipped_samples"][split])

  @abc.abstractmethod
  def _scan_split(self, root: epath.Path, split_dir: str) -> list[SampleRef]:
    """Lists one split's samples, sorted; raises `DatasetLayoutError`."""

  @abc.abstractmethod
  def _make_example(self, ref: SampleRef) -> dict[str, object]:
    """Reads one sample into an example dict; raises `BadSampleError`."""

