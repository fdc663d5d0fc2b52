"""The flare-aware fusion: its distance, weights and recorded choice."""

import json
import os
import tempfile

from absl.testing import absltest
import pytest
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import evaluation
from facenet_jax import fusion
from facenet_jax import fusion_choice
from facenet_jax.train import build
from facenet_jax.train import steps
from facenet_jax.models import FACENet
import run_fixtures

D = 4  # Per-stream feature size.


def _fused(rng, n):
  return np.asarray(fusion.normalized_segments(
      jnp.asarray(rng.normal(size=(n, 3 * D)), jnp.float32)))


def _reference(q, qw, g, gw):
  """The distance written out pair by pair, on unit segments."""
  out = np.zeros((len(q), len(g)))
  for i in range(len(q)):
    for j in range(len(g)):
      num = den = 0.0
      for s in range(3):
        a = q[i, s * D:(s + 1) * D].astype(np.float64)
        b = g[j, s * D:(s + 1) * D].astype(np.float64)
        a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
        num += qw[i, s] * gw[j, s] * np.sum((a - b) ** 2)
        den += qw[i, s] * gw[j, s]
      out[i, j] = np.sqrt(num / den)
  return out


class DistanceTest(absltest.TestCase):

  def test_matches_the_pairwise_reference(self):
    rng = np.random.default_rng(0)
    q, g = _fused(rng, 5), _fused(rng, 7)
    qw, gw = rng.uniform(0.05, 1, (5, 3)), rng.uniform(0.05, 1, (7, 3))
    want = _reference(q, qw, g, gw)
    np.testing.assert_allclose(fusion.fused_distances(q, qw, g, gw), want,
                               atol=1e-5)
    np.testing.assert_allclose(fusion.numpy_distances(q, qw, g, gw), want,
                               atol=1e-6)
    # The evaluation path (chunked, padded) ranks with the same numbers.
    np.testing.assert_allclose(evaluation.fused_pairwise_distance(
        q, qw, g, gw, query_chunk_size=2), want, atol=1e-5)

  def test_flare_free_pairs_are_euclidean(self):
    # Weights all 1: the Euclidean distance of the fused embeddings, which
    # for segments of equal norm is the concat distance of the paper.
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(6, 3 * D))
    parts = raw.reshape(6, 3, D)
    raw = (parts / np.linalg.norm(parts, axis=-1, keepdims=True)).reshape(6, -1)
    q = np.asarray(fusion.normalized_segments(jnp.asarray(raw)))
    ones = np.ones((6, 3))
    concat = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    want = np.linalg.norm(concat[:, None] - concat[None], axis=-1)
    # float32 |q|^2 + |g|^2 - 2 q.g leaves ~1e-4 where the distance is 0.
    np.testing.assert_allclose(fusion.fused_distances(q, ones, q, ones), want,
                               atol=5e-4)

  def test_a_flared_segment_counts_less(self):
    # Query and gallery agree on TI and differ on RGB: down-weighting the
    # query's RGB brings them closer.
    q = np.zeros((1, 3 * D), np.float32)
    g = np.zeros((1, 3 * D), np.float32)
    q[0, [0, D, 2 * D]] = 1.0
    g[0, [1, D, 2 * D]] = 1.0
    q, g = (np.asarray(fusion.normalized_segments(jnp.asarray(x)))
            for x in (q, g))
    full = fusion.numpy_distances(q, np.ones((1, 3)), g, np.ones((1, 3)))
    flared = fusion.numpy_distances(q, np.array([[0.25, 1, 1]]), g,
                                    np.ones((1, 3)))
    self.assertLess(flared[0, 0], full[0, 0])
    # |q_rgb - g_rgb|^2 = 2 on unit segments: d^2 = 2 * w / (w + 2).
    np.testing.assert_allclose(flared[0, 0] ** 2, 2 * 0.25 / 2.25, rtol=1e-6)


class WeightsTest(absltest.TestCase):

  def test_training_free_weights(self):
    flare = np.array([[1, 0], [0, 1], [0, 0]], np.float32)
    ratio = np.array([[0.3, 0.0], [0.05, 0.12], [0.0, 0.02]], np.float32)
    np.testing.assert_array_equal(
        fusion.stream_weights("concat", flare, ratio), np.ones((3, 3)))
    np.testing.assert_allclose(
        fusion.stream_weights("fixed", flare, ratio, weight=0.25),
        [[0.25, 1, 1], [1, 0.25, 1], [1, 1, 1]])
    # Linear in the fraction down to `weight` at full_ratio, no threshold.
    np.testing.assert_allclose(
        fusion.stream_weights("saturation", flare, ratio, weight=0.5,
                              full_ratio=0.2),
        [[0.5, 1, 1], [0.875, 0.7, 1], [1, 0.95, 1]], rtol=1e-6)

  def test_bad_settings_name_the_field(self):
    for args, field in ((("mean", 0.5, 0.2), "model.fusion"),
                        (("fixed", 1.5, 0.2), "model.fusion_weight"),
                        (("saturation", 0.5, 0.0), "model.fusion_full_ratio")):
      with self.assertRaisesRegex(ValueError, field):
        fusion.check(*args)


