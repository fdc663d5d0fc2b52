"""Evaluation under a rendered flare (config.eval.rendered_flare).

The rendering of an eval batch is checked on made-up images; the evaluation
of a trained run with it is in test_missing_modality.SweepTest, which has one.
"""

import os

from absl.testing import absltest
import pytest
import jax
import numpy as np

from configs import tiny
from facenet_jax import flare_render
from facenet_jax.train import evaluate
from facenet_jax.train import extract
from facenet_jax.train import feed
from facenet_jax.train import loop
from facenet_jax.train import mesh
from facenet_jax.constants import MODALITIES


def _raw_batch(indices, seed=0):
  """Raw images in [0, 0.8] (nothing saturated) of the given indices; the
  pixels are a function of the index, so the same index is the same image."""
  images = {m: [] for m in MODALITIES}
  for i in indices:
    rng = np.random.default_rng([seed, int(i)])
    for m in MODALITIES:
      images[m].append(rng.uniform(0.0, 0.8, (16, 8, 3)))
  return {m: np.stack(v).astype(np.float32) for m, v in images.items()}


def _normalised(config, raw, indices):
  mean, std = feed.normalization(config)
  batch = {m: (raw[m] - mean[i]) / std[i] for i, m in enumerate(MODALITIES)}
  batch["flare"] = np.zeros((len(indices), 2), np.float32)
  batch["index"] = np.asarray(indices, np.int32)
  return batch


def _raw_of(config, batch):
  mean, std = feed.normalization(config)
  return {m: np.asarray(batch[m]) * std[i] + mean[i]
          for i, m in enumerate(MODALITIES)}


@pytest.mark.slow
class RenderTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.config = tiny.get_config()
    self.key = extract.render_key(self.config, "query")
    self.render = jax.jit(lambda b, k: extract.render_eval_flare(
        b, k, self.config))

  def test_only_brightens_rgb_and_ni_and_relabels(self):
    indices = [0, 1, 2, 3, 4, 5]
    raw = _raw_batch(indices)
    out = self.render(_normalised(self.config, raw, indices), self.key)
    seen = _raw_of(self.config, out)
    for m in ("rgb", "ni"):
      self.assertGreaterEqual((seen[m] - raw[m]).min(), -1e-5)
      self.assertGreater((seen[m] - raw[m]).max(), 0.2)
      self.assertLessEqual(seen[m].max(), 1.0 + 1e-5)
    np.testing.assert_allclose(seen["ti"], raw["ti"], atol=1e-5)
    # The labels are those of the rendered images (the raw ones have none).
    keys = jax.vmap(lambda i: jax.random.fold_in(self.key, i))(
        np.asarray(indices, np.int32))
    expected = flare_render.add_flare_each(
        keys, raw["rgb"], raw["ni"], pixel_low=self.config.flare.pixel_low,
        ratio_threshold=self.config.flare.ratio_threshold)
    np.testing.assert_array_equal(out["flare"], expected.flare)
    np.testing.assert_allclose(seen["rgb"], expected.rgb, atol=1e-5)
    self.assertGreater(float(np.sum(out["flare"])), 0.0)
    np.testing.assert_array_equal(out["index"], indices)

  def test_an_image_gets_its_own_flare_whatever_the_batch(self):
    first = [3, 9, 4]
    second = [7, 4, 8, 3]
    out = [self.render(_normalised(self.config, _raw_batch(ix), ix), self.key)
           for ix in (first, second)]
    for i, j in ((0, 3), (2, 1)):  # index 3 and index 4 in both batches
      for m in ("rgb", "ni"):
        np.testing.assert_allclose(out[0][m][i], out[1][m][j], atol=1e-6)
      np.testing.assert_array_equal(out[0]["flare"][i], out[1]["flare"][j])
    # Different images of one batch get different flares.
    light = _raw_of(self.config, out[1])["rgb"] - _raw_batch(second)["rgb"]
    self.assertGreater(np.abs(light[1] - light[3]).max(), 0.05)

  def test_query_and_gallery_and_seeds_draw_apart(self):
    keys = {extract.render_key(self.config, s).tobytes()
            for s in ("query", "gallery", "val_query")}
    self.assertLen(keys, 2)  # val_query renders like query
    other = tiny.get_config()
    other.eval.rendered_flare_seed = 1
    self.assertNotEqual(extract.render_key(other, "query").tobytes(),
                        self.key.tobytes())


  def test_a_real_flare_stays_fed(self):
    indices = [0, 1, 2, 3]
    batch = _normalised(self.config, _raw_batch(indices), indices)
    rendered = np.asarray(self.render(batch, self.key)["flare"])
    batch["flare"] = np.ones_like(batch["flare"])
    np.testing.assert_array_equal(self.render(batch, self.key)["flare"], 1.0)
    self.assertLess(rendered.min(), 1.0)  # Some stream the render left clean.

  def test_add_flare_is_add_flare_each_of_split_keys(self):
    raw = _raw_batch([0, 1, 2])
    key = jax.random.PRNGKey(5)
    one = flare_render.add_flare(key, raw["rgb"], raw["ni"])
    each = flare_render.add_flare_each(jax.random.split(key, 3), raw["rgb"],
                                       raw["ni"])
    for a, b in zip(one, each):
      np.testing.assert_array_equal(a, b)


