"""Trainer pieces: data-parallel equivalence, schedules, config mapping."""

import errno
import functools
import json
import os
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import pytest
import jax
import numpy as np
import optax

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import console as console_lib
from facenet_jax.train import build
from facenet_jax.train import extract
from facenet_jax.train import feed
from facenet_jax.train import loop
from facenet_jax.train import mesh
from facenet_jax.train import steps
from facenet_jax.train import train_state
from facenet_jax.constants import MODALITIES
from input_pipeline import generated
from input_pipeline import pipeline


def _batch(rng: np.random.Generator, config) -> dict:
  """A P x K batch of random images with labels and flare pseudo-labels."""
  p, k = config.ids_per_batch, config.instances_per_id
  h, w = config.input_size
  batch = {m: rng.normal(size=(p * k, h, w, 3)).astype(np.float32)
           for m in MODALITIES}
  batch["label"] = np.repeat(np.arange(p), k).astype(np.int32)
  batch["flare"] = rng.integers(0, 2, size=(p * k, 2)).astype(np.float32)
  # The saturated fractions the pseudo-labels come from (the fusion reads them).
  batch["flare_ratio"] = (batch["flare"] * rng.uniform(0.1, 0.6, (p * k, 2))
                         ).astype(np.float32)
  # The pixel-level flare target (loss.flare_pixel_weight) of RGB and NI.
  batch["saturation"] = (rng.random((p * k, h, w, 2)) < 0.2).astype(np.float32)
  return batch


class LossConfigTest(absltest.TestCase):

  def test_incompatible_flare_options_are_refused(self):
    config = tiny.get_config()
    config.preprocess.clahe = True
    with self.assertRaisesRegex(ValueError, "preprocess.clahe"):
      build.loss_config(config)
    config.loss.flare_pixel_weight = 0.0
    build.loss_config(config)
    config.model.fce_projection = False
    with self.assertRaisesRegex(ValueError, "fce_projection"):
      build.loss_config(config)
    config.loss.fce_consistency_weight = 0.0
    self.assertEqual(build.loss_config(config).flare_pixel_weight, 0.0)


@pytest.mark.slow
class DataParallelTest(absltest.TestCase):

  def test_eight_devices_match_one(self):
    self.assertGreaterEqual(jax.device_count(), 8)
    config = tiny.get_config()
    config.ids_per_batch, config.instances_per_id = 4, 2
    model = build.build_model(config, num_classes=4)
    schedule = build.learning_rate_schedule(config, steps_per_epoch=10)
    # Plain SGD with a small step: Adam divides by sqrt(v), which turns float32
    # rounding noise in near-zero gradients into +-lr parameter differences,
    # and a large SGD step makes step 2 chaotic (ReLU/max-pool/hardest-triplet
    # choices flip). Either would hide the gradient comparison tested here.
    optimizer = optax.sgd(1e-3)
    init = functools.partial(train_state.create_state, model, optimizer,
                             tuple(config.input_size))
    rng = np.random.default_rng(0)
    batches = [_batch(rng, config) for _ in range(2)]

    results = {}
    for n in (1, 8):
      sharding = mesh.Sharding.create(jax.devices()[:n])
      state = jax.jit(init, out_shardings=sharding.replicated)(
          jax.random.key(0))
      step = steps.compile_train_step(model, optimizer,
                                      build.loss_config(config), schedule,
                                      sharding)
      losses = []
      for local in batches:
        state, metrics = step(state, sharding.global_batch(local))
        losses.append(float(metrics["train/loss"]))
      self.assertEqual(len(state.params["rgb_backbone"]["conv1"]["kernel"]
                           .sharding.device_set), n)
      results[n] = (losses, jax.device_get(state.params),
                    jax.device_get(state.batch_stats))

    # Summation order differs across devices: float32 rounding only.
    np.testing.assert_allclose(results[1][0], results[8][0], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=2e-6),
                 results[1][1], results[8][1])
    # BatchNorm statistics are global-batch statistics on 8 devices too.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-5),
                 results[1][2], results[8][2])
    self.assertTrue(np.all(np.isfinite(results[8][0])))


