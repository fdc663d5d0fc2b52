"""Tiny trees in the exact on-disk layouts of WMVeID863, MSVR310 and RGBNT100.

Each image is 8x16 (H x W) and made of two 8x8 blocks, so JPEG stores each
block nearly exactly: a colour that differs per file (and per modality), which
lets the tests tell whether a stored image is the file with the right name.
Sample 0 of every tree is flare-corrupted: its left RGB and NI blocks are
white (255), so about half of their channel values count as saturated.
NI is sometimes and TI always a single-channel (greyscale) JPEG, as in the
real releases. NI and TI files are written in the reverse order of the RGB
files, so directory order differs from name order.

Each writer returns the samples it wrote, with the labels the builder must
produce for them.
"""

import dataclasses
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 8, 16
# Channel values of ordinary pixels stay below this, so only flare blocks
# count as saturated (features.FLARE_PIXEL_LOW is 250).
_MAX_PLAIN = 240


@dataclasses.dataclass(frozen=True)
class FixtureSample:
  """One written triplet and the labels expected for it.

  Attributes:
    split: TFDS split name (train, query, gallery).
    file: expected `file` feature (path relative to the dataset root).
    paths: (rgb, ni, ti) files, or the one side-by-side file (RGBNT100).
    pid: expected vehicle id.
    camid: expected 0-based camera.
    sceneid: expected scene (-1 if the dataset has none).
    night: expected night flag (-1 if unknown).
    flare: whether the RGB and NI images have a saturated block.
  """
  split: str
  file: str
  paths: tuple[pathlib.Path, ...]
  pid: int
  camid: int
  sceneid: int = -1
  night: int = -1
  flare: bool = False


