"""Orbax checkpoints of the training state, behind one small module.

A run's workdir holds:
  checkpoints/<step>/   Orbax StandardSave of the TrainState pytree.
  checkpoints_damaged/<step>/
                        a checkpoint that could not be read when the run
                        resumed (moved aside, never deleted; see
                        Checkpointer.restore_latest_intact).
  config.json           the run's ConfigDict, written at the first start and
                        compared at every restart and every restore.
  run_info.json         values derived from the data, and the environment
                        (package versions, backend) the run started under.
  eval_results.json     metrics of the final state on the test split
                        (eval_results_val.json: on the val split).

The data order is a pure function of (seed, step), so the step is all the
input pipeline needs to resume exactly where an interrupted run stopped.

A config.json written by an older version is read in today's fields:
fields added since are filled with the values that reproduce it
(ADDED_FIELDS), and fields retired since are dropped where the run used the
value now built in (RETIRED). Another run's checkpoint is read for a warm
start by facenet_jax/warm_start.py.
"""

import dataclasses
import errno
import importlib.metadata
import json
import os
import platform
from typing import Any, Callable, Iterable, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from facenet_jax.models import backbones

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
# The packages whose versions can change a run's numbers: a run is
# deterministic for one set of them, not necessarily across sets (the
# commit that recorded a 46.0 val mAP in docs/studies.md gives 49.2 under
# later packages), so run_info.json records them.
ENVIRONMENT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                        "numpy", "tensorflow", "tensorflow-cpu",
                        "tensorflow-datasets", "scikit-image", "pillow")
# The evaluation of the final state (split_file gives the val split's name).
EVAL_RESULTS_FILE = "eval_results.json"
# Config fields that may differ between a checkpoint and the run restoring it:
# they change the loop or the evaluation, not the shapes or meaning of state.
RESUMABLE_FIELDS = ("num_epochs", "num_train_steps", "log_every_steps",
                    "checkpoint_every_steps", "keep_checkpoints", "eval",
                    "data_dir", "manual_dir", "eval_batch_size",
                    # How the input is fed (cache, prefetch), not what it is.
                    "input",
                    # How retrieval compares features: no state.
                    "model.fusion", "model.fusion_weight",
                    "model.fusion_full_ratio")


# Config fields added after the first release, with the values that
# reproduce older runs: a config.json without them is read as having these.
# A dict is a section (new, or an older one that gained fields): its missing
# fields are filled in; anything else is a top-level field.
ADDED_FIELDS = {"preprocess": {"clahe": False, "clahe_clip_limit": 0.01},
                "eval": {"split": "test", "missing": "none",
                         "missing_in": "both", "rendered_flare": "none",
                         "rendered_flare_seed": 0},
                # Runs from before the mask-supervising SMP used its first
                # reading, a separate SMP head, and nothing beyond the paper.
                "model": {"init_from": "", "smp": "head",
                          "smp_topk_fraction": 0.25,
                          "mask_detach": False, "mask_stage": 0,
                          "fce_projection": False,
                          "fce_clean": "enhanced",
                          "fce_mask_gradient": True,
                          # Before the ViT streams (ResNets ignore these).
                          "drop_path": 0.0, "camera_embedding": False,
                          "camera_embedding_scale": 3.0,
                          # Before the flare-aware fusion.
                          "fusion": "concat", "fusion_weight": 0.5,
                          "fusion_full_ratio": 0.2},
                "optimizer": {"name": "adam", "momentum": 0.9,
                              "warmup_factor": 0.0, "min_lr_factor": 0.0},
                "loss": {"flare_pixel_weight": 0.0,
                         "fce_consistency_weight": 0.0},
                "input": {"cache": "auto", "cache_max_gb": 4.0,
                          "device_prefetch": 2, "threads": -1},
                "val_ids": 0}

# The last commit with the code of the switches that lost on the validation
# split and were retired (docs/studies.md names each study's numbers):
# check it out to rerun those studies or to use a run trained with one on.
RETIRED_COMMIT = "f5a0e73"