class ConfigTest(absltest.TestCase):

  def test_sides_and_error(self):
    config = tiny.get_config()
    self.assertEqual(extract.rendered_flare_side(config), "none")
    for side in ("query", "gallery", "both"):
      config.eval.rendered_flare = side
      self.assertEqual(extract.rendered_flare_side(config), side)
    config.eval.rendered_flare = "queries"
    with self.assertRaisesRegex(
        ValueError, r"config\.eval\.rendered_flare must be one of \('none', "
        r"'query', 'gallery', 'both'\).*'queries'"):
      extract.rendered_flare_side(config)
    workdir = os.path.join(absltest.get_default_test_tmpdir(), "no_render")
    with self.assertRaisesRegex(ValueError, r"config\.eval\.rendered_flare"):
      loop.train_and_evaluate(config, workdir)
    self.assertFalse(os.path.exists(workdir))

  def test_extract_refuses_an_embed_fn_of_the_other_render(self):
    config = tiny.get_config()
    sharding = mesh.Sharding.create()
    for built, asked in ((False, True), (True, False)):
      embed_fn = extract.embedding_function(config, None, sharding,
                                          render=built)
      with self.assertRaisesRegex(
          ValueError, rf"extract\(render={asked}\) was given an embed_fn "
          rf"built with render={built}"):
        extract.extract(config, None, None, "query", sharding,
                      embed_fn=embed_fn, render=asked)

  def test_clahe_is_refused(self):
    config = tiny.get_config()
    config.eval.rendered_flare = "gallery"
    config.preprocess.clahe = True
    with self.assertRaisesRegex(ValueError, r"rendered_flare='gallery' with "
                                r"preprocess\.clahe"):
      extract.rendered_flare_side(config)

  def test_sweep_files_and_title_name_the_rendered_side(self):
    config = tiny.get_config()
    config.eval.missing = "all"
    config.eval.rendered_flare = "both"
    config.eval.split = "val"
    self.assertEqual(evaluate.results_path(config, "/w"),
                     "/w/missing_modality_rendered-flare-both_val.md")
    config.eval.missing_in = "query"
    config.eval.rendered_flare = "none"
    self.assertEqual(evaluate.results_path(config, "/w"),
                     "/w/missing_modality_query_val.md")
    row = {"missing": "none", "mAP": 0.5, "rank1": 0.5, "rank5": 0.5,
           "rank10": 0.5, "flare": {"mAP": 0.5}, "clean": {"mAP": 0.5}}
    sweep = {"missing_in": "both", "dataset": "d", "split": "val", "step": 1,
             "rows": [row]}
    self.assertNotIn("rendered", evaluate.missing_modality_table(sweep))
    sweep["rendered_flare"] = "query"
    self.assertIn("blanked in the query and the gallery, with a rendered "
                  "flare on the query:", evaluate.missing_modality_table(sweep))

  def test_results_file_names(self):
    self.assertEqual(evaluate.results_file("test", rendered="query"),
                     "eval_results_rendered-flare-query.json")
    self.assertEqual(evaluate.results_file("val", ("ti",), "both", "gallery"),
                     "eval_results_missing-ti_both_rendered-flare-gallery_"
                     "val.json")
    self.assertEqual(evaluate.results_file("val"), "eval_results_val.json")


if __name__ == "__main__":
  absltest.main()
