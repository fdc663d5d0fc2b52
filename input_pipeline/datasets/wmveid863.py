"""WMVeID863: wild multi-spectral vehicle re-ID (RGB, NI, TI triplets).

Introduced with FACENet ("Flare-Aware Cross-modal Enhancement Network for
Multi-spectral Vehicle Re-identification"): 863 vehicles, 4709 aligned
triplets from 8 camera views, day and night, with intense flare. It cannot be
downloaded automatically; request it from the FACENet authors (the paper gives
the release link) and point `manual_dir` at the folder holding `train/`,
`query/` and `test/`.

File names carry the camera and the day/night flag as tokens, e.g.
`0001_v2_n1_0003.jpg`: camera = the digit after a `v` that does not follow a
letter, night = the digit after such an `n`. Only the camera is required; a
name without a camera token is a bad sample. The camera index is stored as
written (it only has to be consistent across query and gallery for the
same-camera filter of the evaluation).

Build:
  builder = tfds.builder("wmveid863")  # or config="skip_bad_samples"
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/data/wmveid"))
"""

import re

from etils import epath

from input_pipeline.datasets import layout

_EXPECTED_LAYOUT = """\
  train/<vid>/vis/<file>.jpg   RGB
  train/<vid>/ni/<file>.jpg    near infrared (same <file> name)
  train/<vid>/th/<file>.jpg    thermal infrared (same <file> name)
  query/<vid>/{vis,ni,th}/<file>.jpg
  test/<vid>/{vis,ni,th}/<file>.jpg    (the gallery)
<vid> is the numeric vehicle id; <file> contains a camera token v<digit> and
optionally a night token n<digit>, e.g. 0001_v2_n1_0003.jpg."""

# A token letter must not follow another letter, so "nv3" or "env2" never
# counts; a digit or separator before it is fine ("v2n1" holds both tokens).
_CAMERA_TOKEN = re.compile(r"(?<![A-Za-z])v(\d)")
_NIGHT_TOKEN = re.compile(r"(?<![A-Za-z])n(\d)")


def _single_token(pattern: re.Pattern[str], stem: str, what: str,
                  path: epath.Path) -> int:
  """The digit of the token in `stem`, -1 if absent; ambiguity is an error."""
  values = set(pattern.findall(stem))
  if len(values) > 1:
    raise layout.BadSampleError(
        f"{path}: ambiguous {what} tokens {sorted(values)} in the file name")
  return int(values.pop()) if values else -1


def parse_labels(ref: layout.SampleRef) -> layout.Labels:
  """pid (folder), camid (v<d>), night (n<d>, -1 if absent) of a sample.

  Args:
    ref: the sample.

  Returns:
    The labels; sceneid is -1 (WMVeID863 has no scene ids).

  Raises:
    layout.BadSampleError: the file name has no or an ambiguous camera token.
  """
  stem = ref.paths[0].stem
  camid = _single_token(_CAMERA_TOKEN, stem, "camera", ref.paths[0])
  if camid < 0:
    raise layout.BadSampleError(
        f"{ref.paths[0]}: no camera token v<digit> in the file name "
        "(expected e.g. 0001_v2_n1_0003.jpg)")
  return {"pid": int(ref.folder), "camid": camid, "sceneid": -1,
          "night": _single_token(_NIGHT_TOKEN, stem, "night", ref.paths[0])}


class Wmveid863(layout.TripletReidBuilder):
  """WMVeID863 from its original folder layout (manual download)."""

  name = "wmveid863"
  SPLIT_DIRS = {"train": "train", "query": "query", "gallery": "test"}
  EXPECTED_LAYOUT = _EXPECTED_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "WMVeID863 is distributed by the authors of the FACENet paper "
      "('Flare-Aware Cross-modal Enhancement Network for Multi-spectral "
      "Vehicle Re-identification'); request it through the link in the paper. "
      "Extract it and pass the folder that holds train/, query/ and test/ as "
      "manual_dir. Expected layout under manual_dir:\n" + _EXPECTED_LAYOUT)
  DESCRIPTION = (
      "WMVeID863: 863 vehicles, aligned RGB / near-infrared / thermal "
      "triplets from 8 camera views, day and night, with intense flare. "
      "Original JPEG bytes are stored unchanged; flare_ratio is measured on "
      "the raw decoded RGB and NI images.")
  CITATION = """\
@misc{facenet_wmveid863,
  title = {Flare-Aware Cross-modal Enhancement Network for Multi-spectral
           Vehicle Re-identification},
  note = {Introduces the WMVeID863 dataset},
}"""

  def _scan_split(self, root: epath.Path,
                  split_dir: str) -> list[layout.SampleRef]:
    return layout.scan_id_folders(root, split_dir, self.EXPECTED_LAYOUT)

  def _make_example(self, ref: layout.SampleRef) -> dict[str, object]:
    return layout.load_triplet_files(ref, parse_labels(ref))