class ScheduleTest(absltest.TestCase):

  def test_piecewise_paper_epochs(self):
    config = tiny.get_config()
    config.num_train_steps = -1
    config.num_epochs = 120
    schedule = build.learning_rate_schedule(config, steps_per_epoch=10)
    lr = config.optimizer.learning_rate
    self.assertAlmostEqual(float(schedule(399)), lr)
    self.assertAlmostEqual(float(schedule(401)), lr * 0.1, places=9)
    self.assertAlmostEqual(float(schedule(701)), lr * 0.01, places=10)

  def test_short_run_scales_decay_points(self):
    config = tiny.get_config()
    config.num_train_steps = 120
    config.num_epochs = 120
    schedule = build.learning_rate_schedule(config, steps_per_epoch=50)
    lr = config.optimizer.learning_rate
    self.assertAlmostEqual(float(schedule(39)), lr)
    self.assertAlmostEqual(float(schedule(41)), lr * 0.1, places=9)

  def test_cosine_warmup(self):
    config = tiny.get_config()
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_epochs = 1
    config.num_train_steps = 100
    config.num_epochs = 10
    schedule = build.learning_rate_schedule(config, steps_per_epoch=10)
    self.assertLess(float(schedule(0)), 1e-9)
    self.assertGreater(float(schedule(10)), float(schedule(90)))

  def test_bad_schedule_name(self):
    config = tiny.get_config()
    config.optimizer.schedule = "linear"
    with self.assertRaisesRegex(ValueError, "optimizer.schedule"):
      build.learning_rate_schedule(config, steps_per_epoch=10)


class NonFiniteTest(absltest.TestCase):

  def test_nan_loss_stops_with_message(self):
    writer = _ListWriter()
    loop._write_metrics(writer, 10, [{"train/loss": np.float32(2.0)}])
    self.assertEqual(writer.rows, [(10, {"train/loss": 2.0})])
    with self.assertRaisesRegex(loop.NonFiniteLossError,
                                "non-finite by step 20"):
      loop._write_metrics(writer, 20, [{"train/loss": np.float32(1.0)},
                                        {"train/loss": np.float32(np.nan)}])
    self.assertLen(writer.rows, 1)  # Nothing written for the bad interval.

  def test_non_finite_parameters_are_not_saved(self):
    state = train_state.TrainState(step=np.int32(5),
                             params={"w": np.array([1.0, np.inf])},
                             batch_stats={}, opt_state=())
    with self.assertRaisesRegex(loop.NonFiniteLossError,
                                "last good checkpoint \\(step 4\\)"):
      loop._check_finite(state, 5, 4, "/tmp/ckpt")
    loop._check_finite(state.replace(params={"w": np.ones(2)}), 5, 4,
                        "/tmp/ckpt")


class _ListWriter:

  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows.append((step, scalars))


class ConfigMappingTest(absltest.TestCase):

  def test_backbone_names(self):
    self.assertEqual(build.parse_depth("resnet101"), 101)
    with self.assertRaisesRegex(ValueError, "model.backbone"):
      build.parse_depth("vit_base")

  def test_unknown_loss_field(self):
    config = tiny.get_config()
    config.loss.tripplet_weight = 1.0
    with self.assertRaisesRegex(ValueError, "tripplet_weight"):
      build.loss_config(config)

  def test_weight_decay_only_on_kernels(self):
    config = tiny.get_config()
    optimizer = build.build_optimizer(
        config, build.learning_rate_schedule(config, 10))
    params = {"kernel": np.ones((2, 2), np.float32),
              "scale": np.ones((2,), np.float32),
              "threshold": np.ones((), np.float32)}
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    self.assertTrue(np.all(np.asarray(updates["kernel"]) < 0))
    np.testing.assert_array_equal(updates["scale"], 0.0)
    np.testing.assert_array_equal(updates["threshold"], 0.0)


def _older_run(config, edit) -> str:
  """A workdir whose config.json is `config` as `edit` trims it in place."""
  workdir = tempfile.mkdtemp()
  saved = checkpointing.config_to_dict(config)
  edit(saved)
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE), "w") as f:
    json.dump(saved, f)
  return workdir