@dataclasses.dataclass(frozen=True)
class Retired:
  """A config field (or some values of one) retired after it lost on val.

  Attributes:
    field: the dotted config field.
    builds_today: (saved value, the saved config flattened) -> whether the
      run is what the code now builds: the value now built in, or one that
      had no effect in that run.
    kept: the field itself stays in the config (only values are retired).
  """
  field: str
  builds_today: Callable[[Any, dict], bool]
  kept: bool = False


RETIRED = (
    Retired("model.fce_inference_mask", lambda v, c: v == "hard"),
    Retired("model.fce_fill",
            lambda v, c: v == "ti" or not c.get("model.use_fce")),
    Retired("model.fce_guide_gradient",
            lambda v, c: v is True or not c.get("model.use_fce")),
    Retired("model.smp_pooling",
            lambda v, c: v == "topk" or c.get("model.smp") != "mask"
            or not c.get("model.use_mfmp")),
    Retired("loss.fce_raw_weight",
            lambda v, c: v == 0 or not c.get("model.use_fce")),
    Retired("loss.fusion_triplet_weight",
            lambda v, c: v == 0 or c.get("model.fusion", "concat") == "concat"),
    Retired("restore.copies", lambda v, c: v == 0),
    # Without copies (checked above) the weight weighed nothing.
    Retired("restore.weight", lambda v, c: True),
    Retired("model.fusion", lambda v, c: v != "gate", kept=True),
)


class RetiredSwitchError(ValueError):
  """A saved run was trained with a switch that has since been retired."""


def _as_current(saved: dict, path: str) -> dict:
  """A saved config.json in today's fields: added ones filled, retired gone.

  Raises:
    RetiredSwitchError: naming each retired field the run set to a value
      the code no longer builds, and the commit that still has its code.
  """
  out = dict(saved)
  for key, default in ADDED_FIELDS.items():
    if isinstance(default, dict):
      out[key] = {**default, **saved.get(key, {})}
    else:
      out.setdefault(key, default)
  flat = flatten_config(out)
  refused = [f"{r.field}={flat[r.field]!r}" for r in RETIRED
             if r.field in flat and not r.builds_today(flat[r.field], flat)]
  if refused:
    raise RetiredSwitchError(
        f"{path} sets {', '.join(refused)}: retired after losing on the "
        "validation split (docs/studies.md, 'Retired switches'). Commit "
        f"{RETIRED_COMMIT} has the code that trains and evaluates it: "
        f"`git checkout {RETIRED_COMMIT}` to use this run.")
  for r in RETIRED:
    section, _, name = r.field.rpartition(".")
    if not r.kept and name in out.get(section, {}):
      out[section] = {k: v for k, v in out[section].items() if k != name}
      if not out[section]:
        del out[section]
  return out


def _read_saved_config(workdir: str) -> dict:
  """WORKDIR/config.json in today's fields (_as_current)."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path) as f:
    return _as_current(json.load(f), path)


def split_file(name: str, split: str) -> str:
  """The file name of an output made on evaluation split `split`.

  `name` itself for the test split (the names from before validation splits
  existed), name_<split>.ext for any other, so that evaluating one split
  never overwrites the other's outputs: eval_results.json and
  eval_results_val.json.
  """
  if split == "test":
    return name
  stem, ext = os.path.splitext(name)
  return f"{stem}_{split}{ext}"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the configuration or model it is restored into."""


class CheckpointDamagedError(ValueError):
  """A checkpoint's files cannot be read: a copy cut short or a file lost.

  Told apart from CheckpointMismatchError by the checkpoint's own metadata:
  where that is readable and lists the very tree and shapes asked for, the
  failure is in the files, not in the model.
  """

  def __init__(self, directory: str, step: int, cause: BaseException,
               steps: Sequence[int]):
    others = [s for s in steps if s != step]
    super().__init__(
        f"Checkpoint {os.path.join(directory, str(step))} is damaged and "
        f"cannot be read ({first_line(cause)}). Other checkpoints: "
        f"{others or '(none)'}" + (
            f"; pass --step {max(others)} to use the newest of them (a "
            "resumed training skips damaged checkpoints by itself)."
            if others else "."))
    self.directory, self.step, self.cause = directory, step, cause


