"""Training and evaluation loop: the only module that reads the ConfigDict.

Data parallel over every device of every process: the state is replicated and
the batch sharded along a 1-D mesh axis "data" (`jax.make_mesh` +
`NamedSharding`), so BatchNorm statistics are computed over the global batch
without any `axis_name`. Multi-host: each process feeds whole P x K identity
groups through `jax.make_array_from_process_local_data`.
"""

import dataclasses
import functools
import itertools
import json
import math
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from facenet_jax import checkpointing
from facenet_jax import console as console_lib
from facenet_jax import evaluation
from facenet_jax import flare_render
from facenet_jax import fusion as fusion_lib
from facenet_jax import losses
from facenet_jax.constants import FLARE_MODALITIES, MODALITIES
from facenet_jax.models import FACENet
from facenet_jax.models import backbones
import input_pipeline  # noqa: F401  (hides accelerators from TensorFlow)
from input_pipeline import deflare
from input_pipeline import pipeline

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}
MSVR_SCENE_DATASETS = ("msvr310",)
# Per-example fields of an evaluation batch that the ranking needs.
EVAL_METADATA = ("pid", "camid", "sceneid", "flare", "valid", "index")


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds. A plain pytree (no functions)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


# --- Building blocks from the config -------------------------------------------


def parse_depth(backbone: str) -> int:
  """"resnet50" -> 50, with a clear error for anything else (ResNets only)."""
  entry = check_backbone(backbone)
  if entry.family != "resnet":
    raise ValueError(f"model.backbone: expected a ResNet "
                     f"({', '.join(backbones.RESNET_NAMES)}), got {backbone!r}")
  return entry.spec


def check_backbone(backbone: str) -> backbones.BackboneInfo:
  """The registry entry of model.backbone; a clear error for unknown names."""
  return backbones.info(backbone)


# ResNet geometry a ViT has no use for: set to anything but these, a warning.
_RESNET_ONLY_DEFAULTS = {"width_multiplier": 1.0, "last_stride": 1}


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                num_cameras: int = 0) -> FACENet:
  """FACENet with typed arguments taken from config.model.

  Args:
    config: the run configuration.
    num_classes: training identities.
    num_cameras: cameras of the training split (largest camid + 1); sizes
      the camera embedding when config.model.camera_embedding is on.
  """
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, "
                     f"got {m.dtype!r}")
  entry = check_backbone(m.backbone)
  for field, default in _RESNET_ONLY_DEFAULTS.items():
    if field not in entry.reads and m[field] != default:
      logging.warning("model.%s=%r has no effect on %s streams.", field,
                      m[field], m.backbone)
  if m.camera_embedding and num_cameras < 1:
    raise ValueError("model.camera_embedding needs the number of cameras of "
                     "the training split (build_model's num_cameras)")
  return FACENet(
      num_classes=num_classes, backbone=m.backbone,
      width_multiplier=m.width_multiplier, last_stride=m.last_stride,
      drop_path=m.drop_path,
      num_cameras=num_cameras if m.camera_embedding else 0,
      camera_scale=m.camera_embedding_scale,
      use_mfmp=m.use_mfmp, use_fmi=m.use_fmi, use_fce=m.use_fce,
      plug_stage=backbones.resolve_plug_stage(m.backbone, m.plug_stage),
      fmi_width=m.fmi_width,
      fmi_reduction=m.fmi_attention_reduction,
      mask_temperature=m.mask_temperature, smp=m.smp,
      smp_pooling=m.smp_pooling, smp_topk_fraction=m.smp_topk_fraction,
      mask_detach=m.mask_detach, mask_stage=m.mask_stage,
      fce_projection=m.fce_projection,
      fce_clean=m.fce_clean, fce_inference_mask=m.fce_inference_mask,
      fce_fill=m.fce_fill, fce_guide_gradient=m.fce_guide_gradient,
      fce_mask_gradient=m.fce_mask_gradient,
      raw_head=config.loss.fce_raw_weight > 0,
      embedding_source=m.embedding, fusion=m.fusion,
      fusion_weight=m.fusion_weight, fusion_full_ratio=m.fusion_full_ratio,
      dtype=DTYPES[m.dtype])


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
  fields = {f.name for f in dataclasses.fields(losses.LossConfig)}
  unknown = set(config.loss.keys()) - fields
  if unknown:
    raise ValueError(f"Unknown config.loss fields: {sorted(unknown)}; "
                     f"known: {sorted(fields)}")
  if (config.loss.flare_pixel_weight > 0 and config.model.use_mfmp and
      config.preprocess.clahe):
    raise ValueError(
        "loss.flare_pixel_weight > 0 with preprocess.clahe: the pixel-level "
        "target would be measured on the CLAHE-enhanced images, not on the "
        "raw ones the pseudo-label delta comes from; set "
        "loss.flare_pixel_weight=0 (or preprocess.clahe=False)")
  if (config.loss.fce_consistency_weight > 0 and config.model.use_fce and
      not config.model.fce_projection):
    raise ValueError(
        "loss.fce_consistency_weight > 0 trains FCE's TI projection: it needs "
        "model.fce_projection=True (or weight 0)")
  if config.loss.fce_raw_weight > 0 and not (
      config.model.use_fce and config.model.use_mfmp):
    raise ValueError(
        "loss.fce_raw_weight > 0 trains the flare streams' maps before FCE: "
        "it needs model.use_fce=True and model.use_mfmp=True (or weight 0)")
  if config.model.fusion == "gate" and config.loss.fusion_triplet_weight <= 0:
    raise ValueError(
        "model.fusion='gate' learns its weights from the triplet on its "
        "distance: set loss.fusion_triplet_weight > 0 (e.g. 1.0)")
  if config.loss.flare_pixel_weight > 0 and config.model.use_mfmp:
    _check_pixel_target_grid(config)
  return losses.LossConfig(**config.loss.to_dict())


def _check_pixel_target_grid(config: ml_collections.ConfigDict) -> None:
  # losses.area_pool box-pools the input's saturation map to the mask grid,
  # which needs the grid to divide the input (TransReID's overlapping patches
  # give 21 x 10 tokens at 256 x 128, which does not).
  m = config.model
  entry = check_backbone(m.backbone)
  plug_stage = backbones.resolve_plug_stage(m.backbone, m.plug_stage)
  height, width = config.input_size
  h, w = entry.plug_grid((height, width), plug_stage, m.last_stride)
  if height % h or width % w:
    raise ValueError(
        f"loss.flare_pixel_weight > 0: the pixel-level flare target pools the "
        f"{height}x{width} input's saturation map to the mask grid, but "
        f"{m.backbone} at plug_stage {plug_stage} gives a {h}x{w} grid that "
        "does not divide it; set loss.flare_pixel_weight=0 or choose an "
        "input size the grid divides")


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """num_train_steps when > 0, else num_epochs * steps_per_epoch."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """The paper's piecewise schedule, or warmup + cosine.

  Decay points are given in epochs of a `num_epochs` run (paper: 40 and 70 of
  120). When `num_train_steps` shortens the run, they are scaled to the same
  fractions of it, so a short run still sees the whole schedule. The warmup
  rises linearly from warmup_factor x learning_rate (0 by default; the
  official ViT recipe: 0.01); the cosine ends at min_lr_factor x
  learning_rate (0 by default).
  """
  opt = config.optimizer
  steps = total_steps(config, steps_per_epoch)
  scale = steps / max(1, config.num_epochs * steps_per_epoch)
  warmup = int(round(opt.warmup_epochs * steps_per_epoch * scale))
  start = opt.warmup_factor * opt.learning_rate
  if opt.schedule == "piecewise":
    boundaries = {}
    for epoch in opt.decay_epochs:
      # Decay points that round to the same step in a short run compound.
      step = int(round(epoch * steps_per_epoch * scale))
      boundaries[step] = boundaries.get(step, 1.0) * opt.decay_factor
    main = optax.piecewise_constant_schedule(opt.learning_rate, boundaries)
    if not warmup:
      return main
    return optax.join_schedules(
        [optax.linear_schedule(start, opt.learning_rate, warmup),
         lambda s: main(s + warmup)], [warmup])
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        start, opt.learning_rate, max(1, warmup), max(steps, warmup + 1),
        end_value=opt.min_lr_factor * opt.learning_rate)
  raise ValueError(f"optimizer.schedule must be 'piecewise' or 'cosine', "
                   f"got {opt.schedule!r}")


OPTIMIZERS = ("adam", "sgd")


def build_optimizer(config: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam (the paper) or SGD with momentum (the official ViT recipe).

  Both with L2 weight decay on kernels (ndim > 1), added to the gradient
  before the update as PyTorch's `weight_decay` does.
  """
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got "
                     f"{opt.name!r}")
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  # PyTorch SGD: v = momentum * v + g; p -= lr * v (no dampening).
  update = (optax.scale_by_adam() if opt.name == "adam" else
            optax.trace(decay=opt.momentum))
  return optax.chain(
      optax.add_decayed_weights(opt.weight_decay, decay_mask),
      update,
      optax.scale_by_learning_rate(schedule))


