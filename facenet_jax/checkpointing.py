"""Orbax checkpoints of the training state, behind one small module.

A run's workdir holds:
  checkpoints/<step>/   Orbax StandardSave of the TrainState pytree.
  config.json           the run's ConfigDict, written at the first start and
                        compared at every restart and every restore.
  run_info.json         values derived from the data, and the environment
                        (package versions, backend) the run started under.
  eval_results.json     metrics of the final state on the test split
                        (eval_results_val.json: on the val split).

The data order is a pure function of (seed, step), so the step is all the
input pipeline needs to resume exactly where an interrupted run stopped.

A new run can also be warm-started from another run's checkpoint
(`read_variables` + `copy_matching`): only params and batch_stats are read,
without building the source's model.
"""

import dataclasses
import importlib.metadata
import json
import os
import platform
from typing import Any, Iterable, Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from facenet_jax.models import backbones

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
# The packages whose versions can change a run's numbers: a run is
# deterministic for one set of them, not necessarily across sets (the
# commit that recorded a 46.0 val mAP in docs/results.md gives 49.2 under
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
                    # Which mask FCE pastes with at evaluation: no state.
                    "model.fce_inference_mask",
                    # The training-free fusions' settings: no state (a
                    # change to or from the learned "gate" is refused).
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
                          "smp_pooling": "topk", "smp_topk_fraction": 0.25,
                          "mask_detach": False, "mask_stage": 0,
                          "fce_projection": False,
                          "fce_clean": "enhanced",
                          "fce_inference_mask": "hard", "fce_fill": "ti",
                          "fce_guide_gradient": True,
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
                         "fce_consistency_weight": 0.0,
                         "fce_raw_weight": 0.0,
                         "fusion_triplet_weight": 1.0},
                "input": {"cache": "auto", "cache_max_gb": 4.0,
                          "device_prefetch": 2, "threads": -1},
                # Before restoration training (beyond the paper; off).
                "restore": {"copies": 0, "weight": 1.0},
                "val_ids": 0}


def _with_added_fields(saved: dict) -> dict:
  out = dict(saved)
  for key, default in ADDED_FIELDS.items():
    if isinstance(default, dict):
      out[key] = {**default, **saved.get(key, {})}
    else:
      out.setdefault(key, default)
  return out


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
  with open(path) as f:
    saved = _with_added_fields(json.load(f))
  ignored = tuple(ignore)
  saved_flat = _spelled_out(flatten_config(saved))
  current_flat = _spelled_out(flatten_config(current))
  diffs = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    # The learned fusion has parameters: only the training-free fusions
    # may stand in for each other.
    gate = key == "model.fusion" and "gate" in (saved_flat.get(key),
                                                current_flat.get(key))
    if (key in ignored or key.split(".")[0] in ignored) and not gate:
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
  with open(path) as f:
    saved = _with_added_fields(json.load(f))
  config = ml_collections.ConfigDict(_tuples(saved))
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
  (config.json): a fusion the caller set differently is kept. A learned
  fusion ("gate") is never replaced.

  Returns:
    The choice applied, or None.
  """
  choice = read_recorded_fusion(workdir)
  if choice is None or config.model.fusion == "gate":
    return None
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    trained = _with_added_fields(json.load(f))["model"]
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


# --- Warm start ---------------------------------------------------------------

# The collections a warm start reads; the optimizer state always starts afresh.
WARM_START_COLLECTIONS = ("params", "batch_stats")
# How many names of each kind a warm-start message lists.
_MAX_LISTED = 20
# ... and per stream module when the streams differ from the source's.
_MAX_LISTED_PER_MODULE = 5

ShapeMismatch = tuple[str, tuple[int, ...], tuple[int, ...]]


class WarmStartError(CheckpointMismatchError):
  """A warm-start source has no usable checkpoint, or does not fit the model."""


def read_variables(workdir: str,
                   step: Optional[int] = None) -> tuple[int, dict]:
  """Params and batch_stats of a run's checkpoint, as NumPy arrays.

  Needs no model: the tree (names, shapes, dtypes) comes from the checkpoint's
  metadata, so a run of any configuration can be read. The optimizer state is
  not read. Every process reads the whole arrays to host memory (like an
  ImageNet weight file); nothing is placed on devices.

  Args:
    workdir: the source run's directory (the one holding checkpoints/).
    step: which checkpoint; None = the latest.

  Returns:
    (the step read, {"params": ..., "batch_stats": ...}) as nested dicts of
    np.ndarray.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint, or not that step (the
      message lists the available ones).
    WarmStartError: the checkpoint is not a training state (no params or
      batch_stats).
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints in {workdir}: {directory} does "
                            "not exist")
  # Read-only: the source belongs to another run, so nothing here may create,
  # clean up or delete files in it. The plain PyTree handler restores part of
  # the tree (partial_restore, orbax-checkpoint >= 0.11.14); StandardRestore
  # would also read the optimizer state.
  manager = ocp.CheckpointManager(
      directory, item_handlers=ocp.PyTreeCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0))
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"No checkpoints in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {directory}; "
                              f"available steps: {steps}")
    tree = manager.item_metadata(step).tree
    missing = [c for c in WARM_START_COLLECTIONS if c not in tree]
    if missing:
      raise WarmStartError(f"{directory}/{step} holds no {missing} (has "
                           f"{sorted(tree)}): not a training checkpoint")
    target = {c: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                              tree[c])
              for c in WARM_START_COLLECTIONS}
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    logging.info("Reading params and batch_stats of step %d from %s", step,
                 directory)
    variables = manager.restore(
        step, args=ocp.args.PyTreeRestore(item=target,
                                          restore_args=restore_args,
                                          partial_restore=True))
  finally:
    manager.close()
  return step, {c: variables[c] for c in WARM_START_COLLECTIONS}


