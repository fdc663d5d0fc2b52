"""The training state, and every way a run gets one.

A run starts from its own latest checkpoint, or from another run's
(`load_init_from`, a warm start), or from ImageNet weights (`load_pretrained`),
or from random initialisation (`create_state`); `train.loop` spells out that
order. `restore_for_eval` rebuilds a finished run for evaluation and
inference without reading its data.
"""

import functools
from typing import Any, Optional, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from facenet_jax import checkpointing
from facenet_jax import warm_start
from facenet_jax.constants import MODALITIES
from facenet_jax.models import FACENet
from facenet_jax.train import build
from facenet_jax.train import mesh


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds. A plain pytree (no functions)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_state(model: FACENet, optimizer: optax.GradientTransformation,
                 input_size, rng: jax.Array) -> TrainState:
  """Random initial state (a pure function: usable under jax.eval_shape)."""
  h, w = input_size
  images = {m: jnp.zeros((2, h, w, 3), jnp.float32) for m in MODALITIES}
  flare = jnp.zeros((2, 2), jnp.float32)
  variables = model.init(rng, images, flare, train=False,
                         camera=jnp.zeros((2,), jnp.int32), flare_ratio=flare)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"],
                    opt_state=optimizer.init(params))


def load_pretrained(state: TrainState, path: str, backbone: str,
                    optimizer: optax.GradientTransformation,
                    input_size: Sequence[int] = (256, 128)) -> TrainState:
  """Initialises every stream's backbone from an ImageNet weights file.

  Args:
    state: the freshly initialised state.
    path: a ResNet or ViT weights file (pretrained.load_backbone_variables).
    backbone: model.backbone.
    optimizer: for a fresh optimizer state.
    input_size: the network input (H, W); a ViT's position embeddings are
      resampled to its token grid.

  Returns:
    The state with the three stream backbones replaced, as host arrays.
  """
  from facenet_jax import pretrained  # pylint: disable=g-import-not-at-top
  loaded = pretrained.load_backbone_variables(path, backbone,
                                              tuple(input_size))
  variables = mesh.to_host({"params": state.params,
                       "batch_stats": state.batch_stats})
  for m in MODALITIES:
    stream = f"{m}_backbone"
    # What no ImageNet file holds (a camera embedding) keeps its init.
    own = {name: leaf for name, leaf in variables["params"][stream].items()
           if name in pretrained.NOT_IN_CHECKPOINTS}
    subtree = {**loaded, "params": {**loaded["params"], **own}}
    variables = pretrained.merge_into(variables, subtree, (stream,))
  logging.info("Initialised the %s backbones from %s", MODALITIES, path)
  return TrainState(step=mesh.to_host(state.step), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=optimizer.init(variables["params"]))


def parse_init_from(value: str) -> tuple[str, Optional[int]]:
  """Splits model.init_from into the source workdir and step.

  Args:
    value: "WORKDIR" or "WORKDIR:STEP". The last colon starts STEP unless a
      "/" follows it (then it is part of the path).

  Returns:
    (workdir, step); step None means the latest checkpoint.

  Raises:
    ValueError: an empty workdir, or a STEP that is not a non-negative integer.
  """
  workdir, colon, step = value.rpartition(":")
  if not colon or "/" in step:
    workdir, step = value, None
  elif not step.isdigit():
    raise ValueError(f"model.init_from={value!r}: expected 'WORKDIR' or "
                     f"'WORKDIR:STEP' with STEP a checkpoint step (a "
                     f"non-negative integer), got STEP {step!r}")
  if not workdir:
    raise ValueError(f"model.init_from={value!r}: no WORKDIR; expected "
                     "'WORKDIR' or 'WORKDIR:STEP'")
  return workdir, None if step is None else int(step)


def check_config(config: ml_collections.ConfigDict) -> None:
  """model.init_from and model.pretrained, before any data is read.

  Raises:
    ValueError: a malformed init_from, or both set.
  """
  if not config.model.init_from:
    return
  parse_init_from(config.model.init_from)
  if config.model.pretrained:
    raise ValueError(
        f"model.init_from={config.model.init_from!r} and model.pretrained="
        f"{config.model.pretrained!r} are exclusive: the warm start "
        "overwrites every stream backbone, so the ImageNet weights would be "
        "discarded (a source run started from them passes them on). Clear "
        "one of the two.")


def load_init_from(state: TrainState, init_from: str,
                   optimizer: optax.GradientTransformation) -> TrainState:
  """Warm start: copies another run's matching variables into a new state.

  Every params and batch_stats leaf whose full name and shape match a leaf of
  the source checkpoint is copied; the rest keeps its initialisation. The
  stream backbones must match exactly. The optimizer state starts afresh and
  the step is kept (0 for a new run).

  Args:
    state: the new run's freshly initialised state.
    init_from: config.model.init_from, "WORKDIR" or "WORKDIR:STEP".
    optimizer: the new run's optimizer, for a fresh optimizer state.

  Returns:
    The warm-started state as host arrays (put them on the mesh with
    `put_replicated`).

  Raises:
    ValueError: a malformed init_from.
    warm_start.WarmStartError: the workdir has no checkpoints or not that
      step, nothing matches, or the stream backbones differ.
  """
  workdir, step = parse_init_from(init_from)
  variables = mesh.to_host({"params": state.params,
                       "batch_stats": state.batch_stats})
  try:
    step, source = warm_start.read_variables(workdir, step)
    variables, report = warm_start.copy_matching(
        variables, source, exact=tuple(f"{m}_backbone" for m in MODALITIES))
  except (FileNotFoundError, warm_start.WarmStartError) as e:
    raise warm_start.WarmStartError(
        f"model.init_from={init_from!r}: {e}") from e
  logging.info("Warm start from %s step %d: %s", workdir, step,
               report.summary())
  for name, here, there in report.shape_mismatches:
    logging.info("Warm start: kept %s, shape %s here, %s in the source", name,
                 here, there)
  return TrainState(step=mesh.to_host(state.step), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=optimizer.init(variables["params"]))


def abstract_state(config: ml_collections.ConfigDict, num_classes: int,
                   steps_per_epoch: int, num_cameras: int = 0):
  """(model, optimizer, the state's shapes and dtypes) of a config; no arrays."""
  model = build.build_model(config, num_classes, num_cameras)
  optimizer = build.build_optimizer(
      config, build.learning_rate_schedule(config, steps_per_epoch))
  abstract = jax.eval_shape(
      functools.partial(create_state, model, optimizer,
                        tuple(config.input_size)), jax.random.key(0))
  return model, optimizer, abstract


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str,
                     step: Optional[int] = None):
  """Model and state of a finished (or interrupted) run, for eval/inference."""
  checkpointing.check_config(workdir, config, has_state=True, write=False)
  info = checkpointing.read_run_info(workdir)
  # Runs from before the camera embedding have no num_cameras (and no use).
  model, _, abstract = abstract_state(config, info["num_classes"],
                                      info["steps_per_epoch"],
                                      info.get("num_cameras", 0))
  sharding = mesh.Sharding.create()
  state_sharding = jax.tree.map(lambda _: sharding.replicated, abstract)
  ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
  try:
    state = ckpt.restore(mesh.with_sharding(abstract, state_sharding), step)
  finally:
    ckpt.close()
  return model, state, sharding

