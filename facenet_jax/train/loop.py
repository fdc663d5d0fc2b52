"""The training loop: `train_and_evaluate`, read top to bottom.

The config is checked at the door by each module that reads it; then the
data, the model and its update step, the starting point (in one place, in
order: the run's own checkpoint, a warm start, ImageNet weights, scratch),
the loop with its periodic logs and checkpoints, and the evaluation of the
final state.
"""

import functools
import math
import os
import signal
import threading

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from facenet_jax import checkpointing
from facenet_jax import console as console_lib
from facenet_jax.train import build
from facenet_jax.train import evaluate
from facenet_jax.train import extract
from facenet_jax.train import feed
from facenet_jax.train import mesh
from facenet_jax.train import steps
from facenet_jax.train import train_state
from input_pipeline import pipeline


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


# The exit status of a run stopped by SIGTERM or SIGINT after saving its
# step (EX_TEMPFAIL: run the same command again to continue).
INTERRUPTED_STATUS = 75


class Interrupted(Exception):
  """SIGTERM or SIGINT stopped training after a checkpoint of this step."""

  def __init__(self, signal_name: str, step: int, directory: str):
    super().__init__(f"Stopped by {signal_name} at step {step}: saved "
                     f"{os.path.join(directory, str(step))}; run the same "
                     "command again to continue from it.")
    self.signal_name, self.step, self.directory = signal_name, step, directory


class _StopSignals:
  """Turns SIGTERM and SIGINT into a request the loop reads between steps.

  A scheduler's preemption (SIGTERM) or a Ctrl-C (SIGINT) does not kill the
  step or a save in progress: the loop finishes its step, saves it and
  raises Interrupted. Later signals while that happens are logged and
  otherwise ignored. The previous handlers come back on exit. Handlers can
  only be installed from the main thread; elsewhere nothing changes.
  """

  def __init__(self):
    self.name = None
    self._previous = {}

  def __enter__(self) -> "_StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.name is None:
      self.name = name
      logging.warning("%s received: saving the current step, then stopping.",
                      name)
    else:
      logging.warning("%s received again: still saving, then stopping.", name)

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _stop_requested(stop: _StopSignals, step: int, log_every: int) -> bool:
  """Whether every process stops after `step`.

  One process reads its own flag every step. Several agree at the log
  steps (one small all-gather there, not every step), so that all of them
  save the same step.
  """
  if jax.process_count() == 1:
    return stop.name is not None
  if step % log_every:
    return False
  flags = multihost_utils.process_allgather(np.int32(stop.name is not None))
  return bool(np.max(flags))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str,
    console: console_lib.Console = console_lib.SILENT) -> dict:
  """Trains (resuming from the workdir), then evaluates the final state.

  Args:
    config: the run configuration.
    workdir: where checkpoints, config.json, TensorBoard logs and
      the evaluation results go.
    console: where a person follows the run (header, progress, results);
      silent by default.

  Returns:
    The evaluation results on config.eval.split (also written to
    WORKDIR/eval_results.json for test, eval_results_val.json for val;
    evaluate.results_file names those of a config.eval.missing set).

  Raises:
    Interrupted: SIGTERM or SIGINT arrived; the step it arrived in was
      finished and saved (the same call continues from it).
  """
  # --- Config, checked before any data is read --------------------------------
  sharding = mesh.Sharding.create()
  build.check_config(config)
  feed.check_config(config, sharding)
  train_state.check_config(config)
  extract.check_config(config, training=True)
  ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
  resuming = ckpt.latest_step() is not None
  checkpointing.check_config(workdir, config, has_state=resuming)

  # --- Data -------------------------------------------------------------------
  if not pipeline.is_prepared(config.dataset, config.dataset_config,
                              config.data_dir or None):
    console.print(f"Preparing {_dataset_name(config)} (first use; done once, "
                  "kept in TFDS's data_dir)...")
    if jax.process_count() > 1:
      # Process 0 prepares it alone: TFDS's final rename of the prepared
      # folder fails in all but one of several processes doing it at once.
      if jax.process_index() == 0:
        feed.split_data(config, "train")
      multihost_utils.sync_global_devices("dataset prepared")
  train_data = feed.split_data(config, "train")
  num_classes = len(pipeline.train_label_map(train_data))
  num_cameras = int(train_data.camid.max()) + 1 if len(train_data.camid) else 0
  steps_per_epoch = pipeline.steps_per_epoch(
      train_data, config.ids_per_batch, config.instances_per_id)
  num_steps = build.total_steps(config, steps_per_epoch)
  logging.info("Train split: %d triplets, %d ids; %d steps/epoch; %d steps",
               train_data.num_examples, num_classes, steps_per_epoch,
               num_steps)
  checkpointing.write_run_info(
      workdir, num_classes=num_classes, steps_per_epoch=steps_per_epoch,
      num_cameras=num_cameras,
      **checkpointing.record_environment(workdir, has_state=resuming))

  # --- Model and update step ------------------------------------------------
  model = build.build_model(config, num_classes, num_cameras)
  schedule = build.learning_rate_schedule(config, steps_per_epoch)
  optimizer = build.build_optimizer(config, schedule)
  step_fn = steps.compile_train_step(model, optimizer,
                                     build.loss_config(config), schedule,
                                     sharding, seed=config.seed)

  # --- Starting point: own checkpoint > warm start > ImageNet > scratch -------
  init_fn = functools.partial(train_state.create_state, model, optimizer,
                              tuple(config.input_size))
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(init_fn, rng)
  replicated = jax.tree.map(lambda _: sharding.replicated, abstract)
  fresh = lambda: jax.jit(init_fn, out_shardings=replicated)(rng)
  if resuming:
    try:
      state, damaged = ckpt.restore_latest_intact(
          mesh.with_sharding(abstract, replicated))
    except BaseException:
      ckpt.close()
      raise
    aside = os.path.join(workdir, checkpointing.DAMAGED_DIRECTORY)
    for skipped in damaged:
      reason = checkpointing.first_line(skipped.cause)
      console.print(f"warning: the checkpoint of step {skipped.step} is "
                    f"damaged ({reason}); moved to {aside}, resuming from "
                    "the newest intact one")
    logging.info("Resumed from step %d", int(mesh.to_host(state.step)))
  elif config.model.init_from:
    state = mesh.put_replicated(
        train_state.load_init_from(fresh(), config.model.init_from,
                                   optimizer), sharding.replicated)
  elif config.model.pretrained:
    state = mesh.put_replicated(
        train_state.load_pretrained(fresh(), config.model.pretrained,
                                    config.model.backbone, optimizer,
                                    config.input_size), sharding.replicated)
  else:
    state = fresh()
  start_step = int(mesh.to_host(state.step))

  # --- Console and metrics ----------------------------------------------------
  console.print(_header(config, train_data, num_classes, num_steps,
                        start_step, workdir))
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    _record_start(config, workdir, state, writer)
  report = periodic_actions.ReportProgress(num_train_steps=num_steps,
                                           writer=writer)

  # --- Loop (SIGTERM / SIGINT: save this step, then stop) ---------------------
  batches = feed.input_batches(config, train_data, sharding, start_step)
  pending = []
  last_saved = start_step
  bar = console.progress(num_steps, "train", initial=start_step)
  stopped_at = None
  with _StopSignals() as stop:
    for step in range(start_step + 1, num_steps + 1):
      state, metrics = step_fn(state, next(batches))
      pending.append(metrics)
      report(step)
      stopping = _stop_requested(stop, step, config.log_every_steps)
      is_last = step == num_steps or stopping
      if step % config.log_every_steps == 0 or is_last:
        bar.update(step, loss=_write_metrics(writer, step, pending))
        pending = []
      else:
        bar.update(step)
      if step % config.checkpoint_every_steps == 0 or is_last:
        _check_finite(state, step, last_saved, ckpt.directory)
        ckpt.save(step, state)
        last_saved = step
      if stopping and step < num_steps:
        stopped_at = step
        break
    bar.close()
    batches.close()  # Stops the prefetch thread.
    ckpt.wait()
    writer.flush()
  if stopped_at is not None:
    ckpt.close()
    raise Interrupted(stop.name or "a signal to another process", stopped_at,
                      ckpt.directory)

  # --- Evaluation of the final state ------------------------------------------
  results = evaluate.evaluate(config, workdir, model, state, sharding, console)
  ckpt.close()
  return results


