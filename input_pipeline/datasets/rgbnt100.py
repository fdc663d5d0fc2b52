"""RGBNT100: multi-spectral vehicle re-ID (RGB, NI, TI side by side).

From Li et al., "Multi-spectral vehicle re-identification: a challenge"
(AAAI 2020, the HAMNet paper): 100 vehicles, 17250 images. It cannot be
downloaded automatically; request it from the authors (see the paper) and
point `manual_dir` at the folder holding `rgbir/`.

Each JPEG holds one triplet side by side, left to right RGB, NI, TI, each of
the same width (256x128 W x H in the release); the builder splits the width
into three equal parts. File names look like `0561_c0001_006.jpg`: vehicle id
= the first field, camera = the number after `c` (c1-c8, stored 0-based).

The crops are stored as PNG: re-encoding them as JPEG would compress the
released pixels a second time, while PNG keeps exactly the decoded pixels the
flare ratio is measured on.

Build:
  builder = tfds.builder("rgbnt100")  # or config="skip_bad_samples"
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/data/RGBNT100"))
"""

import re

from etils import epath

from input_pipeline.datasets import layout

_EXPECTED_LAYOUT = """\
  rgbir/bounding_box_train/<file>.jpg
  rgbir/query/<file>.jpg
  rgbir/bounding_box_test/<file>.jpg    (the gallery)
each <file> holds [RGB | NI | TI] side by side with equal widths and is named
like 0561_c0001_006.jpg (<id>_c<camera 1-8>_<index>)."""

_NAME = re.compile(r"^(\d+)_c(\d+)_")


def parse_labels(ref: layout.SampleRef) -> layout.Labels:
  """pid and camid (c<n> -> n - 1) from an RGBNT100 file name.

  Args:
    ref: the sample.

  Returns:
    The labels; sceneid and night are -1 (not in RGBNT100).

  Raises:
    layout.BadSampleError: the name does not follow the scheme or has c0.
  """
  path = ref.paths[0]
  match = _NAME.match(path.name)
  if not match:
    raise layout.BadSampleError(
        f"{path}: file name does not follow <id>_c<camera>_<index> "
        "(e.g. 0561_c0001_006.jpg)")
  pid, camera = (int(g) for g in match.groups())
  if camera < 1:
    raise layout.BadSampleError(
        f"{path}: camera c{match.group(2)} is invalid; cameras are numbered "
        "from c1")
  return {"pid": pid, "camid": camera - 1, "sceneid": -1, "night": -1}


class Rgbnt100(layout.TripletReidBuilder):
  """RGBNT100 from its original folder layout (manual download)."""

  name = "rgbnt100"
  ENCODING_FORMAT = "png"
  SPLIT_DIRS = {"train": "rgbir/bounding_box_train", "query": "rgbir/query",
                "gallery": "rgbir/bounding_box_test"}
  EXPECTED_LAYOUT = _EXPECTED_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "RGBNT100 is distributed by Li et al. ('Multi-spectral vehicle "
      "re-identification: a challenge', AAAI 2020, HAMNet); request it from "
      "the authors as the paper describes. Extract it and pass the folder "
      "that holds rgbir/ as manual_dir. Expected layout under manual_dir:\n"
      + _EXPECTED_LAYOUT)
  DESCRIPTION = (
      "RGBNT100: 100 vehicles, RGB / near-infrared / thermal triplets stored "
      "side by side in one JPEG, split into three PNG-encoded images; "
      "flare_ratio is measured on the raw decoded RGB and NI crops.")
  CITATION = """\
@inproceedings{li2020rgbnt100,
  title = {Multi-spectral vehicle re-identification: a challenge},
  author = {Li, Hongchao and Li, Chenglong and Zhu, Xianpeng and Zheng, Aihua
            and Luo, Bin},
  booktitle = {AAAI},
  volume = {34},
  number = {07},
  pages = {11345--11353},
  year = {2020},
}"""

  def _scan_split(self, root: epath.Path,
                  split_dir: str) -> list[layout.SampleRef]:
    return layout.scan_flat_folder(root, split_dir, self.EXPECTED_LAYOUT)

  def _make_example(self, ref: layout.SampleRef) -> dict[str, object]:
    return layout.load_side_by_side(ref, parse_labels(ref))
