"""Tests of the training/evaluation input pipelines and their ops."""

import collections
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import ops
from input_pipeline import pipeline
from input_pipeline.datasets import features

# 7 ids with 1..8 examples: id 0 has fewer than K examples.
COUNTS = (1, 2, 3, 4, 5, 6, 8)
P, K = 4, 2
# Chunks per id (1, 1, 1, 2, 2, 3, 4): the max B with sum min(c, B) >= 4 B.
STEPS_PER_EPOCH = 3
IMAGE_HW = (24, 12)
INPUT_SIZE = (32, 16)
# round(255 * mean) of channel 0 is odd, so it never equals channel 0 of an
# image (even): erased pixels (filled with the mean colour) are recognisable.
MEAN = ((0.49, 0.4, 0.3), (0.45, 0.35, 0.25), (0.553, 0.6, 0.65))
STD = ((0.2, 0.25, 0.3), (0.3, 0.2, 0.25), (0.25, 0.3, 0.2))
THRESHOLD = 0.25


def _image(index: int, modality: int) -> np.ndarray:
  """Channel 0 encodes (index, modality); channels 1-2 are shared gradients."""
  h, w = IMAGE_HW
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = 10 + 8 * index + 2 * modality
  image[..., 1] = 5 + 20 * np.arange(w)[None, :]
  image[..., 2] = 5 + 10 * np.arange(h)[:, None]
  return image


def _encode(image: np.ndarray) -> bytes:
  return tf.io.encode_png(tf.constant(image)).numpy()


def _flare_ratio(index: int) -> np.ndarray:
  return np.array([(index % 5) / 10, ((index + 2) % 5) / 10], np.float32)


def _make_data(counts=COUNTS) -> pipeline.SplitData:
  pid = np.repeat(100 + 7 * np.arange(len(counts)), counts)
  n = len(pid)
  images = {
      m: np.array([_encode(_image(i, j)) for i in range(n)], dtype=object)
      for j, m in enumerate(ops.MODALITIES)
  }
  return pipeline.SplitData(
      **images, pid=pid, camid=np.arange(n) % 3, sceneid=np.full(n, -1),
      flare_ratio=np.stack([_flare_ratio(i) for i in range(n)]),
      file=[f"{p}/{i}.png" for i, p in enumerate(pid)])


DATA = _make_data()
TRAIN_KW = dict(ids_per_batch=P, instances_per_id=K, input_size=INPUT_SIZE,
                mean=MEAN, std=STD, flip_prob=0.5, pad=3,
                random_erasing_prob=0.5, flare_threshold=THRESHOLD)
EVAL_KW = dict(input_size=INPUT_SIZE, mean=MEAN, std=STD,
               flare_threshold=THRESHOLD)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _unnormalize(batch, modality: int, key: str) -> np.ndarray:
  x = batch[key] * np.array(STD[modality]) + np.array(MEAN[modality])
  return x * 255.0


def _erased(batch, modality: int, key: str) -> np.ndarray:
  """(b, H, W) True where random erasing filled the modality's mean colour."""
  fill = np.round(255.0 * np.array(MEAN[modality]))
  return np.all(np.abs(_unnormalize(batch, modality, key) - fill) < 1e-2,
                axis=-1)


