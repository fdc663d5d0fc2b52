"""Warm start (`model.init_from`): copying, its errors, and resume.

The sources are tiny checkpoints written with `checkpointing.Checkpointer`
once per module (no data, no training): a FACENet run at steps 2 and 5, a
baseline run (MFMP, FCE and the modality loss off) and a wider one. States
are the models' abstract trees (`jax.eval_shape`, no compile) filled with
seeded noise, batch statistics included, so a copied leaf cannot equal the
new run's own values by chance. One real 1-step `train_and_evaluate` run,
warm-started from the baseline and then resumed, covers the trainer's wiring.
"""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import pytest
import flax
import jax
import numpy as np

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import warm_start
from facenet_jax.train import loop
from facenet_jax.train import train_state
import input_pipeline.datasets  # noqa: F401  (registers synthetic_flare)

# Trains runs, starts scripts or compiles the tiny model: left out of the
# quick loop (-m "not slow").
pytestmark = pytest.mark.slow

STREAMS = ("rgb_backbone", "ni_backbone", "ti_backbone")
HEADS = ("rgb_head", "ni_head", "ti_head")
FACENET_ONLY = ("fmi", "rgb_mask", "ni_mask")
NUM_CLASSES = 4
_SOURCES = {}


def _baseline(config):
  config.model.use_mfmp = False
  config.model.use_fce = False
  config.loss.modality = "none"
  return config


