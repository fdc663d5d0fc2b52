"""The ablation study's bookkeeping: variants, resume, aggregation, tables."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest
import numpy as np
from PIL import Image

from configs import experiments as experiments_config
from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import experiments
from facenet_jax.train import build
import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _fake_results(seed: int, steps: int, split: str = "test") -> dict:
  """Eval results whose metrics are a known function of the seed."""
  metrics = {"mAP": 0.1 * (seed + 1), "rank1": 0.2, "rank5": 0.5,
             "rank10": 0.25 * (seed + 1), "num_query": 10}
  return {**metrics, "step": steps, "split": split,
          "flare": {**metrics, "num_query": 4, "mAP": 0.05},
          "clean": {**metrics, "num_query": 6}}


class VariantsTest(absltest.TestCase):

  def test_all_tables_need_seventeen_distinct_variants(self):
    variants = experiments.variants_of(sorted(experiments.TABLES))
    # The paper's Tables 2-5 need 12; Table 8 adds the two ViT runs and the
    # warm-start table three.
    self.assertLen(experiments.variants_of([2, 3, 4, 5]), 12)
    self.assertEqual(experiments.variants_of([8]),
                     ["baseline", "facenet", "vit_baseline", "vit_facenet"])
    self.assertLen(variants, 17)
    # One more is in no table: the diagnostics' stage-1 masks.
    self.assertCountEqual(variants + ["mfmp_fce_ms1"], experiments.VARIANTS)

  def test_warm_started_variants_start_from_the_same_seeds_baseline(self):
    base = tiny.get_config()
    for variant in ("baseline_ws", "mfmp_fce_ws", "facenet_ws"):
      config = experiments.variant_config(base, variant, 2, "/study")
      self.assertEqual(config.model.init_from,
                       experiments.run_dir("/study", "baseline", 2))
      plain = experiments.variant_config(base, variant[:-3], 2, "/study")
      self.assertEqual(plain.model.init_from, "")
      config.model.init_from = ""
      self.assertEqual(config.to_dict(), plain.to_dict())
    with self.assertRaisesRegex(ValueError, "needs the study root"):
      experiments.variant_config(base, "facenet_ws", 0)

  def test_run_study_trains_the_warm_start_source_first(self):
    order = []

    def fake_train(config, workdir):
      order.append(os.path.basename(os.path.dirname(workdir)))
      return _fake_results(config.seed, config.num_train_steps)

    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root)
    base = tiny.get_config()
    # Table 9 lists the warm-started baseline after the baseline already;
    # a table that only asks for warm-started runs needs another table's.
    experiments.run_study(base, root, [9], [0], fake_train)
    self.assertEqual(order[0], "baseline")
    self.assertEqual(len(order), 5)
    saved = experiments.TABLES[10] = experiments.Table(
        10, "only warm", (("ws", "facenet_ws", None),))
    try:
      with self.assertRaisesRegex(ValueError, r"start from \['baseline'\]"):
        experiments.run_study(base, root, [10], [0], fake_train)
    finally:
      del experiments.TABLES[saved.number]

  def test_variants_mean_what_the_tables_say(self):
    base = experiments_config.get_config()
    models = {v: build.build_model(
        experiments.variant_config(base, v, 0, "/study"), 5)
              for v in experiments.VARIANTS}
    loss = {v: build.loss_config(
        experiments.variant_config(base, v, 0, "/study"))
            for v in experiments.VARIANTS}
    self.assertFalse(models["baseline"].use_mfmp)
    self.assertFalse(models["baseline"].use_fce)
    self.assertTrue(models["mfmp"].use_mfmp)
    self.assertFalse(models["mfmp"].use_fce)
    self.assertFalse(models["mfmp_nofmi_fce"].use_fmi)
    self.assertTrue(models["mfmp_fce"].use_fmi and models["mfmp_fce"].use_fce)
    for stage in (1, 2, 3):
      self.assertEqual(models[f"mfmp_fce_stage{stage}"].plug_stage, stage)
    self.assertEqual(models["mfmp_fce"].plug_stage, 4)
    self.assertEqual(loss["facenet"].modality, "ic")
    self.assertEqual(models["vit_baseline"].backbone, "vit_micro8")
    self.assertFalse(models["vit_baseline"].use_mfmp)
    self.assertTrue(models["vit_facenet"].use_fce)
    self.assertEqual(loss["vit_facenet"].modality, "ic")
    for name in ("3m", "hc", "cdc"):
      self.assertEqual(loss[f"mfmp_fce_{name}"].modality, name)
    for v in ("baseline", "baseline_clahe", "mfmp", "mfmp_fce",
              "mfmp_nofmi_fce", "vit_baseline"):
      self.assertEqual(loss[v].modality, "none")
    clahe = {v: experiments.variant_config(base, v, 0, "/s").preprocess.clahe
             for v in experiments.VARIANTS}
    self.assertEqual([v for v, on in clahe.items() if on], ["baseline_clahe"])

  def test_variant_config_sets_seed_and_leaves_base_alone(self):
    base = tiny.get_config()
    config = experiments.variant_config(base, "baseline", 7)
    self.assertEqual(config.seed, 7)
    self.assertFalse(config.model.use_mfmp)
    self.assertTrue(base.model.use_mfmp)
    self.assertEqual(base.seed, 0)

  def test_unknown_names_are_refused(self):
    base = tiny.get_config()
    with self.assertRaisesRegex(ValueError, "unknown variant 'nope'"):
      experiments.variant_config(base, "nope", 0)
    with self.assertRaisesRegex(ValueError, "--tables: unknown table '7'"):
      experiments.parse_tables(["2", "7"])
    with self.assertRaisesRegex(ValueError, "table 2 is listed twice"):
      experiments.parse_tables(["2", "2"])
    self.assertEqual(experiments.parse_tables(["5", "2"]), [5, 2])
    self.assertEqual(experiments.parse_seeds(["2", "0"]), [2, 0])
    for bad in (["a"], ["1", "1"], ["-1"], []):
      with self.assertRaisesRegex(ValueError, "--seeds"):
        experiments.parse_seeds(bad)


class AggregateTest(absltest.TestCase):

  def test_mean_and_sample_std_in_percent(self):
    per_seed = {s: _fake_results(s, 3) for s in range(3)}
    agg = experiments.aggregate(per_seed, "all")
    self.assertEqual(agg["n"], 3)
    mean, std = agg["mAP"]
    self.assertAlmostEqual(mean, 20.0)
    self.assertAlmostEqual(std, 10.0)  # sample std of 10, 20, 30
    self.assertAlmostEqual(agg["rank1"][1], 0.0)
    flare = experiments.aggregate(per_seed, "flare")
    self.assertAlmostEqual(flare["mAP"][0], 5.0)
    self.assertEqual(flare["num_query"], 4)

  def test_subsets_without_metrics_are_left_out(self):
    runs = {0: _fake_results(0, 3), 1: _fake_results(1, 3)}
    runs[1]["flare"] = {"num_query": 0}
    runs[0]["clean"] = {"num_query": 6, "note": "No query has a true match."}
    self.assertEqual(experiments.aggregate(runs, "flare")["n"], 1)
    self.assertEqual(experiments.aggregate(runs, "clean")["n"], 1)

  def test_one_seed_has_no_std_and_none_is_nan(self):
    agg = experiments.aggregate({0: _fake_results(0, 3)}, "clean")
    self.assertEqual(agg["mAP"][0], 10.0)
    self.assertTrue(np.isnan(agg["mAP"][1]))
    self.assertEqual(experiments.cell(agg["mAP"]), "10.0")
    self.assertEqual(experiments.cell(experiments.mean_std([1.0, 2.0])),
                     "1.5 ± 0.7")
    empty = experiments.aggregate({}, "all")
    self.assertEqual(empty["n"], 0)
    self.assertTrue(np.isnan(empty["mAP"][0]))

  def test_table_markdown(self):
    results = {"baseline": {s: _fake_results(s, 3) for s in range(2)}}
    text = experiments.table_markdown(experiments.TABLES[3], results)
    lines = text.splitlines()
    self.assertEqual(lines[0], "### Table 3: Comparison with a classical "
                     "de-flare method (test split)")
    self.assertIn("### Table 3: Comparison with a classical de-flare method "
                  "(val split)",
                  experiments.results_markdown([3], results, split="val"))
    rows = [line for line in lines if line.startswith("| ")][1:]
    self.assertLen(rows, 3 * len(experiments.TABLES[3].rows))
    self.assertEqual(rows[0], "| Baseline | all (10) | 2 | 15.0 ± 7.1 | "
                     "20.0 ± 0.0 | 50.0 ± 0.0 | 37.5 ± 17.7 | 53.7 / 60.3 |")
    self.assertIn("| flare (4) | 2 | 5.0 ± 0.0 |", rows[1])
    # A variant without results yet: 0 seeds and empty cells.
    self.assertEqual(rows[3], "| + CLAHE | all | 0 | - | - | - | - | "
                     "54.5 / 60.5 |")


class SegmentsTest(absltest.TestCase):

  def test_segments_are_the_normalised_parts(self):
    emb = np.array([[3.0, 4.0, 0.0, 2.0, 1.0, 0.0]])
    parts = experiments.modality_segments(emb, ("rgb", "ni", "ti"))
    np.testing.assert_allclose(parts["rgb"], [[0.6, 0.8]])
    np.testing.assert_allclose(parts["ni"], [[0.0, 1.0]])
    np.testing.assert_allclose(parts["ti"], [[1.0, 0.0]])
    with self.assertRaisesRegex(ValueError, "3 \\* D"):
      experiments.modality_segments(np.zeros((2, 5)), ("rgb", "ni", "ti"))


class RunStudyTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = os.path.join(absltest.get_default_test_tmpdir(), "study")
    shutil.rmtree(self.root, ignore_errors=True)
    self.base = tiny.get_config()
    self.calls = []

  def _train(self, config, workdir):
    """Stands in for train_and_evaluate: writes what a finished run writes."""
    self.calls.append((config.seed, workdir))
    checkpointing.check_config(workdir, config, has_state=False)
    return self._evaluate(config, workdir)

  def _evaluate(self, config, workdir):
    """Stands in for evaluate_checkpoint: the results file of the split."""
    results = _fake_results(config.seed, config.num_train_steps,
                            config.eval.split)
    name = checkpointing.split_file(experiments.RESULTS_FILE,
                                    config.eval.split)
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(results, f)
    return results

  def test_runs_each_variant_once_per_seed_and_resumes(self):
    written = []
    results = experiments.run_study(self.base, self.root, [3], [0, 1],
                                    self._train,
                                    on_result=lambda: written.append(1))
    self.assertLen(self.calls, 3 * 2)
    self.assertLen(written, 6)
    self.assertEqual(sorted(results), ["baseline", "baseline_clahe",
                                       "mfmp_fce"])
    self.assertEqual(
        self.calls[0][1],
        os.path.join(self.root, "runs", "baseline", "seed0"))
    # Everything finished: a second study trains nothing and reads the same.
    self.calls.clear()
    again = experiments.run_study(self.base, self.root, [3], [0, 1],
                                  self._train)
    self.assertEmpty(self.calls)
    self.assertEqual(again, results)
    self.assertEqual(experiments.collect(self.base, self.root, ["baseline"],
                                         [0, 1]),
                     {"baseline": results["baseline"]})

  def test_unfinished_run_is_trained_again(self):
    experiments.run_study(self.base, self.root, [3], [0], self._train)
    path = os.path.join(experiments.run_dir(self.root, "mfmp_fce", 0),
                        experiments.RESULTS_FILE)
    with open(path) as f:
      stale = json.load(f)
    stale["step"] = 1  # evaluated before reaching num_train_steps
    with open(path, "w") as f:
      json.dump(stale, f)
    self.calls.clear()
    experiments.run_study(self.base, self.root, [3], [0], self._train)
    self.assertEqual(self.calls,
                     [(0, experiments.run_dir(self.root, "mfmp_fce", 0))])

  def test_a_longer_study_does_not_extend_finished_runs(self):
    # Resuming with a new num_train_steps would splice two LR schedules.
    experiments.run_study(self.base, self.root, [3], [0], self._train)
    longer = tiny.get_config()
    longer.num_train_steps = 8
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "num_train_steps"):
      experiments.run_study(longer, self.root, [3], [0], self._train)

  def test_the_other_split_is_evaluated_not_trained_nor_reused(self):
    experiments.run_study(self.base, self.root, [3], [0], self._train)
    val = tiny.get_config()
    val.eval.split = "val"
    workdir = experiments.run_dir(self.root, "baseline", 0)
    run_test = experiments.variant_config(self.base, "baseline", 0)
    run_val = experiments.variant_config(val, "baseline", 0)
    # Test results do not count as val results, nor the other way round.
    self.assertIsNone(experiments.finished_results(workdir, run_val))
    self.assertTrue(experiments.finished_training(workdir, run_val))
    evaluated = []

    def evaluate(config, workdir):
      evaluated.append((config.eval.split, workdir))
      return self._evaluate(config, workdir)

    self.calls.clear()
    results = experiments.run_study(val, self.root, [3], [0], self._train,
                                    evaluate_fn=evaluate)
    self.assertEmpty(self.calls)
    self.assertLen(evaluated, 3)
    self.assertEqual({s for s, _ in evaluated}, {"val"})
    self.assertEqual(results["baseline"][0]["split"], "val")
    # Both splits' results are kept; each is finished on its own split.
    self.assertEqual(
        experiments.finished_results(workdir, run_val)["split"], "val")
    self.assertEqual(
        experiments.finished_results(workdir, run_test)["split"], "test")
    with open(os.path.join(workdir, experiments.RESULTS_FILE), "w") as f:
      json.dump(_fake_results(0, 4, "val"), f)  # mislabelled file
    self.assertIsNone(experiments.finished_results(workdir, run_test))
    # Without evaluate_fn a run of an unfinished split goes to train_fn.
    self.calls.clear()
    experiments.run_study(self.base, self.root, [3], [0], self._train)
    self.assertEqual(self.calls, [(0, workdir)])

  def test_a_run_of_another_config_is_not_reused(self):
    experiments.run_study(self.base, self.root, [3], [0], self._train)
    changed = tiny.get_config()
    changed.model.width_multiplier = 0.25
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "width_multiplier"):
      experiments.run_study(changed, self.root, [3], [0], self._train)


if __name__ == "__main__":
  absltest.main()


@pytest.mark.slow
class ScriptTest(absltest.TestCase):
  """scripts/experiments.py end to end on synthetic_flare/tiny, 2 steps a run."""

  def _run(self, *args, script="experiments.py"):
    env = subprocess_env.script_env()
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", script),
         "--config", os.path.join(ROOT, "configs", "tiny.py"),
         "--workdir", self.root, *args], env=env, capture_output=True,
        text=True, timeout=900, check=False)
    self.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-3000:])
    self.stderr = done.stderr
    return done.stdout

  def setUp(self):
    super().setUp()
    tmp = absltest.get_default_test_tmpdir()
    self.root = os.path.join(tmp, "script_study")
    # The prepared synthetic_flare/tiny that the other test modules share.
    self.data_dir = os.path.join(tmp, "tfds")
    shutil.rmtree(self.root, ignore_errors=True)

  def test_diagnosing_a_directory_without_a_study_is_one_line(self):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "diagnose_study.py"),
         "--config", os.path.join(ROOT, "configs", "tiny.py"),
         "--workdir", self.root], env=subprocess_env.script_env(),
        capture_output=True, text=True, timeout=300, check=False)
    self.assertNotEqual(done.returncode, 0)
    self.assertIn("holds no study (no runs/ directory)", done.stderr)
    self.assertFalse(os.path.exists(self.root))

  def test_quick_dry_run_lists_table_2_with_one_seed(self):
    out = self._run("--quick", "--dry_run")
    lines = out.strip().splitlines()
    self.assertLen(lines, 5)
    self.assertTrue(all(" seed 0: " in line for line in lines))
    self.assertFalse(os.path.exists(os.path.join(self.root, "runs")))

  def test_table_3_with_masks_then_resume(self):
    args = ("--tables=3", "--seeds=0", "--config.num_train_steps=2",
            f"--config.data_dir={self.data_dir}")
    out = self._run(*args)
    # The console has the study's lines; the libraries' log is in log.txt.
    self.assertIn("[3/3] mfmp_fce seed 0: mAP", out)
    self.assertNotIn("ni_backbone", out + self.stderr)
    with open(os.path.join(self.root, "log.txt")) as f:
      self.assertIn("ni_backbone/conv1/kernel", f.read())
    with open(os.path.join(self.root, "results.md")) as f:
      text = f.read()
    self.assertIn("### Table 3", text)
    for label in ("| Baseline | all (12) | 1 |", "| + CLAHE | all (12) | 1 |",
                  "| + MFMP + FCE | all (12) | 1 |",
                  "| MFMP + FCE | rgb | 1 |", "| MFMP + FCE | ni | 1 |"):
      self.assertIn(label, text)
    self.assertIn("3 runs trained", text)
    with Image.open(os.path.join(self.root, "mask_figure.png")) as figure:
      # image, ground truth, gt at map and the one mask variant of Table 3.
      self.assertEqual(figure.size[0], 4 * (2 * 32 + 4) + 4)
    with open(os.path.join(experiments.run_dir(self.root, "mfmp_fce", 0),
                           "mask_quality.json")) as f:
      self.assertBetween(json.load(f)["rgb"]["coverage_flare"], 0.0, 1.0)
    # Everything finished. The validation split: the trained runs are only
    # evaluated (nothing is trained again), on their own files; the test
    # tables stay as they were.
    out = self._run(*args, "--split=val")
    self.assertNotIn("training", out)
    self.assertIn("evaluating baseline seed 0 (trained earlier) on the val "
                  "split", out)
    self.assertRegex(out, r"\[3/3\] mfmp_fce seed 0: mAP \d+\.\d on the val "
                     r"split")
    self.assertIn(f"log: {os.path.join(self.root, 'log.txt')}", out)
    with open(os.path.join(self.root, "results_val.md")) as f:
      val_text = f.read()
    for line in ("### Table 3: Comparison with a classical de-flare method "
                 "(val split)", "metrics on the validation split (val_query",
                 "| Baseline | all (8) | 1 |",
                 "### Mask quality (the paper's Figure 5, measured; val split)",
                 "| MFMP + FCE | rgb | 1 |", "mask_figure_val.png"):
      self.assertIn(line, val_text)
    with open(os.path.join(self.root, "results.md")) as f:
      self.assertEqual(f.read(), text)
    run = experiments.run_dir(self.root, "mfmp_fce", 0)
    with open(os.path.join(run, "eval_results_val.json")) as f:
      self.assertEqual(json.load(f)["split"], "val")
    self.assertTrue(os.path.exists(os.path.join(run, "mask_quality_val.json")))
    self.assertTrue(os.path.exists(os.path.join(self.root,
                                                "mask_figure_val.png")))
    # Diagnostics of the finished runs: per-stream ranking, FCE off at test.
    self._run("--variants=baseline,mfmp_fce", "--seeds=0",
              f"--config.data_dir={self.data_dir}", "--config.num_train_steps=2",
              script="diagnose_study.py")
    with open(os.path.join(self.root, "diagnostics.md")) as f:
      diagnostics = f.read()
    for row in ("| baseline | full embedding | 1 |",
                "| baseline | TI segment only | 1 |",
                "| mfmp_fce | RGB segment only | 1 |",
                "| mfmp_fce | FCE off at test | 1 |",
                "| mfmp_fce | rendered flare on the query | 1 |",
                "| baseline | equal segments | 1 |",
                "| mfmp_fce | flared streams at weight 0 | 1 |",
                "| mfmp_fce | as is | 1 |", "| mfmp_fce | rendered flare | 1 |"):
      self.assertIn(row, diagnostics)
    self.assertNotIn("| baseline | as is |", diagnostics)
    self.assertNotIn("| baseline | FCE off at test", diagnostics)
    # The full-embedding probe reproduces the run's own evaluation.
    with open(os.path.join(experiments.run_dir(self.root, "baseline", 0),
                           experiments.RESULTS_FILE)) as f:
      evaluated = json.load(f)
    self.assertIn(f"| baseline | full embedding | 1 | "
                  f"{100 * evaluated['mAP']:.1f} | "
                  f"{100 * evaluated['rank1']:.1f} |", diagnostics)