def _block_image(left: Sequence[int], right: Sequence[int]) -> np.ndarray:
  """uint8 (HEIGHT, WIDTH, C): left 8x8 block coloured `left`, right `right`."""
  image = np.empty((HEIGHT, WIDTH, len(left)), np.uint8)
  image[:, :WIDTH // 2] = left
  image[:, WIDTH // 2:] = right
  return image


def modality_images(index: int, flare: bool,
                    grey_ni: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The (rgb, ni, ti) pixels of sample `index`: distinct per sample/modality.

  Args:
    index: sample number within the tree (0..~25).
    flare: make the left RGB and NI blocks white.
    grey_ni: make the NI image single-channel.

  Returns:
    rgb (H, W, 3), ni (H, W, 1 or 3), ti (H, W, 1), all uint8.
  """
  base = 20 + 8 * index
  assert base + 10 < _MAX_PLAIN, "too many fixture samples for distinct colours"
  rgb_colour = (base, _MAX_PLAIN - base // 2, 60)
  ni_colour = (base + 3,) if grey_ni else (base + 3, base + 3, 90)
  white = (255,) * len(ni_colour)
  rgb = _block_image((255, 255, 255) if flare else rgb_colour, rgb_colour)
  ni = _block_image(white if flare else ni_colour, ni_colour)
  ti = _block_image((base + 6,), (base + 9,))
  return rgb, ni, ti


def write_jpeg(path: pathlib.Path, pixels: np.ndarray) -> None:
  """Saves uint8 (H, W, 1 or 3) pixels as a JPEG (greyscale if 1 channel)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
  # No chroma subsampling: 8x8 colour blocks then decode almost exactly.
  image.save(path, format="JPEG", quality=95, subsampling=0)


def _write_per_id_tree(root: pathlib.Path, split_dirs: dict[str, str],
                       entries: Sequence[tuple[str, str, str, dict]]
                       ) -> list[FixtureSample]:
  """Writes <split_dir>/<vid>/{vis,ni,th}/<name> triplets.

  Args:
    root: dataset root.
    split_dirs: TFDS split -> folder.
    entries: (split, vid, name, labels) per sample; sample 0 has flare.

  Returns:
    The written samples.
  """
  samples, pending = [], []
  for index, (split, vid, name, labels) in enumerate(entries):
    folder = root / split_dirs[split] / vid
    paths = tuple(folder / m / name for m in ("vis", "ni", "th"))
    rgb, ni, ti = modality_images(index, flare=index == 0,
                                  grey_ni=index % 2 == 0)
    write_jpeg(paths[0], rgb)
    pending.append(((paths[1], ni), (paths[2], ti)))
    samples.append(FixtureSample(
        split=split, file=f"{split_dirs[split]}/{vid}/vis/{name}", paths=paths,
        flare=index == 0, **labels))
  for ni_item, ti_item in reversed(pending):
    write_jpeg(*ni_item)
    write_jpeg(*ti_item)
  return samples


def write_wmveid863(root: pathlib.Path) -> list[FixtureSample]:
  """A WMVeID863 tree: {train,query,test}/<vid>/{vis,ni,th}/<name>.jpg.

  Names use the v<camera> / n<night> tokens, including the forms "v7n1"
  (tokens not separated) and a name without a night token.

  Args:
    root: dataset root (created).

  Returns:
    The written samples.
  """
  split_dirs = {"train": "train", "query": "query", "gallery": "test"}
  entries = [
      ("train", "0001", "0001_v2_n1_0003.jpg",
       dict(pid=1, camid=2, night=1)),
      ("train", "0001", "0001_v5_n0_0001.jpg",
       dict(pid=1, camid=5, night=0)),
      ("train", "0001", "0001_v0_n0_0010.jpg",
       dict(pid=1, camid=0, night=0)),
      ("train", "0002", "0002_v7n1_0002.jpg", dict(pid=2, camid=7, night=1)),
      ("train", "0002", "0002_v1_n0_0001.jpg",
       dict(pid=2, camid=1, night=0)),
      ("train", "0012", "0012_v3_0001.jpg", dict(pid=12, camid=3, night=-1)),
      ("query", "0003", "0003_v4_n1_0001.jpg",
       dict(pid=3, camid=4, night=1)),
      ("query", "0004", "0004_v6_n0_0001.jpg",
       dict(pid=4, camid=6, night=0)),
      ("gallery", "0003", "0003_v1_n1_0002.jpg",
       dict(pid=3, camid=1, night=1)),
      ("gallery", "0003", "0003_v4_n0_0003.jpg",
       dict(pid=3, camid=4, night=0)),
      ("gallery", "0004", "0004_v2_n1_0002.jpg",
       dict(pid=4, camid=2, night=1)),
  ]
  return _write_per_id_tree(root, split_dirs, entries)


def write_msvr310(root: pathlib.Path) -> list[FixtureSample]:
  """An MSVR310 tree: {bounding_box_train,query3,bounding_box_test}/<vid>/...

  Args:
    root: dataset root (created).

  Returns:
    The written samples.
  """
  split_dirs = {"train": "bounding_box_train", "query": "query3",
                "gallery": "bounding_box_test"}
  entries = []
  for split, vid, scene, camera, index in [
      ("train", "0019", 12, 0, 0), ("train", "0019", 12, 1, 1),
      ("train", "0019", 40, 2, 2), ("train", "0023", 7, 0, 0),
      ("train", "0023", 7, 3, 1), ("query", "0101", 3, 1, 0),
      ("query", "0310", 310, 0, 0), ("gallery", "0101", 3, 2, 1),
      ("gallery", "0101", 8, 0, 2), ("gallery", "0310", 311, 1, 1),
  ]:
    name = f"{vid}_s{scene:03d}_v{camera}_{index:03d}.jpg"
    entries.append((split, vid, name,
                    dict(pid=int(vid), camid=camera, sceneid=scene)))
  return _write_per_id_tree(root, split_dirs, entries)


def write_rgbnt100(root: pathlib.Path) -> list[FixtureSample]:
  """An RGBNT100 tree: rgbir/{bounding_box_train,query,bounding_box_test}/*.jpg.

  Each file is one RGB JPEG of 8x48 holding [RGB | NI | TI] side by side.

  Args:
    root: dataset root (created).

  Returns:
    The written samples.
  """
  split_dirs = {"train": "rgbir/bounding_box_train", "query": "rgbir/query",
                "gallery": "rgbir/bounding_box_test"}
  samples = []
  for index, (split, pid, camera, number) in enumerate([
      ("train", 561, 1, 6), ("train", 561, 8, 2), ("train", 7, 3, 1),
      ("train", 7, 4, 11), ("query", 42, 2, 1), ("query", 99, 5, 3),
      ("gallery", 42, 6, 2), ("gallery", 99, 5, 4), ("gallery", 99, 7, 1),
  ]):
    name = f"{pid:04d}_c{camera:04d}_{number:03d}.jpg"
    path = root / split_dirs[split] / name
    rgb, ni, ti = modality_images(index, flare=index == 0, grey_ni=True)
    side_by_side = np.concatenate(
        [rgb, np.repeat(ni, 3, axis=-1), np.repeat(ti, 3, axis=-1)], axis=1)
    write_jpeg(path, side_by_side)
    samples.append(FixtureSample(
        split=split, file=f"{split_dirs[split]}/{name}", paths=(path,),
        pid=pid, camid=camera - 1, flare=index == 0))
  return samples
