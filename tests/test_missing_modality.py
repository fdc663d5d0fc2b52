"""Missing-modality evaluation: blanking, config checks, the sweep of a run.

The blanking is checked on a batch, the config errors without any data, and
the sweep (config.eval.missing="all") on one 4-step run of configs/tiny.py.
"""

import itertools
import json
import os

from absl.testing import absltest
import pytest
from absl.testing import parameterized
import jax
import numpy as np

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax.train import evaluate
from facenet_jax.train import extract
from facenet_jax.train import loop
from facenet_jax.train import train_state
from facenet_jax.constants import FLARE_MODALITIES, MODALITIES
import input_pipeline.datasets  # noqa: F401  (registers synthetic_flare)
import run_fixtures

# Trains runs, starts scripts or compiles the tiny model: left out of the
# quick loop (-m "not slow").
pytestmark = pytest.mark.slow

# Every set a single evaluation accepts: none, one or two of three.
_SETS = [s for n in range(3) for s in itertools.combinations(MODALITIES, n)]


def _batch(size: int = 4) -> dict:
  rng = np.random.default_rng(0)
  # Values away from 0, so that a zero can only come from the blanking.
  batch = {m: rng.uniform(0.5, 2.0, (size, 6, 4, 3)).astype(np.float32)
           for m in MODALITIES}
  batch["flare"] = np.ones((size, 2), np.float32)
  batch["flare_ratio"] = np.full((size, 2), 0.3, np.float32)
  batch["pid"] = np.arange(size)
  return batch


class BlankingTest(parameterized.TestCase):

  @parameterized.parameters(*_SETS)
  def test_zeros_exactly_the_missing_inputs(self, *missing):
    batch = _batch()
    out = jax.jit(extract.blank_inputs)(batch, extract.input_keep(missing))
    for m in MODALITIES:
      expected = np.zeros_like(batch[m]) if m in missing else batch[m]
      np.testing.assert_array_equal(out[m], expected)
    # A missing TI image leaves delta alone: only RGB and NI have one.
    for i, m in enumerate(FLARE_MODALITIES):
      np.testing.assert_array_equal(out["flare"][:, i],
                                    0.0 if m in missing else 1.0)
      # A missing image has no saturated fraction either (fusion weight 1).
      np.testing.assert_allclose(out["flare_ratio"][:, i],
                                 0.0 if m in missing else 0.3, rtol=1e-6)
    np.testing.assert_array_equal(out["pid"], batch["pid"])

  def test_zero_flare_keeps_the_images(self):
    batch = _batch()
    out = extract.blank_inputs(batch, extract.input_keep(("ti",), zero_flare=True))
    np.testing.assert_array_equal(out["flare"], 0.0)
    np.testing.assert_array_equal(out["rgb"], batch["rgb"])
    np.testing.assert_array_equal(out["ti"], 0.0)

  def test_query_and_gallery_sides(self):
    self.assertEqual(extract.missing_by_side(("ni",), "query"),
                     {"query": ("ni",), "gallery": ()})
    self.assertEqual(extract.missing_by_side(("rgb", "ti"), "gallery"),
                     {"query": (), "gallery": ("rgb", "ti")})
    self.assertEqual(extract.missing_by_side(("ti",), "both"),
                     {"query": ("ti",), "gallery": ("ti",)})

  def test_results_files_keep_the_full_modality_names(self):
    self.assertEqual(evaluate.results_file("test"), "eval_results.json")
    self.assertEqual(evaluate.results_file("val", (), "query"),
                     "eval_results_val.json")
    self.assertEqual(evaluate.results_file("test", ("ni",), "both"),
                     "eval_results_missing-ni_both.json")
    self.assertEqual(evaluate.results_file("val", ("rgb", "ni"), "gallery"),
                     "eval_results_missing-rgb+ni_gallery_val.json")


