"""What a run is made of, built from its config: model, loss, schedule, optimizer.

The only place that turns config.model, config.loss and config.optimizer into
typed objects; the model and the losses never see the ConfigDict.
"""

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from facenet_jax import losses
from facenet_jax.models import FACENet
from facenet_jax.models import backbones


def check_config(config: ml_collections.ConfigDict) -> None:
  """The model, loss and optimizer fields, before anything is built.

  Raises:
    ValueError: naming the field.
  """
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, "
                     f"got {m.dtype!r}")
  check_backbone(m.backbone)
  loss_config(config)
  if config.optimizer.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got "
                     f"{config.optimizer.name!r}")
  if config.optimizer.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule must be 'piecewise' or 'cosine', "
                     f"got {config.optimizer.schedule!r}")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


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
      smp_topk_fraction=m.smp_topk_fraction,
      mask_detach=m.mask_detach, mask_stage=m.mask_stage,
      fce_projection=m.fce_projection,
      fce_clean=m.fce_clean, fce_mask_gradient=m.fce_mask_gradient,
      embedding_source=m.embedding, fusion=m.fusion,
      fusion_weight=m.fusion_weight, fusion_full_ratio=m.fusion_full_ratio,
      dtype=DTYPES[m.dtype])


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
  """config.loss as a typed LossConfig, checked against config.model."""
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
SCHEDULES = ("piecewise", "cosine")


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


def model_summary(config: ml_collections.ConfigDict) -> str:
  """The network, input size, loss and fusion in one line, for the console."""
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
  if config.loss.modality != "none":
    loss += f" + {config.loss.modality.upper()}"
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