class EnvironmentRecordTest(absltest.TestCase):

  def test_first_start_records_and_a_changed_resume_is_appended(self):
    workdir = tempfile.mkdtemp()
    fields = checkpointing.record_environment(workdir, has_state=False)
    self.assertEqual(set(fields), {"environment"})
    env = fields["environment"]
    self.assertEqual(env["packages"]["jax"], jax.__version__)
    self.assertEqual(env["backend"], jax.default_backend())
    self.assertEqual(env["device_count"], jax.device_count())
    checkpointing.write_run_info(workdir, num_classes=3, **fields)
    self.assertFalse(os.path.exists(os.path.join(
        workdir, checkpointing.RUN_INFO_FILE + ".tmp")))
    # The same environment again: nothing appended, nothing logged.
    with self.assertNoLogs(level="WARNING"):
      self.assertEqual(
          checkpointing.record_environment(workdir, has_state=True), fields)
    # A run started under other versions keeps its first record.
    older = json.loads(json.dumps(env))
    older["packages"]["jax"] = "0.0.1"
    checkpointing.write_run_info(workdir, num_classes=3, environment=older)
    with self.assertLogs(level="WARNING") as logs:
      resumed = checkpointing.record_environment(workdir, has_state=True)
    self.assertIn("packages changed", logs.output[0])
    self.assertEqual(resumed["environment"], older)
    self.assertEqual(resumed["resumed_environments"], [env])
    checkpointing.write_run_info(workdir, num_classes=3, **resumed)
    self.assertEqual(
        checkpointing.record_environment(workdir, has_state=True), resumed)
    # With no checkpoint yet, a restart is a new start: recorded afresh.
    self.assertEqual(
        checkpointing.record_environment(workdir, has_state=False),
        {"environment": env})

  def test_resumed_run_without_a_record_has_an_unknown_start(self):
    workdir = tempfile.mkdtemp()
    # Written before the record existed ...
    checkpointing.write_run_info(workdir, num_classes=3)
    fields = checkpointing.record_environment(workdir, has_state=True)
    self.assertIsNone(fields["environment"])
    self.assertEqual(fields["resumed_environments"],
                     [checkpointing.environment()])
    # ... or cut short by an interrupted write of an older version.
    with open(os.path.join(workdir, checkpointing.RUN_INFO_FILE), "w") as f:
      f.write('{"num_classes": ')
    self.assertIsNone(checkpointing.record_environment(
        workdir, has_state=True)["environment"])


class OlderRunDirectoryTest(absltest.TestCase):

  def test_config_json_without_later_fields_still_matches(self):
    config = tiny.get_config()
    # Written before CLAHE existed.
    workdir = _older_run(config, lambda saved: saved.pop("preprocess"))
    checkpointing.check_config(workdir, config, has_state=True, write=False)
    self.assertFalse(checkpointing.load_config(workdir).preprocess.clahe)
    config.preprocess.clahe = True
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "preprocess.clahe"):
      checkpointing.check_config(workdir, config, has_state=True, write=False)

  def test_config_json_without_val_fields_reads_as_test_and_no_val_ids(self):
    config = tiny.get_config()

    def before_validation_splits(saved):
      del saved["val_ids"], saved["eval"]["split"]

    workdir = _older_run(config, before_validation_splits)
    loaded = checkpointing.load_config(workdir)
    self.assertEqual(loaded.val_ids, 0)
    self.assertEqual(loaded.eval.split, "test")
    self.assertEqual(loaded.eval.max_rank, config.eval.max_rank)
    checkpointing.check_config(workdir, config, has_state=True, write=False)
    # The evaluation split may differ between a run and its restore ...
    config.eval.split = "val"
    checkpointing.check_config(workdir, config, has_state=True, write=False)
    # ... the held-out identities may not: they change the training data.
    config.val_ids = 3
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "val_ids: saved 0, now 3"):
      checkpointing.check_config(workdir, config, has_state=True, write=False)

  def test_config_json_before_the_mask_rework_reads_as_its_first_reading(self):
    config = tiny.get_config()
    fields = ("smp", "smp_topk_fraction", "mask_detach", "fce_projection",
              "fce_clean", "fce_mask_gradient")

    def before_mask_rework(saved):
      for name in fields:
        del saved["model"][name]
      del saved["loss"]["flare_pixel_weight"]
      del saved["loss"]["fce_consistency_weight"]

    loaded = checkpointing.load_config(_older_run(config, before_mask_rework))
    self.assertEqual(loaded.model.smp, "head")
    self.assertFalse(loaded.model.mask_detach or loaded.model.fce_projection)
    self.assertEqual(loaded.model.fce_clean, "enhanced")
    self.assertTrue(loaded.model.fce_mask_gradient)
    self.assertEqual(loaded.loss.flare_pixel_weight, 0.0)
    self.assertEqual(loaded.loss.fce_consistency_weight, 0.0)
    self.assertEqual(loaded.model.backbone, config.model.backbone)

  def test_dotted_ignore_covers_one_field(self):
    workdir = tempfile.mkdtemp()
    config = tiny.get_config()
    checkpointing.check_config(workdir, config, has_state=False)
    config.eval.split = "val"
    checkpointing.check_config(workdir, config, has_state=True, write=False,
                               ignore=("eval.split",))
    config.eval.rerank = True
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "eval.rerank"):
      checkpointing.check_config(workdir, config, has_state=True, write=False,
                                 ignore=("eval.split",))