class ConfigTest(parameterized.TestCase):

  def _config(self, missing="none", missing_in="both"):
    config = tiny.get_config()
    config.eval.missing = missing
    config.eval.missing_in = missing_in
    return config

  def test_sets(self):
    self.assertEqual(extract.missing_sets(self._config()), ((),))
    self.assertEqual(extract.missing_sets(self._config(" NI, rgb")),
                     (("rgb", "ni"),))
    sweep = extract.missing_sets(self._config("all", "query"))
    self.assertEqual(sweep, ((), ("rgb",), ("ni",), ("ti",), ("rgb", "ni"),
                             ("rgb", "ti"), ("ni", "ti")))

  @parameterized.parameters(
      ("nir", "both", r"config\.eval\.missing='nir': 'nir' is not a modality"),
      ("rgb,", "both", r"config\.eval\.missing='rgb,': '' is not"),
      ("none,ti", "both", r"config\.eval\.missing='none,ti': 'none' is not"),
      ("ni,ni", "both", r"config\.eval\.missing='ni,ni' names 'ni' 2 times"),
      ("rgb,ni,ti", "both", r"config\.eval\.missing='rgb,ni,ti' blanks every"),
      ("ti,all", "both", r"config\.eval\.missing='ti,all': 'all' is not"),
      ("ni", "queries", r"config\.eval\.missing_in must be one of \('query', "
       r"'gallery', 'both'\).*'queries'"),
      ("all", "", r"config\.eval\.missing_in must be"))
  def test_errors_name_the_field(self, missing, missing_in, message):
    with self.assertRaisesRegex(ValueError, message):
      extract.missing_sets(self._config(missing, missing_in))

  def test_training_refuses_the_sweep_before_anything_is_written(self):
    workdir = os.path.join(absltest.get_default_test_tmpdir(), "refused")
    with self.assertRaisesRegex(ValueError,
                                r"config\.eval\.missing='all'.*--mode eval"):
      loop.train_and_evaluate(self._config("all"), workdir)
    self.assertFalse(os.path.exists(workdir))

  def test_old_config_files_read_as_none(self):
    saved = checkpointing.config_to_dict(tiny.get_config())
    for field in ("missing", "missing_in", "rendered_flare",
                  "rendered_flare_seed"):
      del saved["eval"][field]
    old = os.path.join(absltest.get_default_test_tmpdir(), "old_config")
    os.makedirs(old, exist_ok=True)
    with open(os.path.join(old, checkpointing.CONFIG_FILE), "w") as f:
      json.dump(saved, f)
    config = checkpointing.load_config(old)
    self.assertEqual((config.eval.missing, config.eval.missing_in),
                     ("none", "both"))
    self.assertEqual((config.eval.rendered_flare,
                      config.eval.rendered_flare_seed), ("none", 0))


