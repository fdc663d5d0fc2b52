"""MSVR310: multi-spectral vehicle re-ID benchmark (RGB, NI, TI triplets).

From Zheng et al., "Multi-spectral vehicle re-identification with
cross-directional consistency network and a high-quality benchmark"
(arXiv:2208.00632, 2022): 310 vehicles, 2061 aligned triplets. It cannot be
downloaded automatically; request it from the authors (see the paper) and
point `manual_dir` at the folder holding `bounding_box_train/`, `query3/` and
`bounding_box_test/`.

File names look like `0019_s012_v0_000.jpg`: vehicle id = characters 0-3,
scene = characters 6-8, camera = character 11 (0-based as written). The id in
the name must match the `<vid>` folder. The evaluation drops gallery entries
with the same id and the same scene, hence `sceneid`.

Build:
  builder = tfds.builder("msvr310")  # or config="skip_bad_samples"
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/data/MSVR310"))
"""

import re

from etils import epath

from input_pipeline.datasets import layout

_EXPECTED_LAYOUT = """\
  bounding_box_train/<vid>/vis/<file>.jpg   RGB
  bounding_box_train/<vid>/ni/<file>.jpg    near infrared (same <file> name)
  bounding_box_train/<vid>/th/<file>.jpg    thermal infrared (same <file> name)
  query3/<vid>/{vis,ni,th}/<file>.jpg
  bounding_box_test/<vid>/{vis,ni,th}/<file>.jpg    (the gallery)
<vid> is the numeric vehicle id; <file> is like 0019_s012_v0_000.jpg
(id = chars 0-3, scene = chars 6-8, camera = char 11)."""

# Exactly the character positions of the scheme: id 0-3, scene 6-8, camera 11.
_NAME = re.compile(r"^(\d{4})_s(\d{3})_v(\d)")


def parse_labels(ref: layout.SampleRef) -> layout.Labels:
  """pid, sceneid and camid from an MSVR310 file name.

  Args:
    ref: the sample.

  Returns:
    The labels; night is -1 (MSVR310 has no day/night flag).

  Raises:
    layout.BadSampleError: the name does not follow the scheme, or its id
      differs from the `<vid>` folder.
  """
  path = ref.paths[0]
  match = _NAME.match(path.name)
  if not match:
    raise layout.BadSampleError(
        f"{path}: file name does not follow <id:4>_s<scene:3>_v<camera:1>_..."
        " (e.g. 0019_s012_v0_000.jpg)")
  pid, sceneid, camid = (int(g) for g in match.groups())
  if pid != int(ref.folder):
    raise layout.BadSampleError(
        f"{path}: id {pid} in the file name differs from its folder "
        f"'{ref.folder}'")
  return {"pid": pid, "camid": camid, "sceneid": sceneid, "night": -1}


class Msvr310(layout.TripletReidBuilder):
  """MSVR310 from its original folder layout (manual download)."""

  name = "msvr310"
  SPLIT_DIRS = {"train": "bounding_box_train", "query": "query3",
                "gallery": "bounding_box_test"}
  EXPECTED_LAYOUT = _EXPECTED_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "MSVR310 is distributed by Zheng et al. ('Multi-spectral vehicle "
      "re-identification with cross-directional consistency network and a "
      "high-quality benchmark', arXiv:2208.00632, 2022); request it from the "
      "authors as the paper describes. Extract it and pass the folder that "
      "holds bounding_box_train/, query3/ and bounding_box_test/ as "
      "manual_dir. Expected layout under manual_dir:\n" + _EXPECTED_LAYOUT)
  DESCRIPTION = (
      "MSVR310: 310 vehicles, aligned RGB / near-infrared / thermal triplets "
      "with scene ids. Original JPEG bytes are stored unchanged; flare_ratio "
      "is measured on the raw decoded RGB and NI images.")
  CITATION = """\
@article{zheng2022msvr310,
  title = {Multi-spectral vehicle re-identification with cross-directional
           consistency network and a high-quality benchmark},
  author = {Zheng, Aihua and Zhu, Xianpeng and Li, Chenglong and Tang, Jin
            and Ma, Jixin},
  journal = {arXiv preprint arXiv:2208.00632},
  year = {2022},
}"""

  def _scan_split(self, root: epath.Path,
                  split_dir: str) -> list[layout.SampleRef]:
    return layout.scan_id_folders(root, split_dir, self.EXPECTED_LAYOUT)

  def _make_example(self, ref: layout.SampleRef) -> dict[str, object]:
    return layout.load_triplet_files(ref, parse_labels(ref))
