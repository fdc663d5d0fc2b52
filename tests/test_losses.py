"""Tests of facenet_jax.losses against plain NumPy (float64, loops) versions."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from facenet_jax import losses

STREAMS = ("rgb", "ni", "ti")

# Jitted once per shape: far cheaper than compiling every op eagerly.
cross_entropy = jax.jit(losses.cross_entropy, static_argnames="label_smoothing")
batch_hard_triplet = jax.jit(losses.batch_hard_triplet,
                             static_argnames="soft_margin")
triplet_value_and_grad = jax.jit(
    jax.value_and_grad(losses.batch_hard_triplet), static_argnames="soft_margin")
flare_bce = jax.jit(losses.flare_bce)
ic_loss = jax.jit(losses.ic_loss)
three_m_loss = jax.jit(losses.three_m_loss)
hetero_center_loss = jax.jit(losses.hetero_center_loss)
cdc_loss = jax.jit(losses.cdc_loss)


# --- NumPy references ----------------------------------------------------------


def np_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_cross_entropy(logits, labels, eps):
  batch, classes = logits.shape
  total = 0.0
  for b in range(batch):
    log_p = np_log_softmax(logits[b].astype(np.float64))
    for c in range(classes):
      target = (1.0 - eps) * (c == labels[b]) + eps / classes
      total -= target * log_p[c]
  return total / batch


def np_triplet(features, labels, margin, soft):
  f = features.astype(np.float64)
  batch = len(labels)
  per_anchor = []
  for a in range(batch):
    pos = [np.linalg.norm(f[a] - f[p]) for p in range(batch)
           if p != a and labels[p] == labels[a]]
    neg = [np.linalg.norm(f[a] - f[n]) for n in range(batch)
           if labels[n] != labels[a]]
    if not pos or not neg:
      continue
    gap = max(pos) - min(neg)
    per_anchor.append(np.log1p(np.exp(gap)) if soft else max(0.0, margin + gap))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def np_bce(x, t):
  x = x.astype(np.float64)
  p = 1.0 / (1.0 + np.exp(-x))
  return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))


def np_ic(logits_rgb, logits_ni):
  p_r = np.exp(np_log_softmax(logits_rgb.astype(np.float64)))
  p_n = np.exp(np_log_softmax(logits_ni.astype(np.float64)))
  kl_rn = np.mean([np.sum(p_r[b] * np.log(p_r[b] / p_n[b]))
                   for b in range(len(p_r))])
  kl_nr = np.mean([np.sum(p_n[b] * np.log(p_n[b] / p_r[b]))
                   for b in range(len(p_r))])
  return min(kl_rn, kl_nr)


def np_three_m(features, margin):
  unit = {s: f / np.linalg.norm(f, axis=1, keepdims=True)
          for s, f in features.items()}
  values = []
  for a, c in itertools.combinations(STREAMS, 2):
    for b in range(len(unit[a])):
      values.append(max(0.0, margin - np.linalg.norm(unit[a][b] - unit[c][b])))
  return float(np.mean(values))


def np_centres(f, labels):
  return {i: f[labels == i].mean(axis=0) for i in np.unique(labels)}


def np_hetero_center(features, labels):
  c_r = np_centres(features["rgb"].astype(np.float64), labels)
  c_n = np_centres(features["ni"].astype(np.float64), labels)
  return float(np.mean([np.sum((c_r[i] - c_n[i])**2) for i in c_r]))


def np_cdc(features, labels):
  c = {s: np_centres(features[s].astype(np.float64), labels) for s in STREAMS}
  return float(np.mean([np.linalg.norm(c["rgb"][i] - c["ti"][i]) +
                        np.linalg.norm(c["ni"][i] - c["ti"][i])
                        for i in c["ti"]]))


# --- Helpers -------------------------------------------------------------------


def random_labels(rng, batch, ids):
  # Arbitrary, non-contiguous identity values: losses must not assume 0..N-1.
  pool = rng.choice(1000, size=ids, replace=False)
  return pool[rng.integers(0, ids, size=batch)]


def random_features(rng, batch, dim):
  return {s: rng.normal(size=(batch, dim)).astype(np.float32) for s in STREAMS}


def assert_finite_tree(testcase, tree):
  for leaf in jax.tree.leaves(tree):
    testcase.assertTrue(np.all(np.isfinite(np.asarray(leaf))), msg=str(leaf))


class CrossEntropyTest(parameterized.TestCase):

  @parameterized.product(seed=[0, 1, 2], shape=[(4, 3), (9, 7)],
                         smoothing=[0.0, 0.1])
  def test_matches_numpy(self, seed, shape, smoothing):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=shape).astype(np.float32)
    labels = rng.integers(0, shape[1], size=shape[0])
    got = cross_entropy(logits, labels, smoothing)
    np.testing.assert_allclose(got, np_cross_entropy(logits, labels, smoothing),
                               rtol=1e-5, atol=1e-6)

  def test_extreme_logits_are_finite(self):
    logits = np.array([[1e4, -1e4, 0.0]], np.float32)
    got = cross_entropy(logits, np.array([1]), 0.1)
    self.assertTrue(np.isfinite(got))
    np.testing.assert_allclose(got, 0.9 * 2e4 + 0.1 / 3 * (2e4 + 1e4), rtol=1e-5)

  def test_bad_smoothing_raises(self):
    with self.assertRaisesRegex(ValueError, "label_smoothing"):
      losses.cross_entropy(np.zeros((2, 3)), np.zeros(2, int), 1.0)


class TripletTest(parameterized.TestCase):

  @parameterized.product(seed=[0, 1, 2], shape=[(8, 5), (12, 16)],
                         soft=[False, True], margin=[0.3, 5.0])
  def test_matches_numpy(self, seed, shape, soft, margin):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=shape).astype(np.float32)
    labels = random_labels(rng, shape[0], ids=3)
    got = batch_hard_triplet(features, labels, margin, soft)
    np.testing.assert_allclose(got, np_triplet(features, labels, margin, soft),
                               rtol=1e-4, atol=1e-5)

  @parameterized.parameters(False, True)
  def test_anchor_without_positive_is_left_out(self, soft):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(5, 4)).astype(np.float32)
    labels = np.array([7, 7, 2, 2, 9])  # 9 has no positive.
    got = batch_hard_triplet(features, labels, 0.5, soft)
    want = np_triplet(features, labels, 0.5, soft)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Counting the singleton as an anchor with zero loss would give 4/5 of it.
    self.assertGreater(want, 0.0)
    self.assertGreater(abs(float(got) - 0.8 * want), 1e-3)

  @parameterized.named_parameters(
      ("all_distinct", np.array([0, 1, 2, 3, 4, 5])),
      ("all_same", np.array([5, 5, 5, 5, 5, 5])))
  def test_no_valid_anchor_gives_zero(self, labels):
    features = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    loss, grad = triplet_value_and_grad(features, labels, 0.3)
    self.assertEqual(float(loss), 0.0)
    np.testing.assert_array_equal(grad, np.zeros_like(features))

  @parameterized.parameters(False, True)
  def test_gradient_finite_with_duplicate_features(self, soft):
    rng = np.random.default_rng(4)
    features = rng.normal(size=(6, 4)).astype(np.float32)
    features[1] = features[0]  # duplicate positive (distance 0)
    features[3] = features[0]  # duplicate negative (distance 0)
    labels = np.array([0, 0, 1, 1, 2, 2])
    loss, grad = triplet_value_and_grad(features, labels, 0.3, soft_margin=soft)
    self.assertTrue(np.isfinite(loss))
    assert_finite_tree(self, grad)
    self.assertGreater(float(jnp.abs(grad).sum()), 0.0)
    constant = np.ones((6, 4), np.float32)
    assert_finite_tree(
        self, triplet_value_and_grad(constant, labels, 0.3, soft_margin=soft))

  def test_gradient_matches_finite_differences(self):
    rng = np.random.default_rng(5)
    features = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    _, grad = triplet_value_and_grad(features, labels, 1.0)
    direction = rng.normal(size=features.shape).astype(np.float32)
    h = 1e-3
    numeric = (np_triplet(features + h * direction, labels, 1.0, False) -
               np_triplet(features - h * direction, labels, 1.0, False)) / (2 * h)
    np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-3)


class FlareBceTest(parameterized.TestCase):

  @parameterized.product(seed=[0, 1], batch=[1, 7])
  def test_matches_numpy(self, seed, batch):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=4.0, size=batch).astype(np.float32)
    t = rng.integers(0, 2, size=batch).astype(np.float32)
    np.testing.assert_allclose(flare_bce(x, t), np_bce(x, t), rtol=1e-5)

  def test_extreme_logits_are_stable(self):
    x = np.array([200.0, -200.0, 200.0], np.float32)
    t = np.array([1.0, 0.0, 0.0], np.float32)
    np.testing.assert_allclose(flare_bce(x, t), 200.0 / 3, rtol=1e-6)
    assert_finite_tree(self, jax.jit(jax.grad(losses.flare_bce))(x, t))


class PixelAndConsistencyTest(parameterized.TestCase):

  def test_area_pool_is_the_cell_mean(self):
    maps = np.arange(2 * 8 * 4, dtype=np.float32).reshape(2, 8, 4)
    pooled = np.asarray(losses.area_pool(maps, (4, 2)))
    ref = maps.reshape(2, 4, 2, 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(pooled, ref, rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "divisible by the plug-in"):
      losses.area_pool(maps, (3, 2))

  @parameterized.parameters(0, 1)
  def test_flare_pixel_bce_matches_numpy(self, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(3, 4, 2, 5)).astype(np.float32)
    sat = (rng.random((3, 16, 8)) < 0.3).astype(np.float32)
    target = sat.reshape(3, 4, 4, 2, 4).mean(axis=(2, 4))
    target = np.repeat(target[..., None], 5, axis=-1)  # Every channel.
    np.testing.assert_allclose(
        jax.jit(losses.flare_pixel_bce)(logits, sat),
        np_bce(logits.ravel(), target.ravel()), rtol=1e-5)

  def test_flare_bce_broadcasts_the_image_target_over_channels(self):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    t = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    np.testing.assert_allclose(flare_bce(x, t),
                               np_bce(x.ravel(), np.repeat(t, 3)), rtol=1e-5)

  def test_fce_consistency_matches_numpy_on_clean_samples_only(self):
    rng = np.random.default_rng(3)
    guide = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
    plug = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
    flare = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
    err = ((guide - plug) ** 2).mean(axis=(1, 2, 3))
    energy = (plug ** 2).mean(axis=(1, 2, 3))
    expected = np.mean((err / energy)[flare < 0.5])
    value, (g_guide, g_plug) = jax.jit(jax.value_and_grad(
        losses.fce_consistency, argnums=(0, 1)))(guide, plug, flare)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    self.assertEqual(float(jnp.abs(g_plug).sum()), 0.0)  # Target is fixed.
    self.assertEqual(float(jnp.abs(g_guide[1]).sum()), 0.0)  # Flared sample.
    self.assertGreater(float(jnp.abs(g_guide[0]).sum()), 0.0)
    self.assertEqual(float(losses.fce_consistency(guide, plug,
                                                  np.ones(4, np.float32))),
                     0.0)

  def test_total_loss_adds_the_weighted_terms(self):
    rng = np.random.default_rng(4)
    logits = {s: rng.normal(size=(4, 5)).astype(np.float32) for s in STREAMS}
    feats = {s: rng.normal(size=(4, 6)).astype(np.float32) for s in STREAMS}
    flare_logits = {s: rng.normal(size=(4,)).astype(np.float32)
                    for s in ("rgb", "ni")}
    maps = {s: rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
            for s in ("rgb", "ni")}
    guides = {s: rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
              for s in ("rgb", "ni")}
    plugs = {s: rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
             for s in ("rgb", "ni")}
    sat = rng.random((4, 8, 8, 2)).astype(np.float32)
    labels = np.array([0, 0, 1, 1])
    targets = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], np.float32)
    kwargs = dict(flare_maps=maps, saturation=sat, fce_guides=guides,
                  plug_features=plugs)
    base_cfg = losses.LossConfig(modality="none")
    cfg = losses.LossConfig(modality="none", flare_pixel_weight=0.5,
                            fce_consistency_weight=2.0)
    base, _ = losses.total_loss(logits, feats, flare_logits, labels, targets,
                                base_cfg, **kwargs)
    total, terms = losses.total_loss(logits, feats, flare_logits, labels,
                                     targets, cfg, **kwargs)
    extra = sum(0.5 * terms[f"flare_pixel_{s}"] +
                2.0 * terms[f"fce_consistency_{s}"] for s in ("rgb", "ni"))
    np.testing.assert_allclose(total, base + extra, rtol=1e-5)
    np.testing.assert_allclose(
        terms["flare_pixel_ni"],
        losses.flare_pixel_bce(maps["ni"], sat[..., 1]), rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "flare_pixel_weight"):
      losses.total_loss(logits, feats, flare_logits, labels, targets, cfg)


class IcLossTest(parameterized.TestCase):

  @parameterized.product(seed=[0, 1, 2], shape=[(3, 4), (8, 11)])
  def test_matches_numpy(self, seed, shape):
    rng = np.random.default_rng(seed)
    rgb = rng.normal(scale=2.0, size=shape).astype(np.float32)
    ni = rng.normal(scale=2.0, size=shape).astype(np.float32)
    np.testing.assert_allclose(ic_loss(rgb, ni), np_ic(rgb, ni),
                               rtol=1e-4, atol=1e-6)

  def test_min_of_batch_means_not_mean_of_per_sample_min(self):
    # Sample 0 has its smaller KL in one direction, sample 1 in the other.
    rgb = np.array([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    ni = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]], np.float32)
    p_r = np.exp(np_log_softmax(rgb.astype(np.float64)))
    p_n = np.exp(np_log_softmax(ni.astype(np.float64)))
    kl_rn = np.sum(p_r * np.log(p_r / p_n), axis=1)
    kl_nr = np.sum(p_n * np.log(p_n / p_r), axis=1)
    per_sample_min = np.mean(np.minimum(kl_rn, kl_nr))
    got = float(ic_loss(rgb, ni))
    np.testing.assert_allclose(got, min(kl_rn.mean(), kl_nr.mean()), rtol=1e-5)
    self.assertGreater(got, per_sample_min + 1e-3)

  def test_zero_for_equal_logits_and_finite_gradient(self):
    logits = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    self.assertAlmostEqual(float(ic_loss(logits, logits)), 0.0, places=6)
    extreme = np.array([[100.0, -100.0], [-100.0, 100.0]], np.float32)
    assert_finite_tree(self, jax.jit(jax.grad(losses.ic_loss, argnums=(0, 1)))(
        extreme, -extreme))


class FeatureModalityLossTest(parameterized.TestCase):

  @parameterized.product(seed=[0, 1, 2], margin=[0.1, 1.5])
  def test_three_m_matches_numpy(self, seed, margin):
    rng = np.random.default_rng(seed)
    features = random_features(rng, 6, 4)
    # Make some pairs close so that both hinge branches occur.
    features["ni"][:3] = features["rgb"][:3] + 0.01
    np.testing.assert_allclose(three_m_loss(features, margin),
                               np_three_m(features, margin), rtol=1e-5, atol=1e-6)

  @parameterized.product(seed=[0, 1, 2], shape=[(5, 3), (10, 8)], ids=[1, 3])
  def test_hetero_center_matches_numpy(self, seed, shape, ids):
    rng = np.random.default_rng(seed)
    features = random_features(rng, *shape)
    labels = random_labels(rng, shape[0], ids)
    np.testing.assert_allclose(hetero_center_loss(features, labels),
                               np_hetero_center(features, labels), rtol=1e-5)

  @parameterized.product(seed=[0, 1, 2], shape=[(5, 3), (10, 8)], ids=[1, 3])
  def test_cdc_matches_numpy(self, seed, shape, ids):
    rng = np.random.default_rng(seed)
    features = random_features(rng, *shape)
    labels = random_labels(rng, shape[0], ids)
    np.testing.assert_allclose(cdc_loss(features, labels),
                               np_cdc(features, labels), rtol=1e-5)

  def test_identity_mean_not_sample_mean(self):
    # Identity 4 has three samples, identity 8 one: each counts once.
    labels = np.array([4, 8, 4, 4])
    rgb = np.array([[1.0], [3.0], [1.0], [1.0]], np.float32)
    features = {"rgb": rgb, "ni": np.zeros_like(rgb), "ti": np.zeros_like(rgb)}
    np.testing.assert_allclose(hetero_center_loss(features, labels),
                               (1.0 + 9.0) / 2)
    np.testing.assert_allclose(cdc_loss(features, labels), (1.0 + 3.0) / 2)

  def test_gradients_finite_for_identical_streams(self):
    rng = np.random.default_rng(6)
    same = rng.normal(size=(4, 3)).astype(np.float32)
    features = {s: same for s in STREAMS}
    labels = np.array([0, 0, 1, 1])
    assert_finite_tree(self, jax.jit(jax.grad(losses.three_m_loss))(features, 0.1))
    assert_finite_tree(
        self, jax.jit(jax.grad(losses.hetero_center_loss))(features, labels))
    assert_finite_tree(self, jax.jit(jax.grad(losses.cdc_loss))(features, labels))

  def test_missing_stream_raises(self):
    features = random_features(np.random.default_rng(0), 2, 3)
    del features["ti"]
    with self.assertRaisesRegex(ValueError, "ti"):
      losses.cdc_loss(features, np.array([0, 1]))


class TotalLossTest(parameterized.TestCase):

  def make_inputs(self, seed=0, batch=8, classes=5, dim=6):
    rng = np.random.default_rng(seed)
    logits = {s: rng.normal(size=(batch, classes)).astype(np.float32)
              for s in STREAMS}
    features = random_features(rng, batch, dim)
    flare_logits = {s: rng.normal(size=batch).astype(np.float32)
                    for s in ("rgb", "ni")}
    labels = np.repeat(np.arange(batch // 2), 2)
    flare_targets = rng.integers(0, 2, size=(batch, 2)).astype(np.float32)
    return logits, features, flare_logits, labels, flare_targets

  @parameterized.parameters("ic", "none", "3m", "hc", "cdc")
  def test_jit_keys_and_weighted_sum(self, modality):
    config = losses.LossConfig(
        ce_weight=0.7, label_smoothing=0.1, triplet_weight=1.3,
        triplet_margin=0.5, flare_weight=0.4, modality=modality,
        modality_weight=2.0, modality_margin=0.8)
    logits, features, flare_logits, labels, flare_targets = self.make_inputs()
    fn = jax.jit(losses.total_loss, static_argnames="config")
    total, terms = fn(logits, features, flare_logits, labels, flare_targets,
                      config=config)
    expected_keys = {f"{kind}_{s}" for kind in ("ce", "triplet") for s in STREAMS}
    expected_keys |= {"flare_rgb", "flare_ni", "total"}
    if modality != "none":
      expected_keys.add(f"modality_{modality}")
    self.assertEqual(set(terms), expected_keys)
    weights = {"ce": 0.7, "triplet": 1.3, "flare": 0.4, "modality": 2.0}
    weighted = sum(weights[k.split("_")[0]] * float(v)
                   for k, v in terms.items() if k != "total")
    np.testing.assert_allclose(total, weighted, rtol=1e-5)
    np.testing.assert_allclose(terms["total"], total)
    # The terms are the unweighted losses.
    np.testing.assert_allclose(
        terms["ce_ni"], np_cross_entropy(logits["ni"], labels, 0.1), rtol=1e-5)
    np.testing.assert_allclose(
        terms["triplet_ti"], np_triplet(features["ti"], labels, 0.5, False),
        rtol=1e-4)
    np.testing.assert_allclose(
        terms["flare_ni"], np_bce(flare_logits["ni"], flare_targets[:, 1]),
        rtol=1e-5)
    np.testing.assert_allclose(
        terms["flare_rgb"], np_bce(flare_logits["rgb"], flare_targets[:, 0]),
        rtol=1e-5)

  def test_without_flare_heads_and_gradients(self):
    config = losses.LossConfig()
    logits, features, _, labels, flare_targets = self.make_inputs(seed=1)
    fn = lambda lg, ft: losses.total_loss(lg, ft, {}, labels, flare_targets,
                                          config)
    (total, terms), grads = jax.jit(
        jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(logits, features)
    self.assertNotIn("flare_rgb", terms)
    self.assertIn("modality_ic", terms)
    np.testing.assert_allclose(total, sum(float(v) for k, v in terms.items()
                                          if k != "total"), rtol=1e-5)
    assert_finite_tree(self, grads)

  def test_invalid_modality_raises(self):
    with self.assertRaisesRegex(ValueError, r"loss\.modality"):
      losses.LossConfig(modality="kl")

  def test_negative_weight_raises(self):
    with self.assertRaisesRegex(ValueError, r"loss\.triplet_weight"):
      losses.LossConfig(triplet_weight=-1.0)

  def test_unknown_flare_stream_raises(self):
    logits, features, flare_logits, labels, flare_targets = self.make_inputs()
    flare_logits["ti"] = flare_logits["rgb"]
    with self.assertRaisesRegex(ValueError, "flare_logits"):
      losses.total_loss(logits, features, flare_logits, labels, flare_targets,
                        losses.LossConfig())

  def test_modality_names_exported(self):
    self.assertEqual(losses.MODALITY_LOSSES, ("ic", "none", "3m", "hc", "cdc"))
    for name in losses.MODALITY_LOSSES:
      self.assertEqual(losses.LossConfig(modality=name).modality, name)


if __name__ == "__main__":
  absltest.main()
