"""FACENet: Flare-Aware Cross-modal Enhancement Network (paper sections 3.1-3.3).

Three non-shared backbone streams (RGB, NI, TI), ResNets (the paper) or ViTs
(the official code, paper Table 8), built from the registry in
`facenet_jax/models/backbones.py` and used only through its interface. After
a chosen stage or block (`plug_stage`; ResNet default 4, ViT default before
the last block) the flare-susceptible RGB and NI plug-in maps (a ResNet's
feature map, a ViT's patch tokens as their grid) go through MFMP (mutual
flare mask prediction: FMI + SMP) and FCE (flare-aware cross-modal
enhancement with the TI map); the stages after the plug-in point continue
per stream (a ViT's CLS token carried along). Each stream's pooled feature
(ResNet: global average pooling; ViT: the CLS token after the final
LayerNorm) goes through a BatchNorm neck and a bias-free classifier.

Every interpretation of the paper's garbled equations 4-6 is documented in
docs/model.md and is switchable through the attributes below. All switches
off is the paper's baseline: three streams trained with CE + triplet.

Arrays are NHWC. B = batch, C = channels of the plug-in map, D = the
per-stream feature dimension (ResNet: channels of the stage-4 map; ViT: the
embedding width, C = D).
"""

import math
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from facenet_jax import fusion as fusion_lib
from facenet_jax.constants import FLARE_MODALITIES, GUIDE_MODALITY, MODALITIES
from facenet_jax.models import backbones as backbones_lib
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
    flare_logits: flare modality -> SMP "this image is flare-corrupted"
      logits, (B, C) one per mask channel with smp = "mask" (positions
      pooled), (B,) with smp = "head"; empty without MFMP.
    thresholds: flare modality -> () the learnable mask threshold Delta.
    flare_maps: flare modality -> (B, h, w, C) mask margins
      (m_S - Delta) / tau, the logits of the soft mask: SMP pools them over
      positions (`smp = "mask"`) and the pixel-level target supervises them
      at every position and channel; empty without MFMP.
    fce_guides: flare modality -> (B, h, w, C) the TI map as FCE pastes it
      (after `fce_projection`), computed from a stop-gradient f_T: the input
      of the consistency loss, whose gradient so reaches the projection
      only; empty without FCE.
    plug_features: flare modality -> (B, h, w, C) f_S at the plug-in point,
      before FCE; empty without FCE.
    weights: (B, 3) reliability weights of the [RGB | NI | TI] segments for
      the flare-aware fusion (fusion.py); all ones with fusion "concat".
  """
  embedding: Array
  features: Mapping[str, Array]
  logits: Mapping[str, Array]
  masks: Mapping[str, Array]
  flare_logits: Mapping[str, Array]
  thresholds: Mapping[str, Array]
  flare_maps: Mapping[str, Array] = flax.core.FrozenDict()
  fce_guides: Mapping[str, Array] = flax.core.FrozenDict()
  plug_features: Mapping[str, Array] = flax.core.FrozenDict()
  weights: Optional[Array] = None


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
  3x3 in that order (the order the paper's prose gives; eq. 3 is
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


SMP_MODES = ("mask", "head")
FCE_CLEAN = ("enhanced", "identity")


def pool_positions(position_logits: Array, topk_fraction: float) -> Array:
  """Image-level flare logits from per-position logits, (B, h, w, C) -> (B, C).

  Each channel's value is the mean of its highest ceil(topk_fraction * h * w)
  positions: a flare covers part of an image, so the image is flared when
  its most flared part is. (Log-mean-exp, max and mean pooling lost to it on
  the validation split and were retired: docs/studies.md.)
  """
  b, h, w, c = position_logits.shape
  # Positions last: top_k works on the last axis.
  flat = jnp.moveaxis(position_logits.reshape(b, h * w, c), 1, 2)
  k = max(1, min(h * w, math.ceil(topk_fraction * h * w - 1e-9)))
  return jnp.mean(jax.lax.top_k(flat, k)[0], axis=-1)


class FlareMask(nn.Module):
  """Per-modality mask branch for one flare-susceptible spectrum.

  a_S = sigmoid(conv1x1(f_C) * conv1x1(f_S)); A_S = a_S * f_S + f_S;
  m_S = conv1x1(A_S); M_S = 1[m_S > Delta] (straight-through). With
  `detach` the branch reads a stop_gradient copy of f_S (the caller detaches
  f_C's inputs), so that the flare losses train the branch but never the
  backbones; A_S itself stays a
  function of the live f_S (only a_S is computed from the copies), so the
  identity losses train the streams through it as before.

  With `smp_head` (the first reading of SMP, `smp = "head"`) a separate
  classifier predicts "this image is flare-corrupted" from the masked feature
  M_S * f_S (GAP -> Dense -> ReLU -> Dense(1)); the mask logits then get no
  gradient from the flare BCE except through the straight-through mask,
  which left the masks unsupervised (docs/model.md). It is kept for
  comparison, with the parameter names of the first release.

  Attributes:
    channels: C.
    temperature: tau of the straight-through surrogate.
    smp_head: build the separate SMP classifier.
    detach: compute a_S and m_S from stop_gradient inputs.
  """
  channels: int
  temperature: float = 1.0
  smp_head: bool = False
  detach: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_common: Array, f_self: Array,
               branch_view: Optional[Array] = None):
    """Maps f_self (B, h, w, C) to (A_S, m_S float32, Delta, M_S, head logit).

    Args:
      f_common: (B, h, w, C') what the masks are predicted from (f_C, or
        the branch's view of f_S without FMI).
      f_self: (B, h, w, C) f_S at the plug-in point.
      branch_view: (B, h, w, C'') what the mask branch reads of the stream
        instead of f_S (`model.mask_stage`: an earlier stage's map pooled to
        the plug-in grid, already detached when asked); None = f_S. A 1x1
        convolution ("self_align") brings it to C channels.

    The head logit (B,) is None without `smp_head`.
    """
    sg = jax.lax.stop_gradient if self.detach else (lambda x: x)
    if branch_view is None:
      branch_self = sg(f_self)
    else:
      branch_self = _conv1x1(self.channels, self.dtype, "self_align")(
          branch_view)
    affinity = nn.sigmoid(
        _conv1x1(self.channels, self.dtype, "common_proj")(f_common) *
        _conv1x1(self.channels, self.dtype, "self_proj")(branch_self))
    enhanced = affinity * f_self + f_self
    branch_enhanced = affinity * branch_self + branch_self
    mask_logits = _conv1x1(self.channels, self.dtype, "mask_logits")(
        branch_enhanced).astype(jnp.float32)
    threshold = self.param("threshold", nn.initializers.zeros, (), jnp.float32)
    mask = straight_through_mask(mask_logits, threshold, self.temperature)
    head_logit = None
    if self.smp_head:
      pooled = jnp.mean(mask * branch_self.astype(jnp.float32), axis=(1, 2))
      hidden = nn.relu(nn.Dense(max(1, self.channels // 4), dtype=self.dtype,
                                name="smp_hidden")(pooled))
      head_logit = nn.Dense(1, dtype=self.dtype, name="smp_out")(
          hidden)[:, 0].astype(jnp.float32)
    return enhanced, mask_logits, threshold, mask, head_logit


def flare_aware_enhancement(f_self: Array, f_guide: Array, mask: Array,
                            clean: Array, flare: Array) -> Array:
  """FCE (paper eq. 7), gated per sample by the pseudo-label.

  For a sample with delta_S = 1: f_S' = f_T * M_S + f_S * (1 - M_S); otherwise
  f_S' = `clean` (the paper: A_S, "replaced by the output of FMI"). A
  sample's result never depends on other samples in its batch.

  Args:
    f_self: (B, h, w, C) f_S.
    f_guide: (B, h, w, C) f_T, the flare-immune TI map (or its projection).
    mask: (B, h, w, C) mask M_S, hard {0, 1} or soft in [0, 1].
    clean: (B, h, w, C) what a flare-free sample gets (A_S or f_S).
    flare: (B,) pseudo-label delta_S in {0, 1}.

  Returns:
    (B, h, w, C) f_S'.
  """
  mask = mask.astype(f_self.dtype)
  restored = f_guide * mask + f_self * (1 - mask)
  gate = (flare > 0.5)[:, None, None, None]
  return jnp.where(gate, restored, clean)


def pool_to_grid(x: Array, size: tuple[int, int]) -> Array:
  """Box-averages a (B, H, W, C) map to (B, h, w, C); h, w must divide H, W."""
  b, height, width, c = x.shape
  h, w = size
  if height % h or width % w:
    raise ValueError(f"model.mask_stage: a {height}x{width} map does not "
                     f"pool to the {h}x{w} plug-in grid")
  return jnp.mean(x.reshape(b, h, height // h, w, width // w, c), axis=(2, 4))


def _identity_kernel(key, shape, dtype=jnp.float32):
  """A 1x1 convolution kernel that starts as the identity map."""
  del key
  return jnp.eye(shape[-2], shape[-1], dtype=dtype).reshape(shape)


class StreamHead(nn.Module):
  """Pooled feature; BN neck (no bias, BoT-style) -> bias-free classifier."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feature: Array, train: bool):
    """Maps the pooled stream feature (B, D) to (feature, neck, logits)."""
    feature = feature.astype(jnp.float32)
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
    backbone: the streams' registry name (backbones.names(): resnet10..101,
      vit_s16, vit_b16, transreid_b16, vit_micro8); "" = f"resnet{depth}".
    depth: ResNet depth when `backbone` is "" (the attribute of the releases
      before the registry, kept for their callers).
    width_multiplier: ResNet width multiplier (1.0 = standard).
    last_stride: stride of ResNet stage 4 (re-ID default 1).
    drop_path: ViT stochastic depth of the last block (linear over blocks).
    num_cameras: > 0 adds TransReID's camera embedding to ViT tokens (a
      table of that many cameras; the call then needs `camera`); 0 = none.
    camera_scale: weight of the camera embedding (TransReID: 3.0).
    use_mfmp: mask prediction (SMP heads, masks, enhanced features A_S).
    use_fmi: masks from the common RGB+NI feature (False = "w/o FMI": each
      modality predicts its mask from itself alone).
    use_fce: replace flare regions with TI features (needs use_mfmp).
    plug_stage: stage (ResNet, 1-4) or block (ViT, 1-depth) after which
      MFMP/FCE are applied; 0 = the backbone's default (ResNet 4, the paper;
      ViT depth - 1, before the last block, the official code).
    fmi_width: inner width of FMI's convolutions; 0 = C (paper-faithful).
    fmi_reduction: channel reduction of FMI's attention.
    mask_temperature: tau of the straight-through mask surrogate.
    smp: "mask" (the flare logit is pooled from the mask logits, so the flare
      BCE supervises the mask and Delta) or "head" (a separate classifier on
      the masked feature; the first reading, kept for comparison).
    smp_topk_fraction: share of positions whose mean mask margin is the
      image-level flare logit of "mask" (pool_positions).
    mask_detach: the mask branch reads stop_gradient features, so the flare
      losses do not train the backbones (beyond the paper).
    mask_stage: the stage whose map the mask branch (FMI and the mask
      logits) reads, box-pooled to the plug-in grid; 0 = the plug-in stage
      itself (the paper). An earlier stage keeps the low-level evidence of
      saturation that identity training removes from late features (beyond
      the paper); A_S and FCE still act on the plug-in map.
    fce_projection: FCE pastes conv1x1(f_T) (identity-initialised, one per
      flare modality) instead of f_T itself (beyond the paper).
    fce_clean: what a flare-free sample gets: "enhanced" (A_S, the paper) or
      "identity" (f_S unchanged; beyond the paper).
    fce_mask_gradient: the identity losses reach the mask through FCE's
      straight-through gradient (the paper's reading). False stops it, so
      that only the flare losses shape the mask (beyond the paper): the
      identity losses otherwise learn to switch the mask off when pasting
      costs them.
    embedding_source: "before_bn" or "after_bn" stream features.
    fusion: how retrieval compares the stream features (fusion.py; beyond
      the paper except "concat"): "concat" (the paper), "fixed" or
      "saturation" (weights from each image's flare evidence).
    fusion_weight: a fully flared stream's weight ("fixed", "saturation").
    fusion_full_ratio: "saturation": the saturated fraction at which the
      weight reaches fusion_weight.
    dtype: compute dtype (parameters are float32).
  """
  num_classes: int
  backbone: str = ""
  depth: int = 50
  width_multiplier: float = 1.0
  last_stride: int = 1
  drop_path: float = 0.0
  num_cameras: int = 0
  camera_scale: float = 3.0
  use_mfmp: bool = True
  use_fmi: bool = True
  use_fce: bool = True
  plug_stage: int = 4
  fmi_width: int = 0
  fmi_reduction: int = 16
  mask_temperature: float = 1.0
  smp: str = "mask"
  smp_topk_fraction: float = 0.25
  mask_detach: bool = False
  mask_stage: int = 0
  fce_projection: bool = False
  fce_clean: str = "enhanced"
  fce_mask_gradient: bool = True
  embedding_source: str = "before_bn"
  fusion: str = "concat"
  fusion_weight: float = 0.5
  fusion_full_ratio: float = 0.2
  dtype: Dtype = jnp.float32

  @property
  def backbone_name(self) -> str:
    """The streams' registry name."""
    return self.backbone or f"resnet{self.depth}"

  def _check(self) -> None:
    if self.use_fce and not self.use_mfmp:
      raise ValueError("model.use_fce needs model.use_mfmp: FCE uses the masks "
                       "that MFMP predicts.")
    plug_stage = backbones_lib.resolve_plug_stage(self.backbone_name,
                                                  self.plug_stage)
    if not 0 <= self.mask_stage <= plug_stage:
      raise ValueError(f"model.mask_stage must be 0 (the plug-in stage) or "
                       f"1-{plug_stage} (at most the plug-in stage), got "
                       f"{self.mask_stage}")
    for field, value, allowed in (
        ("smp", self.smp, SMP_MODES),
        ("fce_clean", self.fce_clean, FCE_CLEAN)):
      if value not in allowed:
        raise ValueError(f"model.{field} must be one of {allowed}, "
                         f"got {value!r}")
    if not 0.0 < self.smp_topk_fraction <= 1.0:
      raise ValueError(f"model.smp_topk_fraction must be in (0, 1], got "
                       f"{self.smp_topk_fraction}")
    if self.mask_temperature <= 0:
      raise ValueError(f"model.mask_temperature must be > 0, got "
                       f"{self.mask_temperature}")
    fusion_lib.check(self.fusion, self.fusion_weight, self.fusion_full_ratio)
    if self.embedding_source not in EMBEDDING_SOURCES:
      raise ValueError(f"model.embedding must be one of {EMBEDDING_SOURCES}, "
                       f"got {self.embedding_source!r}")

  @nn.compact
  def __call__(self, images: Mapping[str, Array], flare: Array,
               train: bool = False,
               camera: Optional[Array] = None,
               flare_ratio: Optional[Array] = None) -> ModelOutput:
    """Runs the three streams.

    Args:
      images: modality -> (B, H, W, 3) normalised float images, keys MODALITIES.
      flare: (B, 2) pseudo-labels delta for [RGB, NI] in {0, 1}.
      train: batch statistics in BatchNorm and stochastic depth (True), or
        running averages and no dropping. Stochastic depth needs the
        "dropout" rng.
      camera: (B,) int camera ids; read only with num_cameras > 0.
      flare_ratio: (B, 2) saturated fraction of the raw [RGB, NI] images;
        read only by the fusion "saturation".

    Returns:
      ModelOutput.
    """
    self._check()
    plug_stage = backbones_lib.resolve_plug_stage(self.backbone_name,
                                                  self.plug_stage)
    input_size = tuple(images[MODALITIES[0]].shape[1:3])
    backbones = {m: backbones_lib.build(
        self.backbone_name, input_size=input_size,
        width_multiplier=self.width_multiplier, last_stride=self.last_stride,
        drop_path=self.drop_path, num_cameras=self.num_cameras,
        camera_scale=self.camera_scale, dtype=self.dtype,
        name=f"{m}_backbone") for m in MODALITIES}
    camera = camera if self.num_cameras else None
    states = {m: backbones[m].stem(images[m], train, camera)
              for m in MODALITIES}
    early = None
    for stage in range(1, plug_stage + 1):
      states = {m: backbones[m].stage(stage, states[m], train)
                for m in MODALITIES}
      if stage == self.mask_stage and stage < plug_stage:
        early = {m: backbones[m].grid(states[m]) for m in FLARE_MODALITIES}
    maps = {m: backbones[m].grid(states[m]) for m in MODALITIES}

    masks, flare_logits, thresholds, flare_maps = {}, {}, {}, {}
    guides, plug_features = {}, {}
    if self.use_mfmp:
      channels = maps["rgb"].shape[-1]
      sg = jax.lax.stop_gradient if self.mask_detach else (lambda x: x)
      # What the mask branch reads of each flare stream: f_S, or an earlier
      # stage's map pooled to the plug-in grid (model.mask_stage).
      views = {m: sg(maps[m]) for m in FLARE_MODALITIES}
      if early is not None:
        grid = maps["rgb"].shape[1:3]
        views = {m: pool_to_grid(sg(early[m]), grid) for m in FLARE_MODALITIES}
      common = None
      if self.use_fmi:
        common = FMI(channels, self.fmi_width or channels, self.fmi_reduction,
                     self.dtype, name="fmi")(views["rgb"], views["ni"], train)
      for i, m in enumerate(FLARE_MODALITIES):
        # Without FMI each modality predicts its mask from itself alone.
        source = common if common is not None else views[m]
        enhanced, mask_logits, threshold, mask, head_logit = FlareMask(
            channels, self.mask_temperature, self.smp == "head",
            self.mask_detach, self.dtype, name=f"{m}_mask")(
                source, maps[m], views[m] if early is not None else None)
        margin = (mask_logits - threshold) / self.mask_temperature
        flare_maps[m] = margin
        if self.smp == "mask":
          flare_logits[m] = pool_positions(margin, self.smp_topk_fraction)
        else:
          flare_logits[m] = head_logit
        masks[m], thresholds[m] = mask, threshold
        if not self.use_fce:
          maps[m] = enhanced
          continue
        paste = mask if self.fce_mask_gradient else jax.lax.stop_gradient(mask)
        clean = enhanced if self.fce_clean == "enhanced" else maps[m]
        guide = maps[GUIDE_MODALITY]
        # What the consistency loss reads: the same projection of a
        # stop-gradient f_T, so that the loss trains the projection and
        # leaves the TI stream to the identity losses (pulling f_T itself
        # towards f_S made the TI features less discriminative).
        consistency_guide = jax.lax.stop_gradient(guide)
        if self.fce_projection:
          projection = nn.Conv(channels, (1, 1), use_bias=True,
                               kernel_init=_identity_kernel, dtype=self.dtype,
                               param_dtype=jnp.float32,
                               name=f"{m}_fce_projection")
          consistency_guide = projection(consistency_guide)
          guide = projection(guide)
        guides[m], plug_features[m] = consistency_guide, maps[m]
        maps[m] = flare_aware_enhancement(maps[m], guide, paste, clean,
                                          flare[:, i])

    states = {m: backbones[m].with_grid(states[m], maps[m])
              for m in MODALITIES}
    for stage in range(plug_stage + 1, backbones[MODALITIES[0]].num_stages + 1):
      states = {m: backbones[m].stage(stage, states[m], train)
                for m in MODALITIES}

    pooled = {m: backbones[m].pool(states[m]) for m in MODALITIES}
    features, necks, logits = {}, {}, {}
    for m in MODALITIES:
      features[m], necks[m], logits[m] = StreamHead(
          self.num_classes, self.dtype, name=f"{m}_head")(
              pooled[m], train)
    source = features if self.embedding_source == "before_bn" else necks
    embedding = jnp.concatenate([source[m] for m in MODALITIES], axis=-1)
    return ModelOutput(embedding=embedding, features=features, logits=logits,
                       masks=masks, flare_logits=flare_logits,
                       thresholds=thresholds, flare_maps=flare_maps,
                       fce_guides=guides, plug_features=plug_features,
                       weights=fusion_lib.stream_weights(
                           self.fusion, flare, flare_ratio,
                           self.fusion_weight, self.fusion_full_ratio))
