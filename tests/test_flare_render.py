"""The rendered flare of facenet_jax/flare_render.py (eval.rendered_flare)."""

from absl.testing import absltest
import pytest
import jax
import jax.numpy as jnp
import numpy as np

from facenet_jax import flare_render


def _raw_images(seed: int, n: int = 6, size=(64, 32)) -> tuple:
  rng = np.random.default_rng(seed)
  rgb = rng.uniform(0.0, 0.6, size=(n, *size, 3)).astype(np.float32)
  ni = np.repeat(rng.uniform(0.0, 0.6, size=(n, *size, 1)), 3, axis=-1)
  return jnp.asarray(rgb), jnp.asarray(ni.astype(np.float32))


@pytest.mark.slow
class RenderTest(absltest.TestCase):

  def test_flare_only_brightens_and_saturates_where_it_says(self):
    rgb, ni = _raw_images(0)
    out = flare_render.add_flare(jax.random.key(0), rgb, ni)
    for before, after in ((rgb, out.rgb), (ni, out.ni)):
      self.assertTrue(np.all(np.asarray(after) >= np.asarray(before) - 1e-7))
      self.assertLessEqual(float(jnp.max(after)), 1.0)
    # The inputs stay below the bar, so every saturated value is the flare's.
    np.testing.assert_allclose(
        out.saturation[..., 0],
        np.mean(np.round(np.asarray(out.rgb) * 255) >= 250, axis=-1))
    # NI stays a grey image.
    np.testing.assert_array_equal(out.ni[..., 0], out.ni[..., 2])
    share = np.asarray(jnp.mean(out.saturation, axis=(1, 2)))
    np.testing.assert_array_equal(out.flare, (share > 0.1).astype(np.float32))
    # Every image gets a flare whose core saturates part of it, never all.
    self.assertTrue(np.all(share.max(axis=-1) > 0.0))
    self.assertTrue(np.all(share < 1.0))
    self.assertGreater(float(jnp.mean(out.flare)), 0.5)

  def test_same_key_same_flare_other_key_other_flare(self):
    rgb, ni = _raw_images(1)
    a = flare_render.add_flare(jax.random.key(4), rgb, ni)
    b = flare_render.add_flare(jax.random.key(4), rgb, ni)
    c = flare_render.add_flare(jax.random.key(5), rgb, ni)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    self.assertGreater(float(jnp.mean(jnp.abs(a.rgb - c.rgb))), 0.01)
    # Images of one call get flares of their own.
    self.assertGreater(
        float(jnp.mean(jnp.abs((a.rgb - rgb)[0] - (a.rgb - rgb)[1]))), 0.01)

  def test_values_outside_the_unit_range_are_left_alone(self):
    rgb, ni = _raw_images(2, n=2)
    rgb = rgb.at[:, :4].set(-0.5).at[:, -4:].set(1.7)
    out = flare_render.add_flare(jax.random.key(0), rgb, ni)
    self.assertGreaterEqual(float(jnp.min(out.rgb[:, :4])), -0.5)
    np.testing.assert_allclose(out.rgb[:, -4:], 1.7)


if __name__ == "__main__":
  absltest.main()