def first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  return line if len(line) <= 200 else line[:197] + "..."


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
    ignore: fields allowed to differ (loop length, logging, eval): a
      top-level name covers its whole section, a dotted one ("eval.split")
      that field only.

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
  saved = _read_saved_config(workdir)
  ignored = tuple(ignore)
  saved_flat = _spelled_out(flatten_config(saved))
  current_flat = _spelled_out(flatten_config(current))
  diffs = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    if key in ignored or key.split(".")[0] in ignored:
      continue
    if saved_flat.get(key, "<absent>") != current_flat.get(key, "<absent>"):
      diffs.append(f"  {key}: saved {saved_flat.get(key, '<absent>')!r}, "
                   f"now {current_flat.get(key, '<absent>')!r}")
  if diffs:
    raise CheckpointMismatchError(
        f"The config differs from the one the run in {workdir} was started "
        "with (" + path + "):\n" + "\n".join(diffs) +
        "\nUse a new --workdir, or the saved values.")


def _spelled_out(flat: dict) -> dict:
  """Config values that name a default replaced by what they resolve to.

  model.plug_stage = 0 is the backbone's default stage (ResNet: 4), so a run
  saved with 4, from before the default was spelled 0, matches.
  """
  if flat.get("model.plug_stage") == 0:
    try:
      stage = backbones.resolve_plug_stage(flat.get("model.backbone"), 0)
    except ValueError:
      return flat
    flat = {**flat, "model.plug_stage": stage}
  return flat


def environment() -> dict:
  """Python, backend, device count and ENVIRONMENT_PACKAGES' versions."""
  packages = {}
  for name in ENVIRONMENT_PACKAGES:
    try:
      packages[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return {"python": platform.python_version(),
          "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind,
          "process_count": jax.process_count(),
          "device_count": jax.device_count(),
          "packages": packages}


def record_environment(workdir: str, has_state: bool) -> dict:
  """The `environment` and `resumed_environments` fields of run_info.json.

  A new run (no checkpoint yet) records the environment it starts under. A
  resumed one keeps that record and, when it resumes under another
  environment, appends it to `resumed_environments` and logs the difference
  (its numbers may then differ from an uninterrupted run's). A run resumed
  from before this record existed gets `environment` None: its start is
  unknown.
  """
  current = environment()
  if not has_state:
    return {"environment": current}
  try:
    previous = read_run_info(workdir)
  except (FileNotFoundError, ValueError):
    previous = {}
  first = previous.get("environment")
  resumed = list(previous.get("resumed_environments", []))
  last = resumed[-1] if resumed else first
  if current != last:
    if last is not None:
      changed = sorted(k for k in set(current) | set(last)
                       if current.get(k) != last.get(k))
      logging.warning("%s resumes under another environment (%s changed) "
                      "than it last ran under: its numbers may differ from "
                      "an uninterrupted run's.", workdir, ", ".join(changed))
    resumed.append(current)
  fields = {"environment": first}
  if resumed:
    fields["resumed_environments"] = resumed
  return fields


def write_run_info(workdir: str, **info: Any) -> None:
  """Writes values derived from the data (e.g. num_classes) beside the config.

  Evaluation and inference need them to rebuild the model without reading the
  training split again.
  """
  if jax.process_index() == 0:
    # Written whole then renamed: an interrupted write leaves the old file.
    path = os.path.join(workdir, RUN_INFO_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_run_info(workdir: str) -> dict:
  path = os.path.join(workdir, RUN_INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} holds no run "
                            "started by scripts/main.py --mode train")
  with open(path) as f:
    return json.load(f)


def load_config(workdir: str,
                recorded_fusion: bool = True) -> ml_collections.ConfigDict:
  """The ConfigDict a run was started with (WORKDIR/config.json).

  With `recorded_fusion`, the fusion chosen on the run's val split
  (WORKDIR/fusion.json, scripts/fusion.py) replaces the trained one, so that
  the Embedder, the export and the pictures rank as was chosen.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a run "
                            "directory written by scripts/main.py")
  config = ml_collections.ConfigDict(_tuples(_read_saved_config(workdir)))
  if recorded_fusion:
    apply_recorded_fusion(config, workdir)
  return config


# The training-free fusion chosen on a run's val split (scripts/fusion.py).
FUSION_FILE = "fusion.json"
FUSION_FIELDS = ("fusion", "fusion_weight", "fusion_full_ratio")


def read_recorded_fusion(workdir: str) -> Optional[dict]:
  """WORKDIR/fusion.json's choice {model field: value}, or None."""
  path = os.path.join(workdir, FUSION_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    choice = json.load(f)["choice"]
  return {k: choice[k] for k in FUSION_FIELDS}


def apply_recorded_fusion(config: ml_collections.ConfigDict,
                          workdir: str) -> Optional[dict]:
  """Sets config.model's fusion to the run's recorded choice, in place.

  Only where config.model's fusion is still the one the run was trained with
  (config.json): a fusion the caller set differently is kept.

  Returns:
    The choice applied, or None.
  """
  choice = read_recorded_fusion(workdir)
  if choice is None:
    return None
  trained = _read_saved_config(workdir)["model"]
  if any(config.model[k] != trained[k] for k in FUSION_FIELDS):
    return None
  with config.unlocked():
    for k, v in choice.items():
      config.model[k] = v
  return choice


def _tuples(value: Any) -> Any:
  # JSON turns tuples into lists; configs use tuples (e.g. input_size).
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints in WORKDIR/checkpoints, oldest first.

  Reads the directory only (an Orbax manager would create it when missing),
  and skips the temporary directories of an unfinished save.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def check_run_dir(workdir: str, step: Optional[int] = None) -> list[int]:
  """One-line errors for a workdir that holds no finished run to read.

  For the commands that read a trained run (export, pictures) before they
  restore it; nothing is created while looking.

  Returns:
    The checkpoint steps, oldest first.

  Raises:
    FileNotFoundError: WORKDIR/config.json missing, or no (such) checkpoint.
  """
  config_file = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"--workdir {workdir}: {config_file} not found "
                            "(not a run directory of scripts/main.py)")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f"--workdir {workdir}: no checkpoint in "
        f"{os.path.join(workdir, 'checkpoints')} (train the run first)")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"--step {step}: no such checkpoint in {workdir}; "
                            f"available steps: {steps}")
  return steps


