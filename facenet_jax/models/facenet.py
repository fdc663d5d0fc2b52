"""FACENet: Flare-Aware Cross-modal Enhancement Network (paper sections 3.1-3.3).

Three non-shared ResNet streams (RGB, NI, TI). After a chosen stage
(`plug_stage`, paper default 4) the flare-susceptible RGB and NI feature maps
go through MFMP (mutual flare mask prediction: FMI + SMP) and FCE
(flare-aware cross-modal enhancement with the TI map); the stages after the
plug-in point continue per stream. Each stream ends in global average pooling,
a BatchNorm neck and a bias-free classifier.

Every interpretation of the paper's garbled equations 4-6 is documented in
docs/model.md and is switchable through the attributes below. All switches
off is the paper's baseline: three streams trained with CE + triplet.

Arrays are NHWC. B = batch, C = channels at the plug-in stage, D = channels of
the stage-4 map (the per-stream feature dimension).
"""

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from facenet_jax.constants import FLARE_MODALITIES, GUIDE_MODALITY, MODALITIES
from facenet_jax.models import resnet

Array = jax.Array
Dtype = Any

EMBEDDING_SOURCES = ("before_bn", "after_bn")


@flax.struct.dataclass
class ModelOutput:
  """What FACENet returns.

  Attributes:
    embedding: (B, 3 * D) retrieval embedding, the concatenation of the
      [RGB | NI | TI] stream features (before or after the BN neck), not yet
      L2-normalised.
    features: modality -> (B, D) pooled stream features before the BN neck
      (used by the triplet and modality-relation losses).
    logits: modality -> (B, num_classes) identity logits.
    masks: flare modality -> (B, h, w, C) hard {0, 1} flare masks at the plug-in
      resolution (straight-through gradient); empty without MFMP.
    flare_logits: flare modality -> (B,) SMP "this image is flare-corrupted"
      logits; empty without MFMP.
    thresholds: flare modality -> () the learnable mask threshold Delta.
  """
  embedding: Array
  features: Mapping[str, Array]
  logits: Mapping[str, Array]
  masks: Mapping[str, Array]
  flare_logits: Mapping[str, Array]
  thresholds: Mapping[str, Array]


def _conv_bn_relu(x: Array, features: int, kernel: int, train: bool,
                  dtype: Dtype, name: str) -> Array:
  pad = (kernel - 1) // 2
  x = nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
              use_bias=False, kernel_init=resnet.conv_init, dtype=dtype,
              param_dtype=jnp.float32, name=f"{name}_conv")(x)
  x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=dtype, param_dtype=jnp.float32, name=f"{name}_bn")(x)
  return nn.relu(x)