def model_inputs(batch: Mapping[str, jax.Array]) -> dict:
  return {m: batch[m] for m in MODALITIES}


# --- Step functions ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RestoreConfig:
  """Restoration training (beyond the paper); mirrors `config.restore`.

  Attributes:
    copies: flared copies added to each global batch (0 = off).
    weight: weight of each flare stream's restoration loss.
    mean, std: per-modality normalisation, [RGB, NI, TI] order, to bring the
      batch's images back to [0, 1] for rendering.
    pixel_low, ratio_threshold: the pseudo-label's bars (config.flare).
  """
  copies: int = 0
  weight: float = 1.0
  mean: tuple = ((0.485, 0.456, 0.406),) * 3
  std: tuple = ((0.229, 0.224, 0.225),) * 3
  pixel_low: int = 250
  ratio_threshold: float = 0.1


def restore_config(config: ml_collections.ConfigDict) -> RestoreConfig:
  """config.restore checked, with the normalisation and flare bars it needs."""
  r = config.restore
  unknown = set(r.keys()) - {"copies", "weight"}
  if unknown:
    raise ValueError(f"Unknown config.restore fields: {sorted(unknown)}; "
                     "known: ['copies', 'weight']")
  batch = config.ids_per_batch * config.instances_per_id
  if not 0 <= r.copies <= batch:
    raise ValueError(f"restore.copies must be in [0, {batch}] (the batch, "
                     f"ids_per_batch x instances_per_id), got {r.copies}")
  if r.weight < 0:
    raise ValueError(f"restore.weight must be >= 0, got {r.weight}")
  if r.copies and config.preprocess.clahe:
    raise ValueError("restore.copies > 0 with preprocess.clahe: the flare "
                     "would be rendered onto CLAHE-enhanced images; set one "
                     "of them off")
  mean, std = (tuple(map(tuple, a.tolist())) for a in normalization(config))
  return RestoreConfig(copies=int(r.copies), weight=float(r.weight),
                       mean=mean, std=std,
                       pixel_low=int(config.flare.pixel_low),
                       ratio_threshold=float(config.flare.ratio_threshold))


def _render_normalised(images: Mapping[str, jax.Array], mean, std,
                       render: Callable) -> tuple[dict, Any]:
  """A flare rendered onto normalised RGB and NI images.

  Args:
    images: {modality: normalised (N, H, W, 3)}, as the pipeline gives them.
    mean, std: (modality, channel) normalisation, rows in MODALITIES order.
    render: (raw rgb, raw ni) -> flare_render.RenderedFlare, on [0, 255]
      pixels.

  Returns:
    ({"rgb", "ni": the rendered images normalised again, in the input
    dtype}, the RenderedFlare).
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  row = {m: i for i, m in enumerate(MODALITIES)}
  rendered = render(*(images[m] * std[row[m]] + mean[row[m]]
                      for m in FLARE_MODALITIES))
  flared = {m: ((image - mean[row[m]]) / std[row[m]]).astype(images[m].dtype)
            for m, image in zip(FLARE_MODALITIES,
                                (rendered.rgb, rendered.ni))}
  return flared, rendered


def with_flared_copies(batch: Mapping[str, jax.Array], restore: RestoreConfig,
                       key: jax.Array) -> tuple[dict, jax.Array, jax.Array]:
  """The batch with `restore.copies` flared copies appended (beyond the paper).

  Sources are the batch's first flare-free samples (delta = 0 for RGB and
  NI), or flared ones when the batch has too few; the copy of a triplet keeps
  its TI image, label and camera, and gets a rendered flare on RGB and NI
  (facenet_jax/flare_render.py), its own pseudo-labels and saturation map.

  Returns:
    (batch of B + n rows, src (n,) source rows, valid (n,) bool: the source
    was flare-free).
  """
  flare = batch["flare"]
  order = jnp.argsort(jnp.sum(flare, axis=-1), stable=True)
  src = order[:restore.copies]
  valid = jnp.sum(flare[src], axis=-1) == 0
  sources = {m: batch[m][src] for m in MODALITIES}
  flared, rendered = _render_normalised(
      sources, restore.mean, restore.std,
      lambda rgb, ni: flare_render.add_flare(
          key, rgb, ni, pixel_low=restore.pixel_low,
          ratio_threshold=restore.ratio_threshold))
  out = {m: jnp.concatenate([batch[m], flared.get(m, sources[m])])
         for m in MODALITIES}
  out["flare"] = jnp.concatenate([flare, rendered.flare])
  if "flare_ratio" in batch:
    # Measured at the input size, like the copies' pseudo-labels.
    out["flare_ratio"] = jnp.concatenate([
        batch["flare_ratio"],
        jnp.mean(rendered.saturation, axis=(1, 2)).astype(
            batch["flare_ratio"].dtype)])
  for k in ("label", "camid"):
    if k in batch:
      out[k] = jnp.concatenate([batch[k], batch[k][src]])
  if "saturation" in batch:
    out["saturation"] = jnp.concatenate(
        [batch["saturation"], rendered.saturation])
  return out, src, valid


def training_loss(params: Any, *, batch_stats: Any,
                  batch: Mapping[str, jax.Array], size: int,
                  src: Optional[jax.Array], valid: Optional[jax.Array],
                  model: FACENet, loss_cfg: losses.LossConfig,
                  restore: RestoreConfig, dropout_rng: jax.Array):
  """The step's objective: (loss, (terms, ModelOutput, new batch_stats)).

  `batch` holds `size` rows, then (restoration training) the flared copies
  of rows `src` (`with_flared_copies`). CE and triplet see the first `size`
  rows, the flare losses every row; each copy adds the CE of its RGB and NI
  streams and, with `restore.weight`, the restoration loss towards its
  source.
  """
  out, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      model_inputs(batch), batch["flare"], train=True,
      camera=batch.get("camid"), flare_ratio=batch.get("flare_ratio"),
      rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
  head = lambda tree: {k: v[:size] for k, v in tree.items()}
  # A flare-aware fusion trains the streams (and a learned gate) with a
  # triplet on the distance it ranks with.
  fused = None
  if model.fusion != "concat" and loss_cfg.fusion_triplet_weight > 0:
    fused = (fusion_lib.normalized_segments(out.embedding[:size]),
             out.weights[:size])
  loss, terms = losses.total_loss(
      head(out.logits), head(out.features), out.flare_logits,
      batch["label"][:size], batch["flare"], loss_cfg,
      flare_maps=out.flare_maps, saturation=batch.get("saturation"),
      fce_guides=out.fce_guides, plug_features=out.plug_features,
      raw_logits=head(out.raw_logits), raw_features=head(out.raw_features),
      fused=fused)
  if restore.copies:
    for m in FLARE_MODALITIES:
      terms[f"ce_flared_{m}"] = losses.cross_entropy(
          out.logits[m][size:], batch["label"][size:],
          loss_cfg.label_smoothing)
      terms[f"restore_{m}"] = losses.restoration_loss(
          out.features[m][size:], out.features[m][src], valid)
      loss += (loss_cfg.ce_weight * terms[f"ce_flared_{m}"] +
               restore.weight * terms[f"restore_{m}"])
    terms["total"] = loss
  return loss, (terms, out, updates["batch_stats"])


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *,
               model: FACENet, optimizer: optax.GradientTransformation,
               loss_cfg: losses.LossConfig, schedule: optax.Schedule,
               seed: int = 0, restore: RestoreConfig = RestoreConfig()):
  """One optimisation step: (state, batch) -> (state, metrics).

  Metrics stay on device; the host fetches them every log_every_steps. The
  "dropout" rng (ViT stochastic depth) and the rendered flares of
  restoration training are functions of (seed, step), so a resumed run draws
  what the uninterrupted one would have. With `restore.copies` > 0 the
  network runs on the batch plus its flared copies (`training_loss`).
  """
  step_key = jax.random.fold_in(jax.random.key(seed), state.step)
  size = batch["label"].shape[0]
  src = valid = None
  if restore.copies:
    batch, src, valid = with_flared_copies(
        batch, restore, jax.random.fold_in(step_key, 1))
  loss_fn = functools.partial(
      training_loss, batch_stats=state.batch_stats, batch=batch, size=size,
      src=src, valid=valid, model=model, loss_cfg=loss_cfg, restore=restore,
      dropout_rng=step_key)
  grads, (terms, out, batch_stats) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {f"train/loss_{k}" if k != "total" else "train/loss": v
             for k, v in terms.items()}
  metrics["train/learning_rate"] = schedule(state.step)
  metrics["train/grad_norm"] = optax.tree.norm(grads)
  for m in FLARE_MODALITIES:
    if m in out.masks:
      metrics[f"train/mask_coverage_{m}"] = jnp.mean(out.masks[m])
      metrics[f"train/threshold_{m}"] = out.thresholds[m]
  new_state = TrainState(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def embed_step(variables: Any, batch: Mapping[str, jax.Array], *,
               model: FACENet, flip_average: bool
               ) -> tuple[jax.Array, jax.Array]:
  """Eval-mode embeddings (B, 3D) and segment weights (B, 3).

  "concat": the whole embedding L2-normalised (the paper). A flare-aware
  fusion: each segment normalised (fusion.normalized_segments), with the
  weights its distance needs. Flip averaging averages both.
  """
  def run(images):
    out = model.apply(variables, images, batch["flare"], train=False,
                      camera=batch.get("camid"),
                      flare_ratio=batch.get("flare_ratio"))
    return out.embedding, out.weights
  emb, weights = run(model_inputs(batch))
  if flip_average:
    flipped, flipped_weights = run({m: batch[m][:, :, ::-1]
                                    for m in MODALITIES})
    emb, weights = emb + flipped, (weights + flipped_weights) / 2
  if model.fusion != "concat":
    return fusion_lib.normalized_segments(emb), weights
  return emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True),
                           1e-12), weights


def compile_train_step(model: FACENet, optimizer: optax.GradientTransformation,
                       loss_cfg: losses.LossConfig, schedule: optax.Schedule,
                       sharding: "Sharding", seed: int = 0,
                       restore: RestoreConfig = RestoreConfig()) -> Callable:
  """train_step jitted for the mesh: state replicated and donated, batch sharded."""
  return jax.jit(
      functools.partial(train_step, model=model, optimizer=optimizer,
                        loss_cfg=loss_cfg, schedule=schedule, seed=seed,
                        restore=restore),
      in_shardings=(sharding.replicated, sharding.data),
      out_shardings=(sharding.replicated, sharding.replicated),
      donate_argnums=0)


# --- Sharding ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sharding:
  """A 1-D data-parallel mesh over all devices of all processes."""
  mesh: jax.sharding.Mesh

  @classmethod
  def create(cls, devices: Optional[list] = None) -> "Sharding":
    """A mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes: the compiler propagates the batch sharding through the model
    # (Explicit axes would demand sharding annotations on every batch-mixing op,
    # e.g. the triplet loss distance matrix).
    return cls(jax.make_mesh((len(devices),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,),
                             devices=devices))

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @property
  def data(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh,
                                      jax.sharding.PartitionSpec("data"))

  def global_batch(self, local: Mapping[str, np.ndarray]) -> dict:
    """Assembles each process's share into global arrays sharded on 'data'."""
    return {k: jax.make_array_from_process_local_data(self.data, v)
            for k, v in local.items() if v.dtype.kind in "fiub"}