class SweepTest(absltest.TestCase):
  """One 4-step run, then --mode eval with every missing set."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = absltest.get_default_test_tmpdir()
    cls.data_dir = os.path.join(root, "tfds")
    cls.workdir = os.path.join(root, "missing_run")
    # The tiny run, trained once for every file that reads one.
    run_fixtures.trained_tiny_run(cls.workdir, cls.data_dir)
    with open(os.path.join(cls.workdir, "eval_results.json")) as f:
      cls.trained = json.load(f)
    config = cls._config()
    config.eval.missing = "all"
    cls.sweep = evaluate.evaluate_checkpoint(config, cls.workdir)

  @classmethod
  def _config(cls):
    config = tiny.get_config()
    config.data_dir = cls.data_dir
    return config

  def test_table_has_a_row_per_set(self):
    with open(os.path.join(self.workdir, "missing_modality.md")) as f:
      lines = f.read().splitlines()
    rows = [l for l in lines if l.startswith("| ") and "---" not in l][1:]
    self.assertEqual([r.split(" | ")[0][2:] for r in rows],
                     ["none", "rgb", "ni", "ti", "rgb,ni", "rgb,ti", "ni,ti"])
    self.assertEqual(rows[3].split(" | ")[1], "rgb+ni")
    for row in rows:
      self.assertLen(row.split(" | "), 8)
    first = rows[0].split(" | ")
    self.assertEqual(first[2], f"{100 * self.trained['mAP']:.1f}")
    self.assertEqual(first[6], f"{100 * self.trained['flare']['mAP']:.1f}")
    with open(os.path.join(self.workdir, "missing_modality.json")) as f:
      self.assertEqual(json.load(f), self.sweep)

  def test_none_row_is_the_full_modality_evaluation(self):
    none = self.sweep["rows"][0]
    self.assertEqual((none["missing"], none["missing_in"]), ("none", "none"))
    self.assertEqual((self.trained["missing"], self.trained["missing_in"]),
                     ("none", "none"))
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
      self.assertAlmostEqual(none[key], self.trained[key], places=6)
      self.assertAlmostEqual(none["flare"][key], self.trained["flare"][key],
                             places=6)
    # The sweep's "none" is what eval_results.json holds; the missing sets
    # went to files of their own.
    with open(os.path.join(self.workdir, "eval_results.json")) as f:
      self.assertEqual(json.load(f), none)
    for row in self.sweep["rows"][1:]:
      path = os.path.join(self.workdir, evaluate.results_file(
          "test", extract.parse_missing(row["missing"]), "both"))
      with open(path) as f:
        self.assertEqual(json.load(f), row)
      self.assertEqual(row["missing_in"], "both")
      # Same queries in the flare / clean rows of every set.
      self.assertEqual(row["flare"]["num_query"], none["flare"]["num_query"])
    self.assertNotEqual(self.sweep["rows"][1]["mAP"], none["mAP"])

  def test_one_set_on_the_query_side(self):
    config = self._config()
    config.eval.missing = "rgb"
    config.eval.missing_in = "query"
    model, state, sharding = train_state.restore_for_eval(config, self.workdir)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    embed_fn = extract.embedding_function(config, model, sharding)
    full = extract.extract(config, model, variables, "query", sharding,
                         embed_fn=embed_fn)
    blank = extract.extract(config, model, variables, "query", sharding,
                          missing=("rgb",), embed_fn=embed_fn)
    # The real labels define the subsets; the fed ones lost RGB's delta.
    np.testing.assert_array_equal(blank["flare"], full["flare"])
    self.assertGreater(full["flare"][:, 0].sum(), 0)
    np.testing.assert_array_equal(blank["flare_input"][:, 0], 0.0)
    np.testing.assert_array_equal(blank["flare_input"][:, 1],
                                  full["flare"][:, 1])
    np.testing.assert_array_equal(full["flare_input"], full["flare"])
    self.assertGreater(np.abs(blank["embedding"] - full["embedding"]).max(),
                       1e-3)
    results = evaluate.evaluate(config, self.workdir, model, state, sharding)
    path = os.path.join(self.workdir, "eval_results_missing-rgb_query.json")
    self.assertEqual(evaluate.results_path(config, self.workdir), path)
    with open(path) as f:
      saved = json.load(f)
    self.assertEqual((saved["missing"], saved["missing_in"]),
                     ("rgb", "query"))
    self.assertEqual(saved["mAP"], results["mAP"])
    # The query side alone differs from both sides blanked.
    both = self.sweep["rows"][1]
    self.assertEqual(both["missing"], "rgb")
    self.assertNotAlmostEqual(saved["mAP"], both["mAP"], places=6)
    # The full-modality results are kept.
    with open(os.path.join(self.workdir, "eval_results.json")) as f:
      self.assertEqual(json.load(f)["missing"], "none")

  def test_rendered_flare_on_the_query(self):
    config = self._config()
    config.eval.rendered_flare = "query"
    results = evaluate.evaluate_checkpoint(config, self.workdir)
    path = os.path.join(self.workdir,
                        "eval_results_rendered-flare-query.json")
    self.assertEqual(evaluate.results_path(config, self.workdir), path)
    with open(path) as f:
      saved = json.load(f)
    self.assertEqual(saved, json.loads(json.dumps(results)))
    self.assertEqual((saved["rendered_flare"], saved["missing"]),
                     ("query", "none"))
    self.assertEqual(self.trained["rendered_flare"], "none")
    # The subsets stay those of the real images.
    self.assertEqual(saved["flare"]["num_query"],
                     self.trained["flare"]["num_query"])
    self.assertNotAlmostEqual(saved["mAP"], self.trained["mAP"], places=6)
    with open(os.path.join(self.workdir, "eval_results.json")) as f:
      self.assertEqual(json.load(f)["rendered_flare"], "none")
    # What the query side was fed: rendered labels; the gallery as it is.
    model, state, sharding = train_state.restore_for_eval(config, self.workdir)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    query = extract.extract(config, model, variables, "query", sharding,
                          render=True)
    self.assertGreater(np.sum(query["flare_input"]),
                       np.sum(query["flare"]))
    np.testing.assert_array_equal(np.maximum(query["flare_input"],
                                             query["flare"]),
                                  query["flare_input"])
    # Only the query was rendered: the same ranking against the gallery as
    # it is.
    gallery = extract.extract(config, model, variables, "gallery", sharding)
    self.assertAlmostEqual(evaluate.rank(config, query, gallery)["mAP"],
                           saved["mAP"], places=6)


if __name__ == "__main__":
  absltest.main()
