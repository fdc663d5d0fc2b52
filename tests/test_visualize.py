"""Pictures of a run: facenet_jax/visualize.py and scripts/visualize.py.

The drawing helpers are checked on hand-made inputs. The figures of a run are
drawn once, for every query, from a tiny workdir of seeded random weights
(run_fixtures.make_run) on synthetic_flare/tiny; their frames are checked
against a ranking done here in NumPy from the run's embeddings.
"""

import importlib.util
import io
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import console as console_lib
from facenet_jax import evaluation
from facenet_jax import mask_quality
from facenet_jax import visualize
import input_pipeline.datasets  # noqa: F401  (registers synthetic_flare)
import run_fixtures
import subprocess_env

# Trains runs, starts scripts or compiles the tiny model: left out of the
# quick loop (-m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The t-SNE map needs the viz extra, which the README's test command does not
# install (.ci/run does).
_HAS_VIZ = importlib.util.find_spec("sklearn") is not None
_NEEDS_VIZ = 'needs pip install -e ".[viz]"'


def _read_png(path_or_bytes) -> np.ndarray:
  if isinstance(path_or_bytes, bytes):
    path_or_bytes = io.BytesIO(path_or_bytes)
  image = Image.open(path_or_bytes)
  if image.format != "PNG":
    raise AssertionError(f"not a PNG: {image.format}")
  return np.asarray(image.convert("RGB"))


def _frame_colours(pixels: np.ndarray, box) -> set:
  """The colours of a frame's band, sampled on its four sides."""
  left, top, right, bottom = box
  mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
  points = [(left + 1, mid_y), (right - 2, mid_y), (mid_x, top + 1),
            (mid_x, bottom - 2), (left + 1, top + 1)]
  return {tuple(int(v) for v in pixels[y, x]) for x, y in points}


class OptionsTest(absltest.TestCase):

  def test_bad_values_name_the_flag(self):
    for options, message in (
        (visualize.Options(topk=0), "--topk must be >= 1, got 0"),
        (visualize.Options(figures=("ranks", "maps")), "--figures must name"),
        (visualize.Options(queries=(2, -1)), r"--queries .*\[-1\]"),
        (visualize.Options(max_points=3), "--max_points must be >= 4")):
      with self.assertRaisesRegex(ValueError, message):
        options.check()
    visualize.Options().check()


class RankListTest(absltest.TestCase):

  def test_cells_are_apart_and_inside_the_figure(self):
    layout = visualize.RankLayout(tile_height=20, tile_width=10, topk=3)
    width, height = layout.size(2)
    boxes = [layout.cell(r, c) for r in range(2) for c in range(4)]
    for left, top, right, bottom in boxes:
      self.assertEqual((right - left, bottom - top), layout.cell_size)
      self.assertTrue(0 < left < right <= width and 0 < top < bottom <= height)
    # The query stands apart from its gallery; rows leave room for captions.
    self.assertEqual(layout.cell(0, 1)[0] - layout.cell(0, 0)[2],
                     layout.query_gap)
    self.assertEqual(layout.cell(1, 0)[1] - layout.cell(0, 0)[3],
                     layout.caption + layout.gap)

  def test_frames_have_their_colours_and_frame_the_images(self):
    layout = visualize.RankLayout(tile_height=16, tile_width=8, topk=2)
    grey = [np.full((32, 16, 3), v, np.uint8) for v in (50, 100, 150)]
    cell = lambda frame: visualize.Cell(grey, frame, ("a", "b"),
                                        ((0, 0, 0),) * 2)
    png = visualize.rank_figure(
        [[cell(visualize.FLARE_QUERY), cell(visualize.MATCH),
          cell(visualize.NON_MATCH)],
         [cell(visualize.CLEAN_QUERY), None, cell(visualize.MATCH)]],
        layout, "title")
    pixels = _read_png(png)
    self.assertEqual(pixels.shape[:2], layout.size(2)[::-1])
    expected = [[visualize.FLARE_QUERY, visualize.MATCH, visualize.NON_MATCH],
                [visualize.CLEAN_QUERY, None, visualize.MATCH]]
    for r, row in enumerate(expected):
      for c, colour in enumerate(row):
        box = layout.cell(r, c)
        want = {(255, 255, 255)} if colour is None else {colour}
        self.assertEqual(_frame_colours(pixels, box), want, (r, c))
    # The three tiles sit side by side inside the border.
    left, top, _, _ = layout.cell(0, 1)
    b = layout.border
    for k, value in enumerate((50, 100, 150)):
      tile = pixels[top + b:top + b + 16, left + b + 8 * k:left + b + 8 * k + 8]
      np.testing.assert_array_equal(tile, value)

  def test_choose_queries(self):
    flared = np.array([1, 0, 1, 0, 1, 0, 0], bool)
    eligible = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    flare, clean = visualize.choose_queries(
        flared, eligible, visualize.Options(queries=(5, 0, 2)))
    np.testing.assert_array_equal(flare, [0, 2])
    np.testing.assert_array_equal(clean, [5])
    flare, clean = visualize.choose_queries(
        flared, eligible, visualize.Options(num_queries=2, seed=3))
    # Only eligible queries are drawn: flare 0 and 4, two of clean 1, 3, 5.
    np.testing.assert_array_equal(flare, [0, 4])
    self.assertLen(clean, 2)
    self.assertTrue(set(clean) <= {1, 3, 5})
    again = visualize.choose_queries(flared, eligible,
                                     visualize.Options(num_queries=2, seed=3))
    np.testing.assert_array_equal(again[1], clean)
    with self.assertRaisesRegex(ValueError, r"--queries \[7\]: the query "
                                "split has 7 queries"):
      visualize.choose_queries(flared, eligible,
                               visualize.Options(queries=(1, 7)))