# Where a resumed run moves the checkpoints it could not read.
DAMAGED_DIRECTORY = "checkpoints_damaged"


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
  """{path: shape} of a pytree of arrays or of their metadata."""

  def name(entry) -> str:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        return str(getattr(entry, attribute))
    return str(entry)

  return {"/".join(name(e) for e in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(leaf, "shape")}


class CheckpointWriteError(PermissionError):
  """A checkpoint could not be written: a full or read-only disk.

  A PermissionError, so that the scripts show it as one line (the disk, not
  the code, is at fault); `errno` is the underlying error's.
  """

  def __init__(self, directory: str, step: Optional[int], kept: Sequence[int],
               code: int):
    super().__init__(
        code,
        f"Could not write the checkpoint of step {step} to {directory} "
        f"({os.strerror(code)}); the checkpoints already there "
        f"{kept or '(none)'} are intact. Free space or fix the permissions, "
        "then run the same command again to continue from the last one.")

  def __str__(self) -> str:
    return self.args[1]


# TensorStore reports a failed write as a ValueError carrying the OS error's
# text or an absl status code; these are the disk's faults, by errno.
_WRITE_FAILURES = (
    ("No space left on device", errno.ENOSPC),
    ("RESOURCE_EXHAUSTED", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
    ("PERMISSION_DENIED", errno.EACCES),
)


def _write_failure(error: BaseException) -> Optional[int]:
  """The errno of a disk that refused a checkpoint write, else None."""
  if isinstance(error, OSError) and error.errno:
    return error.errno
  if isinstance(error, (OSError, ValueError)):
    text = str(error)
    for marker, code in _WRITE_FAILURES:
      if marker in text:
        return code
  return None


class Checkpointer:
  """Periodic saves, keep-last-N, and restore of an abstract state."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    # The handler named here lets item_metadata read a step's saved tree.
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self._last_saved = None  # The step of the last save requested.

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Saves asynchronously; `wait` blocks until it is on disk.

    Raises:
      CheckpointWriteError: the directory cannot be written (full,
        read-only); the checkpoints already there are left as they were
        (Orbax writes a step into a temporary directory and renames it only
        once it is complete).
    """
    # The previous save's own failure is reported under its own step (Orbax
    # would raise it from this save, which waits for it anyway).
    self.wait()
    self._last_saved = step
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state))
    except (OSError, ValueError) as e:
      self._raise_write_error(e)
      raise

  def wait(self) -> None:
    """Blocks until the last save is on disk (CheckpointWriteError if not)."""
    try:
      self._manager.wait_until_finished()
    except (OSError, ValueError) as e:
      self._raise_write_error(e)
      raise

  def _raise_write_error(self, error: Exception) -> None:
    """CheckpointWriteError from `error` if the disk refused the write."""
    code = _write_failure(error)
    if code is not None:
      raise CheckpointWriteError(self.directory, self._last_saved,
                                 self.all_steps(), code) from error

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
      CheckpointDamagedError: the checkpoint's files cannot be read.
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
    except Exception as e:  # pylint: disable=broad-except
      # TensorStore reports a lost or short file as a bare Exception.
      raise self._read_error(step, abstract_state, e) from e

  def _read_error(self, step: int, abstract_state: Any,
                  error: Exception) -> ValueError:
    """Why `step` did not restore: the model differs, or the files are bad."""
    try:
      saved = _leaf_shapes(self._manager.item_metadata(step))
    except Exception as e:  # pylint: disable=broad-except
      return CheckpointDamagedError(self.directory, step, e, self.all_steps())
    if not saved:
      return CheckpointDamagedError(self.directory, step, error,
                                    self.all_steps())
    wanted = _leaf_shapes(abstract_state)
    if saved == wanted:
      return CheckpointDamagedError(self.directory, step, error,
                                    self.all_steps())
    differ = sorted(set(saved.items()) ^ set(wanted.items()))
    return CheckpointMismatchError(
        f"Checkpoint {self.directory}/{step} does not match the model built "
        f"from the config (different model fields or dataset?): "
        f"{len(differ)} leaves differ, first {differ[0][0]} "
        f"(saved {saved.get(differ[0][0])}, model {wanted.get(differ[0][0])})"
        f"; {first_line(error)}")

  def restore_latest_intact(self, abstract_state: Any
                            ) -> tuple[Any, list[CheckpointDamagedError]]:
    """Restores the newest checkpoint that reads, for a resumed run.

    A damaged newer checkpoint is moved to WORKDIR/checkpoints_damaged/ (not
    deleted) by process 0, so that the run saves its steps again after the
    one it resumes from; each one is logged as a warning.

    Returns:
      The restored state and the damaged checkpoints skipped, newest first.

    Raises:
      CheckpointMismatchError: as `restore`; nothing is moved.
      CheckpointDamagedError: no checkpoint reads (the newest one's error);
        nothing is moved.
    """
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(abstract_state, step)
      except CheckpointDamagedError as e:
        skipped.append(e)
        continue
      for damaged in skipped:
        logging.warning("Skipped checkpoint step %d: %s", damaged.step,
                        damaged)
        self._set_aside(damaged.step)
      return state, skipped
    if skipped:
      raise skipped[0]
    return self.restore(abstract_state), skipped  # FileNotFoundError.

  def _set_aside(self, step: int) -> None:
    """Moves checkpoints/<step> to checkpoints_damaged/ and rereads the list."""
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory),
                           DAMAGED_DIRECTORY)
      os.makedirs(aside, exist_ok=True)
      target, copy = os.path.join(aside, str(step)), 0
      while os.path.exists(target):
        copy += 1
        target = os.path.join(aside, f"{step}.{copy}")
      os.rename(os.path.join(self.directory, str(step)), target)
      logging.warning("Moved the damaged checkpoint of step %d to %s", step,
                      target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()

  def close(self) -> None:
    self.wait()
    self._manager.close()
