"""Builds WMVeID863, MSVR310 and RGBNT100 from tiny trees in their layouts."""

import logging
import pathlib
import re
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import tiny
import dataset_fixtures as fx
from facenet_jax.train import feed
from input_pipeline import pipeline
from input_pipeline.datasets import features
from input_pipeline.datasets import layout
from input_pipeline.datasets import msvr310
from input_pipeline.datasets import rgbnt100
from input_pipeline.datasets import wmveid863

BUILDERS = {
    "wmveid863": (wmveid863.Wmveid863, fx.write_wmveid863),
    "msvr310": (msvr310.Msvr310, fx.write_msvr310),
    "rgbnt100": (rgbnt100.Rgbnt100, fx.write_rgbnt100),
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _prepare(name: str, manual_dir: pathlib.Path, data_dir: pathlib.Path,
             config: str = "strict") -> tfds.core.DatasetBuilder:
  builder = tfds.builder(name, config=config, data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _examples(builder: tfds.core.DatasetBuilder, split: str,
              **kwargs) -> dict[str, dict]:
  """The split's examples as NumPy dicts, keyed by their `file`."""
  return {ex["file"].decode(): ex
          for ex in tfds.as_numpy(builder.as_dataset(split, **kwargs))}


def _raw_images(name: str, sample: fx.FixtureSample) -> list[np.ndarray]:
  """(rgb, ni, ti) as PIL decodes the files: (H, W) greyscale or (H, W, 3)."""
  if name == "rgbnt100":
    with Image.open(sample.paths[0]) as image:
      return np.split(np.asarray(image), 3, axis=1)
  raw = []
  for path in sample.paths:
    with Image.open(path) as image:
      raw.append(np.asarray(image))
  return raw


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def built(request, tmp_path_factory):
  """(name, builder, fixture samples, {split: {file: example}}), built once."""
  name = request.param
  _, write = BUILDERS[name]
  tmp = tmp_path_factory.mktemp(name)
  samples = write(tmp / "raw")
  builder = _prepare(name, tmp / "raw", tmp / "data")
  examples = {split: _examples(builder, split) for split in features.SPLITS}
  return name, builder, samples, examples


def _fresh_tree(name: str, tmp_path: pathlib.Path):
  samples = BUILDERS[name][1](tmp_path / "raw")
  return tmp_path / "raw", samples


def test_splits_hold_the_expected_samples_and_labels(built):
  _, builder, samples, examples = built
  for split in features.SPLITS:
    expected = {s.file: (s.pid, s.camid, s.sceneid, s.night)
                for s in samples if s.split == split}
    got = {f: (ex["pid"], ex["camid"], ex["sceneid"], ex["night"])
           for f, ex in examples[split].items()}
    assert got == expected, split
    assert builder.info.splits[split].num_examples == len(expected)


def test_no_val_splits_of_their_own_but_carved_from_train(built):
  name, builder, samples, _ = built
  assert set(builder.info.splits) == set(features.SPLITS)
  config = tiny.get_config()
  config.dataset, config.dataset_config = name, "strict"
  # builder.data_dir is DATA_DIR/<name>/strict/<version>.
  config.data_dir = str(pathlib.Path(builder.data_dir).parents[2])
  config.eval.split = "val"
  with pytest.raises(pipeline.MissingSplitError, match="config.val_ids"):
    feed.split_data(config, "val_query")
  config.val_ids = 1
  carved = {s: feed.split_data(config, s)
            for s in ("train", "val_query", "val_gallery")}
  train_pids = {s.pid for s in samples if s.split == "train"}
  held = set(carved["val_query"].pid.tolist())
  assert len(held) == 1 and held < train_pids
  assert set(carved["train"].pid.tolist()) == train_pids - held
  held_samples = {s.file: s for s in samples
                  if s.split == "train" and s.pid in held}
  query = carved["val_query"]
  assert len(query.file) == len({s.camid for s in held_samples.values()})
  assert sorted(np.concatenate([query.file, carved["val_gallery"].file])) == (
      sorted(held_samples))
  for file, camid, sceneid in zip(query.file, query.camid, query.sceneid):
    # Cameras and scenes (MSVR310) travel with the examples.
    assert (held_samples[file].camid, held_samples[file].sceneid) == (
        camid, sceneid)


def test_each_modality_is_the_file_with_the_same_name(built):
  name, _, samples, examples = built
  by_file = {s.file: s for s in samples}
  for split in features.SPLITS:
    for file, ex in examples[split].items():
      sample = by_file[file]
      if name == "rgbnt100":
        # PNG crops keep the decoded pixels exactly.
        expected = [np.repeat(x[..., None], 3, -1) if x.ndim == 2 else x
                    for x in _raw_images(name, sample)]
      else:
        # Original JPEG bytes: TFDS decodes them as TensorFlow does.
        expected = [tf.io.decode_image(p.read_bytes(), channels=3).numpy()
                    for p in sample.paths]
      for modality, want in zip(("rgb", "ni", "ti"), expected):
        np.testing.assert_array_equal(ex[modality], want,
                                      err_msg=f"{file} {modality}")
    # Every file has its own colour, so a mispairing could not go unnoticed.
    for modality in ("rgb", "ni", "ti"):
      images = [ex[modality].tobytes() for ex in examples[split].values()]
      assert len(set(images)) == len(images)


def test_images_are_three_channel_and_greyscale_is_repeated(built):
  name, _, samples, examples = built
  by_file = {s.file: s for s in samples}
  for split in features.SPLITS:
    for file, ex in examples[split].items():
      for modality in ("rgb", "ni", "ti"):
        assert ex[modality].shape == (fx.HEIGHT, fx.WIDTH, 3)
      if name != "rgbnt100":
        with Image.open(by_file[file].paths[2]) as ti_file:
          assert ti_file.mode == "L"
      ti = ex["ti"].astype(np.int32)
      np.testing.assert_array_equal(ti[..., 0], ti[..., 1])
      np.testing.assert_array_equal(ti[..., 0], ti[..., 2])


def test_stored_encoding(built):
  name, builder, samples, _ = built
  by_file = {s.file: s for s in samples}
  skip = {m: tfds.decode.SkipDecoding() for m in ("rgb", "ni", "ti")}
  for split in features.SPLITS:
    for file, ex in _examples(builder, split, decoders=skip).items():
      for i, modality in enumerate(("rgb", "ni", "ti")):
        if name == "rgbnt100":
          assert ex[modality].startswith(PNG_SIGNATURE)
        else:
          # Original bytes, greyscale JPEGs included: no re-encoding.
          assert ex[modality] == by_file[file].paths[i].read_bytes()


def test_flare_ratio_is_measured_on_the_raw_rgb_and_ni(built):
  name, _, samples, examples = built
  by_file = {s.file: s for s in samples}
  flared = 0
  for split in features.SPLITS:
    for file, ex in examples[split].items():
      sample = by_file[file]
      rgb, ni, _ = _raw_images(name, sample)
      want = np.array([features.flare_ratio(rgb), features.flare_ratio(ni)],
                      np.float32)
      np.testing.assert_array_equal(ex["flare_ratio"], want, err_msg=file)
      if sample.flare:
        flared += 1
        assert np.all(ex["flare_ratio"] > 0.1), file
      else:
        assert np.all(ex["flare_ratio"] == 0.0), file
  assert flared == 1


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("empty", [False, True])
def test_missing_or_empty_root_is_a_layout_error(name, empty, tmp_path):
  root = tmp_path / "dataset_root"
  if empty:
    root.mkdir()
  with pytest.raises(layout.DatasetLayoutError, match=re.escape(str(root))):
    _prepare(name, root, tmp_path / "data")


def _remove(path: pathlib.Path) -> pathlib.Path:
  shutil.rmtree(path)
  return path


def _rename(path: pathlib.Path, new_name: str) -> pathlib.Path:
  path.rename(path.with_name(new_name))
  return path


@pytest.mark.parametrize("name,break_layout", [
    ("wmveid863", lambda root: _remove(root / "query")),
    ("wmveid863", lambda root: _remove(root / "train" / "0002" / "ni")),
    ("wmveid863",
     lambda root: _rename(root / "test" / "0003", "car3").with_name("car3")),
    ("msvr310", lambda root: _remove(root / "bounding_box_train/0019/th")),
    ("msvr310", lambda root: _remove(root / "query3")),
    ("rgbnt100", lambda root: _rename(root / "rgbir", "rgb_ir")),
    ("rgbnt100", lambda root: _remove(root / "rgbir" / "bounding_box_test")),
])
def test_wrong_layout_names_the_path_and_the_expected_layout(
    name, break_layout, tmp_path):
  root, _ = _fresh_tree(name, tmp_path)
  path = break_layout(root)
  with pytest.raises(layout.DatasetLayoutError) as error:
    _prepare(name, root, tmp_path / "data")
  assert str(path) in str(error.value)
  assert "Expected layout" in str(error.value)


def _truncate(path: pathlib.Path) -> pathlib.Path:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return path


def _garbage(path: pathlib.Path) -> pathlib.Path:
  path.write_bytes(b"not an image at all")
  return path


def _too_narrow(path: pathlib.Path) -> pathlib.Path:
  fx.write_jpeg(path, np.full((fx.HEIGHT, 47, 3), 100, np.uint8))
  return path


def _unlink(path: pathlib.Path) -> pathlib.Path:
  path.unlink()
  return path


def _rename_triplet(sample: fx.FixtureSample, new_name: str) -> pathlib.Path:
  for path in sample.paths:
    path.rename(path.with_name(new_name))
  return sample.paths[0].with_name(new_name)


@pytest.mark.parametrize("name,index,break_sample,message", [
    # Corrupt or unreadable images.
    ("wmveid863", 3, lambda s: _truncate(s.paths[1]), "cannot read or decode"),
    ("msvr310", 6, lambda s: _garbage(s.paths[0]), "cannot read or decode"),
    ("rgbnt100", 2, lambda s: _truncate(s.paths[0]), "cannot read or decode"),
    ("rgbnt100", 5, lambda s: _too_narrow(s.paths[0]), "not divisible by 3"),
    # A sample missing one modality.
    ("wmveid863", 8, lambda s: _unlink(s.paths[2]), "missing modality"),
    ("msvr310", 1, lambda s: _unlink(s.paths[0]), "missing modality"),
    # File names outside the dataset's scheme.
    ("wmveid863", 4, lambda s: _rename_triplet(s, "0002_x_0009.jpg"),
     "no camera token"),
    ("msvr310", 3, lambda s: _rename_triplet(s, "0024_s007_v3_009.jpg"),
     "differs from its folder"),
    ("rgbnt100", 6, lambda s: _rename(s.paths[0], "0042_c0000_002.jpg")
     .with_name("0042_c0000_002.jpg"), "numbered from c1"),
])
def test_bad_sample_fails_the_build_naming_the_file(
    name, index, break_sample, message, tmp_path):
  root, samples = _fresh_tree(name, tmp_path)
  path = break_sample(samples[index])
  with pytest.raises(layout.BadSampleError) as error:
    _prepare(name, root, tmp_path / "data")
  assert str(path) in str(error.value)
  assert message in str(error.value)
  assert "skip_bad_samples" in str(error.value)


def test_skip_bad_samples_skips_and_reports_them(tmp_path, caplog):
  root, samples = _fresh_tree("wmveid863", tmp_path)
  bad = {
      samples[1].file: _truncate(samples[1].paths[0]),  # train
      samples[7].file: _unlink(samples[7].paths[1]),  # query
      samples[9].file: _garbage(samples[9].paths[2]),  # gallery
  }
  with caplog.at_level(logging.WARNING):
    builder = _prepare("wmveid863", root, tmp_path / "data",
                       config="skip_bad_samples")
  for split in features.SPLITS:
    expected = {s.file for s in samples if s.split == split} - set(bad)
    assert set(_examples(builder, split)) == expected
  assert caplog.text.count("skipped 1 of") == len(features.SPLITS)
  # The report is saved with the dataset: reload it from data_dir.
  reloaded = tfds.builder("wmveid863", config="skip_bad_samples",
                          data_dir=str(tmp_path / "data"))
  skipped = reloaded.info.metadata["skipped_samples"]
  assert sum(len(v) for v in skipped.values()) == len(bad)
  for split in features.SPLITS:
    assert len(skipped[split]) == 1
  reported = "\n".join(line for v in skipped.values() for line in v)
  for file, path in bad.items():
    assert file in reported and str(path) in reported
    assert str(path) in caplog.text


def test_non_jpeg_content_is_converted_to_rgb_and_reencoded(tmp_path):
  root, samples = _fresh_tree("msvr310", tmp_path)
  sample = samples[5]  # query
  rgba = np.zeros((fx.HEIGHT, fx.WIDTH, 4), np.uint8)
  rgba[..., :3] = (30, 120, 200)
  rgba[..., 3] = 128
  # PNG bytes under the .jpg name, so the triplet still pairs by name.
  Image.fromarray(rgba, "RGBA").save(sample.paths[1], format="PNG")
  builder = _prepare("msvr310", root, tmp_path / "data")
  ex = _examples(builder, "query")[sample.file]
  raw = _examples(builder, "query",
                  decoders={"ni": tfds.decode.SkipDecoding()})[sample.file]
  assert raw["ni"].startswith(b"\xff\xd8")  # JPEG, the feature's format.
  assert ex["ni"].shape == (fx.HEIGHT, fx.WIDTH, 3)
  assert np.abs(ex["ni"].astype(int) - (30, 120, 200)).max() <= 3
