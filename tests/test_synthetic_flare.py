"""Tests of the synthetic_flare TFDS builder and its NumPy renderer."""

import dataclasses
import hashlib
import os
import re
import time
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from input_pipeline.datasets import features
from input_pipeline.datasets import synthetic_flare
from input_pipeline.datasets import synthetic_render

_IMAGE_KEYS = ("rgb", "ni", "ti", "flare_mask_rgb", "flare_mask_ni")
_TINY = synthetic_flare.SyntheticFlare.builder_configs["tiny"]
_PARENT = os.getpid()
_MAKE_EXAMPLE = synthetic_flare.make_example


def _build(data_dir, config=None) -> tfds.core.DatasetBuilder:
  if config is None:
    builder = tfds.builder("synthetic_flare/tiny", data_dir=str(data_dir))
  else:
    builder = synthetic_flare.SyntheticFlare(config=config, data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def _load(builder, split: str, raw: bool = False) -> dict[str, dict]:
  """Examples of a split keyed by file; raw=True keeps the PNG bytes."""
  decoders = {k: tfds.decode.SkipDecoding() for k in _IMAGE_KEYS} if raw else None
  examples = tfds.as_numpy(builder.as_dataset(split, decoders=decoders))
  return {e["file"].decode(): e for e in examples}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tiny_a"))


@pytest.fixture(scope="module")
def tiny_examples(tiny):
  return {split: _load(tiny, split) for split in synthetic_flare.SPLITS}


def test_split_counts_and_identities(tiny, tiny_examples):
  assert set(tiny.info.splits) == set(synthetic_flare.SPLITS)
  for split in synthetic_flare.SPLITS:
    planned = synthetic_flare.plan_split(_TINY, split)
    assert tiny.info.splits[split].num_examples == len(planned) > 0
    assert set(tiny_examples[split]) == {p.file for p in planned}
  pids = {s: {int(e["pid"]) for e in tiny_examples[s].values()}
          for s in synthetic_flare.SPLITS}
  assert len(pids["train"]) == _TINY.num_train_ids
  assert not pids["train"] & (pids["query"] | pids["gallery"])
  # Validation identities: disjoint from train and from test.
  assert not pids["val_query"] & (pids["train"] | pids["query"])
  assert min(pids["val_query"]) == synthetic_flare.VAL_PID_OFFSET
  for query, gallery, num_ids in (("query", "gallery", _TINY.num_test_ids),
                                  ("val_query", "val_gallery", _TINY.num_val_ids)):
    assert len(pids[query]) == num_ids
    assert pids[query] == pids[gallery]
    g = [(int(e["pid"]), int(e["camid"])) for e in tiny_examples[gallery].values()]
    q = [(int(e["pid"]), int(e["camid"])) for e in tiny_examples[query].values()]
    assert len(q) == num_ids * _TINY.query_cameras
    assert len(set(q)) == len(q)  # One query per (id, camera).
    for pid, camid in q:  # A match from another camera survives the protocol.
      assert any(g_pid == pid and g_cam != camid for g_pid, g_cam in g)


def _plan_1_0_0(config, split):
  """plan_split as version 1.0.0 wrote it (train, query and gallery only)."""
  if split == "train":
    pids = range(config.num_train_ids)
  else:
    pids = range(synthetic_flare.TEST_PID_OFFSET,
                 synthetic_flare.TEST_PID_OFFSET + config.num_test_ids)
  planned = []
  for pid in pids:
    cameras, counts = synthetic_flare._identity_layout(config, pid)
    query_cams = set(cameras[:config.query_cameras])
    number = 0
    for camid, count in sorted(zip(cameras, counts)):
      for index in range(count):
        is_query = camid in query_cams and index == 0
        if split == "train" or is_query == (split == "query"):
          planned.append(synthetic_flare.PlannedSample(split, pid, camid, index, number))
        number += 1
  return planned


# Digests of the 1.0.0 data, computed with the 1.0.0 code: sha256 over the
# train, query and gallery plans (all configs) and over the rendered pixels of
# every tiny sample of those splits (see _pixel_digest).
_PLAN_DIGESTS_1_0_0 = {
    "tiny": "19acce96fbc0e964865b360da4661504d29dea4d42b282f6f2dd1c3124d46740",
    "small": "c15ca15adcfdd8028e70d5281ab59b84d1e7b92ac2992c22964dfee6d56f0d4c",
    "large": "8e5e03396eaef01482de27663510368167124ad00ab3c582c44067c1c9fb4b74",
}
_TINY_PIXEL_DIGEST_1_0_0 = "91fb6297704e9f75500af0544a1030be6585e9557950861f92e0394842037f10"


def _plan_digest(config) -> str:
  h = hashlib.sha256()
  for split in features.SPLITS:
    for p in synthetic_flare.plan_split(config, split):
      h.update(f"{p.split} {p.pid} {p.camid} {p.index} {p.number}\n".encode())
  return h.hexdigest()


def _pixel_digest(config) -> str:
  h = hashlib.sha256()
  for split in features.SPLITS:
    for p in synthetic_flare.plan_split(config, split):
      sample = synthetic_render.render_sample(config.render, config.seed, p.pid, p.camid,
                                              p.index)
      h.update(p.file.encode())
      for key in _IMAGE_KEYS:
        h.update(getattr(sample, key).tobytes())
  return h.hexdigest()


def test_val_splits_leave_the_1_0_0_splits_bit_identical(tiny):
  assert str(tiny.info.version) == "1.1.0"
  for name, digest in _PLAN_DIGESTS_1_0_0.items():
    config = synthetic_flare.SyntheticFlare.builder_configs[name]
    for split in features.SPLITS:
      assert synthetic_flare.plan_split(config, split) == _plan_1_0_0(config, split)
    assert _plan_digest(config) == digest, name
  assert _pixel_digest(_TINY) == _TINY_PIXEL_DIGEST_1_0_0
  # The PNG bytes are a function of the pixels alone; the number of validation
  # ids changes nothing outside the validation splits.
  more_val = dataclasses.replace(_TINY, name="tiny_more_val", num_val_ids=9)
  for split in features.SPLITS:
    assert synthetic_flare.plan_split(more_val, split) == synthetic_flare.plan_split(_TINY, split)
  first = synthetic_flare.plan_split(_TINY, "query")[0]
  a, b = synthetic_flare.make_example(more_val, first), synthetic_flare.make_example(_TINY, first)
  assert all(a[k] == b[k] for k in _IMAGE_KEYS)
  assert len({p.pid for p in synthetic_flare.plan_split(more_val, "val_query")}) == 9


def test_severe_glare_variant_is_small_with_stronger_flare():
  configs = synthetic_flare.SyntheticFlare.builder_configs
  small, severe = configs["small"], configs["small_severe"]
  assert severe.render.flare_strength > small.render.flare_strength
  for split in synthetic_flare.SPLITS:
    assert synthetic_flare.plan_split(severe, split) == synthetic_flare.plan_split(small, split)
  # Same scenes: a flare-free sample is the same image; a flared one has
  # more of its RGB and NI saturated, and the same TI.
  seen = set()
  for planned in synthetic_flare.plan_split(small, "val_query"):
    a = synthetic_render.render_sample(small.render, small.seed, planned.pid,
                                       planned.camid, planned.index)
    b = synthetic_render.render_sample(severe.render, severe.seed, planned.pid,
                                       planned.camid, planned.index)
    assert a.flare == b.flare
    np.testing.assert_array_equal(a.ti, b.ti)
    if a.flare == "none":
      np.testing.assert_array_equal(a.rgb, b.rgb)
    else:
      assert (features.flare_ratio(b.rgb, 250) + features.flare_ratio(b.ni, 250)
              > features.flare_ratio(a.rgb, 250) + features.flare_ratio(a.ni, 250))
    seen.add(a.flare == "none")
    if len(seen) == 2:
      break
  assert seen == {True, False}


def test_example_features(tiny_examples):
  h, w = _TINY.render.height, _TINY.render.width
  for split, examples in tiny_examples.items():
    for file, e in examples.items():
      assert re.fullmatch(rf"{split}/\d{{4}}/c[0-7]_\d{{4}}\.png", file)
      for key in ("rgb", "ni", "ti"):
        assert e[key].shape == (h, w, 3) and e[key].dtype == np.uint8
      for key in ("flare_mask_rgb", "flare_mask_ni"):
        assert e[key].shape == (h, w, 1) and set(np.unique(e[key])) <= {0, 1}
      assert e["sceneid"] == -1
      assert 0 <= e["camid"] < _TINY.render.num_cameras
      np.testing.assert_array_equal(e["ni"][..., 0], e["ni"][..., 2])  # Grey.
  nights = [bool(e["night"]) for e in tiny_examples["train"].values()]
  assert any(nights) and not all(nights)


def test_decoded_images_equal_renderer_output(tiny_examples):
  planned = synthetic_flare.plan_split(_TINY, "gallery")[3]
  sample = synthetic_render.render_sample(_TINY.render, _TINY.seed, planned.pid,
                                          planned.camid, planned.index)
  e = tiny_examples["gallery"][planned.file]
  for key in _IMAGE_KEYS:
    np.testing.assert_array_equal(e[key], getattr(sample, key))
  assert bool(e["night"]) == sample.night


def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tmp_path):
  again = _build(tmp_path / "again")
  other = _build(tmp_path / "other", dataclasses.replace(_TINY, name="tiny_seed1", seed=1))
  first = _load(tiny, "train", raw=True)
  second = _load(again, "train", raw=True)
  third = _load(other, "train", raw=True)
  assert first.keys() == second.keys()
  for file, e in first.items():
    for key in _IMAGE_KEYS:
      assert e[key] == second[file][key], (file, key)
  shared = first.keys() & third.keys()
  assert shared
  assert all(first[f]["rgb"] != third[f]["rgb"] for f in shared)


