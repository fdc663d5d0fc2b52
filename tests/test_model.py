"""FACENet and ResNet: shapes, parameter counts, gradients, FCE gating."""

import functools

from absl.testing import absltest
import pytest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from facenet_jax import losses
from facenet_jax.constants import MODALITIES
from facenet_jax.models import FACENet, ResNet
from facenet_jax.models import facenet as facenet_lib

# torchvision's resnet{18,50} parameter counts without the 1000-way fc layer.
TORCHVISION_PARAMS = {18: 11_689_512 - 513_000, 50: 25_557_032 - 2_049_000}
TINY = dict(depth=10, width_multiplier=0.125, fmi_reduction=4)
H, W = 64, 32


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _images(key, batch: int, h: int = H, w: int = W) -> dict:
  keys = jax.random.split(key, len(MODALITIES))
  return {m: jax.random.normal(k, (batch, h, w, 3))
          for m, k in zip(MODALITIES, keys)}


@functools.lru_cache(maxsize=None)
def _tiny_variables(**overrides):
  model = FACENet(num_classes=7, **{**TINY, **overrides})
  flare = jnp.zeros((2, 2))
  # Op by op, not jitted: the model's operations compile once for all the
  # variants of this file, where each jitted init compiled its own program
  # (8 s each; op by op, 9 s for the first variant, under 1 s for the next).
  return model, model.init(jax.random.key(0), _images(jax.random.key(1), 2),
                           flare, train=False)


def _train_grads(model, variables, images, flare, objective):
  """Gradients w.r.t. the params of objective(ModelOutput), train mode."""
  def loss(params):
    out, _ = model.apply({"params": params,
                          "batch_stats": variables["batch_stats"]},
                         images, flare, train=True, mutable=["batch_stats"])
    return objective(out)
  return jax.grad(loss)(variables["params"])


def _abs_sum(tree) -> float:
  return float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))


class ResNetTest(parameterized.TestCase):

  @parameterized.parameters(18, 50)
  def test_parameter_count_matches_torchvision(self, depth):
    variables = jax.eval_shape(
        lambda: ResNet(depth=depth).init(jax.random.key(0),
                                         jnp.zeros((1, 256, 128, 3))))
    self.assertEqual(_count(variables["params"]), TORCHVISION_PARAMS[depth])

  @parameterized.parameters((1, (16, 8)), (2, (8, 4)))
  def test_last_stride(self, last_stride, hw):
    model = ResNet(depth=50, last_stride=last_stride)
    out = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0),
                                       jnp.zeros((2, 256, 128, 3)))[0])
    self.assertEqual(out.shape, (2, *hw, 2048))

  def test_bfloat16_compute_float32_params(self):
    model = ResNet(depth=10, width_multiplier=0.125, dtype=jnp.bfloat16)
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0),
                                       jnp.zeros((1, 64, 32, 3))))
    self.assertEqual(out.dtype, jnp.bfloat16)
    self.assertTrue(all(x.dtype == jnp.float32
                        for x in jax.tree.leaves(variables["params"])))

  def test_unknown_depth(self):
    with self.assertRaisesRegex(ValueError, "model.backbone"):
      ResNet(depth=42).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.slow
