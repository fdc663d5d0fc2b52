"""Restoration training: the rendered flare, the flared copies, their losses."""

import functools
import json
import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import flare_render
from facenet_jax import losses
from facenet_jax import train
from facenet_jax.constants import MODALITIES


def _raw_images(seed: int, n: int = 6, size=(64, 32)) -> tuple:
  rng = np.random.default_rng(seed)
  rgb = rng.uniform(0.0, 0.6, size=(n, *size, 3)).astype(np.float32)
  ni = np.repeat(rng.uniform(0.0, 0.6, size=(n, *size, 1)), 3, axis=-1)
  return jnp.asarray(rgb), jnp.asarray(ni.astype(np.float32))


class RenderTest(absltest.TestCase):

  def test_flare_only_brightens_and_saturates_where_it_says(self):
    rgb, ni = _raw_images(0)
    out = flare_render.add_flare(jax.random.key(0), rgb, ni)
    for before, after in ((rgb, out.rgb), (ni, out.ni)):
      self.assertTrue(np.all(np.asarray(after) >= np.asarray(before) - 1e-7))
      self.assertLessEqual(float(jnp.max(after)), 1.0)
    # The inputs stay below the bar, so every saturated value is the flare's.
    np.testing.assert_allclose(
        out.saturation[..., 0],
        np.mean(np.round(np.asarray(out.rgb) * 255) >= 250, axis=-1))
    # NI stays a grey image.
    np.testing.assert_array_equal(out.ni[..., 0], out.ni[..., 2])
    share = np.asarray(jnp.mean(out.saturation, axis=(1, 2)))
    np.testing.assert_array_equal(out.flare, (share > 0.1).astype(np.float32))
    # Every image gets a flare whose core saturates part of it, never all.
    self.assertTrue(np.all(share.max(axis=-1) > 0.0))
    self.assertTrue(np.all(share < 1.0))
    self.assertGreater(float(jnp.mean(out.flare)), 0.5)

  def test_same_key_same_flare_other_key_other_flare(self):
    rgb, ni = _raw_images(1)
    a = flare_render.add_flare(jax.random.key(4), rgb, ni)
    b = flare_render.add_flare(jax.random.key(4), rgb, ni)
    c = flare_render.add_flare(jax.random.key(5), rgb, ni)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    self.assertGreater(float(jnp.mean(jnp.abs(a.rgb - c.rgb))), 0.01)
    # Images of one call get flares of their own.
    self.assertGreater(
        float(jnp.mean(jnp.abs((a.rgb - rgb)[0] - (a.rgb - rgb)[1]))), 0.01)

  def test_values_outside_the_unit_range_are_left_alone(self):
    rgb, ni = _raw_images(2, n=2)
    rgb = rgb.at[:, :4].set(-0.5).at[:, -4:].set(1.7)
    out = flare_render.add_flare(jax.random.key(0), rgb, ni)
    self.assertGreaterEqual(float(jnp.min(out.rgb[:, :4])), -0.5)
    np.testing.assert_allclose(out.rgb[:, -4:], 1.7)


def _batch(config, flare_rows=(0, 3)) -> dict:
  rng = np.random.default_rng(0)
  p, k = config.ids_per_batch, config.instances_per_id
  h, w = config.input_size
  mean, std = train.normalization(config)
  batch = {}
  for i, m in enumerate(MODALITIES):
    raw = rng.uniform(0.0, 0.7, size=(p * k, h, w, 3))
    batch[m] = jnp.asarray(((raw - mean[i]) / std[i]).astype(np.float32))
  batch["label"] = jnp.asarray(np.repeat(np.arange(p), k).astype(np.int32))
  flare = np.zeros((p * k, 2), np.float32)
  flare[list(flare_rows)] = 1.0
  batch["flare"] = jnp.asarray(flare)
  batch["flare_ratio"] = jnp.asarray(flare * 0.3)
  batch["saturation"] = jnp.zeros((p * k, h, w, 2), jnp.float32)
  return batch