class MaskHelpersTest(absltest.TestCase):

  def test_flare_images_first(self):
    flared = np.array([0, 1, 0, 0, 1, 0], bool)
    picked = visualize.choose_images(flared, 4, seed=0)
    np.testing.assert_array_equal(picked[:2], [1, 4])
    self.assertLen(set(picked[2:]) & {0, 2, 3, 5}, 2)
    self.assertContainsSubset(visualize.choose_images(flared, 1, 0), {1, 4})

  def test_heat_overlay(self):
    image = np.full((2, 3, 3), 100, np.uint8)
    np.testing.assert_array_equal(
        visualize.heat_overlay(image, np.zeros((2, 3))), image)
    heat = np.zeros((2, 3))
    heat[0, 0], heat[1, 2] = 1.0, 0.5
    out = visualize.heat_overlay(image, heat, alpha=0.5)
    # Opacity 0.5 x sqrt(heat): 0.5 towards yellow (255, 255, 0), 0.354
    # towards (255, 127.5, 0).
    np.testing.assert_array_equal(out[0, 0], [178, 178, 50])
    np.testing.assert_array_equal(out[1, 2], [155, 110, 65])
    np.testing.assert_array_equal(out[0, 1], image[0, 1])


class EmbeddingMapTest(absltest.TestCase):

  def test_discs_and_crosses_in_identity_colours(self):
    coords = np.array([[0.0, 0.0], [10.0, 10.0], [10.0, 0.0]])
    pids = np.array([7, 9, 7])
    flare = np.array([False, True, False])
    pixels = _read_png(visualize.embedding_map(coords, pids, flare, "t"))
    colours = visualize.identity_colours(pids)
    self.assertLen(set(colours.values()), 2)
    xy = visualize.map_pixels(coords)
    for (x, y), pid, flared in zip(xy, pids, flare):
      self.assertEqual(tuple(pixels[y, x]), colours[pid])
      # A cross has its arms on the diagonals; a disc fills its sides.
      self.assertEqual(tuple(pixels[y + 3, x + 3]) == colours[pid], flared)
      self.assertEqual(tuple(pixels[y, x + 3]) == colours[pid], not flared)

  @pytest.mark.extras
  @absltest.skipUnless(_HAS_VIZ, _NEEDS_VIZ)
  def test_tsne(self):
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (10, 64)),
                             rng.normal(5, 0.1, (10, 64))])
    coords = visualize.tsne_2d(points, seed=0)
    self.assertEqual(coords.shape, (20, 2))
    # Two tight clusters stay apart.
    first, second = coords[:10].mean(axis=0), coords[10:].mean(axis=0)
    spread = max(coords[:10].std(axis=0).max(), coords[10:].std(axis=0).max())
    self.assertGreater(np.linalg.norm(first - second), 3 * spread)
    np.testing.assert_array_equal(visualize.tsne_2d(points, seed=0), coords)

  def test_tsne_without_scikit_learn(self):
    with mock.patch.dict(sys.modules, {"sklearn": None}):
      with self.assertRaisesRegex(ImportError,
                                  r'pip install -e "\.\[viz\]"'):
        visualize.tsne_2d(np.zeros((8, 4)), seed=0)