def test_worker_processes_build_the_same_examples(tiny, tmp_path, monkeypatch):
  # Every split of tiny is below the threshold: force the forked workers.
  monkeypatch.setattr(synthetic_flare, "PARALLEL_MIN_SAMPLES", 0)
  monkeypatch.setattr(synthetic_flare, "_usable_cpus", lambda: 2)
  parallel = _build(tmp_path / "parallel")
  for split in synthetic_flare.SPLITS:
    first, second = _load(tiny, split, raw=True), _load(parallel, split, raw=True)
    assert list(first) == list(second), split  # Same examples, same order.
    for file, e in first.items():
      for key, value in e.items():
        np.testing.assert_array_equal(value, second[file][key], err_msg=f"{file} {key}")


def _with_renderer_pid(config, planned):
  return {**_MAKE_EXAMPLE(config, planned), "renderer": os.getpid()}


def test_render_examples_keeps_the_plan_order_across_workers(monkeypatch):
  planned = synthetic_flare.plan_split(_TINY, "train")  # 55 samples.
  serial = list(synthetic_flare.render_examples(_TINY, planned, processes=1))
  monkeypatch.setattr(synthetic_flare, "make_example", _with_renderer_pid)
  # 14 chunks: more than the 4 that wait at once, so the queue refills.
  monkeypatch.setattr(synthetic_flare, "_CHUNK", 4)
  forked = list(synthetic_flare.render_examples(_TINY, planned, processes=2))
  assert [e["file"] for e in forked] == [p.file for p in planned]
  assert [e["rgb"] for e in forked] == [e["rgb"] for e in serial]
  # Rendered by the workers (one or both: who takes a chunk is theirs to
  # race for), not by this process.
  renderers = {e["renderer"] for e in forked}
  assert renderers and os.getpid() not in renderers