class CopiesTest(absltest.TestCase):

  def test_copies_of_flare_free_triplets_with_their_labels(self):
    config = tiny.get_config()
    config.restore.copies = 4
    restore = train.restore_config(config)
    batch = _batch(config)
    out, src, valid = train.with_flared_copies(batch, restore,
                                               jax.random.key(0))
    size = batch["label"].shape[0]
    np.testing.assert_array_equal(src, [1, 2, 4, 5])
    self.assertTrue(np.all(valid))
    for key in (*MODALITIES, "flare", "label", "saturation"):
      self.assertEqual(out[key].shape[0], size + 4, key)
    np.testing.assert_array_equal(out["label"][size:], batch["label"][src])
    np.testing.assert_array_equal(out["ti"][size:], batch["ti"][src])
    np.testing.assert_array_equal(out["rgb"][:size], batch["rgb"])
    # The copies are their sources with light added (normalised: std > 0).
    for m in ("rgb", "ni"):
      self.assertTrue(np.all(np.asarray(out[m][size:]) >=
                             np.asarray(batch[m][src]) - 1e-5))
      self.assertGreater(float(jnp.mean(out[m][size:] - batch[m][src])), 0.05)
    self.assertGreater(float(jnp.sum(out["saturation"][size:])), 0.0)

  def test_too_few_flare_free_sources_are_marked(self):
    config = tiny.get_config()
    config.restore.copies = 8
    batch = _batch(config, flare_rows=(0, 1, 2))
    _, src, valid = train.with_flared_copies(
        batch, train.restore_config(config), jax.random.key(0))
    np.testing.assert_array_equal(src[:5], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(valid, [True] * 5 + [False] * 3)

  def test_runs_from_before_restoration_read_as_off(self):
    config = tiny.get_config()
    saved = checkpointing.config_to_dict(config)
    del saved["restore"]
    old = tempfile.mkdtemp()
    with open(os.path.join(old, checkpointing.CONFIG_FILE), "w") as f:
      json.dump(saved, f)
    self.assertEqual(checkpointing.load_config(old).restore.copies, 0)
    # Resuming or evaluating such a run under today's config is no mismatch.
    checkpointing.check_config(old, config, has_state=True, write=False)
    config.restore.copies = 2
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "restore.copies"):
      checkpointing.check_config(old, config, has_state=True, write=False)

  def test_bad_restore_fields_are_named(self):
    config = tiny.get_config()
    config.restore.copies = 9
    with self.assertRaisesRegex(ValueError, r"restore.copies must be in \[0, 8\]"):
      train.restore_config(config)
    config.restore.copies = 2
    config.restore.weight = -1.0
    with self.assertRaisesRegex(ValueError, "restore.weight"):
      train.restore_config(config)
    config.restore.weight = 1.0
    config.preprocess.clahe = True
    with self.assertRaisesRegex(ValueError, "preprocess.clahe"):
      train.restore_config(config)


class RestorationLossTest(absltest.TestCase):

  def test_against_numpy(self):
    rng = np.random.default_rng(0)
    flared, clean = rng.normal(size=(2, 5, 7))
    valid = np.array([True, False, True, True, False])
    got = losses.restoration_loss(jnp.asarray(flared), jnp.asarray(clean),
                                  jnp.asarray(valid))
    per = np.mean((flared - clean) ** 2, -1) / np.mean(clean ** 2, -1)
    np.testing.assert_allclose(got, per[valid].mean(), rtol=1e-5)
    self.assertEqual(float(losses.restoration_loss(
        jnp.asarray(flared), jnp.asarray(clean), jnp.zeros(5, bool))), 0.0)

  def test_gradient_reaches_the_copy_only(self):
    rng = np.random.default_rng(1)
    flared, clean = (jnp.asarray(x) for x in rng.normal(size=(2, 3, 4)))
    valid = jnp.ones(3, bool)
    g_flared, g_clean = jax.grad(losses.restoration_loss, argnums=(0, 1))(
        flared, clean, valid)
    self.assertGreater(float(jnp.sum(jnp.abs(g_flared))), 0.0)
    np.testing.assert_array_equal(g_clean, 0.0)


class TrainingLossTest(absltest.TestCase):

  def test_copies_add_their_terms_with_their_weight(self):
    config = tiny.get_config()
    config.restore.copies = 4
    config.restore.weight = 3.0
    model = train.build_model(config, num_classes=4)
    restore = train.restore_config(config)
    batch, src, valid = jax.jit(functools.partial(
        train.with_flared_copies, restore=restore))(_batch(config),
                                                     key=jax.random.key(0))
    size = batch["label"].shape[0] - 4
    # The copies carry their own saturated fractions (the fusion reads them).
    self.assertEqual(batch["flare_ratio"].shape, (size + 4, 2))
    self.assertTrue(np.all(np.asarray(batch["flare_ratio"][size:]) > 0))
    variables = model.init(jax.random.key(0), train.model_inputs(batch),
                           batch["flare"], train=False,
                           flare_ratio=batch["flare_ratio"])
    # Eager: one forward pass of the tiny model runs faster than it compiles.
    with jax.disable_jit():
      loss, (terms, out, _) = train.training_loss(
          variables["params"], batch_stats=variables["batch_stats"],
          batch=batch, size=size, src=src, valid=valid, model=model,
          loss_cfg=train.loss_config(config), restore=restore,
          dropout_rng=jax.random.key(1))
    self.assertEqual(out.embedding.shape[0], size + 4)
    # Every other term of the tiny config has weight 1, or 0 and is absent.
    weights = {k: v for k, v in config.loss.items()
               if k.endswith("_weight") and v != 0}
    self.assertEqual(set(weights.values()), {1.0}, weights)
    self.assertEqual(config.loss.fce_raw_weight, 0.0)
    self.assertFalse([k for k in terms if "_raw_" in k], terms.keys())
    terms = {k: float(v) for k, v in terms.items()}
    total = terms.pop("total")
    self.assertAlmostEqual(total, float(loss), places=5)
    restore_sum = 0.0
    for m in ("rgb", "ni"):
      self.assertGreater(terms[f"restore_{m}"], 0.0)
      self.assertGreater(terms[f"ce_flared_{m}"], 0.0)
      restore_sum += terms[f"restore_{m}"]
    self.assertNotIn("restore_ti", terms)
    self.assertAlmostEqual(total, sum(terms.values()) + 2.0 * restore_sum,
                           places=3)
    # The copies' own pseudo-labels reach FCE's gate: the flare losses see
    # every row.
    self.assertEqual(out.flare_logits["rgb"].shape[0], size + 4)


if __name__ == "__main__":
  absltest.main()
