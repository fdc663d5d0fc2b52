"""Warm start: another run's params and batch_stats, matched into a new model.

`read_variables` reads a run's checkpoint without building its model (the
tree comes from the checkpoint's metadata); `copy_matching` copies every
leaf whose name and shape match into the new model's variables and reports
what it copied, kept and could not use. `train.train_state.load_init_from`
puts the two together for config.model.init_from.
"""

import dataclasses
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from facenet_jax import checkpointing


# The collections a warm start reads; the optimizer state always starts afresh.
WARM_START_COLLECTIONS = ("params", "batch_stats")
# How many names of each kind a warm-start message lists.
_MAX_LISTED = 20
# ... and per stream module when the streams differ from the source's.
_MAX_LISTED_PER_MODULE = 5

ShapeMismatch = tuple[str, tuple[int, ...], tuple[int, ...]]


class WarmStartError(checkpointing.CheckpointMismatchError):
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
