"""The mask mechanism learns to find saturated blobs (smp = "mask").

A tiny FACENet is trained for a few hundred steps on generated triplets with
saturated blobs in RGB and NI (never TI), through the flare losses only, and
its hard masks are scored against the blobs on images it has not seen. This
is the mechanism the paper's SMP describes ("supervises the flare mask with
the pseudo-label"), separated from retrieval: if it cannot localise here, it
cannot on any dataset.
"""

from absl.testing import absltest
import pytest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from facenet_jax import losses
from facenet_jax import mask_quality
from facenet_jax.constants import FLARE_MODALITIES, MODALITIES
from facenet_jax.models import FACENet

# Trains runs, starts scripts or compiles the tiny model: left out of the
# quick loop (-m "not slow").
pytestmark = pytest.mark.slow

H, W = 64, 32
# Plug in after stage 2: an 8 x 4 mask grid at 64 x 32 inputs.
MODEL = dict(depth=10, width_multiplier=0.125, fmi_reduction=4, plug_stage=2,
             use_fce=False)
BAR = 250
RATIO_THRESHOLD = 0.1
STEPS = 120


def _blobs(rng: np.random.Generator, n: int):
  """Triplets of textures; half of them get one saturated ellipse in RGB and NI.

  Returns:
    images: modality -> uint8 (n, H, W, 3); gt: bool (n, H, W) blob pixels.
  """
  yy, xx = np.mgrid[:H, :W]
  images = {m: np.zeros((n, H, W, 3), np.uint8) for m in MODALITIES}
  gt = np.zeros((n, H, W), bool)
  for i in range(n):
    for m in MODALITIES:
      # A smooth random texture well below the saturation bar.
      coarse = rng.uniform(20, 200, size=(H // 8, W // 8, 3))
      images[m][i] = np.kron(coarse, np.ones((8, 8, 1))).astype(np.uint8)
    if rng.random() < 0.5:
      cy, cx = rng.uniform(8, H - 8), rng.uniform(6, W - 6)
      ry, rx = rng.uniform(8, 16), rng.uniform(6, 10)
      gt[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
      for m in FLARE_MODALITIES:
        images[m][i][gt[i]] = 255
  return images, gt


def _batch(images, gt):
  normed = {m: (images[m].astype(np.float32) / 255.0 - 0.5) / 0.25
            for m in MODALITIES}
  saturation = np.stack(
      [np.mean(images[m] >= BAR, axis=-1) for m in FLARE_MODALITIES],
      axis=-1).astype(np.float32)
  ratio = np.stack([np.mean(images[m] >= BAR, axis=(1, 2, 3))
                    for m in FLARE_MODALITIES], axis=-1)
  flare = (ratio > RATIO_THRESHOLD).astype(np.float32)
  return normed, saturation, flare


class MaskLearningTest(absltest.TestCase):

  def test_masks_find_saturated_blobs(self):
    rng = np.random.default_rng(0)
    model = FACENet(num_classes=4, **MODEL)
    # Only the flare terms: the image-level BCE on the pooled mask logits
    # and the pixel-level target.
    config = losses.LossConfig(ce_weight=0.0, triplet_weight=0.0,
                               modality="none", flare_weight=1.0,
                               flare_pixel_weight=1.0)
    images, gt = _blobs(rng, 16)
    normed, _, flare = _batch(images, gt)
    variables = model.init(jax.random.key(0), normed, flare, train=False)
    optimizer = optax.adam(3e-3)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, stats, opt_state, normed, saturation, flare):
      def loss_fn(p):
        out, updates = model.apply({"params": p, "batch_stats": stats},
                                   normed, flare, train=True,
                                   mutable=["batch_stats"])
        loss, _ = losses.total_loss(
            out.logits, out.features, out.flare_logits,
            jnp.zeros(flare.shape[0], jnp.int32), flare, config,
            flare_maps=out.flare_maps, saturation=saturation)
        return loss, updates["batch_stats"]
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), stats, opt_state, loss

    for _ in range(STEPS):
      normed, saturation, flare = _batch(*_blobs(rng, 16))
      params, stats, opt_state, loss = step(params, stats, opt_state, normed,
                                            saturation, flare)
    self.assertTrue(np.isfinite(float(loss)))

    test_images, test_gt = _blobs(np.random.default_rng(1), 64)
    normed, _, flare = _batch(test_images, test_gt)
    masks = mask_quality.predict_masks(
        model, {"params": params, "batch_stats": stats}, normed, flare,
        batch_size=64)
    for m in FLARE_MODALITIES:
      grid = masks[m].shape[1:3]
      scores = mask_quality.mask_scores(
          masks[m], mask_quality.gt_at_resolution(test_gt, grid),
          test_gt.any(axis=(1, 2)))
      self.assertGreater(scores["num_flare"], 10)
      self.assertGreater(scores["iou"], 3.0 * scores["iou_all_ones"],
                         msg=f"{m}: {scores}")
      self.assertLess(scores["coverage_clean"], 0.1, msg=f"{m}: {scores}")


if __name__ == "__main__":
  absltest.main()