def _init(config, seed: int, num_classes: int = NUM_CLASSES):
  """(optimizer, host TrainState of `config`'s model holding seeded noise).

  Small enough values to train on: weights ~ N(0, 0.05), BatchNorm scales
  and variances around 1.
  """
  _, optimizer, abstract = train_state.abstract_state(config, num_classes,
                                                steps_per_epoch=10)
  rng = np.random.default_rng(seed)

  def noise(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    offset = 1.0 if name.endswith(("scale", "var")) else 0.0
    return (offset + rng.normal(0.0, 0.05, leaf.shape)).astype(leaf.dtype)

  params = jax.tree_util.tree_map_with_path(noise, abstract.params)
  return optimizer, train_state.TrainState(
      step=np.zeros((), np.int32), params=params,
      batch_stats=jax.tree_util.tree_map_with_path(noise,
                                                   abstract.batch_stats),
      opt_state=optimizer.init(params))


def _save(workdir: str, states: dict) -> None:
  ckpt = checkpointing.Checkpointer(workdir)
  for step, state in states.items():
    ckpt.save(step, state)
  ckpt.close()


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _module_leaves(state, modules) -> dict:
  return {f"{c}/{k}": v for c in ("params", "batch_stats")
          for k, v in _flat(getattr(state, c)).items()
          if k.split("/")[0] in modules}


def setUpModule():
  root = tempfile.mkdtemp(prefix="warm_start_")
  _SOURCES["facenet"] = os.path.join(root, "facenet")
  _SOURCES["facenet_states"] = {step: _init(tiny.get_config(), seed=step)[1]
                                for step in (2, 5)}
  _save(_SOURCES["facenet"], _SOURCES["facenet_states"])

  _SOURCES["baseline"] = os.path.join(root, "baseline")
  _SOURCES["baseline_state"] = _init(_baseline(tiny.get_config()), seed=3)[1]
  _save(_SOURCES["baseline"], {3: _SOURCES["baseline_state"]})

  wide_config = tiny.get_config()
  wide_config.model.width_multiplier = 0.25
  _SOURCES["wide"] = os.path.join(root, "wide")
  _save(_SOURCES["wide"], {1: _init(wide_config, seed=1)[1]})

  _SOURCES["foreign"] = os.path.join(root, "foreign")
  _save(_SOURCES["foreign"], {1: {
      "params": {"encoder": {"kernel": np.ones((3, 4), np.float32)}},
      "batch_stats": {"encoder": {"mean": np.zeros(4, np.float32)}}}})
  _SOURCES["weights_only"] = os.path.join(root, "weights_only")
  _save(_SOURCES["weights_only"], {1: {"weights": np.ones(3, np.float32)}})
  _SOURCES["empty"] = os.path.join(root, "empty")
  os.makedirs(os.path.join(_SOURCES["empty"], "checkpoints"))
  _SOURCES["root"] = root


def tearDownModule():
  shutil.rmtree(_SOURCES["root"], ignore_errors=True)


class WarmStartTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.optimizer, cls.fresh = _init(tiny.get_config(), seed=0)

  def _warm(self, init_from: str):
    return train_state.load_init_from(self.fresh, init_from, self.optimizer)

  def test_same_model_copies_everything_from_the_latest_step(self):
    with self.assertLogs(level="INFO") as logs:
      state = self._warm(_SOURCES["facenet"])
    source = _SOURCES["facenet_states"][5]
    jax.tree.map(np.testing.assert_array_equal, state.params, source.params)
    jax.tree.map(np.testing.assert_array_equal, state.batch_stats,
                 source.batch_stats)
    # A fresh optimizer state and step, not the source's.
    self.assertEqual(int(state.step), 0)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state,
                 self.optimizer.init(state.params))
    summary = next(line for line in logs.output if "Warm start from" in line)
    self.assertIn("step 5", summary)
    self.assertRegex(summary, r"copied (\d+) of \1 leaves")
    self.assertNotIn("kept", summary)

  def test_step_selects_the_checkpoint(self):
    state = self._warm(f"{_SOURCES['facenet']}:2")
    jax.tree.map(np.testing.assert_array_equal, state.params,
                 _SOURCES["facenet_states"][2].params)

  def test_facenet_from_baseline_copies_streams_and_heads_only(self):
    with self.assertLogs(level="INFO") as logs:
      state = self._warm(_SOURCES["baseline"])
    source = _SOURCES["baseline_state"]
    copied = _module_leaves(state, STREAMS + HEADS)
    self.assertLen(copied, len(_module_leaves(source, STREAMS + HEADS)))
    jax.tree.map(np.testing.assert_array_equal, copied,
                 _module_leaves(source, STREAMS + HEADS))
    # The FMI and mask modules the baseline lacks keep the new run's init.
    kept = _module_leaves(state, FACENET_ONLY)
    self.assertNotEmpty(kept)
    jax.tree.map(np.testing.assert_array_equal, kept,
                 _module_leaves(self.fresh, FACENET_ONLY))
    summary = next(line for line in logs.output if "Warm start from" in line)
    for module in FACENET_ONLY:
      self.assertIn(f"{module}: ", summary)

  def test_report_lists_kept_leaves_per_module(self):
    variables = {"params": self.fresh.params,
                 "batch_stats": self.fresh.batch_stats}
    source = {"params": _SOURCES["baseline_state"].params,
              "batch_stats": _SOURCES["baseline_state"].batch_stats}
    _, report = warm_start.copy_matching(variables, source, exact=STREAMS)
    self.assertContainsSubset(FACENET_ONLY, report.kept_by_module())
    self.assertNoCommonElements(STREAMS + HEADS, report.kept_by_module())
    self.assertEmpty(report.shape_mismatches)
    self.assertEmpty(report.unused)
    self.assertLess(report.num_copied_params, report.num_params)

  def test_other_classifier_shape_is_kept_and_logged(self):
    optimizer, fresh = _init(_baseline(tiny.get_config()), seed=0,
                             num_classes=NUM_CLASSES + 3)
    with self.assertLogs(level="INFO") as logs:
      state = train_state.load_init_from(fresh, _SOURCES["baseline"], optimizer)
    np.testing.assert_array_equal(
        state.params["rgb_head"]["classifier"]["kernel"],
        fresh.params["rgb_head"]["classifier"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, state.params["rgb_backbone"],
                 _SOURCES["baseline_state"].params["rgb_backbone"])
    self.assertTrue(any("params/rgb_head/classifier/kernel" in line
                        for line in logs.output), logs.output)

  def test_malformed_values(self):
    self.assertEqual(train_state.parse_init_from("/runs/base"), ("/runs/base", None))
    self.assertEqual(train_state.parse_init_from("/runs/base:40"), ("/runs/base", 40))
    self.assertEqual(train_state.parse_init_from("gs://bucket/base"),
                     ("gs://bucket/base", None))
    for value in (":3", "/runs/base:", "/runs/base:last", "/runs/base:-1"):
      with self.subTest(value=value):
        with self.assertRaisesRegex(ValueError, "model.init_from"):
          train_state.parse_init_from(value)

  def test_no_checkpoints(self):
    missing = os.path.join(_SOURCES["root"], "missing")
    for workdir in (_SOURCES["empty"], missing):
      with self.subTest(workdir=workdir):
        with self.assertRaisesRegex(
            warm_start.WarmStartError,
            f"model.init_from='{workdir}'.*No checkpoints in {workdir}"):
          self._warm(workdir)

  def test_missing_step_lists_the_available_ones(self):
    with self.assertRaisesRegex(warm_start.WarmStartError,
                                r"step 3 .*available steps: \[2, 5\]"):
      self._warm(f"{_SOURCES['facenet']}:3")

  def test_streams_of_another_width_are_refused(self):
    with self.assertRaisesRegex(warm_start.WarmStartError,
                                "model.init_from=.*must match") as raised:
      self._warm(_SOURCES["wide"])
    message = str(raised.exception)
    for stream in STREAMS:
      self.assertIn(f"params/{stream}/conv1/kernel: (7, 7, 3, 8) vs "
                    "(7, 7, 3, 16)", message)

  def test_streams_of_another_depth_are_refused(self):
    # A deeper source has blocks the model lacks; a shallower one lacks some.
    variables = {"params": self.fresh.params,
                 "batch_stats": self.fresh.batch_stats}
    deeper = jax.tree.map(lambda x: x, variables)
    deeper["params"]["rgb_backbone"]["layer1"]["1"] = (
        variables["params"]["rgb_backbone"]["layer1"]["0"])
    with self.assertRaisesRegex(
        warm_start.WarmStartError,
        r"rgb_backbone:\n    only in the source \(\d+\):\n"
        "      params/rgb_backbone/layer1/1/"):
      warm_start.copy_matching(variables, deeper, exact=STREAMS)
    shallower = jax.tree.map(lambda x: x, variables)
    del shallower["batch_stats"]["ni_backbone"]["layer4"]
    with self.assertRaisesRegex(
        warm_start.WarmStartError,
        r"ni_backbone:\n    missing in the source \(\d+\):\n"
        "      batch_stats/ni_backbone/layer4/"):
      warm_start.copy_matching(variables, shallower, exact=STREAMS)

  def test_nothing_matching_is_refused(self):
    with self.assertRaisesRegex(warm_start.WarmStartError,
                                "model.init_from=.*No variable of the source"):
      self._warm(_SOURCES["foreign"])

  def test_not_a_training_checkpoint(self):
    with self.assertRaisesRegex(warm_start.WarmStartError,
                                "model.init_from=.*not a training checkpoint"):
      self._warm(_SOURCES["weights_only"])

  def test_exclusive_with_pretrained(self):
    config = tiny.get_config()
    config.model.init_from = _SOURCES["baseline"]
    config.model.pretrained = "/weights/resnet18.safetensors"
    with self.assertRaisesRegex(ValueError, "model.init_from=.*exclusive"):
      loop.train_and_evaluate(config, tempfile.mkdtemp())

  def test_config_json_before_init_from_reads_as_off(self):
    workdir = tempfile.mkdtemp()
    config = tiny.get_config()
    saved = checkpointing.config_to_dict(config)
    del saved["model"]["init_from"]
    with open(os.path.join(workdir, checkpointing.CONFIG_FILE), "w") as f:
      json.dump(saved, f)
    checkpointing.check_config(workdir, config, has_state=True, write=False)
    self.assertEqual(checkpointing.load_config(workdir).model.init_from, "")


class WarmStartedRunTest(absltest.TestCase):
  """A FACENet run warm-started from the baseline by train_and_evaluate."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = absltest.get_default_test_tmpdir()
    # A copy of the source that test_resume_ignores_init_from may delete.
    cls.source = os.path.join(_SOURCES["root"], "run_source")
    shutil.copytree(_SOURCES["baseline"], cls.source)
    cls.workdir = os.path.join(_SOURCES["root"], "warm_run")
    cls.config = tiny.get_config()
    cls.config.data_dir = os.path.join(root, "tfds")
    cls.config.model.init_from = cls.source
    # Two steps, each saved: the resume test below removes step 2 and runs
    # the same config again (the same programs, compiled once).
    cls.config.num_train_steps = 2
    cls.config.checkpoint_every_steps = 1
    loop.train_and_evaluate(cls.config, cls.workdir)

  def test_first_step_starts_from_the_source(self):
    _, state, _ = train_state.restore_for_eval(self.config, self.workdir, step=1)
    source = _SOURCES["baseline_state"].params
    for stream in STREAMS:
      after = _flat(jax.device_get(state.params[stream]))
      # One Adam step moves a parameter by about the learning rate (3.5e-4);
      # the source's values are noise of scale 0.05 no init reproduces.
      for name, value in _flat(source[stream]).items():
        np.testing.assert_allclose(after[name], value, rtol=0, atol=2e-3,
                                   err_msg=f"{stream}/{name}")

  def test_resume_ignores_init_from(self):
    # The source is gone by the time the run resumes: it must not be read.
    shutil.rmtree(self.source)
    shutil.rmtree(os.path.join(self.workdir, "checkpoints", "2"))
    with self.assertLogs(level="INFO") as logs:
      results = loop.train_and_evaluate(self.config, self.workdir)
    self.assertEqual(results["step"], 2)
    self.assertTrue(any("Resumed from step 1" in line for line in logs.output))
    self.assertFalse(any("Warm start" in line for line in logs.output))


if __name__ == "__main__":
  absltest.main()
