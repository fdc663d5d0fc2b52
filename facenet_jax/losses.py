"""FACENet's training losses as pure JAX functions.

The paper's objective (eq. 13) is

  L_all = L_tri + L_id + L_f + L_IC,

with identity cross-entropy L_id (eqs. 9-10) and batch-hard triplet L_tri
(eqs. 11-12) on each of the three streams, the flare-classification loss L_f
(eq. 1) of the SMP heads and the inter-modality consistency loss L_IC (eq. 8).
`total_loss` puts them together with a weight per term (`LossConfig`); the
Table 5 alternatives to L_IC (3M, hetero-center, cross-directional consistency)
can be selected in its place.

Every function here is stateless and jit-compatible. Inputs may be bfloat16;
losses are computed in float32. Where the paper sums over a batch (eqs. 10-12)
we take batch means instead, as the re-ID toolboxes and the official code do,
so that the loss scale does not depend on the batch size.
"""

import dataclasses
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from facenet_jax.constants import FLARE_MODALITIES, GUIDE_MODALITY, MODALITIES

Array = jax.Array

# Modality-relation losses `LossConfig.modality` can select: the paper's IC
# loss, none (the Table 2 rows without L_IC), and the Table 5 alternatives.
MODALITY_LOSSES = ("ic", "none", "3m", "hc", "cdc")

# Distance matrices and identity centres are products of features; on TPUs the
# default matmul precision is bfloat16, which is too coarse for the small
# differences of the Gram expansion ||a||^2 + ||b||^2 - 2<a, b>.
_PRECISION = jax.lax.Precision.HIGHEST


def _float32(x: Array) -> Array:
  return jnp.asarray(x, jnp.float32)


def _safe_sqrt(x: Array) -> Array:
  """sqrt(x) for x >= 0 whose gradient is 0, not inf/NaN, where x == 0.

  The inner `where` keeps the untaken branch of sqrt away from 0, so that its
  infinite derivative is never multiplied by the zero cotangent (0 * inf = NaN).
  """
  positive = x > 0.0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _safe_norm(x: Array, axis: int = -1) -> Array:
  """Euclidean norm along `axis` with a finite gradient at the zero vector."""
  return _safe_sqrt(jnp.sum(jnp.square(x), axis=axis))


def _l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) along `axis`; a zero vector stays zero."""
  return x / jnp.maximum(_safe_norm(x, axis=axis)[..., None], eps)


def _masked_mean(values: Array, mask: Array) -> Array:
  """Mean of `values` where `mask` is true; 0 when the mask is empty."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _require_keys(features: Mapping[str, Array], keys: tuple[str, ...],
                  loss_name: str) -> None:
  missing = [k for k in keys if k not in features]
  if missing:
    raise ValueError(f"{loss_name} needs features of the streams {keys}; "
                     f"missing {missing} (got {sorted(features)}).")


def pairwise_distances(features: Array) -> Array:
  """Euclidean distances between all pairs of rows.

  d(i, j) = sqrt(max(||f_i||^2 + ||f_j||^2 - 2 <f_i, f_j>, 0)), with a safe
  square root: the diagonal (and any pair of identical rows) has distance 0
  and a finite (zero) gradient.

  Args:
    features: (B, D) features.

  Returns:
    (B, B) float32 distances.
  """
  features = _float32(features)
  squared_norms = jnp.sum(jnp.square(features), axis=-1)
  gram = jnp.matmul(features, features.T, precision=_PRECISION)
  squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
  # Rounding can make the expansion slightly negative for (near-)equal rows.
  return _safe_sqrt(jnp.maximum(squared, 0.0))