def _config(data_dir: str, **model):
  config = tiny.get_config()
  config.data_dir = data_dir
  for key, value in model.items():
    config.model[key] = value
  return config


class RunTest(absltest.TestCase):
  """The figures of one tiny run, drawn once for every query."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="visualize_")
    cls.data_dir = os.path.join(absltest.get_default_test_tmpdir(), "tfds")
    cls.workdir = os.path.join(cls.root, "run")
    cls.config = _config(cls.data_dir)
    run_fixtures.make_run(cls.workdir, cls.config)
    cls.restored = visualize.Run(cls.config, cls.workdir)
    cls.query, cls.gallery = cls.restored.embedded()
    cls.out = io.StringIO()
    cls.options = visualize.Options(
        queries=tuple(range(len(cls.query["pid"]))))
    cls.written = visualize.draw(cls.restored, cls.options,
                                 console_lib.Console(cls.out, live=False))

  def test_every_figure_is_a_png_in_the_figures_directory(self):
    self.assertEqual(list(self.written),
                     ["ranks_flare", "ranks_clean", "masks"] +
                     ["tsne"] * _HAS_VIZ)
    for name, path in self.written.items():
      self.assertEqual(path, os.path.join(self.workdir, "figures",
                                          f"{name}.png"))
      pixels = _read_png(path)
      self.assertGreater(min(pixels.shape[:2]), 200, name)
      self.assertLess(max(pixels.shape[:2]), 3000, name)
      # More than a title on a blank canvas (the t-SNE map of 35 points is
      # the sparsest, 0.7% of its pixels).
      self.assertGreater(np.mean(np.any(pixels < 250, axis=-1)), 0.004, name)
    self.assertEqual("skipped" in self.out.getvalue(), not _HAS_VIZ)
    # Names padded to the longest, ranks_flare, and two spaces.
    last = list(self.written)[-1]
    self.assertEqual(
        visualize.where(self.written, "LOG").splitlines()[-2:],
        [f"{last:<13}{self.written[last]}", "log          LOG"])

  def test_rank_frames_show_true_and_false_matches(self):
    query, gallery = self.query, self.gallery
    # The run's own ranking (its fusion's distance, as evaluation ranks).
    self.assertIn("weights", query)
    distmat = evaluation.distance_matrix(query, gallery)
    flared = np.any(query["flare"] > 0.5, axis=1)
    self.assertTrue(flared.any() and not flared.all())
    layout = visualize.RankLayout(128, 64, self.options.topk)
    colours = []
    for kind, rows in (("flare", np.flatnonzero(flared)),
                       ("clean", np.flatnonzero(~flared))):
      pixels = _read_png(self.written[f"ranks_{kind}"])
      self.assertEqual(pixels.shape[:2], layout.size(len(rows))[::-1])
      for r, q in enumerate(rows):
        self.assertEqual(
            _frame_colours(pixels, layout.cell(r, 0)),
            {visualize.FLARE_QUERY if kind == "flare" else
             visualize.CLEAN_QUERY})
        # The evaluation's ranking: same id and camera removed.
        order = np.argsort(distmat[q], kind="stable")
        kept = order[~((gallery["pid"][order] == query["pid"][q]) &
                       (gallery["camid"][order] == query["camid"][q]))]
        for c, g in enumerate(kept[:layout.topk], start=1):
          colour = (visualize.MATCH if gallery["pid"][g] == query["pid"][q]
                    else visualize.NON_MATCH)
          self.assertEqual(_frame_colours(pixels, layout.cell(r, c)),
                           {colour}, (kind, q, c))
          colours.append(colour)
    # Both kinds of frame were checked.
    self.assertIn(visualize.MATCH, colours)
    self.assertIn(visualize.NON_MATCH, colours)

  def test_masks_are_laid_over_rgb_and_ni(self):
    pixels = _read_png(self.written["masks"])
    # Tiny's 64x32 input at tile height 128 is 64 wide: widened to 96 for
    # the captions, so 192 high. 4 columns, 8 rows (--num_masks).
    height, width = 192, 96
    gap, title = mask_quality.GAP, mask_quality.TITLE_HEIGHT
    row = height + mask_quality.CAPTION_HEIGHT + gap
    self.assertEqual(pixels.shape[:2],
                     (title + 8 * row + gap, 4 * (width + gap) + gap))
    for j in (0, 2):  # RGB, NI
      for i in range(8):
        y, x = title + gap + i * row, gap + j * (width + gap)
        plain = pixels[y:y + height, x:x + width].astype(float)
        over = pixels[y:y + height, x + width + gap:x + 2 * width + gap]
        # The heat colours (red to yellow) raise red and lower blue.
        self.assertGreaterEqual(over[..., 0].mean(), plain[..., 0].mean())
        self.assertLess(over[..., 2].mean(), plain[..., 2].mean())

  @pytest.mark.extras
  @absltest.skipUnless(_HAS_VIZ, _NEEDS_VIZ)
  def test_tsne_points_in_identity_colours(self):
    pixels = _read_png(self.written["tsne"])
    pids = np.concatenate([self.query["pid"], self.gallery["pid"]])
    present = {tuple(p) for p in np.unique(pixels.reshape(-1, 3), axis=0)}
    colours = visualize.identity_colours(pids)
    self.assertLen(colours, 6)
    self.assertContainsSubset(set(colours.values()), present)

  def test_skipped_figures_say_why(self):
    clean = int(np.flatnonzero(~np.any(self.query["flare"] > 0.5, axis=1))[0])
    out = io.StringIO()
    with mock.patch.dict(sys.modules, {"sklearn": None}):
      written = visualize.draw(
          self.restored, visualize.Options(figures=("ranks", "tsne"),
                                      queries=(clean,)),
          console_lib.Console(out, live=False))
    self.assertEqual(list(written), ["ranks_clean"])
    lines = out.getvalue().splitlines()
    self.assertIn("skipped ranks_flare.png: none of --queries is a flare "
                  "query", lines)
    self.assertIn('skipped tsne.png: t-SNE needs scikit-learn, which is not '
                  'installed: pip install -e ".[viz]"', lines)
    self.assertEqual(_read_png(written["ranks_clean"]).shape[:2],
                     visualize.RankLayout(128, 64, 5).size(1)[::-1])

  def test_baseline_has_no_masks(self):
    # visualize_run from the workdir alone (its config.json).
    workdir = os.path.join(self.root, "baseline")
    run_fixtures.make_run(workdir, _config(self.data_dir, use_mfmp=False,
                                           use_fce=False))
    out = io.StringIO()
    written = visualize.visualize_run(
        None, workdir, options=visualize.Options(figures=("masks",)),
        console=console_lib.Console(out, live=False))
    self.assertEqual(written, {})
    self.assertEqual(out.getvalue().splitlines(), [
        f"Pictures of step 0 of {workdir}: synthetic_flare/tiny, test split "
        "(query 12 vs gallery 23 triplets)",
        "skipped masks.png: the model has no MFMP (a baseline), so it "
        "predicts no mask"])
    self.assertIn("none written",
                  visualize.where(written, "LOG").splitlines()[0])

  def test_user_errors(self):
    untrained = os.path.join(self.root, "untrained")
    checkpointing.check_config(untrained, self.config, has_state=False)
    with self.assertRaisesRegex(FileNotFoundError,
                                "untrained: no checkpoint in"):
      visualize.visualize_run(None, untrained)
    with self.assertRaisesRegex(FileNotFoundError,
                                r"--step 9: .*available steps: \[2\]"):
      visualize.visualize_run(None, self.workdir, step=9)
    with self.assertRaisesRegex(ValueError, r"--queries \[12, 40\]: the "
                                "query split has 12 queries"):
      visualize.draw(self.restored, visualize.Options(queries=(3, 12, 40)))


class ScriptTest(absltest.TestCase):

  def test_no_checkpoint_is_one_line_and_status_2(self):
    workdir = os.path.join(tempfile.mkdtemp(), "untrained")
    checkpointing.check_config(workdir, tiny.get_config(), has_state=False)
    env = subprocess_env.script_env()
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "visualize.py"),
         "--workdir", workdir], env=env, capture_output=True, text=True,
        timeout=300, check=False)
    self.assertEqual(done.returncode, 2, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    self.assertLen(lines, 1, done.stderr)
    self.assertStartsWith(lines[0], f"error: --workdir {workdir}: no "
                          "checkpoint in")
    self.assertIn(os.path.join(workdir, console_lib.LOG_FILE), lines[0])
    self.assertEqual(done.stdout, "")


if __name__ == "__main__":
  absltest.main()