def _hung_in_workers(config, planned):
  if os.getpid() != _PARENT:
    time.sleep(60)  # A worker that never delivers.
  return _MAKE_EXAMPLE(config, planned)


def test_hung_workers_fall_back_to_in_process_rendering(monkeypatch):
  planned = synthetic_flare.plan_split(_TINY, "query")
  expected = [e["rgb"] for e in synthetic_flare.render_examples(_TINY, planned, 1)]
  monkeypatch.setattr(synthetic_flare, "make_example", _hung_in_workers)
  monkeypatch.setattr(synthetic_flare, "WORKER_TIMEOUT_S", 0.5)
  with mock.patch.object(synthetic_flare.logging, "warning") as warning:
    start = time.monotonic()
    got = [e["rgb"] for e in synthetic_flare.render_examples(_TINY, planned, 2)]
  assert got == expected
  assert time.monotonic() - start < 30  # The hung workers were stopped.
  warning.assert_called_once()
  assert "delivered nothing" in warning.call_args[0][0]


def test_flare_saturates_rgb_ni_inside_mask_and_never_ti(tiny_examples):
  flare = {0: [], 1: []}
  clean = []
  for e in (e for examples in tiny_examples.values() for e in examples.values()):
    ratios = np.array([features.flare_ratio(e["rgb"]), features.flare_ratio(e["ni"])])
    np.testing.assert_allclose(e["flare_ratio"], ratios, rtol=1e-6)
    assert e["ti"].max() <= synthetic_render.TI_MAX_VALUE < features.FLARE_PIXEL_LOW
    for m, (image, mask) in enumerate([(e["rgb"], e["flare_mask_rgb"]),
                                       (e["ni"], e["flare_mask_ni"])]):
      inside = mask[..., 0] == 1
      if inside.any():
        assert image[inside].max(-1).min() >= features.FLARE_PIXEL_LOW
        flare[m].append(ratios[m])
    if not e["flare_mask_rgb"].any() and not e["flare_mask_ni"].any():
      clean.append(ratios.max())
  for m in (0, 1):
    assert len(flare[m]) >= 10
    assert np.mean(np.array(flare[m]) > 0.1) >= 0.7  # The pseudo-label is mostly right.
  assert len(clean) >= 10
  assert max(clean) < 0.1