def cross_entropy(logits: Array, labels: Array,
                  label_smoothing: float = 0.0) -> Array:
  """Identity loss: softmax cross-entropy, optionally label-smoothed.

  Paper eq. 9 (per stream, per sample):
    L_id = -sum_j y_j log softmax(z)_j,
  with, under label smoothing (Szegedy et al. 2016, "Rethinking the Inception
  Architecture for Computer Vision", section 7),
    y = (1 - eps) * onehot(label) + eps / C.

  Args:
    logits: (B, C) classifier outputs.
    labels: (B,) int class indices in [0, C). Out-of-range labels cannot be
      checked under jit; they contribute only the smoothing term.
    label_smoothing: eps in [0, 1).

  Returns:
    Scalar, the batch mean.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
  log_probs = jax.nn.log_softmax(_float32(logits), axis=-1)
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  return jnp.mean(-jnp.sum(targets * log_probs, axis=-1))


def batch_hard_triplet(features: Array, labels: Array, margin: float = 0.3,
                       soft_margin: bool = False) -> Array:
  """Batch-hard triplet loss (Hermans, Beyer and Leibe 2017; paper eq. 11).

  For each anchor a, with Euclidean distances D:
    d_ap = max_{p: y_p = y_a, p != a} D(f_a, f_p)   (hardest positive)
    d_an = min_{n: y_n != y_a}        D(f_a, f_n)   (hardest negative)
    l_a  = max(0, m + d_ap - d_an)                  (margin, the paper)
    l_a  = softplus(d_ap - d_an)                    (soft margin, Hermans et
                                                     al. section 3, official code)
  An anchor whose identity has no other sample in the batch, or for which every
  sample shares its identity, has no triplet: it is left out, and the loss is
  the mean over the remaining anchors (0 if there are none).

  Args:
    features: (B, D) features (FACENet: the pooled features before the BN neck).
    labels: (B,) int identity labels.
    margin: m; ignored when soft_margin is true.
    soft_margin: use softplus instead of the hinge.

  Returns:
    Scalar, the mean over valid anchors.
  """
  return triplet_from_distances(pairwise_distances(features), labels, margin,
                                soft_margin)


def triplet_from_distances(distances: Array, labels: Array,
                           margin: float = 0.3,
                           soft_margin: bool = False) -> Array:
  """batch_hard_triplet on a given (B, B) distance matrix."""
  batch = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(batch, dtype=bool)
  negative = ~same
  has_positive = jnp.any(positive, axis=1)
  has_negative = jnp.any(negative, axis=1)
  # Distances are >= 0, so 0 is a neutral fill for the max; the min needs +inf.
  # Rows without a positive/negative are replaced by 0 before use so that no
  # inf reaches the loss value or its gradient.
  hardest_positive = jnp.max(jnp.where(positive, distances, 0.0), axis=1)
  hardest_negative = jnp.min(jnp.where(negative, distances, jnp.inf), axis=1)
  hardest_negative = jnp.where(has_negative, hardest_negative, 0.0)
  gap = hardest_positive - hardest_negative
  if soft_margin:
    per_anchor = jax.nn.softplus(gap)
  else:
    per_anchor = jax.nn.relu(margin + gap)
  return _masked_mean(per_anchor, has_positive & has_negative)


def flare_bce(flare_logits: Array, targets: Array) -> Array:
  """Flare-classification loss L_f of one SMP head (paper eq. 1).

  Eq. 1 is a two-class cross-entropy "flare-corrupted or not" against the
  histogram pseudo-label delta; with a single logit x per image it is the
  binary cross-entropy
    l = -[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))]
      = max(x, 0) - x t + log(1 + exp(-|x|)),
  the second form being the overflow-free one used here.

  Args:
    flare_logits: (B, ...) logits of "this image is flare-corrupted": one per
      image, or several (e.g. one per mask channel), all with the image's
      target.
    targets: (B,) pseudo-labels in {0, 1} (any float in [0, 1] works).

  Returns:
    Scalar, the mean over all logits.
  """
  x = _float32(flare_logits)
  t = _float32(targets).reshape(
      targets.shape + (1,) * (x.ndim - jnp.ndim(targets)))
  return jnp.mean(jax.nn.relu(x) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))


def area_pool(maps: Array, size: tuple[int, int]) -> Array:
  """Box-averages (B, H, W) maps down to (B, h, w); h and w must divide H, W.

  The plug-in map of a ResNet is the input divided by its stride, so the
  saturation map of the input pools to it exactly, cell by cell.
  """
  b, height, width = maps.shape
  h, w = size
  if height % h or width % w:
    raise ValueError(f"area_pool: {height}x{width} maps do not divide into "
                     f"{h}x{w} cells; use an input size divisible by the "
                     "plug-in stage's stride")
  return jnp.mean(_float32(maps).reshape(b, h, height // h, w, width // w),
                  axis=(2, 4))


def flare_pixel_bce(position_logits: Array, saturation: Array) -> Array:
  """Pixel-level flare target (beyond the paper; `loss.flare_pixel_weight`).

  The same histogram bar as the image-level pseudo-label, applied per
  position: the fraction of the raw image's channel values >= 250 in each
  cell of the mask's grid is the soft target of that position's flare logit,
  so the mask learns where an image is saturated and not only whether.

  Args:
    position_logits: (B, h, w, C) mask margins (ModelOutput.flare_maps); every
      channel of a position gets that position's target.
    saturation: (B, H, W) per-pixel fraction of saturated channel values of
      the raw image, augmented like the image (pipeline `saturation`).

  Returns:
    Scalar, the mean BCE over samples, positions and channels.
  """
  b, h, w = position_logits.shape[:3]
  target = area_pool(saturation, (h, w))
  return flare_bce(position_logits.reshape(b * h * w, -1),
                   target.reshape(-1))


def fce_consistency(guide: Array, plug: Array, flare: Array) -> Array:
  """Keeps what FCE pastes in the stream's own feature space (beyond the paper).

  On flare-free samples (delta_S = 0) the pasted map, conv1x1(f_T) under
  `model.fce_projection`, is regressed onto the stream's own map f_S
  (stop-gradient target), normalised by that map's energy:
    l_i = mean((g_i - sg(f_i))^2) / mean(sg(f_i)^2),
  averaged over the flare-free samples of the batch. What FCE pastes into a
  flared region is then an estimate of the RGB (NI) features the flare
  destroyed, not TI features in channels that mean something else.

  Args:
    guide: (B, h, w, C) the map FCE pastes (ModelOutput.fce_guides).
    plug: (B, h, w, C) f_S before FCE (ModelOutput.plug_features).
    flare: (B,) pseudo-label delta_S.

  Returns:
    Scalar; 0 when the batch has no flare-free sample.
  """
  target = jax.lax.stop_gradient(_float32(plug))
  error = jnp.mean(jnp.square(_float32(guide) - target), axis=(1, 2, 3))
  energy = jnp.mean(jnp.square(target), axis=(1, 2, 3))
  return _masked_mean(error / jnp.maximum(energy, 1e-6),
                      _float32(flare) < 0.5)


def ic_loss(logits_rgb: Array, logits_ni: Array) -> Array:
  """Inter-modality consistency loss L_IC (paper eq. 8).

  With p_R = softmax(S_RGB) and p_N = softmax(S_NI), per sample
    KL(p_R || p_N) = sum_i p_R(i) (log p_R(i) - log p_N(i)),
  and symmetrically KL(p_N || p_R), both from log_softmax so that no
  log(0) or division by a tiny probability occurs. Eq. 8 takes the smaller of
  the two divergences but does not say where the batch enters. We take
    L_IC = min(mean_b KL(p_R || p_N), mean_b KL(p_N || p_R)),
  the min of the two batch-mean divergences, so that one direction is chosen
  for the whole batch; the alternative reading, the batch mean of the
  per-sample min, lets each sample pick its own direction.

  Args:
    logits_rgb: (B, C) RGB classifier outputs S_RGB.
    logits_ni: (B, C) NI classifier outputs S_NI.

  Returns:
    Scalar.
  """
  log_p_rgb = jax.nn.log_softmax(_float32(logits_rgb), axis=-1)
  log_p_ni = jax.nn.log_softmax(_float32(logits_ni), axis=-1)
  log_ratio = log_p_rgb - log_p_ni
  kl_rgb_ni = jnp.sum(jnp.exp(log_p_rgb) * log_ratio, axis=-1)
  kl_ni_rgb = jnp.sum(jnp.exp(log_p_ni) * -log_ratio, axis=-1)
  return jnp.minimum(jnp.mean(kl_rgb_ni), jnp.mean(kl_ni_rgb))


def three_m_loss(features: Mapping[str, Array], margin: float = 0.1) -> Array:
  """3M (multi-modal margin) loss, our reading of Wang et al. AAAI 2022.

  Wang et al., "Interact, Embed, and EnLarge: Boosting Modality-Specific
  Representations for Multi-Modal Person Re-identification", enlarge the
  distance between the modality-specific features of one sample so that each
  modality keeps its own information. We read it as a hinge on the distance of
  L2-normalised features, averaged over samples b and the three modality pairs:
    L_3M = mean_b mean_{(a, c)} max(0, m - ||f^_a(b) - f^_c(b)||_2),
  (a, c) in {(RGB, NI), (RGB, TI), (NI, TI)}, f^ = f / ||f||. Distances of unit
  vectors lie in [0, 2], which is what makes a fixed margin m meaningful.

  Args:
    features: per-stream (B, D) features with keys "rgb", "ni", "ti".
    margin: m.

  Returns:
    Scalar.
  """
  _require_keys(features, MODALITIES, "three_m_loss")
  normalized = {s: _l2_normalize(_float32(features[s])) for s in MODALITIES}
  pairs = [(a, c) for i, a in enumerate(MODALITIES) for c in MODALITIES[i + 1:]]
  hinges = [jax.nn.relu(margin - _safe_norm(normalized[a] - normalized[c]))
            for a, c in pairs]
  return jnp.mean(jnp.stack(hinges))


def _identity_centres(features: Array, labels: Array) -> tuple[Array, Array]:
  """For each sample, the mean feature of all batch samples of its identity.

  Uses the (B, B) same-label matrix, so shapes are static whatever the label
  values are.

  Args:
    features: (B, D) features.
    labels: (B,) int identity labels.

  Returns:
    centres: (B, D), row b the centre of identity labels[b].
    first: (B,) bool, true at the first sample of each identity, so that a
      mean over `first` is a mean over the identities present.
  """
  same = labels[:, None] == labels[None, :]
  counts = jnp.sum(same, axis=1, dtype=jnp.float32)
  centres = jnp.matmul(same.astype(jnp.float32), _float32(features),
                       precision=_PRECISION) / counts[:, None]
  first = ~jnp.any(jnp.tril(same, k=-1), axis=1)
  return centres, first


def hetero_center_loss(features: Mapping[str, Array], labels: Array) -> Array:
  """Hetero-center (HC) loss of Zhu et al. 2020, between RGB and NI.

  Zhu et al., "Hetero-center loss for cross-modality person
  re-identification", Neurocomputing 386: for each identity i in the batch,
  with c_{i,R} and c_{i,N} the means of its RGB and NI features,
    L_HC = mean_i ||c_{i,R} - c_{i,N}||_2^2.
  (Zhu et al. sum over identities; the mean keeps the scale independent of the
  number of identities per batch.)

  Args:
    features: per-stream (B, D) features with keys "rgb" and "ni".
    labels: (B,) int identity labels.

  Returns:
    Scalar.
  """
  _require_keys(features, FLARE_MODALITIES, "hetero_center_loss")
  centre_rgb, first = _identity_centres(features["rgb"], labels)
  centre_ni, _ = _identity_centres(features["ni"], labels)
  squared = jnp.sum(jnp.square(centre_rgb - centre_ni), axis=-1)
  return _masked_mean(squared, first)


def cdc_loss(features: Mapping[str, Array], labels: Array) -> Array:
  """Cross-directional consistency (CdC) loss, our reading of Zheng et al. 2022.

  Zheng et al., "Multi-spectral vehicle re-identification with
  cross-directional consistency network and a high-quality benchmark"
  (MSVR310). The FACENet paper (section 5.3) describes its effect as
  "enforces RGB and NI more similar to TI"; we implement that: for each
  identity i in the batch, with c_{i,S} the mean of its features of stream S,
    L_CdC = mean_i (||c_{i,R} - c_{i,T}||_2 + ||c_{i,N} - c_{i,T}||_2).

  Args:
    features: per-stream (B, D) features with keys "rgb", "ni", "ti".
    labels: (B,) int identity labels.

  Returns:
    Scalar.
  """
  _require_keys(features, MODALITIES, "cdc_loss")
  centre_ti, first = _identity_centres(features[GUIDE_MODALITY], labels)
  per_identity = 0.0
  for stream in FLARE_MODALITIES:
    centre, _ = _identity_centres(features[stream], labels)
    per_identity = per_identity + _safe_norm(centre - centre_ti)
  return _masked_mean(per_identity, first)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights and options of `total_loss`; mirrors `config.loss`.

  Frozen (hence hashable), so it can be closed over or passed as a static
  argument to `jax.jit`. Field errors name the config field, `loss.<field>`.

  Attributes:
    ce_weight: weight of the identity cross-entropy of each stream.
    label_smoothing: eps of the cross-entropy label smoothing, in [0, 1).
    triplet_weight: weight of the batch-hard triplet loss of each stream.
    triplet_margin: hinge margin m of the triplet loss.
    triplet_soft_margin: softplus instead of the hinge (margin unused).
    flare_weight: weight of each SMP head's flare BCE.
    flare_pixel_weight: weight of each flare modality's pixel-level BCE
      against the saturation map (beyond the paper; 0 = off).
    fce_consistency_weight: weight of each flare modality's FCE consistency
      term (beyond the paper; 0 = off).
    modality: modality-relation loss, one of MODALITY_LOSSES.
    modality_weight: weight of the modality-relation loss.
    modality_margin: margin of the 3M loss.
  """
  ce_weight: float = 1.0
  label_smoothing: float = 0.0
  triplet_weight: float = 1.0
  triplet_margin: float = 0.3
  triplet_soft_margin: bool = False
  flare_weight: float = 1.0
  flare_pixel_weight: float = 0.0
  fce_consistency_weight: float = 0.0
  modality: str = "ic"
  modality_weight: float = 1.0
  modality_margin: float = 0.1

  def __post_init__(self):
    if self.modality not in MODALITY_LOSSES:
      raise ValueError(f"loss.modality must be one of {MODALITY_LOSSES}, "
                       f"got {self.modality!r}.")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError("loss.label_smoothing must be in [0, 1), "
                       f"got {self.label_smoothing}.")
    for name in ("ce_weight", "triplet_weight", "triplet_margin", "flare_weight",
                 "flare_pixel_weight", "fce_consistency_weight",
                 "modality_weight", "modality_margin"):
      value = getattr(self, name)
      if value < 0:
        raise ValueError(f"loss.{name} must be >= 0, got {value}.")