class PaperConfigTest(parameterized.TestCase):
  """Paper-size model through jax.eval_shape only (no ResNet50 compile)."""

  def _shapes(self, **kwargs):
    model = FACENet(num_classes=100, depth=50, **kwargs)
    images = {m: jnp.zeros((2, 256, 128, 3)) for m in MODALITIES}
    return jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), images, jnp.zeros((2, 2)), train=False))

  def test_output_shapes(self):
    out, _ = self._shapes()
    self.assertEqual(out.embedding.shape, (2, 3 * 2048))
    for m in MODALITIES:
      self.assertEqual(out.features[m].shape, (2, 2048))
      self.assertEqual(out.logits[m].shape, (2, 100))
    self.assertEqual(set(out.masks), {"rgb", "ni"})
    self.assertEqual(out.masks["rgb"].shape, (2, 16, 8, 2048))
    self.assertEqual(out.flare_logits["ni"].shape, (2, 2048))
    self.assertEqual(out.flare_maps["ni"].shape, (2, 16, 8, 2048))

  def test_parameter_counts(self):
    _, baseline = self._shapes(use_mfmp=False, use_fce=False)
    _, full = self._shapes()
    _, reduced = self._shapes(fmi_width=512)
    _, head = self._shapes(smp="head")
    _, projected = self._shapes(fce_projection=True)
    c, classes = 2048, 100
    backbones = 3 * TORCHVISION_PARAMS[50]
    heads = 3 * (c + c * classes)  # BN neck scale (no bias) + classifier.
    self.assertEqual(_count(baseline["params"]), backbones + heads)

    def fmi(width):  # Conv kernels (no bias) + BN scale/bias, then attention.
      convs = (9 * 2 * c * width + 2 * width + width * width + 2 * width +
               9 * width * width + 2 * width + 9 * width * c + 2 * c)
      hidden = c // 16
      return convs + (c * hidden + hidden) + (hidden * c + c)
    # Per flare modality: three 1x1 convs with bias and Delta; smp="head"
    # adds the separate SMP classifier, fce_projection a 1x1 conv with bias.
    mask = 3 * (c * c + c) + 1
    smp_head = (c * (c // 4) + c // 4) + (c // 4 + 1)
    self.assertEqual(_count(full["params"]),
                     backbones + heads + fmi(c) + 2 * mask)
    self.assertEqual(_count(reduced["params"]),
                     backbones + heads + fmi(512) + 2 * mask)
    self.assertEqual(_count(head["params"]),
                     backbones + heads + fmi(c) + 2 * (mask + smp_head))
    self.assertEqual(_count(projected["params"]),
                     backbones + heads + fmi(c) + 2 * (mask + c * c + c))

  @parameterized.parameters(1, 2, 3)
  def test_plug_stage_mask_resolution(self, stage):
    out, _ = self._shapes(plug_stage=stage)
    channels = (256, 512, 1024)[stage - 1]
    hw = ((64, 32), (32, 16), (16, 8))[stage - 1]
    self.assertEqual(out.masks["rgb"].shape, (2, *hw, channels))
    self.assertEqual(out.embedding.shape, (2, 3 * 2048))

  def test_fce_needs_mfmp(self):
    with self.assertRaisesRegex(ValueError, "use_fce"):
      self._shapes(use_mfmp=False, use_fce=True)


@pytest.mark.slow
class TinyModelTest(parameterized.TestCase):

  def test_forward_backward_and_gradients_reach_threshold(self):
    model, variables = _tiny_variables()
    images = _images(jax.random.key(2), 4)
    flare = jnp.array([[1., 1.], [1., 0.], [0., 1.], [0., 0.]])

    grads = _train_grads(
        model, variables, images, flare,
        lambda out: (sum(jnp.sum(l ** 2) for l in out.logits.values()) +
                     sum(jnp.sum(f) for f in out.flare_logits.values())))
    self.assertTrue(all(np.all(np.isfinite(g))
                        for g in jax.tree.leaves(grads)))
    for m in ("rgb", "ni"):
      self.assertNotEqual(float(grads[f"{m}_mask"]["threshold"]), 0.0)
      kernel = grads[f"{m}_mask"]["mask_logits"]["kernel"]
      self.assertGreater(float(jnp.abs(kernel).sum()), 0.0)
    self.assertGreater(float(jnp.abs(
        grads["fmi"]["mix1_conv"]["kernel"]).sum()), 0.0)

  def test_masks_are_binary(self):
    model, variables = _tiny_variables()
    out = model.apply(variables, _images(jax.random.key(3), 2),
                      jnp.ones((2, 2)))
    for m in ("rgb", "ni"):
      values = np.unique(np.asarray(out.masks[m]))
      self.assertTrue(set(values.tolist()) <= {0.0, 1.0})

  def _abstract(self, **overrides):
    """Output and variables of a tiny variant, shapes only (no compile)."""
    model = FACENet(num_classes=7, **{**TINY, **overrides})
    return jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), _images(jax.random.key(1), 2), jnp.ones((2, 2))))

  def test_without_fmi_has_no_fmi_parameters(self):
    _, variables = self._abstract(use_fmi=False)
    self.assertNotIn("fmi", variables["params"])
    self.assertIn("rgb_mask", variables["params"])

  def test_baseline_has_no_masks(self):
    out, variables = self._abstract(use_mfmp=False, use_fce=False)
    self.assertEqual(dict(out.masks), {})
    self.assertEqual(dict(out.flare_logits), {})
    self.assertNotIn("rgb_mask", variables["params"])

  def test_embedding_after_bn(self):
    # The embedding source changes no parameter: reuse the default variables.
    _, variables = _tiny_variables()
    model = FACENet(num_classes=7, embedding_source="after_bn", **TINY)
    # Running variance 4 makes the neck halve the pooled features.
    stats = jax.tree.map(lambda x: x, variables["batch_stats"])
    stats["rgb_head"]["neck"]["var"] = jnp.full((64,), 4.0)
    out = jax.jit(model.apply)({**variables, "batch_stats": stats},
                               _images(jax.random.key(3), 2), jnp.zeros((2, 2)))
    self.assertEqual(out.embedding.shape, (2, 3 * 64))
    np.testing.assert_allclose(out.embedding[:, :64],
                               out.features["rgb"] / np.sqrt(4.0 + 1e-5),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
class FCEGatingTest(absltest.TestCase):
  """A sample's RGB/NI features depend on its TI image only when delta = 1."""

  def setUp(self):
    super().setUp()
    # Plug in after stage 4 so the mask acts directly on the pooled features.
    self.model, self.variables = _tiny_variables()
    self.apply = jax.jit(lambda imgs, fl: self.model.apply(
        self.variables, imgs, fl, train=False).embedding)
    self.images = _images(jax.random.key(4), 3)
    other_ti = jax.random.normal(jax.random.key(5), (3, H, W, 3)) * 3.0
    self.changed = {**self.images, "ti": other_ti}

  def _segments(self, emb):
    d = emb.shape[-1] // 3
    return {m: np.asarray(emb[:, i * d:(i + 1) * d])
            for i, m in enumerate(MODALITIES)}

  def test_clean_sample_ignores_ti(self):
    flare = jnp.zeros((3, 2))
    before = self._segments(self.apply(self.images, flare))
    after = self._segments(self.apply(self.changed, flare))
    np.testing.assert_array_equal(before["rgb"], after["rgb"])
    np.testing.assert_array_equal(before["ni"], after["ni"])
    self.assertFalse(np.allclose(before["ti"], after["ti"]))

  def test_flare_sample_uses_ti_where_masked(self):
    flare = jnp.ones((3, 2))
    out = self.model.apply(self.variables, self.images, flare)
    coverage = float(jnp.mean(out.masks["rgb"]))
    self.assertGreater(coverage, 0.0)  # Non-empty mask at initialisation.
    before = self._segments(self.apply(self.images, flare))
    after = self._segments(self.apply(self.changed, flare))
    self.assertFalse(np.allclose(before["rgb"], after["rgb"]))

  def test_sample_alone_equals_sample_in_batch(self):
    flare = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
    batch = np.asarray(self.apply(self.images, flare))
    for i in range(3):
      alone = np.asarray(self.apply({m: v[i:i + 1] for m, v in
                                     self.images.items()}, flare[i:i + 1]))
      np.testing.assert_allclose(alone[0], batch[i], rtol=1e-5, atol=1e-5)

  def test_gate_function_per_sample(self):
    f_self = jnp.ones((2, 1, 1, 4))
    f_guide = jnp.full((2, 1, 1, 4), 5.0)
    mask = jnp.array([1., 0., 1., 0.]).reshape(1, 1, 1, 4).repeat(2, 0)
    enhanced = jnp.full((2, 1, 1, 4), -1.0)
    out = facenet_lib.flare_aware_enhancement(f_self, f_guide, mask, enhanced,
                                              jnp.array([1., 0.]))
    np.testing.assert_array_equal(out[0, 0, 0], [5., 1., 5., 1.])
    np.testing.assert_array_equal(out[1, 0, 0], [-1., -1., -1., -1.])


@pytest.mark.slow
class MaskSupervisionTest(parameterized.TestCase):
  """smp = "mask": the flare BCE reaches the mask logits and Delta."""

  def _flare_grads(self, **overrides):
    model, variables = _tiny_variables(**overrides)
    images = _images(jax.random.key(6), 4)
    flare = jnp.array([[1., 1.], [1., 0.], [0., 1.], [0., 0.]])

    return _train_grads(
        model, variables, images, flare,
        lambda out: sum(losses.flare_bce(out.flare_logits[m], flare[:, i])
                        for i, m in enumerate(("rgb", "ni"))))

  def test_flare_bce_reaches_mask_logits_and_threshold(self):
    grads = self._flare_grads()
    for m in ("rgb", "ni"):
      self.assertNotEqual(float(grads[f"{m}_mask"]["threshold"]), 0.0)
      kernel = grads[f"{m}_mask"]["mask_logits"]["kernel"]
      self.assertGreater(float(jnp.abs(kernel).sum()), 0.0)
      self.assertNotIn("smp_hidden", grads[f"{m}_mask"])

  def test_head_reading_leaves_threshold_to_straight_through(self):
    grads = self._flare_grads(smp="head")
    self.assertIn("smp_hidden", grads["rgb_mask"])
    # d(pooled logit)/d(Delta) is -1 per position under "mask": the BCE
    # gradient on Delta is the sum of (p - t); under "head" it is not.
    self.assertGreater(float(jnp.abs(
        grads["rgb_mask"]["smp_out"]["kernel"]).sum()), 0.0)

  def test_detach_keeps_flare_loss_out_of_backbones(self):
    attached = self._flare_grads()
    detached = self._flare_grads(mask_detach=True)
    self.assertGreater(_abs_sum(attached["rgb_backbone"]), 0.0)
    self.assertEqual(_abs_sum(detached["rgb_backbone"]), 0.0)
    self.assertEqual(_abs_sum(detached["ti_backbone"]), 0.0)
    self.assertGreater(_abs_sum(detached["rgb_mask"]["mask_logits"]), 0.0)
    self.assertGreater(_abs_sum(detached["fmi"]), 0.0)

  def test_mask_stage_reads_the_earlier_map_only(self):
    # The branch reads stage 1 pooled to the stage-4 grid: the flare loss
    # reaches stage 1 (and the stem) of the RGB and NI streams, not the
    # stages after it, and a 1x1 convolution aligns the channels.
    grads = self._flare_grads(mask_stage=1)
    rgb = grads["rgb_backbone"]
    self.assertGreater(_abs_sum(rgb["layer1"]), 0.0)
    self.assertGreater(_abs_sum(rgb["conv1"]), 0.0)
    for layer in ("layer2", "layer3", "layer4"):
      self.assertEqual(_abs_sum(rgb[layer]), 0.0, layer)
    self.assertEqual(_abs_sum(grads["ti_backbone"]), 0.0)
    self.assertIn("self_align", grads["rgb_mask"])
    model, variables = _tiny_variables(mask_stage=1)
    out = model.apply(variables, _images(jax.random.key(3), 2),
                      jnp.ones((2, 2)))
    self.assertEqual(out.masks["rgb"].shape[1:3], (H // 16, W // 16))

  def test_mask_stage_after_plug_stage_raises(self):
    with self.assertRaisesRegex(ValueError, "model.mask_stage"):
      _tiny_variables(mask_stage=4, plug_stage=3)

  def test_pool_to_grid_averages_cells(self):
    x = jnp.arange(16.).reshape(1, 4, 4, 1)
    pooled = facenet_lib.pool_to_grid(x, (2, 2))
    np.testing.assert_allclose(pooled[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    with self.assertRaisesRegex(ValueError, "3x3"):
      facenet_lib.pool_to_grid(x, (3, 3))

  def test_pooling_of_a_constant_map_is_the_constant(self):
    maps = jnp.full((2, 4, 3, 5), 1.5)
    np.testing.assert_allclose(
        facenet_lib.pool_positions(maps, 0.25), np.full((2, 5), 1.5),
        rtol=1e-6)

  def test_topk_pooling_averages_the_highest_positions_per_channel(self):
    # 8 positions, top 25 % = 2; channel 1 is channel 0 reversed and negated.
    maps = jnp.stack([jnp.arange(8.0), -jnp.arange(8.0)], -1).reshape(
        1, 4, 2, 2)
    np.testing.assert_allclose(
        facenet_lib.pool_positions(maps, 0.25), [[6.5, -0.5]])
    # The whole map: the plain mean.
    np.testing.assert_allclose(
        facenet_lib.pool_positions(maps, 1.0), [[3.5, -3.5]])

  def test_flare_maps_are_the_mask_margins(self):
    model, variables = _tiny_variables()
    out = model.apply(variables, _images(jax.random.key(7), 2),
                      jnp.ones((2, 2)))
    self.assertEqual(out.flare_maps["rgb"].shape, out.masks["rgb"].shape)
    np.testing.assert_array_equal(out.masks["rgb"],
                                  (out.flare_maps["rgb"] > 0).astype(
                                      np.float32))
    pooled = facenet_lib.pool_positions(out.flare_maps["rgb"], 0.25)
    np.testing.assert_allclose(out.flare_logits["rgb"], pooled, rtol=1e-6)

  def test_unknown_smp_raises(self):
    with self.assertRaisesRegex(ValueError, "model.smp"):
      FACENet(num_classes=7, smp="heads", **TINY).init(
          jax.random.key(0), _images(jax.random.key(1), 1), jnp.ones((1, 2)))


@pytest.mark.slow
class FCEOptionsTest(absltest.TestCase):

  def test_identity_initialised_projection_equals_the_paper_at_init(self):
    images = _images(jax.random.key(8), 2)
    flare = jnp.ones((2, 2))
    model, variables = _tiny_variables()
    proj_model, proj_variables = _tiny_variables(fce_projection=True)
    # Same initial streams (same rng, the projection adds leaves only).
    params = {**proj_variables["params"], **variables["params"]}
    out = model.apply(variables, images, flare)
    proj = proj_model.apply({**proj_variables, "params": params}, images,
                            flare)
    np.testing.assert_allclose(out.embedding, proj.embedding, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(proj.fce_guides["rgb"], out.fce_guides["rgb"],
                               rtol=1e-5, atol=1e-6)

  def test_consistency_trains_the_projection_not_the_ti_stream(self):
    model, variables = _tiny_variables(fce_projection=True)
    images = _images(jax.random.key(11), 4)
    flare = jnp.array([[0., 0.], [1., 0.], [0., 1.], [0., 0.]])

    grads = _train_grads(
        model, variables, images, flare,
        lambda out: sum(losses.fce_consistency(
            out.fce_guides[m], out.plug_features[m], flare[:, i])
                        for i, m in enumerate(("rgb", "ni"))))
    self.assertGreater(_abs_sum(grads["rgb_fce_projection"]), 0.0)
    self.assertEqual(_abs_sum(grads["ti_backbone"]), 0.0)
    # The target is fixed.
    self.assertEqual(_abs_sum(grads["rgb_backbone"]), 0.0)

  def test_rgb_losses_reach_the_ti_stream_through_the_pasted_map(self):
    images = _images(jax.random.key(13), 4)
    flare = jnp.ones((4, 2))
    # The RGB features of flare samples, which FCE filled with f_T where the
    # mask is on (about half of a random model's map): the paper's FCE
    # passes their gradient on to the TI stream and the projection.
    objective = lambda out: jnp.sum(out.features["rgb"] ** 2)
    model, variables = _tiny_variables(fce_projection=True)
    grads = _train_grads(model, variables, images, flare, objective)
    self.assertGreater(_abs_sum(grads["ti_backbone"]), 0.0)
    self.assertGreater(_abs_sum(grads["rgb_fce_projection"]), 0.0)

  def test_mask_gradient_switch_stops_identity_gradient_at_the_mask(self):
    images = _images(jax.random.key(12), 4)
    flare = jnp.ones((4, 2))

    def grads_of(**overrides):
      model, variables = _tiny_variables(**overrides)
      return _train_grads(
          model, variables, images, flare,
          lambda out: sum(jnp.sum(out.features[m] ** 2) for m in ("rgb", "ni")))

    with_grad = grads_of(fce_clean="identity")
    without = grads_of(fce_clean="identity", fce_mask_gradient=False)
    mask_kernel = lambda g: float(jnp.abs(
        g["rgb_mask"]["mask_logits"]["kernel"]).sum())
    self.assertGreater(mask_kernel(with_grad), 0.0)
    self.assertEqual(mask_kernel(without), 0.0)
    self.assertEqual(float(without["rgb_mask"]["threshold"]), 0.0)

  def test_clean_identity_passes_features_unchanged(self):
    images = _images(jax.random.key(9), 2)
    flare = jnp.zeros((2, 2))
    model, variables = _tiny_variables(fce_clean="identity")
    base, base_variables = _tiny_variables(use_mfmp=False, use_fce=False)
    params = {k: v for k, v in variables["params"].items()
              if k in base_variables["params"]}
    stats = {k: v for k, v in variables["batch_stats"].items()
             if k in base_variables["batch_stats"]}
    out = model.apply(variables, images, flare)
    ref = base.apply({"params": params, "batch_stats": stats}, images, flare)
    np.testing.assert_allclose(out.embedding, ref.embedding, rtol=1e-5,
                               atol=1e-6)


class StraightThroughTest(absltest.TestCase):

  def test_forward_hard_backward_sigmoid(self):
    logits = jnp.array([-1.0, 0.5, 2.0])

    def f(threshold):
      return jnp.sum(facenet_lib.straight_through_mask(logits, threshold, 0.5))

    np.testing.assert_array_equal(
        facenet_lib.straight_through_mask(logits, 0.0, 0.5), [0., 1., 1.])
    s = jax.nn.sigmoid((logits - 0.3) / 0.5)
    expected = float(jnp.sum(-s * (1 - s) / 0.5))
    self.assertAlmostEqual(float(jax.grad(f)(0.3)), expected, places=5)


if __name__ == "__main__":
  absltest.main()
