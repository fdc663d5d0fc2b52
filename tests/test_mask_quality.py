"""Mask scoring against ground truth, the figure, and the CLAHE baseline."""

import io

from absl.testing import absltest
import pytest
import numpy as np
from PIL import Image

from facenet_jax import mask_quality
from input_pipeline import deflare
from input_pipeline import pipeline


class GroundTruthTest(absltest.TestCase):

  def test_area_pooling_with_min_fraction(self):
    gt = np.zeros((1, 4, 4), np.uint8)
    gt[0, :2, :2] = 1          # top-left cell: all flare
    gt[0, 0, 2:] = 1           # top-right cell: half
    gt[0, 3, 0] = 1            # bottom-left cell: a quarter
    half = mask_quality.gt_at_resolution(gt, (2, 2), 0.5)
    np.testing.assert_array_equal(half[0], [[True, True], [False, False]])
    quarter = mask_quality.gt_at_resolution(gt, (2, 2), 0.25)
    np.testing.assert_array_equal(quarter[0], [[True, True], [True, False]])
    full = mask_quality.gt_at_resolution(gt, (2, 2), 1.0)
    np.testing.assert_array_equal(full[0], [[True, False], [False, False]])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "min_fraction"):
      mask_quality.gt_at_resolution(np.zeros((1, 4, 4)), (2, 2), 0.0)
    with self.assertRaisesRegex(ValueError, r"\(N, H, W\)"):
      mask_quality.gt_at_resolution(np.zeros((4, 4)), (2, 2))


class ScoresTest(absltest.TestCase):

  def test_known_iou_and_references(self):
    gt = np.zeros((3, 2, 2), bool)
    gt[0, 0, :] = True               # image 0: top row is flare
    gt[1, :, :] = True               # image 1: all flare
    pred = np.zeros((3, 2, 2, 2), np.uint8)
    pred[0, 0, 0, :] = 1             # one of two gt cells, both channels
    pred[0, 1, 1, 0] = 1             # one false positive, one channel
    pred[1] = 1                      # perfect
    pred[2, 0, 0, 0] = 1             # image 2: flare-free, 1/8 covered
    scores = mask_quality.mask_scores(pred, gt, np.array([1, 1, 0], bool))
    # Image 0: intersection 2 (cell x 2 channels), union 4 + 1 = 5.
    self.assertAlmostEqual(scores["iou"], (2 / 5 + 1.0) / 2)
    self.assertAlmostEqual(scores["iou_all_ones"], (0.5 + 1.0) / 2)
    self.assertAlmostEqual(scores["coverage_flare"], (3 / 8 + 1.0) / 2)
    self.assertAlmostEqual(scores["coverage_clean"], 1 / 8)
    self.assertEqual((scores["num_flare"], scores["num_clean"]), (2, 1))

  def test_no_flare_images_gives_nan(self):
    scores = mask_quality.mask_scores(np.ones((2, 2, 2, 1)),
                                      np.zeros((2, 2, 2), bool),
                                      np.zeros(2, bool))
    self.assertTrue(np.isnan(scores["iou"]))
    self.assertEqual(scores["coverage_clean"], 1.0)

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, "does not match"):
      mask_quality.mask_scores(np.ones((2, 2, 2, 1)), np.ones((2, 3, 2)),
                               np.ones(2, bool))


@pytest.mark.slow
class RenderedFlareTest(absltest.TestCase):

  def _data(self, n=5):
    rng = np.random.default_rng(0)
    data = {m: rng.integers(0, 200, (n, 32, 16, 3)).astype(np.uint8)
            for m in ("rgb", "ni", "ti")}
    data["ni"][..., 1:] = data["ni"][..., :1]  # NI is grey
    for m in ("rgb", "ni"):
      data[f"gt_{m}"] = np.zeros((n, 32, 16), np.uint8)
    data["flare_ratio"] = np.zeros((n, 2), np.float32)
    data["pid"] = np.arange(n)
    return data

  def test_ground_truth_is_what_the_render_saturated(self):
    data = self._data()
    out = mask_quality.with_rendered_flare(data, batch_size=4)
    np.testing.assert_array_equal(out["ti"], data["ti"])
    np.testing.assert_array_equal(out["pid"], data["pid"])
    for i, m in enumerate(("rgb", "ni")):
      added = out[m].astype(int) - data[m]
      self.assertGreaterEqual(added.min(), 0)
      saturated = out[m].max(axis=-1) >= 250
      # Nothing was saturated before, so every saturated pixel is the
      # flare's; where it added less than the bar nothing saturates.
      np.testing.assert_array_equal(out[f"gt_{m}"].astype(bool), saturated)
      self.assertGreater(out[f"gt_{m}"].mean(), 0.02)
      np.testing.assert_allclose(out["flare_ratio"][:, i],
                                 (out[m] >= 250).mean(axis=(1, 2, 3)),
                                 atol=1e-6)
    # An image's flare depends on its index only, not on the chunking.
    again = mask_quality.with_rendered_flare(data, batch_size=2)
    np.testing.assert_array_equal(again["rgb"], out["rgb"])
    other = mask_quality.with_rendered_flare(data, seed=1, batch_size=4)
    self.assertFalse(np.array_equal(other["rgb"], out["rgb"]))


