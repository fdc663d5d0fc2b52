"""Orbax checkpoints of the training state, behind one small module.

A run's workdir holds:
  checkpoints/<step>/   Orbax StandardSave of the TrainState pytree.
  config.json           the run's ConfigDict, written at the first start and
                        compared at every restart and every restore.

The data order is a pure function of (seed, step), so the step is all the
input pipeline needs to resume exactly where an interrupted run stopped.
"""

import json
import os
from typing import Any, Iterable, Optional

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
# Config fields that may differ between a checkpoint and the run restoring it:
# they change the loop or the evaluation, not the shapes or meaning of state.
RESUMABLE_FIELDS = ("num_epochs", "num_train_steps", "log_every_steps",
                    "checkpoint_every_steps", "keep_checkpoints", "eval",
                    "data_dir", "manual_dir", "eval_batch_size")


# Config sections added after the first release, with the values that
# reproduce older runs: a config.json without them is read as having these.
ADDED_SECTIONS = {"preprocess": {"clahe": False, "clahe_clip_limit": 0.01}}


def _with_added_fields(saved: dict) -> dict:
  return {**saved, **{key: {**default, **saved.get(key, {})}
                      for key, default in ADDED_SECTIONS.items()}}


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the configuration or model it is restored into."""


def flatten_config(config: Any, prefix: str = "") -> dict:
  if isinstance(config, dict):
    items = {}
    for key, value in config.items():
      items.update(flatten_config(value, f"{prefix}{key}."))
    return items
  return {prefix[:-1]: config}


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-ready dict of the config (tuples become lists)."""
  return json.loads(config.to_json())


def check_config(workdir: str, config: ml_collections.ConfigDict,
                 has_state: bool, write: bool = True,
                 ignore: Iterable[str] = RESUMABLE_FIELDS) -> None:
  """Checks the config against WORKDIR/config.json, or (re)writes that file.

  config.json describes the checkpoints in the workdir. While there are none,
  it is simply (re)written, so a run that failed before its first checkpoint
  (e.g. on a config typo) can be restarted with a corrected config.

  Args:
    workdir: the run directory.
    config: the configuration of this run.
    has_state: whether the workdir holds checkpoints made under config.json.
    write: (re)write config.json when there is nothing to compare against
      (training); False for evaluation, which only compares.
    ignore: top-level fields allowed to differ (loop length, logging, eval).

  Raises:
    CheckpointMismatchError: naming every field that differs from the saved
      config, since restoring state trained under another configuration would
      silently mix two experiments.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = config_to_dict(config)
  if not has_state or not os.path.exists(path):
    if write and jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(path, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
    return
  with open(path) as f:
    saved = _with_added_fields(json.load(f))
  ignored = tuple(ignore)
  saved_flat, current_flat = flatten_config(saved), flatten_config(current)
  diffs = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    if key.split(".")[0] in ignored:
      continue
    if saved_flat.get(key, "<absent>") != current_flat.get(key, "<absent>"):
      diffs.append(f"  {key}: saved {saved_flat.get(key, '<absent>')!r}, "
                   f"now {current_flat.get(key, '<absent>')!r}")
  if diffs:
    raise CheckpointMismatchError(
        f"The config differs from the one the run in {workdir} was started "
        "with (" + path + "):\n" + "\n".join(diffs) +
        "\nUse a new --workdir, or the saved values.")


def write_run_info(workdir: str, **info: Any) -> None:
  """Writes values derived from the data (e.g. num_classes) beside the config.

  Evaluation and inference need them to rebuild the model without reading the
  training split again.
  """
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RUN_INFO_FILE), "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)


def read_run_info(workdir: str) -> dict:
  path = os.path.join(workdir, RUN_INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} holds no run "
                            "started by scripts/main.py --mode train")
  with open(path) as f:
    return json.load(f)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict a run was started with (WORKDIR/config.json)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a run "
                            "directory written by scripts/main.py")
  with open(path) as f:
    saved = _with_added_fields(json.load(f))
  return ml_collections.ConfigDict(_tuples(saved))


def _tuples(value: Any) -> Any:
  # JSON turns tuples into lists; configs use tuples (e.g. input_size).
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


class Checkpointer:
  """Periodic saves, keep-last-N, and restore of an abstract state."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Saves asynchronously; `wait` blocks until it is on disk."""
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores `step` (default latest) into the shapes/shardings given.

    Args:
      abstract_state: a pytree of jax.ShapeDtypeStruct with shardings, e.g.
        from `jax.eval_shape` of the state constructor.
      step: which checkpoint; None = the latest.

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the workdir.
      CheckpointMismatchError: the saved state's structure or shapes differ
        from the model built from the config.
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No checkpoint{'' if step is None else f' for step {step}'} in "
          f"{self.directory}; available steps: {self.all_steps()}")
    logging.info("Restoring checkpoint step %d from %s", step, self.directory)
    try:
      return self._manager.restore(
          step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"Checkpoint {self.directory}/{step} does not match the model built "
          f"from the config (different model fields or dataset?): {e}") from e

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