def _conv1x1(features: int, dtype: Dtype, name: str,
             use_bias: bool = True) -> nn.Conv:
  return nn.Conv(features, (1, 1), use_bias=use_bias,
                 kernel_init=resnet.conv_init, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


class FMI(nn.Module):
  """Flare-susceptible mutual interaction (paper eqs. 2-4).

  f_C' = four convolutions on concat(f_R, f_N) with kernels 3x3, 3x3, 1x1,
  3x3 in that order (the order MISSION.md and the paper's prose give; eq. 3 is
  garbled), each with BN and ReLU, the first three `width` channels wide, the
  last C. An SE-style channel
  attention gives f_att = sigmoid(conv1x1(relu(conv1x1(GAP(f_C'))))), and the
  common flare feature is f_C = f_att * f_C' + f_C'.

  Attributes:
    channels: C, the channels of f_R and f_N and of the output.
    width: inner width of the first three convolutions (C = paper-faithful).
    reduction: channel reduction of the attention bottleneck.
  """
  channels: int
  width: int
  reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_rgb: Array, f_ni: Array, train: bool) -> Array:
    """Maps two (B, h, w, C) maps to the common feature f_C (B, h, w, C)."""
    x = jnp.concatenate([f_rgb, f_ni], axis=-1)
    x = _conv_bn_relu(x, self.width, 3, train, self.dtype, "mix1")
    x = _conv_bn_relu(x, self.width, 3, train, self.dtype, "mix2")
    x = _conv_bn_relu(x, self.width, 1, train, self.dtype, "mix3")
    f_common = _conv_bn_relu(x, self.channels, 3, train, self.dtype, "mix4")
    hidden = max(1, self.channels // self.reduction)
    att = jnp.mean(f_common, axis=(1, 2), keepdims=True)
    att = nn.relu(_conv1x1(hidden, self.dtype, "att_reduce")(att))
    att = nn.sigmoid(_conv1x1(self.channels, self.dtype, "att_expand")(att))
    return att * f_common + f_common


def straight_through_mask(logits: Array, threshold: Array,
                          temperature: float) -> Array:
  """Hard mask 1[logits > threshold] with a sigmoid straight-through gradient.

  Forward: the hard {0, 1} mask. Backward: the gradient of
  sigmoid((logits - threshold) / temperature), so both the mask branch and the
  threshold Delta learn (the official code's threshold never gets a gradient).

  Args:
    logits: (...) mask logits m_S.
    threshold: () learnable Delta.
    temperature: tau > 0 of the surrogate sigmoid.

  Returns:
    (...) float mask with values exactly 0 or 1.
  """
  soft = nn.sigmoid((logits - threshold) / temperature)
  hard = (logits > threshold).astype(soft.dtype)
  return soft + jax.lax.stop_gradient(hard - soft)


class FlareMask(nn.Module):
  """Per-modality mask branch and SMP head for one flare-susceptible spectrum.

  a_S = sigmoid(conv1x1(f_C) * conv1x1(f_S)); A_S = a_S * f_S + f_S;
  m_S = conv1x1(A_S); M_S = 1[m_S > Delta] (straight-through). The SMP head
  predicts "this image is flare-corrupted" from the masked feature M_S * f_S
  (GAP -> Dense -> ReLU -> Dense(1)), trained against the pseudo-label delta_S.

  Attributes:
    channels: C.
    temperature: tau of the straight-through surrogate.
  """
  channels: int
  temperature: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_common: Array, f_self: Array):
    """Returns (A_S, M_S, flare logit (B,), Delta) for f_self (B, h, w, C)."""
    affinity = nn.sigmoid(
        _conv1x1(self.channels, self.dtype, "common_proj")(f_common) *
        _conv1x1(self.channels, self.dtype, "self_proj")(f_self))
    enhanced = affinity * f_self + f_self
    mask_logits = _conv1x1(self.channels, self.dtype, "mask_logits")(enhanced)
    threshold = self.param("threshold", nn.initializers.zeros, (), jnp.float32)
    mask = straight_through_mask(mask_logits.astype(jnp.float32), threshold,
                                 self.temperature)
    pooled = jnp.mean(mask * f_self.astype(jnp.float32), axis=(1, 2))
    hidden = nn.relu(nn.Dense(max(1, self.channels // 4), dtype=self.dtype,
                              name="smp_hidden")(pooled))
    flare_logit = nn.Dense(1, dtype=self.dtype, name="smp_out")(hidden)[:, 0]
    return enhanced, mask, flare_logit.astype(jnp.float32), threshold


def flare_aware_enhancement(f_self: Array, f_guide: Array, mask: Array,
                            enhanced: Array, flare: Array) -> Array:
  """FCE (paper eq. 7), gated per sample by the pseudo-label.

  For a sample with delta_S = 1: f_S' = f_T * M_S + f_S * (1 - M_S); otherwise
  f_S' = A_S (the paper: skipped, "replaced by the output of FMI"). A sample's
  result never depends on other samples in its batch.

  Args:
    f_self: (B, h, w, C) f_S.
    f_guide: (B, h, w, C) f_T, the flare-immune TI map.
    mask: (B, h, w, C) hard mask M_S.
    enhanced: (B, h, w, C) A_S.
    flare: (B,) pseudo-label delta_S in {0, 1}.

  Returns:
    (B, h, w, C) f_S'.
  """
  mask = mask.astype(f_self.dtype)
  restored = f_guide * mask + f_self * (1 - mask)
  gate = (flare > 0.5)[:, None, None, None]
  return jnp.where(gate, restored, enhanced)


class StreamHead(nn.Module):
  """GAP -> feature; BN neck (no bias, BoT-style) -> bias-free classifier."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool):
    """Maps (B, h, w, D) to (feature (B, D), neck feature (B, D), logits)."""
    feature = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    neck = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, use_bias=False, dtype=jnp.float32,
                        name="neck")(feature)
    logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                      param_dtype=jnp.float32,
                      kernel_init=nn.initializers.normal(0.001),
                      name="classifier")(neck)
    return feature, neck, logits.astype(jnp.float32)


class FACENet(nn.Module):
  """The full model; all switches off gives the three-stream baseline.

  Attributes:
    num_classes: training identities.
    depth: ResNet depth of every stream (18, 34, 50, 101).
    width_multiplier: ResNet width multiplier (1.0 = standard).
    last_stride: stride of stage 4 (re-ID default 1).
    use_mfmp: mask prediction (SMP heads, masks, enhanced features A_S).
    use_fmi: masks from the common RGB+NI feature (False = "w/o FMI": each
      modality predicts its mask from itself alone).
    use_fce: replace flare regions with TI features (needs use_mfmp).
    plug_stage: ResNet stage (1-4) after which MFMP/FCE are applied.
    fmi_width: inner width of FMI's convolutions; 0 = C (paper-faithful).
    fmi_reduction: channel reduction of FMI's attention.
    mask_temperature: tau of the straight-through mask surrogate.
    embedding_source: "before_bn" or "after_bn" stream features.
    dtype: compute dtype (parameters are float32).
  """
  num_classes: int
  depth: int = 50
  width_multiplier: float = 1.0
  last_stride: int = 1
  use_mfmp: bool = True
  use_fmi: bool = True
  use_fce: bool = True
  plug_stage: int = 4
  fmi_width: int = 0
  fmi_reduction: int = 16
  mask_temperature: float = 1.0
  embedding_source: str = "before_bn"
  dtype: Dtype = jnp.float32

  def _check(self) -> None:
    if self.use_fce and not self.use_mfmp:
      raise ValueError("model.use_fce needs model.use_mfmp: FCE uses the masks "
                       "that MFMP predicts.")
    if self.plug_stage not in (1, 2, 3, 4):
      raise ValueError(f"model.plug_stage must be 1-4, got {self.plug_stage}")
    if self.embedding_source not in EMBEDDING_SOURCES:
      raise ValueError(f"model.embedding must be one of {EMBEDDING_SOURCES}, "
                       f"got {self.embedding_source!r}")

  @nn.compact
  def __call__(self, images: Mapping[str, Array], flare: Array,
               train: bool = False) -> ModelOutput:
    """Runs the three streams.

    Args:
      images: modality -> (B, H, W, 3) normalised float images, keys MODALITIES.
      flare: (B, 2) pseudo-labels delta for [RGB, NI] in {0, 1}.
      train: batch statistics in BatchNorm (True) or running averages.

    Returns:
      ModelOutput.
    """
    self._check()
    backbones = {m: resnet.ResNet(self.depth, self.width_multiplier,
                                  self.last_stride, self.dtype,
                                  name=f"{m}_backbone") for m in MODALITIES}
    maps = {m: backbones[m].stem(images[m], train) for m in MODALITIES}
    for stage in range(1, self.plug_stage + 1):
      maps = {m: backbones[m].stage(stage, maps[m], train) for m in MODALITIES}

    masks, flare_logits, thresholds = {}, {}, {}
    if self.use_mfmp:
      channels = maps["rgb"].shape[-1]
      common = None
      if self.use_fmi:
        common = FMI(channels, self.fmi_width or channels, self.fmi_reduction,
                     self.dtype, name="fmi")(maps["rgb"], maps["ni"], train)
      for i, m in enumerate(FLARE_MODALITIES):
        # Without FMI each modality predicts its mask from itself alone.
        source = common if common is not None else maps[m]
        enhanced, mask, logit, threshold = FlareMask(
            channels, self.mask_temperature, self.dtype,
            name=f"{m}_mask")(source, maps[m])
        masks[m], flare_logits[m], thresholds[m] = mask, logit, threshold
        if self.use_fce:
          maps[m] = flare_aware_enhancement(maps[m], maps[GUIDE_MODALITY], mask,
                                            enhanced, flare[:, i])
        else:
          maps[m] = enhanced

    for stage in range(self.plug_stage + 1, 5):
      maps = {m: backbones[m].stage(stage, maps[m], train) for m in MODALITIES}

    features, necks, logits = {}, {}, {}
    for m in MODALITIES:
      features[m], necks[m], logits[m] = StreamHead(
          self.num_classes, self.dtype, name=f"{m}_head")(maps[m], train)
    source = features if self.embedding_source == "before_bn" else necks
    embedding = jnp.concatenate([source[m] for m in MODALITIES], axis=-1)
    return ModelOutput(embedding=embedding, features=features, logits=logits,
                       masks=masks, flare_logits=flare_logits,
                       thresholds=thresholds)