class FigureTest(absltest.TestCase):

  def test_grid_size_and_content(self):
    image = np.full((8, 4, 3), 200, np.uint8)
    mask = np.zeros((2, 1), np.float32)
    mask[0, 0] = 1.0
    png = mask_quality.figure([[image, mask], [image, mask]],
                              ["image", "mask"], ["a", "b"], scale=2)
    grid = np.asarray(Image.open(io.BytesIO(png)))
    # 2 columns of 8 px + 3 gaps of 4; a 14 px title + 2 rows of 16 + 3 gaps.
    self.assertEqual(grid.shape, (14 + 2 * 16 + 3 * 4, 2 * 8 + 3 * 4, 3))
    # The mask tile of the second row: white top half, black bottom half.
    top = 14 + 4 + 16 + 4
    tile = grid[top:top + 16, 4 + 8 + 4:4 + 8 + 4 + 8]
    self.assertTrue(np.all(tile[:8] == 255))
    self.assertTrue(np.all(tile[8:] == 0))

  def test_captions_strip_under_each_tile(self):
    image = np.full((8, 4, 3), 200, np.uint8)
    plain = np.asarray(Image.open(io.BytesIO(mask_quality.figure(
        [[image, image]], ["a", "b"], [""], scale=1))))
    png = mask_quality.figure([[image, image]], ["a", "b"], [""], scale=1,
                              captions=[["", "xx"]])
    grid = np.asarray(Image.open(io.BytesIO(png)))
    self.assertEqual(grid.shape[0],
                     plain.shape[0] + mask_quality.CAPTION_HEIGHT)
    strip = grid[14 + 4 + 8:14 + 4 + 8 + mask_quality.CAPTION_HEIGHT]
    # Text under the second tile only.
    self.assertTrue(np.all(strip[:, :4 + 4] == 255))
    self.assertTrue(np.any(strip[:, 4 + 4 + 4:] < 128))
    with self.assertRaisesRegex(ValueError, "one text per tile"):
      mask_quality.figure([[image, image]], ["a", "b"], ["r"],
                          captions=[["x"]])

  def test_ragged_rows_refused(self):
    with self.assertRaisesRegex(ValueError, "one image per column"):
      mask_quality.figure([[np.zeros((4, 4, 3), np.uint8)]], ["a", "b"], ["r"])


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class ClaheTest(absltest.TestCase):

  def _low_contrast(self, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(100, 130, size=(32, 16, 3)).astype(np.uint8)

  def test_stretches_contrast_keeps_shape(self):
    image = self._low_contrast()
    out = deflare.clahe(image)
    self.assertEqual(out.shape, image.shape)
    self.assertEqual(out.dtype, np.uint8)
    self.assertGreater(out.std(), 1.5 * image.std())

  def test_grey_stays_grey(self):
    grey = np.repeat(self._low_contrast()[..., :1], 3, axis=-1)
    out = deflare.clahe(grey)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "uint8"):
      deflare.clahe(np.zeros((8, 8, 3), np.float32))
    with self.assertRaisesRegex(ValueError, "clip_limit"):
      deflare.clahe(self._low_contrast(), clip_limit=0.0)

  def _split(self, n=3):
    images = [_png(self._low_contrast(i)) for i in range(n)]
    return pipeline.SplitData(
        rgb=np.array(images, object), ni=np.array(images, object),
        ti=np.array(images, object), pid=np.arange(n), camid=np.zeros(n, int),
        sceneid=np.full(n, -1), flare_ratio=np.zeros((n, 2), np.float32),
        file=np.array([f"id{i}.png" for i in range(n)]))

  def test_split_enhances_rgb_and_ni_only(self):
    data = self._split()
    out = deflare.clahe_split(data)
    for i in range(3):
      self.assertEqual(out.ti[i], data.ti[i])
      for m in ("rgb", "ni"):
        decoded = np.asarray(Image.open(io.BytesIO(getattr(out, m)[i])))
        np.testing.assert_array_equal(decoded,
                                      deflare.clahe(self._low_contrast(i)))
    np.testing.assert_array_equal(out.pid, data.pid)

  def test_split_names_a_corrupt_image(self):
    data = self._split()
    data.ni[1] = b"not an image"
    with self.assertRaisesRegex(ValueError, r"ni\[1\] \(id1.png\)"):
      deflare.clahe_split(data)


if __name__ == "__main__":
  absltest.main()