class EvalSplitConfigTest(absltest.TestCase):

  def test_split_names_and_file_names(self):
    config = tiny.get_config()
    self.assertEqual(feed.eval_splits(config), ("query", "gallery"))
    config.eval.split = "val"
    self.assertEqual(feed.eval_splits(config), ("val_query", "val_gallery"))
    self.assertEqual(checkpointing.split_file("eval_results.json", "test"),
                     "eval_results.json")
    self.assertEqual(checkpointing.split_file("eval_results.json", "val"),
                     "eval_results_val.json")

  def test_bad_values_name_the_field(self):
    config = tiny.get_config()
    config.eval.split = "dev"
    with self.assertRaisesRegex(ValueError,
                                "config.eval.split must be one of.*'dev'"):
      feed.eval_splits(config)
    for bad in (-1, True):
      config = tiny.get_config()
      config.val_ids = bad
      with self.assertRaisesRegex(ValueError, "config.val_ids"):
        feed.val_ids(config)


class InputTest(absltest.TestCase):

  def test_device_prefetch_keeps_order_and_raises_where_it_failed(self):
    for size in (0, 1, 3):
      out = list(feed.device_prefetch(iter(range(7)), lambda x: 10 * x, size))
      self.assertEqual(out, [10 * x for x in range(7)])

    def failing():
      yield 1
      yield 2
      raise OSError("disk gone")
    for size in (0, 2):
      got = []
      with self.assertRaisesRegex(OSError, "disk gone"):
        for x in feed.device_prefetch(failing(), lambda x: x, size):
          got.append(x)
      self.assertEqual(got, [1, 2])

  def test_device_prefetch_stops_its_thread_when_abandoned(self):
    drawn = []

    def endless():
      i = 0
      while True:
        drawn.append(i)
        yield i
        i += 1
    batches = feed.device_prefetch(endless(), lambda x: x, 2)
    self.assertEqual([next(batches) for _ in range(3)], [0, 1, 2])
    batches.close()
    time.sleep(0.5)
    count = len(drawn)
    time.sleep(0.3)
    # At most the queue's size (+ the one in hand) ahead, then nothing more.
    self.assertLessEqual(count, 3 + 2 + 1)
    self.assertEqual(len(drawn), count)

  def test_input_threads(self):
    config = tiny.get_config()
    self.assertEqual(feed.input_threads(config), 1)  # The CPU backend.
    config.input.threads = 0
    self.assertEqual(feed.input_threads(config), 0)
    config.input.threads = 3
    self.assertEqual(feed.input_threads(config), 3)

  def test_a_batch_the_devices_do_not_divide_is_refused(self):
    config = tiny.get_config()
    config.ids_per_batch, config.instances_per_id = 3, 2
    feed.check_config(config, mesh.Sharding.create(jax.devices()[:2]))
    with self.assertRaisesRegex(
        ValueError, r"ids_per_batch x instances_per_id = 6 must be divisible "
        r"by the number of devices \(8\)"):
      feed.check_config(config, mesh.Sharding.create(jax.devices()[:8]))

  def test_bad_input_fields_are_named(self):
    for field, value in (("cache", "disk"), ("cache_max_gb", -1.0),
                         ("device_prefetch", -1), ("threads", -2)):
      config = tiny.get_config()
      config.input[field] = value
      with self.assertRaisesRegex(ValueError, f"config.input.{field}"):
        feed.check_config(config, mesh.Sharding.create())


class CheckpointWriteTest(absltest.TestCase):

  def test_a_full_disk_is_one_error_and_the_last_checkpoint_stays(self):
    workdir = tempfile.mkdtemp()
    ckpt = checkpointing.Checkpointer(workdir)
    state = {"w": np.arange(4, dtype=np.float32)}
    ckpt.save(1, state)
    ckpt.wait()
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch.object(ckpt._manager, "save", side_effect=full):  # pylint: disable=protected-access
      with self.assertRaises(checkpointing.CheckpointWriteError) as caught:
        ckpt.save(2, state)
    message = str(caught.exception)
    self.assertIn(f"step 2 to {ckpt.directory}", message)
    self.assertIn("No space left on device", message)
    self.assertIn("[1] are intact", message)
    self.assertEqual(caught.exception.errno, errno.ENOSPC)
    # The scripts show it as one line, a user error.
    self.assertIsInstance(caught.exception, console_lib.USER_ERRORS)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    np.testing.assert_array_equal(ckpt.restore(abstract)["w"], state["w"])
    self.assertEqual(ckpt.all_steps(), [1])
    ckpt.close()


class EmptySplitTest(absltest.TestCase):

  def test_an_empty_split_is_one_clear_error(self):
    config = tiny.get_config()
    config.val_ids = 1
    model = build.build_model(config, 4)
    data = generated.generated_split(2, 2, 32, 16)
    empty = pipeline.subset(data, np.zeros((0,), np.int64))
    with self.assertRaisesRegex(ValueError, "val_query split of "
                                "synthetic_flare has no triplets to embed; "
                                "config.val_ids=1 held out too few"):
      extract.extract(config, model, None, "val_query", None, data=empty)


if __name__ == "__main__":
  absltest.main()