# --- State ---------------------------------------------------------------------


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
  variables = to_host({"params": state.params,
                       "batch_stats": state.batch_stats})
  for m in MODALITIES:
    stream = f"{m}_backbone"
    # What no ImageNet file holds (a camera embedding) keeps its init.
    own = {name: leaf for name, leaf in variables["params"][stream].items()
           if name in pretrained.NOT_IN_CHECKPOINTS}
    subtree = {**loaded, "params": {**loaded["params"], **own}}
    variables = pretrained.merge_into(variables, subtree, (stream,))
  logging.info("Initialised the %s backbones from %s", MODALITIES, path)
  return TrainState(step=to_host(state.step), params=variables["params"],
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


def _check_init_from(config: ml_collections.ConfigDict) -> None:
  # Config errors fail before the data is loaded, also on resume.
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
    checkpointing.WarmStartError: the workdir has no checkpoints or not that
      step, nothing matches, or the stream backbones differ.
  """
  workdir, step = parse_init_from(init_from)
  variables = to_host({"params": state.params,
                       "batch_stats": state.batch_stats})
  try:
    step, source = checkpointing.read_variables(workdir, step)
    variables, report = checkpointing.copy_matching(
        variables, source, exact=tuple(f"{m}_backbone" for m in MODALITIES))
  except (FileNotFoundError, checkpointing.WarmStartError) as e:
    raise checkpointing.WarmStartError(
        f"model.init_from={init_from!r}: {e}") from e
  logging.info("Warm start from %s step %d: %s", workdir, step,
               report.summary())
  for name, here, there in report.shape_mismatches:
    logging.info("Warm start: kept %s, shape %s here, %s in the source", name,
                 here, there)
  return TrainState(step=to_host(state.step), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=optimizer.init(variables["params"]))


# --- Data ----------------------------------------------------------------------


def val_ids(config: ml_collections.ConfigDict) -> int:
  """config.val_ids, validated: training identities held out as val."""
  value = config.val_ids
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"config.val_ids must be a non-negative integer (0 = "
                     f"no held-out identities), got {value!r}")
  return value


def eval_splits(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The (query, gallery) splits that config.eval.split ranks."""
  if config.eval.split not in pipeline.EVAL_SPLITS:
    raise ValueError(f"config.eval.split must be one of "
                     f"{sorted(pipeline.EVAL_SPLITS)}, got "
                     f"{config.eval.split!r}")
  return pipeline.EVAL_SPLITS[config.eval.split]


def split_data(config: ml_collections.ConfigDict,
               split: str) -> pipeline.SplitData:
  """The split as the model sees it: loaded, then CLAHE'd if configured.

  With config.val_ids > 0, that many training identities are held out
  (pipeline.carve_val): "train" is what remains and "val_query" /
  "val_gallery" are made of the held-out ones, also on datasets that have
  validation splits of their own (synthetic_flare). With val_ids = 0 the
  validation splits are the dataset's.

  Args:
    config: the run configuration.
    split: train | query | gallery | val_query | val_gallery.

  Returns:
    The split.

  Raises:
    pipeline.MissingSplitError: a validation split was asked for, the
      dataset has none and config.val_ids is 0.
  """
  num_val = val_ids(config)
  load = functools.partial(
      pipeline.load_split, config.dataset,
      builder_config=config.dataset_config, data_dir=config.data_dir or None,
      manual_dir=config.manual_dir or None)
  val_splits = pipeline.EVAL_SPLITS["val"]
  if num_val and split in ("train",) + val_splits:
    train = load("train")
    if num_val >= train.num_ids:
      raise ValueError(f"config.val_ids={num_val} must be smaller than the "
                       f"{train.num_ids} training identities of "
                       f"{config.dataset}")
    data = pipeline.carve_val(train, num_val)[split]
  else:
    try:
      data = load(split)
    except pipeline.MissingSplitError as e:
      if split not in val_splits:
        raise
      raise pipeline.MissingSplitError(
          f"{e}. The dataset has no validation split of its own: set "
          "config.val_ids > 0 to hold out that many training identities as "
          "one (docs/data.md, 'Validation splits').") from e
  if config.preprocess.clahe:
    data = deflare.clahe_split(data, config.preprocess.clahe_clip_limit)
  return data


INPUT_CACHE_MODES = ("auto", "memory", "stream")


def _check_input(config: ml_collections.ConfigDict) -> None:
  if config.input.cache not in INPUT_CACHE_MODES:
    raise ValueError(f"config.input.cache must be one of {INPUT_CACHE_MODES}, "
                     f"got {config.input.cache!r}")
  if not config.input.cache_max_gb >= 0:
    raise ValueError(f"config.input.cache_max_gb must be >= 0, got "
                     f"{config.input.cache_max_gb!r}")
  threads = config.input.threads
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < -1:
    raise ValueError(f"config.input.threads must be an integer >= -1 (-1 = "
                     f"auto), got {threads!r}")
  prefetch = config.input.device_prefetch
  if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
    raise ValueError(f"config.input.device_prefetch must be an integer >= 0, "
                     f"got {prefetch!r}")


def training_cache(config: ml_collections.ConfigDict,
                   data: pipeline.SplitData,
                   saturation: bool) -> Optional[pipeline.DecodedImages]:
  """The training split decoded into memory, if config.input.cache says so.

  "auto" caches when the decoded split fits in config.input.cache_max_gb;
  the choice and its size are logged. None = stream from the encoded bytes.
  """
  _check_input(config)
  size = tuple(config.input_size)
  gigabytes = pipeline.decoded_nbytes(data, size, saturation) / 2**30
  mode = config.input.cache
  if mode == "stream" or (mode == "auto" and
                          gigabytes > config.input.cache_max_gb):
    logging.info("Training input: streaming, decoding every image as it is "
                 "drawn (config.input.cache=%s; decoded split %.2f GB, "
                 "cache_max_gb %.1f).", mode, gigabytes,
                 config.input.cache_max_gb)
    return None
  start = time.perf_counter()
  cache = pipeline.decode_split(
      data, size,
      saturation_bar=config.flare.pixel_low if saturation else None)
  logging.info("Training input: %d triplets decoded into memory, %.2f GB, in "
               "%.1f s (config.input.cache=%s).", data.num_examples,
               gigabytes, time.perf_counter() - start, mode)
  return cache


def device_prefetch(batches: Iterator[Any], put: Callable[[Any], Any],
                    size: int) -> Iterator[Any]:
  """Yields put(batch) for each batch, with `size` of them prepared ahead.

  A background thread draws from `batches` and puts the arrays on the devices
  while the caller runs the previous step, so neither the host-side batch
  nor the transfer waits for the step. Order is kept; an error in the
  thread is raised in the caller at the batch where it happened. size 0
  draws and puts in the caller's thread.
  """
  if size == 0:
    for batch in batches:
      yield put(batch)
    return
  ready = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for batch in batches:
        if not offer(("batch", put(batch))):
          return
    except BaseException as e:  # pylint: disable=broad-except
      offer(("error", e))
      return
    offer(("end", None))

  thread = threading.Thread(target=work, name="device_prefetch", daemon=True)
  thread.start()
  try:
    while True:
      kind, item = ready.get()
      if kind == "error":
        raise item
      if kind == "end":
        return
      yield item
  finally:
    stop.set()


def normalization(config: ml_collections.ConfigDict):
  """Per-modality (mean, std), each float32 (3, 3) in [RGB, NI, TI] order."""
  return (np.asarray(config.normalization.mean, np.float32),
          np.asarray(config.normalization.std, np.float32))


def _check_flare(config: ml_collections.ConfigDict) -> None:
  # The builders store flare_ratio measured at FLARE_PIXEL_LOW; only the ratio
  # threshold can change without rebuilding the dataset.
  from input_pipeline.datasets import features  # pylint: disable=g-import-not-at-top
  if config.flare.pixel_low != features.FLARE_PIXEL_LOW:
    raise ValueError(
        f"flare.pixel_low={config.flare.pixel_low}: the datasets store "
        f"flare_ratio measured at {features.FLARE_PIXEL_LOW} (input_pipeline/"
        "datasets/features.py); change FLARE_PIXEL_LOW and rebuild them to "
        "use another bar.")


def _check_eval_split(config: ml_collections.ConfigDict) -> None:
  # Fails before training, not after it, when the split cannot be evaluated.
  query_split, _ = eval_splits(config)
  if query_split in pipeline.EVAL_SPLITS["val"] and not val_ids(config):
    split_data(config, query_split)


def _check_batch(config: ml_collections.ConfigDict, sharding: Sharding) -> None:
  if config.eval_batch_size < 1:
    raise ValueError(f"eval_batch_size must be >= 1, got "
                     f"{config.eval_batch_size}")
  batch = config.ids_per_batch * config.instances_per_id
  if config.ids_per_batch % jax.process_count():
    raise ValueError(f"ids_per_batch={config.ids_per_batch} must be divisible "
                     f"by the number of processes ({jax.process_count()})")
  if batch % sharding.mesh.size:
    raise ValueError(
        f"The global batch ids_per_batch x instances_per_id = {batch} must be "
        f"divisible by the number of devices ({sharding.mesh.size}).")


# --- The loop ------------------------------------------------------------------


def input_threads(config: ml_collections.ConfigDict) -> int:
  """tf.data threads of the training input (0 = TF's AUTOTUNE).

  config.input.threads = -1 picks 1 when the step runs on the CPU, where
  more input threads take cores from the step, and AUTOTUNE on accelerators.
  """
  if config.input.threads >= 0:
    return config.input.threads
  return 1 if jax.default_backend() == "cpu" else 0


def input_batches(config: ml_collections.ConfigDict,
                  train_data: pipeline.SplitData, sharding: "Sharding",
                  start_step: int) -> Iterator[dict]:
  """The training batches from start_step on, as sharded device arrays.

  Cached in memory or streamed (config.input.cache), then put on the devices
  config.input.device_prefetch batches ahead of the step.
  """
  mean, std = normalization(config)
  saturation = config.loss.flare_pixel_weight > 0 and config.model.use_mfmp
  batches = pipeline.train_batches(
      train_data, ids_per_batch=config.ids_per_batch,
      instances_per_id=config.instances_per_id,
      input_size=tuple(config.input_size), mean=mean, std=std,
      flip_prob=config.augment.flip_prob, pad=config.augment.pad,
      random_erasing_prob=config.augment.random_erasing_prob,
      flare_threshold=config.flare.ratio_threshold, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(),
      saturation=saturation, saturation_bar=config.flare.pixel_low,
      num_threads=input_threads(config),
      cache=training_cache(config, train_data, saturation))
  return device_prefetch(batches, sharding.global_batch,
                         config.input.device_prefetch)


def _devices() -> str:
  devices = jax.devices()
  hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
  return f"{len(devices)} x {devices[0].device_kind}{hosts}"


def _model_summary(config: ml_collections.ConfigDict) -> str:
  m = config.model
  width = (f" x{m.width_multiplier:g}" if "width_multiplier" in
           check_backbone(m.backbone).reads else "")
  parts = [f"3 x {m.backbone}{width}"]
  if m.use_mfmp:
    parts.append(f"MFMP ({'FMI, ' if m.use_fmi else 'no FMI, '}SMP {m.smp})")
  if m.use_fce:
    parts.append("FCE" + (" (projection)" if m.fce_projection else ""))
  if not m.use_mfmp and not m.use_fce:
    parts.append("baseline")
  loss = "CE + triplet"
  if m.use_mfmp:
    loss += " + flare" + (" (+ pixel)" if config.loss.flare_pixel_weight > 0
                          else "")
  if m.use_fce and config.loss.fce_raw_weight > 0:
    loss += " + CE/triplet before FCE"
  if config.loss.modality != "none":
    loss += f" + {config.loss.modality.upper()}"
  if m.fusion != "concat" and config.loss.fusion_triplet_weight > 0:
    loss += " + fused triplet"
  h, w = config.input_size
  return (f"{', '.join(parts)}; {h}x{w}; loss {loss}; fusion "
          f"{fusion_summary(config)}")


def fusion_summary(config: ml_collections.ConfigDict) -> str:
  """The fusion of config.model in a few words, e.g. 'fixed (flared w 0.5)'."""
  m = config.model
  if m.fusion == "fixed":
    return f"fixed (flared w {m.fusion_weight:g})"
  if m.fusion == "saturation":
    return (f"saturation (w {m.fusion_weight:g} from saturated fraction "
            f"{m.fusion_full_ratio:g})")
  return m.fusion


def _header(config: ml_collections.ConfigDict, train_data: pipeline.SplitData,
            num_classes: int, num_steps: int, start_step: int,
            workdir: str) -> str:
  """The few lines a person needs before the progress bar."""
  data = config.dataset + (f"/{config.dataset_config}"
                           if config.dataset_config else "")
  query_split, gallery_split = eval_splits(config)
  start = (f"resumed from step {start_step}" if start_step else
           "from scratch" if not (config.model.pretrained or
                                  config.model.init_from) else
           "from " + (config.model.pretrained or config.model.init_from))
  batch = config.ids_per_batch * config.instances_per_id
  return "\n".join([
      f"data     {data}: train {train_data.num_examples} triplets, "
      f"{num_classes} ids; evaluation on {query_split} vs {gallery_split}",
      f"model    {_model_summary(config)}",
      f"run      {num_steps} steps of {batch} ({config.ids_per_batch} ids x "
      f"{config.instances_per_id}), {start}; {_devices()}",
      f"workdir  {workdir}",
  ])


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
    results_file names those of a config.eval.missing set).
  """
  sharding = Sharding.create()
  _check_batch(config, sharding)
  _check_flare(config)
  loss_config(config)  # Loss-config errors before any data is loaded.
  _check_input(config)
  check_backbone(config.model.backbone)
  _check_missing_for_training(config)
  _check_eval_split(config)
  _check_init_from(config)
  ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
  checkpointing.check_config(workdir, config,
                             has_state=ckpt.latest_step() is not None)
  if not pipeline.is_prepared(config.dataset, config.dataset_config,
                              config.data_dir or None):
    console.print(f"Preparing {config.dataset}"
                  f"{'/' + config.dataset_config if config.dataset_config else ''}"
                  " (first use; done once, kept in TFDS's data_dir)...")
  train_data = split_data(config, "train")
  labels = pipeline.train_label_map(train_data)
  num_classes = len(labels)
  spe = pipeline.steps_per_epoch(train_data, config.ids_per_batch,
                                 config.instances_per_id)
  num_steps = total_steps(config, spe)
  logging.info("Train split: %d triplets, %d ids; %d steps/epoch; %d steps",
               train_data.num_examples, num_classes, spe, num_steps)

  num_cameras = int(train_data.camid.max()) + 1 if len(train_data.camid) else 0
  checkpointing.write_run_info(
      workdir, num_classes=num_classes, steps_per_epoch=spe,
      num_cameras=num_cameras, **checkpointing.record_environment(
          workdir, has_state=ckpt.latest_step() is not None))
  model = build_model(config, num_classes, num_cameras)
  schedule = learning_rate_schedule(config, spe)
  optimizer = build_optimizer(config, schedule)
  rng = jax.random.key(config.seed)
  init_fn = functools.partial(create_state, model, optimizer,
                              tuple(config.input_size))
  abstract = jax.eval_shape(init_fn, rng)
  state_sharding = jax.tree.map(lambda _: sharding.replicated, abstract)

  if ckpt.latest_step() is not None:
    state = ckpt.restore(_with_sharding(abstract, state_sharding))
    logging.info("Resumed from step %d", int(to_host(state.step)))
  else:
    state = jax.jit(init_fn, out_shardings=state_sharding)(rng)
    if config.model.pretrained:
      state = put_replicated(
          load_pretrained(state, config.model.pretrained,
                          config.model.backbone, optimizer,
                          config.input_size),
          sharding.replicated)
    if config.model.init_from:
      state = put_replicated(
          load_init_from(state, config.model.init_from, optimizer),
          sharding.replicated)
  start_step = int(to_host(state.step))

  console.print(_header(config, train_data, num_classes, num_steps,
                        start_step, workdir))
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    overview = parameter_overview.get_parameter_overview(
        to_host(state.params))
    logging.info("Parameters:\n%s", overview)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, console_lib.PARAMETERS_FILE), "w") as f:
        f.write(overview + "\n")
    writer.write_hparams({k: v for k, v in checkpointing.flatten_config(
        checkpointing.config_to_dict(config)).items()
                          if isinstance(v, (int, float, str, bool))})

  step_fn = compile_train_step(model, optimizer, loss_config(config), schedule,
                               sharding, seed=config.seed,
                               restore=restore_config(config))
  batches = input_batches(config, train_data, sharding, start_step)

  report = periodic_actions.ReportProgress(num_train_steps=num_steps,
                                           writer=writer)
  pending = []
  last_saved = start_step
  bar = console.progress(num_steps, "train", initial=start_step)
  for step in range(start_step + 1, num_steps + 1):
    state, metrics = step_fn(state, next(batches))
    pending.append(metrics)
    report(step)
    is_last = step == num_steps
    if step % config.log_every_steps == 0 or is_last:
      bar.update(step, loss=_write_metrics(writer, step, pending))
      pending = []
    else:
      bar.update(step)
    if step % config.checkpoint_every_steps == 0 or is_last:
      _check_finite(state, step, last_saved, ckpt.directory)
      ckpt.save(step, state)
      last_saved = step
  bar.close()
  batches.close()  # Stops the prefetch thread.
  ckpt.wait()
  writer.flush()
  results = evaluate(config, workdir, model, state, sharding, console)
  ckpt.close()
  return results


def to_host(tree: Any) -> Any:
  """Fetches replicated arrays to NumPy, also when they span several hosts.

  `jax.device_get` refuses arrays with devices on other processes; a
  replicated array's local shard already holds the whole value.
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError("to_host needs replicated arrays on multiple hosts")
      return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def put_replicated(tree: Any,
                   sharding: jax.sharding.NamedSharding) -> Any:
  """Host values (identical on every process) -> replicated global arrays."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def _with_sharding(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def _write_metrics(writer, step: int, pending: list) -> float:
  """One host sync: averages the device metrics gathered since the last log.

  Returns:
    The mean training loss over those steps.
  """
  fetched = to_host(pending)
  summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  if not math.isfinite(summary["train/loss"]):
    raise NonFiniteLossError(
        f"Training loss became non-finite by step {step} "
        f"({summary['train/loss']}); terms: {summary}. The last good "
        "checkpoint is kept; lower the learning rate or use float32.")
  writer.write_scalars(step, summary)
  return summary["train/loss"]


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def _check_finite(state: TrainState, step: int, last_saved: int,
                  directory: str) -> None:
  """Refuses to save a state whose parameters are no longer finite."""
  if not bool(to_host(_all_finite(state.params))):
    raise NonFiniteLossError(
        f"Parameters are non-finite at step {step}; not saving. The last good "
        f"checkpoint (step {last_saved}) is kept in {directory}.")


# --- Evaluation ----------------------------------------------------------------

# config.eval.missing_in: the side(s) of the ranking the missing modalities
# are blanked on.
MISSING_SIDES = ("query", "gallery", "both")
# config.eval.missing="all": every modality, then every non-empty proper
# subset missing (one or two of the three), the rows of a missing-modality
# table in TOP-ReID, DeMo and IDEA.
MISSING_SWEEP = tuple(
    missing for size in range(len(MODALITIES))
    for missing in itertools.combinations(MODALITIES, size))
# The sweep's outputs in the workdir (checkpointing.split_file names the val
# split's; missing_in other than "both" adds _query / _gallery).
MISSING_TABLE_FILE = "missing_modality.md"
MISSING_ROWS_FILE = "missing_modality.json"


def _is_sweep(value: Any) -> bool:
  return isinstance(value, str) and value.strip().lower() == "all"


def parse_missing(value: Any) -> tuple[str, ...]:
  """One value of config.eval.missing -> the missing modalities.

  Args:
    value: "none", or a comma-separated set of modalities, e.g. "rgb,ni"
      (case and spaces ignored).

  Returns:
    The set in MODALITIES order ("ni,rgb" and "rgb,ni" are one set), () for
    "none".

  Raises:
    ValueError: naming config.eval.missing, for a name that is not a
      modality, a name given twice, or all three modalities.
  """
  expected = (f"expected 'none', 'all' or a comma-separated set of "
              f"{', '.join(MODALITIES)} (e.g. 'rgb,ni')")
  if not isinstance(value, str):
    raise ValueError(f"config.eval.missing must be a string, {expected}; got "
                     f"{value!r}")
  if value.strip().lower() == "none":
    return ()
  names = [name.strip() for name in value.lower().split(",")]
  for name in names:
    if name not in MODALITIES:
      raise ValueError(f"config.eval.missing={value!r}: {name!r} is not a "
                       f"modality; {expected}")
  for name in MODALITIES:
    if names.count(name) > 1:
      raise ValueError(f"config.eval.missing={value!r} names {name!r} "
                       f"{names.count(name)} times; name each missing "
                       "modality once")
  if len(names) == len(MODALITIES):
    raise ValueError(f"config.eval.missing={value!r} blanks every modality, "
                     "leaving nothing to embed; name at most two of "
                     f"{', '.join(MODALITIES)}")
  return tuple(m for m in MODALITIES if m in names)


def missing_label(missing: Sequence[str]) -> str:
  """The config.eval.missing value of a set: "none", "ni", "rgb,ti", ..."""
  return ",".join(missing) or "none"


def missing_side(config: ml_collections.ConfigDict) -> str:
  """config.eval.missing_in, validated."""
  side = config.eval.missing_in
  if side not in MISSING_SIDES:
    raise ValueError(f"config.eval.missing_in must be one of {MISSING_SIDES} "
                     f"(where config.eval.missing is blanked), got {side!r}")
  return side


# config.eval.rendered_flare (beyond the paper): the side(s) of the ranking
# whose RGB and NI images get a flare of flare_render's family (the one
# restoration training renders; neither synthetic_flare's generator nor a
# camera makes it) before they are embedded: how a model ranks under flare
# that it was not trained on. "none" leaves every image as it is.
RENDER_SIDES = ("none", "query", "gallery", "both")


def rendered_flare_side(config: ml_collections.ConfigDict) -> str:
  """config.eval.rendered_flare, validated."""
  side = config.eval.rendered_flare
  if side not in RENDER_SIDES:
    raise ValueError(f"config.eval.rendered_flare must be one of "
                     f"{RENDER_SIDES} (where a flare is rendered onto RGB and "
                     f"NI at evaluation), got {side!r}")
  if side != "none" and config.preprocess.clahe:
    raise ValueError(
        f"config.eval.rendered_flare={side!r} with preprocess.clahe: the "
        "flare would be rendered onto the CLAHE-enhanced images, not "
        "enhanced with them; evaluate a run without CLAHE")
  return side


def render_key(config: ml_collections.ConfigDict, split: str) -> np.ndarray:
  """The raw key (uint32 (2,)) of a split's rendered flares.

  Query and gallery splits draw from different streams, so that no query
  gets the same flare as a gallery image of the same index; an image's own
  flare is then keyed by its index (render_eval_flare).
  """
  side = 2 if "gallery" in split else 1
  return np.asarray(jax.random.fold_in(
      jax.random.PRNGKey(config.eval.rendered_flare_seed), side))


def render_eval_flare(batch: Mapping[str, jax.Array], key: jax.Array,
                      config: ml_collections.ConfigDict) -> dict:
  """The eval batch with a rendered flare on every RGB and NI image.

  The images are normalised, as the pipeline gives them: the flare is added
  to the raw pixels (flare_render.add_flare_by_index, keyed by example index)
  and the result normalised again. An image is fed as flared where it was
  (the real pseudo-label) or where the rendered image is, measured at the
  network's input size; the original image's own flare, if it had one,
  stays under the rendered one.
  """
  flared, rendered = _render_normalised(
      batch, *normalization(config),
      lambda rgb, ni: flare_render.add_flare_by_index(
          key, batch["index"], rgb, ni, pixel_low=config.flare.pixel_low,
          ratio_threshold=config.flare.ratio_threshold))
  out = {**batch, **flared}
  out["flare"] = jnp.maximum(batch["flare"],
                             rendered.flare.astype(batch["flare"].dtype))
  if "flare_ratio" in batch:
    # Measured at the input size, like the rendered pseudo-label.
    ratio = jnp.mean(rendered.saturation, axis=(1, 2))
    out["flare_ratio"] = jnp.maximum(batch["flare_ratio"],
                                     ratio.astype(batch["flare_ratio"].dtype))
  return out


def missing_sets(
    config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
  """The missing-modality sets config.eval asks for, both fields validated.

  Returns:
    MISSING_SWEEP for config.eval.missing="all", else the one set.
  """
  missing_side(config)
  if _is_sweep(config.eval.missing):
    return MISSING_SWEEP
  return (parse_missing(config.eval.missing),)


def _check_missing_for_training(config: ml_collections.ConfigDict) -> None:
  # Before training, not after it: a training run evaluates one set.
  missing_sets(config)
  rendered_flare_side(config)
  if _is_sweep(config.eval.missing):
    raise ValueError(
        "config.eval.missing='all' sweeps the missing-modality sets of a "
        "trained run and needs --mode eval; train with config.eval.missing="
        "none (or one set), then run --mode eval --config.eval.missing=all")


def missing_by_side(missing: Sequence[str],
                    side: str) -> dict[str, tuple[str, ...]]:
  """What the query and the gallery each lack when `side` loses `missing`."""
  return {s: tuple(missing) if side in (s, "both") else ()
          for s in ("query", "gallery")}


def input_keep(missing: Sequence[str] = (),
               zero_flare: bool = False) -> dict[str, np.ndarray]:
  """Which network inputs an evaluation feeds, as the arrays blank_inputs reads.

  Args:
    missing: modalities that are missing.
    zero_flare: feed no flare pseudo-label at all (FCE replaces nothing).

  Returns:
    "images": bool (3,) in MODALITIES order, False for a missing modality;
    "flare": bool (2,) in FLARE_MODALITIES order, False for a missing RGB or
    NI (a missing image has no flare), and everywhere with zero_flare.
  """
  unknown = set(missing) - set(MODALITIES)
  if unknown:
    raise ValueError(f"Unknown modalities {sorted(unknown)}; known: "
                     f"{MODALITIES}")
  return {"images": np.array([m not in missing for m in MODALITIES]),
          "flare": np.array([m not in missing and not zero_flare
                             for m in FLARE_MODALITIES])}


def blank_inputs(batch: Mapping[str, jax.Array],
                 keep: Mapping[str, jax.Array]) -> dict:
  """The batch as the network sees it: what `keep` leaves out is zero.

  Applied to normalised images, so a missing image is a network input of
  exactly 0 (every pixel at the normalisation mean), and its flare
  pseudo-label is 0.

  Args:
    batch: rgb, ni, ti (B, H, W, 3) normalised, flare (B, 2), anything else.
    keep: input_keep's "images" (3,) and "flare" (2,) booleans; arrays, so
      that one compilation serves every missing set.

  Returns:
    The batch with those images and pseudo-label columns zeroed; the other
    entries are the same arrays.
  """
  out = dict(batch)
  for i, m in enumerate(MODALITIES):
    # A Python 0 is weakly typed: the images keep their dtype.
    out[m] = jnp.where(keep["images"][i], batch[m], 0)
  out["flare"] = jnp.where(keep["flare"], batch["flare"], 0)
  if "flare_ratio" in batch:
    out["flare_ratio"] = jnp.where(keep["flare"], batch["flare_ratio"], 0)
  return out


def embedding_function(config: ml_collections.ConfigDict, model: FACENet,
                       sharding: Sharding, render: bool = False) -> Callable:
  """extract's jitted (variables, batch, keep) -> (embedding, metadata).

  What is fed (`keep`, from input_keep) is an input, not a constant, so one
  compilation serves both splits and every set of a missing-modality sweep.
  The metadata goes through the same jit with replicated outputs: that is the
  all-gather that gives every process every example on multiple hosts. It
  holds the real "flare" labels and the "flare_input" fed.

  With `render`, a flare is rendered onto RGB and NI first
  (render_eval_flare, keyed by keep["render_key"]); missing modalities are
  blanked after that.
  """
  embed = functools.partial(embed_step, model=model,
                            flip_average=config.eval.flip_average)

  def run(variables, batch, keep):
    seen = render_eval_flare(batch, keep["render_key"], config) if render \
        else batch
    fed = blank_inputs(seen, keep)
    metadata = {k: batch[k] for k in EVAL_METADATA}
    metadata["flare_input"] = fed["flare"]
    metadata["flare_ratio_input"] = fed["flare_ratio"]
    return embed(variables, fed), metadata

  jitted = jax.jit(run, in_shardings=(sharding.replicated, sharding.data,
                                      sharding.replicated),
                   out_shardings=sharding.replicated)

  def embed_fn(variables, batch, keep):
    return jitted(variables, batch, keep)

  embed_fn.render = render  # What extract checks against its own `render`.
  return embed_fn


def extract(config: ml_collections.ConfigDict, model: FACENet, variables: Any,
            split: str, sharding: Sharding, zero_flare: bool = False,
            console: console_lib.Console = console_lib.SILENT,
            missing: Sequence[str] = (),
            embed_fn: Optional[Callable] = None,
            data: Optional[pipeline.SplitData] = None,
            render: bool = False) -> dict:
  """Embeddings and metadata of one split, every example exactly once.

  Args:
    config: the run configuration.
    model: the network.
    variables: its params and batch_stats, replicated.
    split: query | gallery | val_query | val_gallery.
    sharding: the mesh the batches are sharded on.
    zero_flare: feed flare pseudo-labels of 0, so that FCE replaces nothing
      (a diagnostic).
    console: where the progress bar goes.
    missing: modalities to blank (blank_inputs): input 0, and delta 0 for a
      missing RGB or NI.
    embed_fn: embedding_function(config, model, sharding), to share one
      compilation between calls; built here when None.
    data: split_data(config, split), for a caller that holds it already;
      loaded here when None.
    render: render a flare onto every RGB and NI image first
      (render_eval_flare); a given embed_fn must be built with the same
      `render`.

  Returns:
    "embedding" (N, 3D) and the EVAL_METADATA fields, in split order;
    with a flare-aware fusion also "weights" (N, 3), the segment weights
    (the embedding is then fusion.normalized_segments').
    "flare" (N, 2) stays the real images' pseudo-labels, so the flare and
    clean queries are the same whatever is fed; "flare_input" and
    "flare_ratio_input" (N, 2) are the pseudo-labels and saturated fractions
    the model was fed.
  """
  # embedding_function marks what it built; another callable is trusted.
  if getattr(embed_fn, "render", render) != render:
    raise ValueError(f"extract(render={render}) was given an embed_fn built "
                     f"with render={not render}")
  if data is None:
    data = split_data(config, split)
  if model.num_cameras and len(data.camid) and (
      data.camid.max() >= model.num_cameras):
    raise ValueError(
        f"model.camera_embedding: {split} has camera {int(data.camid.max())}, "
        f"but the training split, which sized the embedding, has cameras "
        f"0-{model.num_cameras - 1} only")
  mean, std = normalization(config)
  if embed_fn is None:
    embed_fn = embedding_function(config, model, sharding, render=render)
  keep = input_keep(missing, zero_flare)
  if render:
    keep["render_key"] = render_key(config, split)
  keep = put_replicated(keep, sharding.replicated)
  # Round the batch up to a multiple of the devices; padding is masked out.
  batch_size = -(-config.eval_batch_size // sharding.mesh.size) * (
      sharding.mesh.size)
  out = {k: [] for k in ("embedding", "weights", "flare_input",
                         "flare_ratio_input") + EVAL_METADATA}
  local_batch = batch_size // jax.process_count()
  num_batches = pipeline.num_eval_batches(data.num_examples, local_batch,
                                          jax.process_count())
  desc = f"embed {split} ({data.num_examples})" + (
      f" without {missing_label(missing)}" if missing else "") + (
          " with rendered flare" if render else "")
  with console.progress(num_batches, desc, unit="batch") as bar:
    for b, local in enumerate(pipeline.eval_batches(
        data, batch_size=local_batch,
        input_size=tuple(config.input_size), mean=mean, std=std,
        flare_threshold=config.flare.ratio_threshold,
        process_index=jax.process_index(),
        process_count=jax.process_count()), start=1):
      (embedding, weights), metadata = to_host(
          embed_fn(variables, sharding.global_batch(local), keep))
      out["embedding"].append(np.asarray(embedding))
      out["weights"].append(np.asarray(weights))
      for key, value in metadata.items():
        out[key].append(np.asarray(value))
      bar.update(b)
  result = {k: np.concatenate(v) for k, v in out.items()}
  if model.fusion == "concat":
    # The paper's Euclidean ranking: evaluation.distance_matrix ranks with
    # the fused distance where the weights are given.
    del result["weights"]
  valid = result["valid"].astype(bool)
  result = {k: v[valid] for k, v in result.items()}
  order = np.argsort(result["index"])
  return {k: v[order] for k, v in result.items()}


def rank(config: ml_collections.ConfigDict, query: dict,
         gallery: dict, distmat: Optional[np.ndarray] = None) -> dict:
  """evaluation.rank_report with the dataset's protocol and eval settings."""
  return evaluation.rank_report(
      query, gallery, max_rank=config.eval.max_rank,
      use_scenes=config.dataset in MSVR_SCENE_DATASETS,
      rerank=config.eval.rerank, distmat=distmat)


def results_file(split: str, missing: Sequence[str] = (),
                 side: str = "both", rendered: str = "none") -> str:
  """The name of the results file of one evaluation, in the workdir.

  eval_results.json (test) / eval_results_val.json (val) with every
  modality: the files the study driver reads. A missing set writes
  eval_results_missing-<m>[+<m>]_<side>[_val].json, so that it never
  overwrites them (e.g. eval_results_missing-rgb+ni_both.json); a rendered
  flare (config.eval.rendered_flare) adds _rendered-flare-<side> before
  the split's suffix (eval_results_rendered-flare-query_val.json).
  """
  name = checkpointing.EVAL_RESULTS_FILE
  stem, ext = os.path.splitext(name)
  if missing:
    stem += f"_missing-{'+'.join(missing)}_{side}"
  if rendered != "none":
    stem += f"_rendered-flare-{rendered}"
  return checkpointing.split_file(stem + ext, split)


def _sweep_file(name: str, split: str, side: str,
                rendered: str = "none") -> str:
  stem, ext = os.path.splitext(name)
  if side != "both":
    stem += f"_{side}"
  if rendered != "none":
    stem += f"_rendered-flare-{rendered}"
  return checkpointing.split_file(stem + ext, split)


def results_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where an evaluation of config writes its results (the sweep: its table)."""
  side = missing_side(config)
  if _is_sweep(config.eval.missing):
    name = _sweep_file(MISSING_TABLE_FILE, config.eval.split, side,
                       rendered_flare_side(config))
  else:
    name = results_file(config.eval.split, parse_missing(config.eval.missing),
                        side, rendered_flare_side(config))
  return os.path.join(workdir, name)


def _evaluate_set(config: ml_collections.ConfigDict, workdir: str,
                  model: FACENet, state: TrainState, sharding: Sharding,
                  missing: tuple[str, ...], side: str, embed_fn: dict,
                  console: console_lib.Console) -> dict:
  """Ranks one missing set (() = every modality) and writes its results file.

  embed_fn: {render: embedding_function(..., render)}, filled here as the
  sides of config.eval.rendered_flare need them, so that a sweep compiles
  each once.
  """
  query_split, gallery_split = eval_splits(config)
  lacks = missing_by_side(missing, side)
  rendered = rendered_flare_side(config)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  start = time.time()
  embedded = {}
  for part, split in (("query", query_split), ("gallery", gallery_split)):
    render = rendered in (part, "both")
    if render not in embed_fn:
      embed_fn[render] = embedding_function(config, model, sharding, render)
    embedded[part] = extract(config, model, variables, split, sharding,
                             console=console, missing=lacks[part],
                             embed_fn=embed_fn[render], render=render)
  results = rank(config, embedded["query"], embedded["gallery"])
  results["step"] = int(to_host(state.step))
  results["dataset"] = config.dataset
  results["split"] = config.eval.split
  results["missing"] = missing_label(missing)
  # Nothing is blanked anywhere when nothing is missing: the full-modality
  # file does not depend on an eval.missing_in that has no effect.
  results["missing_in"] = side if missing else "none"
  results["rendered_flare"] = rendered
  results["fusion"] = {k: config.model[k]
                       for k in checkpointing.FUSION_FIELDS}
  logging.info("Evaluated step %d on %s/%s in %.1fs: %s", results["step"],
               query_split, gallery_split, time.time() - start,
               json.dumps(results))
  if jax.process_index() == 0:
    path = os.path.join(workdir, results_file(config.eval.split, missing,
                                              side, rendered))
    with open(path, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results


def evaluate(config: ml_collections.ConfigDict, workdir: str, model: FACENet,
             state: TrainState, sharding: Sharding,
             console: console_lib.Console = console_lib.SILENT) -> dict:
  """Ranks the gallery for every query of config.eval.split.

  The modalities of config.eval.missing are blanked on the side(s)
  config.eval.missing_in names. Writes results_file(...): with every
  modality WORKDIR/eval_results.json (test split) or eval_results_val.json
  (val split), so that evaluating one split keeps the other's results; a
  missing set writes a file of its own.

  Raises:
    ValueError: config.eval.missing is invalid, or "all" (a sweep:
      evaluate_missing_sweep).
  """
  if _is_sweep(config.eval.missing):
    raise ValueError("config.eval.missing='all' is a sweep: use "
                     "evaluate_missing_sweep (--mode eval)")
  (missing,) = missing_sets(config)
  side = missing_side(config)
  results = _evaluate_set(config, workdir, model, state, sharding, missing,
                          side, {}, console)
  query_split, gallery_split = eval_splits(config)
  sides = lambda s: "query and gallery" if s == "both" else s
  without = (f", without {missing_label(missing)} in the {sides(side)}"
             if missing else "")
  rendered = rendered_flare_side(config)
  if rendered != "none":
    without += f", rendered flare on the {sides(rendered)}"
  console.print(f"\n{config.dataset} {config.eval.split} split "
                f"({query_split} vs {gallery_split}), step {results['step']}"
                f"{without}, percentages:")
  console.print(evaluation.format_results(results))
  return results


def _percent(results: Mapping[str, Any], key: str) -> str:
  return f"{100 * results[key]:.1f}" if key in results else "-"


def missing_modality_table(sweep: Mapping[str, Any]) -> str:
  """A sweep (evaluate_missing_sweep) as a markdown table of percentages."""
  where = {"both": "the query and the gallery", "query": "the query only",
           "gallery": "the gallery only"}[sweep["missing_in"]]
  rendered = sweep.get("rendered_flare", "none")
  flare = ("" if rendered == "none" else
           f", with a rendered flare on the "
           f"{'query and gallery' if rendered == 'both' else rendered}")
  lines = [
      f"Missing modalities blanked in {where}{flare}: {sweep['dataset']}, "
      f"{sweep['split']} split, step {sweep['step']}; percentages. flare / "
      "clean: the queries whose real RGB or NI image has flare / neither "
      "has.",
      "",
      "| missing | present | mAP | R-1 | R-5 | R-10 | flare mAP | "
      "clean mAP |",
      "|---|---|---:|---:|---:|---:|---:|---:|"]
  for row in sweep["rows"]:
    missing = parse_missing(row["missing"])
    present = "+".join(m for m in MODALITIES if m not in missing)
    cells = [row["missing"], present] + [
        _percent(row, k) for k in ("mAP", "rank1", "rank5", "rank10")] + [
            _percent(row[s], "mAP") for s in ("flare", "clean")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def evaluate_missing_sweep(
    config: ml_collections.ConfigDict, workdir: str, model: FACENet,
    state: TrainState, sharding: Sharding,
    console: console_lib.Console = console_lib.SILENT) -> dict:
  """config.eval.missing="all": every set of MISSING_SWEEP from one state.

  Each set writes the results file that evaluating it alone writes
  (results_file; "none" rewrites eval_results.json with the same numbers).
  The rows go to WORKDIR/missing_modality.md (the table) and
  missing_modality.json; _val for the val split, and _query / _gallery
  before those for config.eval.missing_in other than "both".

  Returns:
    {"step", "dataset", "split", "missing_in", "rows"}: rows are the
    results of every set, in MISSING_SWEEP order.
  """
  side = missing_side(config)
  embed_fn = {}
  rows = [_evaluate_set(config, workdir, model, state, sharding, missing,
                        side, embed_fn, console)
          for missing in MISSING_SWEEP]
  rendered = rendered_flare_side(config)
  sweep = {"step": rows[0]["step"], "dataset": config.dataset,
           "split": config.eval.split, "missing_in": side,
           "rendered_flare": rendered, "rows": rows}
  table = missing_modality_table(sweep)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, _sweep_file(
        MISSING_ROWS_FILE, config.eval.split, side, rendered)), "w") as f:
      json.dump(sweep, f, indent=2, sort_keys=True)
    with open(os.path.join(workdir, _sweep_file(
        MISSING_TABLE_FILE, config.eval.split, side, rendered)), "w") as f:
      f.write(table)
  console.print("")
  console.print(table.rstrip())
  return sweep


def abstract_state(config: ml_collections.ConfigDict, num_classes: int,
                   steps_per_epoch: int, num_cameras: int = 0):
  """(model, optimizer, the state's shapes and dtypes) of a config; no arrays."""
  model = build_model(config, num_classes, num_cameras)
  optimizer = build_optimizer(
      config, learning_rate_schedule(config, steps_per_epoch))
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
  sharding = Sharding.create()
  state_sharding = jax.tree.map(lambda _: sharding.replicated, abstract)
  ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
  state = ckpt.restore(_with_sharding(abstract, state_sharding), step)
  ckpt.close()
  return model, state, sharding


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str,
    step: Optional[int] = None,
    console: console_lib.Console = console_lib.SILENT,
    recorded_fusion: bool = True) -> dict:
  """--mode eval: restores the latest (or given) checkpoint and evaluates it.

  With `recorded_fusion`, the fusion chosen on the run's val split
  (scripts/fusion.py) is used where config keeps the trained one
  (checkpointing.apply_recorded_fusion); the study evaluates every run as
  its variant is configured instead.

  config.eval.missing="all" restores once and sweeps every missing set
  (evaluate_missing_sweep, whose summary it returns).
  """
  # Config errors before the checkpoint is read.
  sets = missing_sets(config)
  rendered = rendered_flare_side(config)
  chosen = (checkpointing.apply_recorded_fusion(config, workdir)
            if recorded_fusion else None)
  model, state, sharding = restore_for_eval(config, workdir, step)
  what = (f"with each of the {len(sets)} missing-modality sets "
          if len(sets) > 1 else "")
  if chosen:
    what += f"with the fusion chosen on val, {fusion_summary(config)}, "
  if rendered != "none":
    what += (f"with a rendered flare on the "
             f"{'query and gallery' if rendered == 'both' else rendered} ")
  console.print(f"Evaluating step {int(to_host(state.step))} of {workdir} "
                f"{what}on the {config.eval.split} split; {_devices()}")
  if _is_sweep(config.eval.missing):
    return evaluate_missing_sweep(config, workdir, model, state, sharding,
                                  console)
  return evaluate(config, workdir, model, state, sharding, console)
