"""The main job on synthetic_flare/tiny: train, resume, evaluate, embed.

One uninterrupted 4-step run is compared with a run that was "killed" after
its step-2 checkpoint and started again: same final parameters (same data
order after the resume) and the same metrics. `--mode eval` on the finished
workdir reproduces eval_results.json, and the inference Embedder reproduces
the evaluation embeddings from raw uint8 images.
"""

import json
import os
import shutil

from absl.testing import absltest
import pytest
import jax
import numpy as np
import tensorflow_datasets as tfds

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import console
from facenet_jax import inference
from facenet_jax import mask_quality
from facenet_jax.train import evaluate
from facenet_jax.train import extract
from facenet_jax.train import feed
from facenet_jax.train import loop
from facenet_jax.train import mesh
from facenet_jax.train import train_state
import input_pipeline.datasets  # noqa: F401  (registers synthetic_flare)
from input_pipeline import pipeline
from input_pipeline.datasets import synthetic_flare
import run_fixtures

# Trains runs, starts scripts or compiles the tiny model: left out of the
# quick loop (-m "not slow").
pytestmark = pytest.mark.slow

_TINY = synthetic_flare.SyntheticFlare.builder_configs["tiny"]


def _config(data_dir: str):
  config = tiny.get_config()
  config.data_dir = data_dir
  return config


def _params(workdir: str, step: int):
  config = checkpointing.load_config(workdir)
  _, state, _ = train_state.restore_for_eval(config, workdir, step)
  return jax.device_get(state.params)


class EndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = absltest.get_default_test_tmpdir()
    cls.data_dir = os.path.join(cls.root, "tfds")
    cls.workdir = os.path.join(cls.root, "run")
    # The tiny run, trained once for every file that reads one, and what
    # its console printed.
    cls.console = run_fixtures.trained_tiny_run(cls.workdir, cls.data_dir)
    with open(os.path.join(cls.workdir, "eval_results.json")) as f:
      cls.results = json.load(f)

  def test_results_file(self):
    with open(os.path.join(self.workdir, "eval_results.json")) as f:
      saved = json.load(f)
    for key in ("step", "mAP", "rank1", "rank5", "rank10", "mINP",
                "num_query", "num_gallery"):
      self.assertIn(key, saved)
    self.assertEqual(saved["step"], 4)
    self.assertEqual(saved["split"], "test")
    self.assertEqual(saved["num_query"], 12)
    self.assertEqual(saved["num_gallery"], 23)
    self.assertEqual(saved["flare"]["num_query"] + saved["clean"]["num_query"],
                     saved["num_query"])
    self.assertBetween(saved["mAP"], 0.0, 1.0)
    self.assertTrue(os.path.isdir(os.path.join(self.workdir, "checkpoints",
                                               "4")))
    with open(os.path.join(self.workdir, "run_info.json")) as f:
      env = json.load(f)["environment"]
    self.assertEqual(env["packages"]["jax"], jax.__version__)
    self.assertEqual(env["backend"], "cpu")

  def test_console_shows_header_progress_and_results(self):
    out = self.console
    lines = out.splitlines()
    self.assertNotIn("\r", out)
    self.assertLess(len(lines), 40, out)
    self.assertTrue(lines[0].startswith("Preparing synthetic_flare/tiny") or
                    lines[0].startswith("data "), out)
    header = [l for l in lines if l.startswith(("data ", "model ", "run ",
                                                "workdir "))]
    self.assertLen(header, 4, out)
    self.assertIn(f"{_TINY.num_train_ids} ids; evaluation on query vs "
                  "gallery", out)
    self.assertIn("4 steps of 8 (4 ids x 2), from scratch", out)
    progress = [l for l in lines if l.startswith("train ")]
    self.assertEqual([l.split()[1] for l in progress],
                     ["1/4", "2/4", "3/4", "4/4"])
    self.assertIn("loss ", progress[-1])
    self.assertIn("took ", progress[-1])
    self.assertRegex(out, r"embed query \(\d+\) \d+/\d+ \(100%\)")
    self.assertRegex(out, r"\n +all +\d+ +\d+\.\d")  # The results table.
    # Library chatter stays out of the console.
    self.assertNotIn("INFO", out)
    self.assertNotIn("Orbax", out)
    with open(os.path.join(self.workdir, console.PARAMETERS_FILE)) as f:
      self.assertIn("rgb_backbone/conv1/kernel", f.read())

  def test_resume_after_interruption(self):
    # The "killed" run: everything up to its step-2 checkpoint.
    resumed = os.path.join(self.root, "resumed")
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(self.workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    os.remove(os.path.join(resumed, "eval_results.json"))
    results = loop.train_and_evaluate(_config(self.data_dir), resumed)
    jax.tree.map(np.testing.assert_array_equal, _params(self.workdir, 4),
                 _params(resumed, 4))
    self.assertEqual(results["mAP"], self.results["mAP"])
    self.assertEqual(results["rank1"], self.results["rank1"])

  def test_eval_mode_reproduces_metrics(self):
    results = evaluate.evaluate_checkpoint(_config(self.data_dir), self.workdir)
    for key in ("mAP", "rank1", "rank5", "mINP"):
      self.assertAlmostEqual(results[key], self.results[key], places=6)

  def test_val_split_is_evaluated_beside_the_test_split(self):
    test_path = os.path.join(self.workdir, "eval_results.json")
    with open(test_path) as f:
      test_results = f.read()
    config = _config(self.data_dir)
    config.eval.split = "val"
    results = evaluate.evaluate_checkpoint(config, self.workdir)
    with open(os.path.join(self.workdir, "eval_results_val.json")) as f:
      saved = json.load(f)
    self.assertEqual(saved["split"], "val")
    self.assertEqual(saved["step"], 4)
    self.assertEqual(saved["mAP"], results["mAP"])
    self.assertEqual(saved["num_query"],
                     _TINY.num_val_ids * _TINY.query_cameras)
    self.assertEqual(saved["num_gallery"],
                     len(synthetic_flare.plan_split(_TINY, "val_gallery")))
    with open(test_path) as f:
      self.assertEqual(f.read(), test_results)

  def test_val_split_carved_from_train(self):
    config = _config(self.data_dir)
    config.val_ids = 3
    parts = {s: feed.split_data(config, s)
             for s in ("train", "val_query", "val_gallery")}
    held = set(parts["val_query"].pid.tolist())
    self.assertLen(held, 3)
    self.assertEqual(parts["train"].num_ids, _TINY.num_train_ids - 3)
    self.assertTrue(all(p < _TINY.num_train_ids for p in held))
    self.assertEqual(set(parts["val_gallery"].pid.tolist()), held)
    # The mask scoring of the val split sees the same held-out images.
    masks = mask_quality.load_eval_split_with_masks(
        "synthetic_flare", "val", "tiny", self.data_dir, val_ids=3)
    self.assertEqual(set(masks["pid"].tolist()), held)
    self.assertLen(masks["pid"], parts["val_query"].num_examples
                   + parts["val_gallery"].num_examples)
    own = mask_quality.load_eval_split_with_masks("synthetic_flare", "val",
                                                  "tiny", self.data_dir)
    self.assertTrue(np.all(own["pid"] >= synthetic_flare.VAL_PID_OFFSET))
    # The held-out ids change the training data: not for a trained run.
    config.eval.split = "val"
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "val_ids"):
      evaluate.evaluate_checkpoint(config, self.workdir)

  def test_changed_config_is_refused(self):
    config = _config(self.data_dir)
    config.model.use_fmi = False
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "model.use_fmi"):
      loop.train_and_evaluate(config, self.workdir)

  def test_eval_with_other_config_is_refused(self):
    config = _config(self.data_dir)
    config.model.embedding = "after_bn"
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "model.embedding"):
      evaluate.evaluate_checkpoint(config, self.workdir)

  def test_checkpoint_shape_mismatch_is_reported(self):
    # A run directory whose config.json says fmi_width=16 but whose
    # checkpoints hold the full-width FMI.
    other = os.path.join(self.root, "mismatch")
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(self.workdir, other)
    config = _config(self.data_dir)
    config.model.fmi_width = 16
    with open(os.path.join(other, checkpointing.CONFIG_FILE), "w") as f:
      json.dump(checkpointing.config_to_dict(config), f)
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "does not match the model"):
      train_state.restore_for_eval(config, other)

  def test_embedder_matches_evaluation(self):
    embedder = inference.Embedder.from_workdir(self.workdir)
    config = checkpointing.load_config(self.workdir)
    model, state, sharding = train_state.restore_for_eval(config, self.workdir)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    expected = extract.extract(config, model, variables, "query", sharding)
    ds = tfds.load("synthetic_flare/tiny", split="query",
                   data_dir=self.data_dir)
    raw = list(tfds.as_numpy(ds))
    emb = embedder(np.stack([r["rgb"] for r in raw]),
                   np.stack([r["ni"] for r in raw]),
                   np.stack([r["ti"] for r in raw]))
    self.assertEqual(emb.shape, expected["embedding"].shape)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb, expected["embedding"], atol=1e-4)
    single = embedder(raw[0]["rgb"], raw[0]["ni"], raw[0]["ti"])
    np.testing.assert_allclose(single[0], emb[0], atol=1e-5)
    with self.assertRaisesRegex(ValueError, "uint8"):
      embedder(raw[0]["rgb"].astype(np.float32), raw[0]["ni"], raw[0]["ti"])

  def test_evaluation_on_eight_devices_matches_one(self):
    # Runs in a test process use one device (tests/conftest.py); here the
    # evaluation is sharded over 8, its batch of 12 rounded up to 16 and the
    # last one padded.
    config = checkpointing.load_config(self.workdir)
    config.eval_batch_size = 12
    model, state, one = train_state.restore_for_eval(config, self.workdir)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    expected = extract.extract(config, model, variables, "query", one)
    eight = mesh.Sharding.create(jax.devices()[:8])
    self.assertGreater(len(expected["index"]) % 16, 0)
    got = extract.extract(config, model,
                          jax.device_put(variables, eight.replicated),
                          "query", eight)
    self.assertEqual(sorted(got), sorted(expected))
    for key, value in expected.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5,
                                 err_msg=key)

  def test_mask_scores_of_the_run(self):
    config = checkpointing.load_config(self.workdir)
    data = mask_quality.load_with_masks("synthetic_flare", "query", "tiny",
                                        self.data_dir)
    scores = mask_quality.score_run(config, self.workdir, data, batch_size=8)
    n = len(data["pid"])
    for m in ("rgb", "ni"):
      # 64x32 inputs, stage 4 at stride 16 (last stride 1): a 4x2 map.
      self.assertEqual(scores["masks"][m].shape, (n, 4, 2))
      self.assertEqual(scores["gt"][m].shape, (n, 4, 2))
      self.assertEqual(scores[m]["num_flare"],
                       int(scores["gt"][m].any(axis=(1, 2)).sum()))
      for key in ("iou", "coverage_flare", "coverage_clean"):
        self.assertBetween(scores[m][key], 0.0, 1.0)
    # Batched, padded prediction = the model on one example alone.
    model, state, _ = train_state.restore_for_eval(config, self.workdir)
    images = inference.preprocess(
        {k: data[k][-1:] for k in ("rgb", "ni", "ti")}, config)
    flare = (data["flare_ratio"][-1:] > config.flare.ratio_threshold).astype(
        np.float32)
    alone = model.apply({"params": state.params,
                         "batch_stats": state.batch_stats}, images, flare,
                        train=False, flare_ratio=data["flare_ratio"][-1:]
                        ).masks
    np.testing.assert_allclose(scores["masks"]["rgb"][-1],
                               np.asarray(alone["rgb"][0]).mean(axis=-1),
                               atol=1e-6)

  def test_clahe_reaches_training_and_inference_alike(self):
    config = _config(self.data_dir)
    config.preprocess.clahe = True
    data = feed.split_data(config, "query")
    plain = feed.split_data(_config(self.data_dir), "query")
    self.assertNotEqual(data.rgb[0], plain.rgb[0])
    self.assertEqual(data.ti[0], plain.ti[0])
    mean, std = feed.normalization(config)
    batch = next(pipeline.eval_batches(
        data, batch_size=4, input_size=config.input_size, mean=mean, std=std,
        flare_threshold=config.flare.ratio_threshold))
    ds = tfds.load("synthetic_flare/tiny", split="query",
                   data_dir=self.data_dir)
    raw = list(tfds.as_numpy(ds.take(4)))
    images = inference.preprocess(
        {m: np.stack([r[m] for r in raw]) for m in ("rgb", "ni", "ti")},
        config)
    for m in ("rgb", "ni", "ti"):
      np.testing.assert_allclose(images[m], batch[m], atol=1e-5)


if __name__ == "__main__":
  absltest.main()