@dataclasses.dataclass(frozen=True)
class WarmStartReport:
  """What `copy_matching` copied into the new model's variables.

  Names are "collection/module/.../leaf", e.g.
  "params/rgb_backbone/conv1/kernel".

  Attributes:
    copied: the new model's leaves that now hold the source's values.
    kept: the new model's leaves left at their initialisation (absent from
      the source, or of another shape there).
    shape_mismatches: (name, shape here, shape in the source) of the kept
      leaves whose name the source has.
    unused: names in the source that the new model does not have.
    num_copied_params: parameter values (params collection) copied.
    num_params: parameter values of the new model.
  """
  copied: tuple[str, ...]
  kept: tuple[str, ...]
  shape_mismatches: tuple[ShapeMismatch, ...]
  unused: tuple[str, ...]
  num_copied_params: int
  num_params: int

  def kept_by_module(self) -> dict[str, int]:
    """Number of kept leaves per top-level module (both collections)."""
    return _count_by_module(self.kept)

  def summary(self) -> str:
    """One line for the log: counts, then the kept leaves per module."""
    line = (f"copied {len(self.copied)} of {len(self.copied) + len(self.kept)}"
            f" leaves ({self.num_copied_params:,} of {self.num_params:,} "
            "parameters)")
    if self.kept:
      other_shape = _count_by_module(name for name, _, _ in
                                     self.shape_mismatches)
      modules = []
      for module, count in sorted(self.kept_by_module().items()):
        note = (f" ({other_shape[module]} of another shape in the source)"
                if module in other_shape else "")
        modules.append(f"{module}: {count}{note}")
      line += "; leaves kept at their initialisation: " + ", ".join(modules)
    if self.unused:
      line += f"; {len(self.unused)} source leaves unused"
    return line


def _module(name: str) -> str:
  """The top-level module of "collection/module/.../leaf"."""
  return name.split("/")[1] if "/" in name else name


def _count_by_module(names: Iterable[str]) -> dict[str, int]:
  counts = {}
  for name in names:
    counts[_module(name)] = counts.get(_module(name), 0) + 1
  return counts