def _decoded_index(batch, key: str, modality: int) -> np.ndarray:
  """Recovers each row's example index from channel 0 of one modality."""
  ch0 = np.round(_unnormalize(batch, modality, key)[..., 0]).astype(int)
  out = []
  for values, erased in zip(ch0, _erased(batch, modality, key)):
    values = values[~erased & (values >= 10)]  # Not erased, not padding.
    code = np.bincount(values).argmax() - 10
    assert code % 8 == 2 * modality, "channel 0 from the wrong modality"
    out.append(code // 8)
  return np.array(out)


def test_split_data_properties():
  assert DATA.num_examples == sum(COUNTS)
  assert DATA.num_ids == len(COUNTS)
  assert DATA.pid.dtype == np.int64 and DATA.flare_ratio.dtype == np.float32
  assert pipeline.train_label_map(DATA) == {100 + 7 * i: i for i in range(7)}
  assert pipeline.steps_per_epoch(DATA, P, K) == STEPS_PER_EPOCH


@pytest.mark.parametrize("field,value,match", [
    ("pid", np.zeros(3, np.int64), r"pid must have shape \(29,\)"),
    ("pid", np.zeros(29, np.float32), "pid must hold integers"),
    ("ni", np.array(["x"] * 29, dtype=object), r"ni\[0\] \(100/0.png\)"),
    ("flare_ratio", np.zeros((29, 3), np.float32), "flare_ratio must have"),
    ("flare_ratio", np.full((29, 2), 1.5, np.float32), r"\[0, 1\]; example 0"),
])
def test_split_data_validation(field, value, match):
  fields = {f.name: getattr(DATA, f.name)
            for f in dataclasses.fields(DATA)}
  fields[field] = value
  with pytest.raises(ValueError, match=match):
    pipeline.SplitData(**fields)


def test_carve_val_holds_out_whole_identities_market_style():
  carved = pipeline.carve_val(DATA, 3)
  assert set(carved) == {"train", "val_query", "val_gallery"}
  train, query, gallery = (carved[k] for k in ("train", "val_query",
                                                "val_gallery"))
  held = set(pipeline.val_identities(DATA.pid, 3).tolist())
  assert len(held) == 3
  # The held-out ids leave training entirely; nothing is lost or duplicated.
  assert set(train.pid.tolist()) == set(DATA.pid.tolist()) - held
  assert set(query.pid.tolist()) == held
  files = np.concatenate([train.file, query.file, gallery.file])
  assert sorted(files) == sorted(DATA.file)
  np.testing.assert_array_equal(train.file, DATA.file[~np.isin(DATA.pid,
                                                               list(held))])
  # One query per (id, camera): the first of its examples in file order.
  pairs = list(zip(query.pid.tolist(), query.camid.tolist()))
  assert len(set(pairs)) == len(pairs)
  for pid, camid in zip(DATA.pid, DATA.camid):
    if pid not in held:
      continue
    same = DATA.file[(DATA.pid == pid) & (DATA.camid == camid)]
    assert (pid, camid) in pairs
    assert query.file[pairs.index((pid, camid))] == min(same)
    assert set(same) - {min(same)} <= set(gallery.file)
  # Everything travels with the example.
  source = {f: i for i, f in enumerate(DATA.file)}
  for part in (train, query, gallery):
    idx = [source[f] for f in part.file]
    for name in ("rgb", "ni", "ti", "pid", "camid", "sceneid", "flare_ratio"):
      np.testing.assert_array_equal(getattr(part, name),
                                    getattr(DATA, name)[idx])


def test_val_identities_fixed_order_free_and_nested():
  chosen = pipeline.val_identities(DATA.pid, 3)
  assert chosen.dtype == np.int64 and list(chosen) == sorted(chosen)
  np.testing.assert_array_equal(
      pipeline.val_identities(DATA.pid[::-1], 3), chosen)
  assert set(pipeline.val_identities(DATA.pid, 2)) < set(chosen)
  shuffled = pipeline.subset(DATA, np.random.default_rng(1).permutation(
      DATA.num_examples))
  for split, data in pipeline.carve_val(shuffled, 3).items():
    np.testing.assert_array_equal(
        np.sort(data.file), np.sort(pipeline.carve_val(DATA, 3)[split].file))
  for bad in (0, len(COUNTS)):
    with pytest.raises(ValueError, match=rf"num_ids .* \[1, 6\].* got {bad}"):
      pipeline.carve_val(DATA, bad)


def test_sampler_identity_balanced_epochs():
  sampler = pipeline.IdentitySampler(DATA.pid, P, K, seed=3)
  for epoch in range(4):
    plan = sampler.epoch(epoch)
    assert plan.shape == (STEPS_PER_EPOCH, P * K)
    seen_ids = set()
    seen_examples = collections.Counter()
    for row in plan:
      groups = DATA.pid[row].reshape(P, K)
      assert np.all(groups == groups[:, :1]), "K consecutive rows share an id"
      assert len(set(groups[:, 0])) == P, "P distinct ids"
      seen_ids.update(groups[:, 0])
      for group in row.reshape(P, K):
        if len(np.flatnonzero(DATA.pid == DATA.pid[group[0]])) < K:
          assert len(set(group)) == 1, "1-example id drawn with replacement"
        else:
          assert len(set(group)) == K
          seen_examples.update(group)
    assert seen_ids == set(DATA.pid), "every id appears each epoch"
    assert max(seen_examples.values()) == 1, "no example twice in an epoch"
  assert not np.array_equal(sampler.epoch(0), sampler.epoch(1))
  other = pipeline.IdentitySampler(DATA.pid, P, K, seed=4)
  assert not np.array_equal(sampler.epoch(0), other.epoch(0))
  np.testing.assert_array_equal(
      sampler.batch(STEPS_PER_EPOCH + 1), sampler.epoch(1)[1])


def test_sampler_errors():
  with pytest.raises(ValueError, match="7 ids but a batch needs .*=8"):
    pipeline.steps_per_epoch(DATA, 8, K)
  with pytest.raises(ValueError, match=r"ids_per_batch \(3\) must be divis"):
    pipeline.train_batches(DATA, **{**TRAIN_KW, "ids_per_batch": 3}, seed=0,
                           process_count=2)
  with pytest.raises(ValueError, match="mean must be \\(3, 3\\)"):
    pipeline.train_batches(DATA, **{**TRAIN_KW, "mean": MEAN[:2]}, seed=0)


def test_train_batches_content_and_alignment():
  sampler = pipeline.IdentitySampler(DATA.pid, P, K, seed=0)
  batches = _take(pipeline.train_batches(DATA, **TRAIN_KW, seed=0), 6)
  flips = crops = erased_rows = 0
  for step, batch in enumerate(batches):
    assert batch["rgb"].shape == (P * K,) + INPUT_SIZE + (3,)
    assert batch["rgb"].dtype == np.float32 and batch["label"].dtype == np.int32
    index = sampler.batch(step)
    np.testing.assert_array_equal(batch["pid"], DATA.pid[index])
    np.testing.assert_array_equal(batch["camid"], DATA.camid[index])
    np.testing.assert_array_equal(batch["label"], (DATA.pid[index] - 100) // 7)
    np.testing.assert_array_equal(
        batch["flare"],
        (DATA.flare_ratio[index] > THRESHOLD).astype(np.float32))
    for m, key in enumerate(ops.MODALITIES):
      np.testing.assert_array_equal(_decoded_index(batch, key, m), index)
    # Same erased rectangle, flip and crop in all three modalities.
    erased = _erased(batch, 0, "rgb")
    for key in ops.MODALITIES:
      # The mean colour is ~0 after normalisation.
      assert np.all(np.abs(batch[key][erased]) <= 0.5 / (255 * 0.2) + 1e-6)
    for m, key in enumerate(ops.MODALITIES[1:], start=1):
      np.testing.assert_array_equal(_erased(batch, m, key), erased)
      np.testing.assert_allclose(
          _unnormalize(batch, m, key)[..., 1:][~erased],
          _unnormalize(batch, 0, "rgb")[..., 1:][~erased], atol=1e-3)
    ch1 = _unnormalize(batch, 0, "rgb")[..., 1]
    middle = ch1[:, INPUT_SIZE[0] // 2]
    flips += int(np.sum(middle[:, 4] > middle[:, 11]))
    crops += int(np.sum(np.any(np.round(ch1) == 0, axis=(1, 2))))
    erased_rows += int(np.sum(np.any(erased, axis=(1, 2))))
  total = 6 * P * K
  assert 0 < flips < total and 0 < crops < total and 0 < erased_rows < total


def test_train_batches_deterministic_and_resumable():
  first = _take(pipeline.train_batches(DATA, **TRAIN_KW, seed=1), 5)
  again = _take(pipeline.train_batches(DATA, **TRAIN_KW, seed=1), 5)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = next(pipeline.train_batches(DATA, **TRAIN_KW, seed=2))
  assert not np.array_equal(other["rgb"], first[0]["rgb"])
  # Step 4 lies in the second epoch.
  resumed = next(pipeline.train_batches(DATA, **TRAIN_KW, seed=1, start_step=4))
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], first[4][key])


def test_train_batches_multi_process_concatenate():
  single = _take(pipeline.train_batches(DATA, **TRAIN_KW, seed=5), 2)
  parts = [_take(pipeline.train_batches(DATA, **TRAIN_KW, seed=5,
                                        process_index=i, process_count=2), 2)
           for i in range(2)]
  for step in range(2):
    assert parts[0][step]["rgb"].shape[0] == P * K // 2
    for key in single[step]:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]),
          single[step][key])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_every_example_once(process_count):
  n = DATA.num_examples
  seen = []
  num_batches = []
  for i in range(process_count):
    batches = list(pipeline.eval_batches(
        DATA, batch_size=4, process_index=i, process_count=process_count,
        **EVAL_KW))
    num_batches.append(len(batches))
    for batch in batches:
      assert batch["rgb"].shape == (4,) + INPUT_SIZE + (3,)
      valid, index = batch["valid"], batch["index"]
      np.testing.assert_array_equal(valid, index >= 0)
      assert np.all(index[valid] % process_count == i)
      assert np.all(batch["pid"][~valid] == -1)
      np.testing.assert_array_equal(batch["pid"][valid], DATA.pid[index[valid]])
      np.testing.assert_array_equal(batch["sceneid"][valid], -1)
      np.testing.assert_array_equal(
          batch["flare"][valid],
          (DATA.flare_ratio[index[valid]] > THRESHOLD).astype(np.float32))
      for m, key in enumerate(ops.MODALITIES):
        decoded = _decoded_index(batch, key, m)
        np.testing.assert_array_equal(decoded[valid], index[valid])
        # Without augmentation the gradients are not flipped.
        ch1 = _unnormalize(batch, m, key)[..., 1]
        assert np.all(ch1[:, :, 0] < ch1[:, :, -1])
      seen.extend(index[valid])
  assert sorted(seen) == list(range(n))
  assert len(set(num_batches)) == 1
  per_process = -(-n // process_count)
  assert num_batches[0] == -(-per_process // 4)


def test_random_erasing_area_and_aspect():
  erase = ops.random_erasing(1.0, keys=("rgb",))
  fractions = []
  for s in range(40):
    data = {"rgb": tf.ones((64, 32, 3)),
            ops.RNG_KEY: tf.constant([7, s], tf.int64)}
    mask = erase(data)["rgb"].numpy()[..., 0] == 0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert mask.sum() == rows.size * cols.size, "one axis-aligned rectangle"
    fractions.append(mask.mean())
    np.testing.assert_array_equal(erase(data)["rgb"], erase(data)["rgb"])
  fractions = np.array(fractions)
  assert np.all(fractions > 0.01) and np.all(fractions < 0.45)
  assert fractions.std() > 0.03


class TinyTripletsForPipelineTest(tfds.core.GeneratorBasedBuilder):
  """A 2-split triplet dataset with an extra feature, for load_split."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    extra = {"flare_mask": tfds.features.Image(shape=(None, None, 1))}
    return tfds.core.DatasetInfo(
        builder=self,
        features=features.triplet_features(extra, encoding_format="png"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(0, 5)),
            "query": self._generate_examples(range(5, 8))}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {
          "rgb": _image(i, 0), "ni": _image(i, 1), "ti": _image(i, 2),
          "pid": i // 2, "camid": i % 3, "sceneid": -1,
          "flare_ratio": _flare_ratio(i), "file": f"{i}.png",
          "flare_mask": np.zeros(IMAGE_HW + (1,), np.uint8)}


def test_load_split_reads_tfds(tmp_path):
  data = pipeline.load_split("tiny_triplets_for_pipeline_test", "query",
                             data_dir=str(tmp_path))
  order = np.argsort(data.file)
  np.testing.assert_array_equal(data.file[order], ["5.png", "6.png", "7.png"])
  np.testing.assert_array_equal(data.pid[order], [2, 3, 3])
  np.testing.assert_array_equal(data.flare_ratio[order],
                                [_flare_ratio(i) for i in (5, 6, 7)])
  decoded = tf.io.decode_png(data.ti[order[1]]).numpy()
  np.testing.assert_array_equal(decoded, _image(6, 2))
  with pytest.raises(pipeline.MissingSplitError,
                     match="has no split 'gallery'"):
    pipeline.load_split("tiny_triplets_for_pipeline_test", "gallery",
                        data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
    pipeline.load_split("no_such_set", "train", data_dir=str(tmp_path))


def _saturated_data() -> pipeline.SplitData:
  """DATA with a saturated left band in RGB and a 2-of-3-channel top band in NI."""
  n = DATA.num_examples
  rgb, ni = [], []
  for i in range(n):
    image = _image(i, 0)
    image[:, :4] = 255
    rgb.append(_encode(image))
    image = _image(i, 1)
    image[:6, :, 1:] = 252
    ni.append(_encode(image))
  return dataclasses.replace(DATA, rgb=np.array(rgb, dtype=object),
                             ni=np.array(ni, dtype=object))


def test_train_batches_saturation_follows_the_augmentation():
  data = _saturated_data()
  with_sat = _take(pipeline.train_batches(data, **TRAIN_KW, seed=2,
                                          saturation=True), 4)
  without = _take(pipeline.train_batches(data, **TRAIN_KW, seed=2), 4)
  flipped = 0
  for batch, plain in zip(with_sat, without):
    sat = batch["saturation"]
    assert sat.shape == (P * K,) + INPUT_SIZE + (2,) and sat.dtype == np.float32
    assert sat.min() >= 0.0 and sat.max() <= 1.0
    for key in ops.MODALITIES:  # The images themselves are unchanged.
      np.testing.assert_array_equal(batch[key], plain[key])
    rgb = _unnormalize(batch, 0, "rgb")
    full = sat[..., 0] > 0.99
    assert np.all(rgb[full] > 245.0), "saturation where the image is not"
    # Both went through the same bilinear resize: a pixel that is a share a
    # of the saturated band has value >= 255 a in every channel.
    assert np.all(255.0 * sat[..., 0] <= rgb.min(axis=-1) + 2.0)
    erased = _erased(batch, 0, "rgb")
    assert np.all(sat[erased] == 0.0), "an erased rectangle has no flare"
    # The NI band saturates two of three channels.
    ni_band = sat[..., 1][sat[..., 1] > 0.01]
    assert ni_band.size and np.max(ni_band) == pytest.approx(2 / 3, abs=0.01)
    # The RGB band sits on the left, or on the right of flipped rows.
    left = sat[:, :, :4, 0].mean(axis=(1, 2))
    right = sat[:, :, -4:, 0].mean(axis=(1, 2))
    flipped += int(np.sum(right > left))
  assert 0 < flipped < 4 * P * K


def test_saturation_map_op_counts_channels():
  image = np.zeros((2, 3, 3), np.uint8)
  image[0, 0] = (250, 249, 255)
  image[1, 2] = (255, 255, 255)
  data = ops.saturation_map(250, keys=("rgb",))({"rgb": tf.constant(image)})
  sat = data[ops.SATURATION_KEY].numpy()
  assert sat.dtype == np.uint8 and sat.shape == (2, 3, 3)
  assert sat[0, 0, 0] == round(255 * 2 / 3) and sat[1, 2, 0] == 255
  assert sat[..., 0].sum() == 170 + 255 and not sat[..., 1:].any()


@pytest.mark.parametrize("saturation", [False, True])
def test_cached_pipeline_yields_the_streaming_batches(saturation):
  data = _saturated_data() if saturation else DATA
  kw = dict(TRAIN_KW, seed=3, saturation=saturation)
  cache = pipeline.decode_split(
      data, INPUT_SIZE, saturation_bar=250 if saturation else None,
      batch_size=5)  # 5 does not divide the split: a short last batch.
  assert cache["rgb"].shape == (data.num_examples,) + INPUT_SIZE + (3,)
  assert (ops.SATURATION_KEY in cache) == saturation
  assert pipeline.decoded_nbytes(data, INPUT_SIZE, saturation) == sum(
      v.nbytes for v in cache.values())
  streamed = _take(pipeline.train_batches(data, **kw), 4)
  cached = _take(pipeline.train_batches(data, **kw, cache=cache), 4)
  resumed = next(pipeline.train_batches(data, **kw, cache=cache, start_step=3))
  for a, b in zip(streamed, cached):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], streamed[3][key])


def test_cache_errors_name_the_problem():
  cache = pipeline.decode_split(DATA, INPUT_SIZE)
  with pytest.raises(ValueError, match="lacks 'saturation'"):
    next(pipeline.train_batches(DATA, **TRAIN_KW, seed=0, saturation=True,
                                cache=cache))
  with pytest.raises(ValueError, match=r"expected uint8 \(29, 24, 12, 3\)"):
    next(pipeline.train_batches(DATA, **dict(TRAIN_KW, input_size=(24, 12)),
                                seed=0, cache=cache))
  broken = dataclasses.replace(
      DATA, ni=np.array([b"not an image"] + list(DATA.ni[1:]), dtype=object))
  with pytest.raises(ValueError, match=r"cannot decode the ni image of "
                     r"example 0 \(100/0.png\)"):
    pipeline.decode_split(broken, INPUT_SIZE)