def _dataset_name(config: ml_collections.ConfigDict) -> str:
  return config.dataset + (f"/{config.dataset_config}"
                           if config.dataset_config else "")


def _header(config: ml_collections.ConfigDict, train_data: pipeline.SplitData,
            num_classes: int, num_steps: int, start_step: int,
            workdir: str) -> str:
  """The few lines a person needs before the progress bar."""
  query_split, gallery_split = feed.eval_splits(config)
  start = (f"resumed from step {start_step}" if start_step else
           "from scratch" if not (config.model.pretrained or
                                  config.model.init_from) else
           "from " + (config.model.pretrained or config.model.init_from))
  batch = config.ids_per_batch * config.instances_per_id
  return "\n".join([
      f"data     {_dataset_name(config)}: train {train_data.num_examples} "
      f"triplets, {num_classes} ids; evaluation on {query_split} vs "
      f"{gallery_split}",
      f"model    {build.model_summary(config)}",
      f"run      {num_steps} steps of {batch} ({config.ids_per_batch} ids x "
      f"{config.instances_per_id}), {start}; {mesh.describe_devices()}",
      f"workdir  {workdir}",
  ])


def _record_start(config: ml_collections.ConfigDict, workdir: str,
                  state: train_state.TrainState, writer) -> None:
  """A new run's parameter table (log and workdir) and hyperparameters."""
  overview = parameter_overview.get_parameter_overview(
      mesh.to_host(state.params))
  logging.info("Parameters:\n%s", overview)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, console_lib.PARAMETERS_FILE), "w") as f:
      f.write(overview + "\n")
  writer.write_hparams({k: v for k, v in checkpointing.flatten_config(
      checkpointing.config_to_dict(config)).items()
                        if isinstance(v, (int, float, str, bool))})


def _write_metrics(writer, step: int, pending: list) -> float:
  """One host sync: averages the device metrics gathered since the last log.

  Returns:
    The mean training loss over those steps.
  """
  fetched = mesh.to_host(pending)
  summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  if not math.isfinite(summary["train/loss"]):
    raise NonFiniteLossError(
        f"Training loss became non-finite by step {step} "
        f"({summary['train/loss']}); terms: {summary}. The last good "
        "checkpoint is kept; lower the learning rate or use float32.")
  writer.write_scalars(step, summary)
  return summary["train/loss"]


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def _check_finite(state: train_state.TrainState, step: int, last_saved: int,
                  directory: str) -> None:
  """Refuses to save a state whose parameters are no longer finite."""
  if not bool(mesh.to_host(_all_finite(state.params))):
    raise NonFiniteLossError(
        f"Parameters are non-finite at step {step}; not saving. The last good "
        f"checkpoint (step {last_saved}) is kept in {directory}.")