def _name(path: tuple[Any, ...]) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaves_by_name(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_name(path): leaf for path, leaf in flat}


def _listed(title: str, items: Sequence[str], limit: int = _MAX_LISTED,
            indent: str = "  ") -> list[str]:
  """A titled, indented listing of at most `limit` items (params first)."""
  if not items:
    return []
  items = sorted(items, key=lambda item: (not item.startswith("params/"),
                                          item))
  shown = [f"{indent}  {item}" for item in items[:limit]]
  if len(items) > limit:
    shown.append(f"{indent}  ... and {len(items) - limit} more")
  return [f"{indent}{title} ({len(items)}):"] + shown


def _mismatch_lines(mismatches: Iterable[ShapeMismatch],
                    limit: int = _MAX_LISTED,
                    indent: str = "  ") -> list[str]:
  return _listed("same name, other shape (here vs source)",
                 [f"{name}: {here} vs {there}"
                  for name, here, there in mismatches], limit, indent)


def copy_matching(variables: Mapping[str, Any], source: Mapping[str, Any],
                  exact: Sequence[str] = ()) -> tuple[Any, WarmStartReport]:
  """Copies every source leaf whose full name and shape match a leaf here.

  Args:
    variables: the new model's {"params": ..., "batch_stats": ...}, host
      arrays; its tree structure is kept exactly.
    source: the same collections of another run (`read_variables`).
    exact: top-level modules (e.g. the stream backbones) that the source must
      hold with exactly the same names and shapes: a partial copy of those
      would silently mix a source network with a random one.

  Returns:
    (variables with the matching leaves replaced by the source's, cast to the
    dtype here; the report). Leaves not copied are the same objects as before.

  Raises:
    WarmStartError: nothing matches at all, or a module in `exact` differs
      (listing the differing names and shapes).
  """
  here = _leaves_by_name(variables)
  there = _leaves_by_name(source)
  mismatches = tuple(
      (name, tuple(np.shape(value)), tuple(np.shape(there[name])))
      for name, value in sorted(here.items())
      if name in there and np.shape(value) != np.shape(there[name]))
  mismatched = {name for name, _, _ in mismatches}
  copied = {name for name in here if name in there and name not in mismatched}
  if not copied:
    raise WarmStartError("\n".join(
        ["No variable of the source matches one of the model by name and "
         f"shape (the model has {len(here)}, the source {len(there)}); is "
         "it a run of this project?"] + _mismatch_lines(mismatches)))
  problems = []
  for module in exact:
    lines = (
        _mismatch_lines([m for m in mismatches if _module(m[0]) == module],
                        _MAX_LISTED_PER_MODULE, "    ") +
        _listed("missing in the source",
                [n for n in here if _module(n) == module and n not in there],
                _MAX_LISTED_PER_MODULE, "    ") +
        _listed("only in the source",
                [n for n in there if _module(n) == module and n not in here],
                _MAX_LISTED_PER_MODULE, "    "))
    if lines:
      problems += [f"  {module}:"] + lines
  if problems:
    raise WarmStartError("\n".join(
        [f"The source's {', '.join(exact)} must match the model's exactly "
         "(same backbone depth and width):"] + problems))

  def take(path: tuple[Any, ...], value: Any) -> Any:
    name = _name(path)
    if name not in copied:
      return value
    return np.asarray(there[name], dtype=np.asarray(value).dtype)

  def num_params(names: Iterable[str]) -> int:
    return sum(int(np.size(here[n])) for n in names
               if n.startswith("params/"))

  report = WarmStartReport(
      copied=tuple(sorted(copied)), kept=tuple(sorted(set(here) - copied)),
      shape_mismatches=mismatches,
      unused=tuple(sorted(set(there) - set(here))),
      num_copied_params=num_params(copied), num_params=num_params(here))
  return jax.tree_util.tree_map_with_path(take, variables), report