def _modality_loss(name: str, logits: Mapping[str, Array],
                   features: Mapping[str, Array], labels: Array,
                   margin: float) -> Array:
  """The modality-relation loss `name` (not "none") on the model outputs."""
  if name == "ic":
    _require_keys(logits, FLARE_MODALITIES, "ic_loss")
    return ic_loss(logits["rgb"], logits["ni"])
  if name == "3m":
    return three_m_loss(features, margin)
  if name == "hc":
    return hetero_center_loss(features, labels)
  return cdc_loss(features, labels)


def _identity_terms(logits: Mapping[str, Array], features: Mapping[str, Array],
                    labels: Array, config: LossConfig
                    ) -> tuple[dict[str, Array], Array]:
  """Each stream's CE and batch-hard triplet ("ce_<s>", "triplet_<s>"), and
  their weighted sum."""
  terms = {}
  total = 0.0
  for stream in logits:
    terms[f"ce_{stream}"] = cross_entropy(logits[stream], labels,
                                          config.label_smoothing)
    terms[f"triplet_{stream}"] = batch_hard_triplet(
        features[stream], labels, config.triplet_margin,
        config.triplet_soft_margin)
    total += (config.ce_weight * terms[f"ce_{stream}"] +
              config.triplet_weight * terms[f"triplet_{stream}"])
  return terms, total