def test_same_identity_across_cameras_closer_than_other_identities():
  config = synthetic_render.RenderConfig(height=64, width=32, night_prob=0.0, flare_prob=0.0,
                                         blur_prob=0.0, near_duplicate_prob=0.0)
  pids, cams = range(12), range(4)
  # Mean RGB and NI over the vehicle's pixels.
  stats = np.zeros((len(pids), len(cams), 4))
  for p in pids:
    for c in cams:
      s = synthetic_render.render_sample(config, 0, p, c, 0)
      stats[p, c] = np.concatenate([s.rgb, s.ni[..., :1]], -1)[s.vehicle_mask].mean(0)
  dist = np.linalg.norm(stats[:, None, :, None] - stats[None, :, None, :], axis=-1)
  same_id = np.mean([dist[p, p, a, b] for p in pids for a in cams for b in cams if a != b])
  other_id = np.mean([dist[p, q, c, c] for p in pids for q in pids if p != q for c in cams])
  assert same_id < 0.5 * other_id


def test_samples_do_not_depend_on_dataset_size_or_order():
  fewer = dataclasses.replace(_TINY, name="tiny_fewer", num_train_ids=4)
  planned = synthetic_flare.plan_split(fewer, "train")
  full = {p.file: p for p in synthetic_flare.plan_split(_TINY, "train")}
  assert all(full[p.file] == p for p in planned)
  for p in reversed(planned):
    a = synthetic_flare.make_example(fewer, p)
    b = synthetic_flare.make_example(_TINY, full[p.file])
    assert all(a[k] == b[k] for k in _IMAGE_KEYS)


def test_render_sample_is_deterministic_and_varies():
  config = _TINY.render
  a = synthetic_render.render_sample(config, 3, 7, 2, 1)
  b = synthetic_render.render_sample(config, 3, 7, 2, 1)
  c = synthetic_render.render_sample(config, 3, 7, 2, 2)
  d = synthetic_render.render_sample(config, 3, 8, 2, 1)
  for key in _IMAGE_KEYS:
    np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
  assert not np.array_equal(a.rgb, c.rgb)
  assert not np.array_equal(a.rgb, d.rgb)


def test_forced_flare_and_no_flare():
  strong = synthetic_render.RenderConfig(height=64, width=32, flare_prob=1.0, flare_strength=3.0)
  none = dataclasses.replace(strong, flare_prob=0.0)
  for i in range(6):
    s = synthetic_render.render_sample(strong, 0, i, i % 8, 0)
    assert s.flare in synthetic_render.FLARE_TYPES[1:]
    assert s.flare_mask_rgb.any() or s.flare_mask_ni.any()
    assert s.ti.max() <= synthetic_render.TI_MAX_VALUE
    n = synthetic_render.render_sample(none, 0, i, i % 8, 0)
    assert n.flare == synthetic_render.FLARE_TYPES[0] and not n.flare_mask_rgb.any() and not n.flare_mask_ni.any()
    # Flare has its own random stream and never reaches TI: the rest is equal.
    np.testing.assert_array_equal(s.ti, n.ti)
    assert s.night == n.night and s.blurred == n.blurred


def test_bad_configs_and_arguments_name_the_field():
  with pytest.raises(ValueError, match="flare_prob"):
    synthetic_render.RenderConfig(flare_prob=1.5).validate()
  with pytest.raises(ValueError, match="num_colors"):
    synthetic_render.RenderConfig(num_colors=0).validate()
  with pytest.raises(ValueError, match="query_cameras"):
    synthetic_flare.SyntheticFlareConfig(name="bad", cameras_per_id=(2, 3), query_cameras=2)
  with pytest.raises(ValueError, match="cameras_per_id"):
    synthetic_flare.SyntheticFlareConfig(name="bad", cameras_per_id=(4, 9))
  with pytest.raises(ValueError, match="num_val_ids"):
    synthetic_flare.SyntheticFlareConfig(name="bad", num_val_ids=0)
  with pytest.raises(ValueError, match="num_test_ids"):  # Would reach the val pids.
    synthetic_flare.SyntheticFlareConfig(name="bad", num_test_ids=3001)
  with pytest.raises(ValueError, match="camid"):
    synthetic_render.render_sample(synthetic_render.RenderConfig(), 0, 0, 8, 0)
  with pytest.raises(ValueError, match="split"):
    synthetic_flare.plan_split(_TINY, "test")