@pytest.mark.slow
class ModelTest(absltest.TestCase):
  """The tiny model in eval mode: one forward pass per fusion."""

  def test_an_image_is_embedded_alike_alone_and_in_a_batch(self):
    config = tiny.get_config()
    h, w = config.input_size
    rng = np.random.default_rng(4)
    batch = {m: jnp.asarray(rng.normal(size=(3, h, w, 3)), jnp.float32)
             for m in ("rgb", "ni", "ti")}
    batch["flare"] = jnp.array([[1, 0], [0, 1], [0, 0]], jnp.float32)
    batch["flare_ratio"] = jnp.array([[0.3, 0.0], [0.05, 0.4], [0.0, 0.0]],
                                     jnp.float32)
    for kind in ("saturation", "fixed"):
      config.model.fusion = kind
      state = run_fixtures.random_state(config, seed=1)
      model = build.build_model(config, run_fixtures.NUM_CLASSES)
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      embed = jax.jit(lambda v, b, model=model: steps.embed_step(
          v, b, model=model, flip_average=False))
      emb, weights = embed(variables, batch)
      # Each segment has norm 1 / sqrt(3).
      np.testing.assert_allclose(np.linalg.norm(
          np.asarray(emb).reshape(3, 3, -1), axis=-1), 3 ** -0.5, rtol=1e-5)
      self.assertLess(float(weights[0, 0]), 1.0, kind)
      for i in range(3):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        emb_i, weights_i = embed(variables, one)
        np.testing.assert_allclose(emb_i[0], emb[i], atol=1e-5)
        np.testing.assert_allclose(weights_i[0], weights[i], atol=1e-6)

  def test_the_saturation_fusion_needs_the_saturated_fractions(self):
    config = tiny.get_config()
    config.model.fusion = "saturation"
    model = build.build_model(config, run_fixtures.NUM_CLASSES)
    h, w = config.input_size
    images = {m: jnp.zeros((1, h, w, 3)) for m in ("rgb", "ni", "ti")}
    self.assertIsInstance(model, FACENet)
    with self.assertRaisesRegex(ValueError, "needs the images' saturated"):
      jax.eval_shape(lambda: model.init(jax.random.key(0), images,
                                        jnp.zeros((1, 2))))


class ChoiceTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp(prefix="fusion_choice_")
    self.config = tiny.get_config()
    self.config.model.fusion = "concat"
    checkpointing.check_config(self.workdir, self.config, has_state=False)

  def _rows(self, *alls):
    return [{"label": c.label, **c.fields(), "mAP": {"all": a}}
            for c, a in zip(fusion_choice.CANDIDATES, alls)]

  def test_the_best_val_row_is_recorded_and_used(self):
    rows = self._rows(40.0, 41.0, 43.0, 43.0, 42.0)
    choice = fusion_choice.choose(rows)
    # Ties go to the earlier candidate.
    self.assertEqual(choice["label"], fusion_choice.CANDIDATES[2].label)
    self.config.eval.split = "val"
    fusion_choice.record(self.workdir, self.config, rows, choice)
    with open(os.path.join(self.workdir, "fusion_sweep_val.json")) as f:
      self.assertLen(json.load(f)["rows"], 5)
    loaded = checkpointing.load_config(self.workdir)
    self.assertEqual(loaded.model.fusion, "fixed")
    self.assertEqual(loaded.model.fusion_weight, 0.75)
    # As trained when asked, and where a caller set its own fusion.
    self.assertEqual(checkpointing.load_config(
        self.workdir, recorded_fusion=False).model.fusion, "concat")
    mine = tiny.get_config()
    mine.model.fusion = "saturation"  # Not what the run was trained with.
    self.assertIsNone(checkpointing.apply_recorded_fusion(mine, self.workdir))
    self.assertEqual(mine.model.fusion, "saturation")

  def test_a_test_split_or_probe_never_records(self):
    rows = self._rows(40.0, 45.0)
    for split, rendered in (("test", "none"), ("val", "query")):
      self.config.eval.split = split
      self.config.eval.rendered_flare = rendered
      fusion_choice.record(self.workdir, self.config, rows,
                           fusion_choice.choose(rows))
      self.assertIsNone(checkpointing.read_recorded_fusion(self.workdir))

  def test_a_run_may_be_restored_with_another_fusion(self):
    run_fixtures.make_run(self.workdir, self.config)
    fixed = tiny.get_config()
    fixed.model.fusion = "fixed"
    fixed.model.fusion_weight = 0.25
    checkpointing.check_config(self.workdir, fixed, has_state=True)
    # Not so a change of what was trained.
    fixed.model.use_fce = not fixed.model.use_fce
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "model.use_fce"):
      checkpointing.check_config(self.workdir, fixed, has_state=True)


if __name__ == "__main__":
  absltest.main()