def total_loss(logits: Mapping[str, Array], features: Mapping[str, Array],
               flare_logits: Mapping[str, Array], labels: Array,
               flare_targets: Array, config: LossConfig, *,
               flare_maps: Optional[Mapping[str, Array]] = None,
               saturation: Optional[Array] = None,
               fce_guides: Optional[Mapping[str, Array]] = None,
               plug_features: Optional[Mapping[str, Array]] = None,
               ) -> tuple[Array, dict[str, Array]]:
  """FACENet's objective (paper eq. 13) with a weight per term.

    total = ce_weight       * sum_s CE(logits[s], labels)
          + triplet_weight  * sum_s triplet(features[s], labels)
          + flare_weight    * sum_{s in flare_logits} BCE(flare_logits[s], delta_s)
          + modality_weight * L_modality
          + flare_pixel_weight     * sum_s flare_pixel_bce(flare_maps[s], sat_s)
          + fce_consistency_weight * sum_s fce_consistency(guide_s, f_s, delta_s),
  s over the streams in `logits` (normally "rgb", "ni", "ti"). The flare sum is
  empty for a model without MFMP. L_modality is IC on the RGB and NI logits,
  or 3M / HC / CdC on the features, or absent for "none". The last two terms
  go beyond the paper and are computed only when their weight is > 0.

  Args:
    logits: stream -> (B, C) classifier outputs (after the BN neck).
    features: stream -> (B, D) features before the BN neck; same keys as logits.
    flare_logits: stream -> (B,) or (B, C) SMP logits, keys a subset of
      ("rgb", "ni");
      may be empty.
    labels: (B,) int identity labels.
    flare_targets: (B, 2) pseudo-labels delta in {0, 1}, columns [rgb, ni].
    config: weights and options.
    flare_maps: stream -> (B, h, w, C) mask margins; needed when
      flare_pixel_weight > 0.
    saturation: (B, H, W, 2) saturation maps of [rgb, ni]; likewise.
    fce_guides: stream -> (B, h, w, C) pasted maps; needed when
      fce_consistency_weight > 0 (with plug_features, f_S before FCE).
    plug_features: stream -> (B, h, w, C).

  Returns:
    total: scalar, the weighted sum.
    terms: the unweighted terms, "ce_<s>", "triplet_<s>", "flare_<s>",
      "modality_<name>", plus "total" (the weighted sum, equal to `total`).
      Unweighted terms stay comparable across runs with different weights.
  """
  if set(features) != set(logits):
    raise ValueError(f"total_loss: features streams {sorted(features)} differ "
                     f"from logits streams {sorted(logits)}.")
  unknown = set(flare_logits) - set(FLARE_MODALITIES)
  if unknown:
    raise ValueError(f"total_loss: flare_logits has streams {sorted(unknown)}; "
                     f"only {FLARE_MODALITIES} have SMP heads.")
  terms, total = _identity_terms(logits, features, labels, config)
  for stream in flare_logits:
    column = FLARE_MODALITIES.index(stream)
    terms[f"flare_{stream}"] = flare_bce(flare_logits[stream],
                                         flare_targets[:, column])
    total += config.flare_weight * terms[f"flare_{stream}"]
  if config.flare_pixel_weight > 0 and flare_logits:
    if flare_maps is None or saturation is None:
      raise ValueError("loss.flare_pixel_weight > 0 needs the model's "
                       "flare_maps and the pipeline's saturation maps.")
    for stream in flare_logits:
      column = FLARE_MODALITIES.index(stream)
      terms[f"flare_pixel_{stream}"] = flare_pixel_bce(
          flare_maps[stream], saturation[..., column])
      total += config.flare_pixel_weight * terms[f"flare_pixel_{stream}"]
  if config.fce_consistency_weight > 0 and fce_guides:
    for stream in fce_guides:
      column = FLARE_MODALITIES.index(stream)
      terms[f"fce_consistency_{stream}"] = fce_consistency(
          fce_guides[stream], plug_features[stream], flare_targets[:, column])
      total += (config.fce_consistency_weight *
                terms[f"fce_consistency_{stream}"])
  if config.modality != "none":
    name = f"modality_{config.modality}"
    terms[name] = _modality_loss(config.modality, logits, features, labels,
                                 config.modality_margin)
    total += config.modality_weight * terms[name]
  total = jnp.asarray(total, jnp.float32)
  terms["total"] = total
  return total, terms
