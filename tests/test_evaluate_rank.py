"""Tests for CMC / mAP / mINP (facenet_jax.evaluation) and re-ranking.

Every hand case states its expected numbers, worked out in the comments.
"""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from facenet_jax import evaluation
from facenet_jax import rerank


def _reference_rank(distmat, q_pids, g_pids, q_groups, g_groups, max_rank):
  """A plain per-query loop: the textbook Market-1501 evaluation."""
  cmc_rows, aps, inps = [], [], []
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind="stable")
    keep = ~((g_pids[order] == q_pids[i]) & (g_groups[order] == q_groups[i]))
    is_match = (g_pids[order] == q_pids[i])[keep]
    if not is_match.any():
      continue
    ranks = np.flatnonzero(is_match) + 1
    cmc_rows.append([float(ranks[0] <= k + 1) for k in range(max_rank)])
    aps.append(np.mean([(j + 1) / r for j, r in enumerate(ranks)]))
    inps.append(len(ranks) / ranks[-1])
  return np.mean(cmc_rows, axis=0), np.mean(aps), np.mean(inps)


def _random_problem(seed, kind, num_q=60, num_g=300):
  """A random distance matrix with awkward values and its ids.

  Query ids are drawn from more identities than the gallery holds, and with
  4 cameras and 3 scenes many true matches share the query's group, so some
  queries have no match left and are skipped.

  Args:
    seed: random seed.
    kind: "uniform32" / "uniform64" (float32 / float64 in [0, 1)), "round1"
      (rounded to 1 decimal: heavy ties), "integers" (float integers 0..9),
      "inf_zeros" (float32 with +-inf, -0.0 and 0.0 mixed in).
    num_q: queries.
    num_g: gallery entries.

  Returns:
    distmat, then q_pids, g_pids, q_cams, g_cams, q_scenes, g_scenes.
  """
  rng = np.random.default_rng(seed)
  if kind == "uniform32":
    distmat = rng.random((num_q, num_g), dtype=np.float32)
  elif kind == "uniform64":
    distmat = rng.random((num_q, num_g))
  elif kind == "round1":
    distmat = np.round(rng.random((num_q, num_g)), 1)
  elif kind == "integers":
    distmat = rng.integers(0, 10, (num_q, num_g)).astype(np.float64)
  elif kind == "inf_zeros":
    distmat = rng.random((num_q, num_g), dtype=np.float32)
    special = np.array([np.inf, -np.inf, 0.0, -0.0], np.float32)
    mask = rng.random((num_q, num_g)) < 0.3
    distmat[mask] = rng.choice(special, mask.sum())
  else:
    raise ValueError(kind)
  return (distmat, rng.integers(0, 25, num_q), rng.integers(0, 20, num_g),
          rng.integers(0, 4, num_q), rng.integers(0, 4, num_g),
          rng.integers(0, 3, num_q), rng.integers(0, 3, num_g))


class EvaluateRankTest(parameterized.TestCase):

  def test_perfect_ranking(self):
    # Each query's two true matches are its two nearest: every rank is a hit.
    distmat = np.array([[0.1, 0.2, 0.8, 0.9],
                        [0.8, 0.9, 0.1, 0.2]])
    cmc, mean_ap, minp = evaluation.evaluate_rank(
        distmat, np.array([0, 1]), np.array([0, 0, 1, 1]), np.array([0, 0]),
        np.array([1, 1, 1, 1]), return_minp=True)
    np.testing.assert_allclose(cmc, np.ones(4))
    self.assertAlmostEqual(mean_ap, 1.0)
    self.assertAlmostEqual(minp, 1.0)
    self.assertIsInstance(mean_ap, float)
    self.assertIsInstance(minp, float)

  def test_same_camera_match_is_removed(self):
    # Query: id 0, camera 0. Gallery by distance:
    #   g0 id 0 cam 0 (removed: same id and camera), g1 id 1, g2 id 0 cam 1,
    #   g3 id 2. Filtered ranking g1, g2, g3: first match at rank 2.
    #   cmc = [0, 1, 1, 1]; AP = 1/2 (one match, precision 1/2).
    distmat = np.array([[0.1, 0.2, 0.3, 0.4]])
    q_pids, g_pids = np.array([0]), np.array([0, 1, 0, 2])
    cmc, mean_ap = evaluation.evaluate_rank(
        distmat, q_pids, g_pids, np.array([0]), np.array([0, 1, 1, 0]))
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0, 1.0])
    self.assertAlmostEqual(mean_ap, 0.5)
    # Same ranking with g0 on camera 2: it stays, matches at ranks 1 and 3.
    #   cmc = [1, 1, 1, 1]; AP = 1/2 * (1/1 + 2/3) = 5/6.
    cmc, mean_ap = evaluation.evaluate_rank(
        distmat, q_pids, g_pids, np.array([0]), np.array([2, 1, 1, 0]))
    np.testing.assert_allclose(cmc, [1.0, 1.0, 1.0, 1.0])
    self.assertAlmostEqual(mean_ap, 0.5 * (1.0 / 1.0 + 2.0 / 3.0))

  def test_msvr310_scene_protocol(self):
    # Query: id 0, camera 0, scene 5. Gallery by distance:
    #   g0 id 0, cam 1, scene 5 -> same scene: removed although camera differs.
    #   g1 id 1, cam 2, scene 6.
    #   g2 id 0, cam 0, scene 7 -> same camera but other scene: kept.
    # Scene protocol ranking g1, g2: cmc = [0, 1, 1], AP = 1/2.
    distmat = np.array([[0.1, 0.2, 0.3]])
    args = (distmat, np.array([0]), np.array([0, 1, 0]), np.array([0]),
            np.array([1, 2, 0]))
    cmc, mean_ap = evaluation.evaluate_rank(
        *args, q_sceneids=np.array([5]), g_sceneids=np.array([5, 6, 7]))
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0])
    self.assertAlmostEqual(mean_ap, 0.5)
    # Camera protocol on the same data: g0 kept, g2 removed -> ranking g0, g1:
    # cmc = [1, 1, 1], AP = 1.
    cmc, mean_ap = evaluation.evaluate_rank(*args)
    np.testing.assert_allclose(cmc, [1.0, 1.0, 1.0])
    self.assertAlmostEqual(mean_ap, 1.0)

  def test_query_without_match_is_skipped(self):
    # q0 (id 0, cam 0): its only match g0 is on cam 0 -> skipped.
    # q1 (id 1, cam 0): ranking g0, g1 -> first match at rank 2.
    # Only q1 counts: cmc = [0, 1], AP = 1/2. Counting q0 as a miss would
    # give cmc = [0, 0.5] instead.
    distmat = np.array([[0.1, 0.2],
                        [0.1, 0.2]])
    g_pids, g_camids = np.array([0, 1]), np.array([0, 1])
    cmc, mean_ap = evaluation.evaluate_rank(
        distmat, np.array([0, 1]), g_pids, np.array([0, 0]), g_camids)
    np.testing.assert_allclose(cmc, [0.0, 1.0])
    self.assertAlmostEqual(mean_ap, 0.5)
    with self.assertRaisesRegex(ValueError, "No query has a true match"):
      evaluation.evaluate_rank(distmat[:1], np.array([0]), g_pids,
                               np.array([0]), g_camids)

  @parameterized.named_parameters(
      # g0 and g1 tie at 0.5; the lower gallery index ranks first.
      ("match_second_index", [1, 0, 2], [0.0, 1.0, 1.0], 0.5),
      ("match_first_index", [0, 1, 2], [1.0, 1.0, 1.0], 1.0),
  )
  def test_ties_break_by_gallery_index(self, g_pids, expected_cmc,
                                       expected_ap):
    distmat = np.array([[0.5, 0.5, 0.9]])
    cmc, mean_ap = evaluation.evaluate_rank(
        distmat, np.array([0]), np.array(g_pids), np.array([0]),
        np.array([1, 1, 1]))
    np.testing.assert_allclose(cmc, expected_cmc)
    self.assertAlmostEqual(mean_ap, expected_ap)

  def test_ap_and_minp_hand_case(self):
    # Gallery ids [0, 1, 0, 2, 2, 0], all camera 1; queries on camera 0.
    # q0 (id 0), distances in gallery order: matches at ranks 1, 3, 6.
    #   AP = (1/1 + 2/3 + 3/6) / 3 = 13/18; INP = 3 matches / rank 6 = 1/2.
    # q1 (id 1): order g0, g2, g1, ... -> its one match at rank 3.
    #   AP = 1/3; INP = 1/3.
    # mAP = (13/18 + 6/18) / 2 = 19/36; mINP = (1/2 + 1/3) / 2 = 5/12.
    # First matches at ranks 1 and 3: cmc = [.5, .5, 1, 1, 1, 1].
    distmat = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                        [0.1, 0.3, 0.2, 0.4, 0.5, 0.6]])
    cmc, mean_ap, minp = evaluation.evaluate_rank(
        distmat, np.array([0, 1]), np.array([0, 1, 0, 2, 2, 0]),
        np.array([0, 0]), np.ones(6, int), return_minp=True)
    np.testing.assert_allclose(cmc, [0.5, 0.5, 1.0, 1.0, 1.0, 1.0])
    self.assertAlmostEqual(mean_ap, 19.0 / 36.0)
    self.assertAlmostEqual(minp, 5.0 / 12.0)

  @parameterized.parameters((3, 3), (6, 6), (50, 6), (1, 1))
  def test_cmc_length(self, max_rank, expected_len):
    distmat = np.arange(6, dtype=np.float32)[None]
    cmc, _ = evaluation.evaluate_rank(
        distmat, np.array([0]), np.array([1, 0, 2, 3, 4, 5]), np.array([0]),
        np.ones(6, int), max_rank=max_rank)
    self.assertEqual(cmc.shape, (expected_len,))
    self.assertEqual(cmc.dtype, np.float64)

  @parameterized.named_parameters(
      ("camera", False, 256), ("camera_small_chunks", False, 7),
      ("scene", True, 256), ("scene_small_chunks", True, 13))
  def test_matches_loop_reference(self, use_scenes, chunk):
    rng = np.random.default_rng(42)
    num_q, num_g = 90, 400
    # Integer-valued distances create many ties, which must resolve the same.
    distmat = rng.integers(0, 30, (num_q, num_g)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 25, num_q), rng.integers(0, 25, num_g)
    q_cams, g_cams = rng.integers(0, 4, num_q), rng.integers(0, 4, num_g)
    q_scenes, g_scenes = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    kwargs = {}
    q_groups, g_groups = q_cams, g_cams
    if use_scenes:
      kwargs = {"q_sceneids": q_scenes, "g_sceneids": g_scenes}
      q_groups, g_groups = q_scenes, g_scenes
    cmc, mean_ap, minp = evaluation.evaluate_rank(
        distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20,
        return_minp=True, query_chunk_size=chunk, **kwargs)
    ref_cmc, ref_ap, ref_inp = _reference_rank(
        distmat, q_pids, g_pids, q_groups, g_groups, 20)
    np.testing.assert_allclose(cmc, ref_cmc, rtol=1e-12)
    self.assertAlmostEqual(mean_ap, ref_ap, places=12)
    self.assertAlmostEqual(minp, ref_inp, places=12)
    self.assertTrue(0.0 < mean_ap < 1.0)

  @parameterized.product(
      kind=("uniform32", "uniform64", "round1", "integers", "inf_zeros"),
      seed=(0, 1, 2),
      use_scenes=(False, True))
  def test_random_matches_loop_reference(self, kind, seed, use_scenes):
    distmat, q_pids, g_pids, q_cams, g_cams, q_scenes, g_scenes = (
        _random_problem(seed, kind))
    kwargs = {}
    q_groups, g_groups = q_cams, g_cams
    if use_scenes:
      kwargs = {"q_sceneids": q_scenes, "g_sceneids": g_scenes}
      q_groups, g_groups = q_scenes, g_scenes
    # 17 does not divide the 60 queries: the last chunk is short.
    cmc, mean_ap, minp = evaluation.evaluate_rank(
        distmat, q_pids, g_pids, q_cams, g_cams, max_rank=30,
        return_minp=True, query_chunk_size=17, **kwargs)
    ref_cmc, ref_ap, ref_inp = _reference_rank(
        distmat, q_pids, g_pids, q_groups, g_groups, 30)
    np.testing.assert_allclose(cmc, ref_cmc, rtol=1e-12, atol=1e-12)
    self.assertAlmostEqual(mean_ap, ref_ap, places=12)
    self.assertAlmostEqual(minp, ref_inp, places=12)

  def test_both_kinds_of_skipped_query_match_reference(self):
    # A small gallery (60 entries of 20 ids) leaves queries of both kinds
    # the protocol skips: identity absent from the gallery (ids 20..24), and
    # every match on the query's camera (removed).
    (distmat, q_pids, g_pids, q_cams, g_cams, _, _) = _random_problem(
        0, "uniform32", num_q=300, num_g=60)
    absent = ~np.isin(q_pids, g_pids)
    same_cam_only = np.array([
        np.any(g_pids == p) and np.all(g_cams[g_pids == p] == c)
        for p, c in zip(q_pids, q_cams)])
    self.assertTrue(absent.any())
    self.assertTrue(same_cam_only.any())
    cmc, mean_ap, minp = evaluation.evaluate_rank(
        distmat, q_pids, g_pids, q_cams, g_cams, return_minp=True,
        query_chunk_size=64)
    ref_cmc, ref_ap, ref_inp = _reference_rank(
        distmat, q_pids, g_pids, q_cams, g_cams, 50)
    np.testing.assert_allclose(cmc, ref_cmc, rtol=1e-12, atol=1e-12)
    self.assertAlmostEqual(mean_ap, ref_ap, places=12)
    self.assertAlmostEqual(minp, ref_inp, places=12)

  @parameterized.parameters(1, 5, 60, 256)
  def test_threads_and_chunks_do_not_change_results(self, chunk):
    distmat, q_pids, g_pids, q_cams, g_cams, _, _ = _random_problem(
        3, "round1")
    args = (distmat, q_pids, g_pids, q_cams, g_cams)
    one = evaluation.evaluate_rank(*args, return_minp=True,
                                   query_chunk_size=chunk, num_threads=1)
    two = evaluation.evaluate_rank(*args, return_minp=True,
                                   query_chunk_size=chunk, num_threads=2)
    # Bit-identical: chunks are concatenated in order whatever the threads.
    np.testing.assert_array_equal(one[0], two[0])
    self.assertEqual(one[1:], two[1:])
    base = evaluation.evaluate_rank(*args, return_minp=True,
                                    query_chunk_size=60, num_threads=1)
    np.testing.assert_array_equal(one[0], base[0])
    self.assertEqual(one[1:], base[1:])

  def test_float32_and_float64_agree(self):
    # The same values in either precision rank identically.
    distmat, q_pids, g_pids, q_cams, g_cams, _, _ = _random_problem(
        4, "uniform32")
    args = (q_pids, g_pids, q_cams, g_cams)
    single = evaluation.evaluate_rank(distmat, *args, return_minp=True)
    double = evaluation.evaluate_rank(distmat.astype(np.float64), *args,
                                      return_minp=True)
    np.testing.assert_array_equal(single[0], double[0])
    self.assertEqual(single[1:], double[1:])

  def test_signed_zero_and_inf_ties_break_by_index(self):
    # -0.0 == 0.0 and inf == inf: both pairs are ties, broken by index.
    # Gallery order by (distance, index): g1 (-inf), g0 (0.0), g2 (-0.0),
    #   g4 (0.5), g3 (inf), g5 (inf).
    # Query id 0 matches g2 and g5 (all camera 1): ranks 3 and 6.
    #   cmc = [0, 0, 1, 1, 1, 1]; AP = (1/3 + 2/6) / 2 = 1/3; INP = 2/6.
    distmat = np.array([[0.0, -np.inf, -0.0, np.inf, 0.5, np.inf]])
    cmc, mean_ap, minp = evaluation.evaluate_rank(
        distmat, np.array([0]), np.array([1, 1, 0, 1, 1, 0]), np.array([0]),
        np.ones(6, int), return_minp=True)
    np.testing.assert_allclose(cmc, [0, 0, 1, 1, 1, 1])
    self.assertAlmostEqual(mean_ap, 1.0 / 3.0)
    self.assertAlmostEqual(minp, 1.0 / 3.0)

  def test_nan_row_reported_with_threads(self):
    # NaN in rows 9 and 20, in different chunks ranked by different threads:
    # the first row is named.
    distmat = np.random.default_rng(0).random((24, 10))
    distmat[20, 3] = distmat[9, 7] = np.nan
    with self.assertRaisesRegex(ValueError, "query row 9"):
      evaluation.evaluate_rank(distmat, np.zeros(24), np.zeros(10),
                               np.zeros(24), np.ones(10), query_chunk_size=4,
                               num_threads=2)

  @parameterized.named_parameters(
      ("uniform", lambda rng, n: rng.random(n, dtype=np.float32)),
      ("float16", lambda rng, n: rng.random(n).astype(np.float16)),
      ("few_values", lambda rng, n: rng.integers(0, 3, n).astype(np.float32)),
      ("int_dtype", lambda rng, n: rng.integers(-5, 5, n)),
      ("outlier", lambda rng, n: np.where(
          np.arange(n) == 3, 1e30, rng.random(n))),
      ("extremes", lambda rng, n: rng.choice(np.array(
          [-1.7e308, 1.7e308, 0.0, -0.0, 5e-324, np.inf, -np.inf]), n)),
      ("subnormal", lambda rng, n: (rng.random(n) * 1e-40).astype(
          np.float32)),
      ("complex", lambda rng, n: (rng.integers(0, 3, n) +
                                  1j * rng.integers(0, 3, n))),
  )
  def test_stable_positions_equal_stable_argsort(self, make_row):
    # The core step: positions in each row's stable order, for any values
    # and any subset of columns (none, one, some or all of a row).
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 200):
      dist = np.stack([make_row(rng, size) for _ in range(6)])
      subsets = [np.flatnonzero(rng.random(size) < p)
                 for p in (0.0, 0.05, 0.3, 0.3, 1.0)]
      subsets.append(np.array([size - 1]))
      cols = np.concatenate(subsets)
      bounds = np.cumsum([0] + [c.size for c in subsets])
      expected = []
      for row, subset in zip(dist, subsets):
        inverse = np.empty(size, np.int64)
        inverse[np.argsort(row, kind="stable")] = np.arange(size)
        expected.append(inverse[subset])
      with np.errstate(all="raise"):
        positions = evaluation._stable_positions(dist, cols, bounds)  # pylint: disable=protected-access
      np.testing.assert_array_equal(positions, np.concatenate(expected))

  def test_string_ids_work(self):
    # Identities need only support ==; results equal the integer-id case.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4]])
    cmc, mean_ap = evaluation.evaluate_rank(
        distmat, np.array(["a"]), np.array(["b", "a", "c", "a"]),
        np.array(["c0"]), np.array(["c1"] * 4))
    # Matches at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 1/2.
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0, 1.0])
    self.assertAlmostEqual(mean_ap, 0.5)

  @parameterized.named_parameters(
      ("distmat_1d", {"distmat": np.zeros(3)}, "distmat must be 2-D"),
      ("q_pids_length", {"q_pids": np.zeros(3)}, "q_pids has 3 entries"),
      ("g_camids_2d", {"g_camids": np.zeros((4, 1))}, "g_camids must be 1-D"),
      ("one_scene_array", {"q_sceneids": np.zeros(2)},
       "q_sceneids and g_sceneids"),
      ("g_sceneids_length", {"q_sceneids": np.zeros(2),
                             "g_sceneids": np.zeros(3)},
       "g_sceneids has 3 entries"),
      ("max_rank_zero", {"max_rank": 0}, "max_rank must be a positive"),
      ("num_threads_negative", {"num_threads": -1},
       "num_threads must be a non-negative"),
      ("nan", {"distmat": np.array([[0.1, 0.2, 0.3, 0.4],
                                    [0.1, np.nan, 0.3, 0.4]])},
       "NaN .*query row 1"),
  )
  def test_bad_input(self, override, message):
    kwargs = {
        "distmat": np.zeros((2, 4)),
        "q_pids": np.zeros(2),
        "g_pids": np.zeros(4),
        "q_camids": np.zeros(2),
        "g_camids": np.ones(4),
    }
    kwargs.update(override)
    with self.assertRaisesRegex(ValueError, message):
      evaluation.evaluate_rank(**kwargs)


class RankedGalleryTest(parameterized.TestCase):
  """ranked_gallery: the top of each ranking evaluate_rank scores."""

  def test_hand_case_with_removal_and_padding(self):
    # Query 0 (id 1, cam 0): gallery 2 (id 1, cam 0) is removed; 1 and 3 tie
    # at 0.2 and keep index order. Query 1 (id 2) loses nothing.
    distmat = np.array([[0.5, 0.2, 0.1, 0.2],
                        [0.4, 0.3, 0.2, 0.1]])
    g_pids, g_cams = np.array([1, 7, 1, 1]), np.array([1, 0, 0, 2])
    top = evaluation.ranked_gallery(distmat, np.array([1, 2]), g_pids,
                                    np.array([0, 1]), g_cams, k=3)
    np.testing.assert_array_equal(top, [[1, 3, 0], [3, 2, 1]])
    # All four entries of id 1 in camera 0: query 0 has 1 entry left.
    top = evaluation.ranked_gallery(distmat[:1], np.array([1]), g_pids,
                                    np.array([0]), np.zeros(4, int), k=10)
    np.testing.assert_array_equal(top, [[1, -1, -1, -1]])

  @parameterized.product(kind=["uniform32", "round1", "integers"],
                         use_scenes=[False, True])
  def test_first_entries_give_evaluate_rank_cmc(self, kind, use_scenes):
    distmat, q_pids, g_pids, q_cams, g_cams, q_scenes, g_scenes = (
        _random_problem(3, kind))
    q_groups, g_groups = ((q_scenes, g_scenes) if use_scenes else
                          (q_cams, g_cams))
    top = evaluation.ranked_gallery(distmat, q_pids, g_pids, q_groups,
                                    g_groups, k=5)
    scenes = ({"q_sceneids": q_scenes, "g_sceneids": g_scenes}
              if use_scenes else {})
    cmc, _ = evaluation.evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams,
                                      max_rank=5, **scenes)
    # Only queries with a match left count in the CMC.
    removed = ((q_pids[:, None] == g_pids[None]) &
               (q_groups[:, None] == g_groups[None]))
    valid = np.any((q_pids[:, None] == g_pids[None]) & ~removed, axis=1)
    hits = g_pids[top[valid]] == q_pids[valid, None]
    np.testing.assert_allclose(np.mean(np.cumsum(hits, axis=1) > 0, axis=0),
                               cmc)
    # No removed entry is listed.
    self.assertFalse(np.any(np.take_along_axis(removed, top, axis=1)))

  def test_bad_k(self):
    with self.assertRaisesRegex(ValueError, "k must be positive"):
      evaluation.ranked_gallery(np.zeros((1, 2)), [0], [0, 1], [0], [0, 1], 0)


class PairwiseDistanceTest(parameterized.TestCase):

  # The distances are computed in float32: |q|^2 + |g|^2 - 2 q.g rounds with
  # errors of a few float32 ulps of |q|^2 (~1e-6 for these 16-d normal
  # vectors at distances ~5, measured), well inside rtol = atol = 1e-5.
  @parameterized.parameters(1, 10, 37, 1024)
  def test_matches_brute_force(self, chunk):
    # 10 leaves a padded last chunk of 7 rows; 1024 > 37 queries.
    rng = np.random.default_rng(0)
    query = rng.normal(size=(37, 16)).astype(np.float32)
    gallery = rng.normal(size=(53, 16)).astype(np.float32)
    dist = evaluation.pairwise_distance(query, gallery,
                                        query_chunk_size=chunk)
    expected = np.linalg.norm(
        query[:, None].astype(np.float64) - gallery[None], axis=-1)
    self.assertIsInstance(dist, np.ndarray)
    self.assertEqual(dist.dtype, np.float32)
    self.assertEqual(dist.shape, (37, 53))
    np.testing.assert_allclose(dist, expected, rtol=1e-5, atol=1e-5)

  def test_float64_input_and_normalised_embeddings(self):
    # rank_report's case: unit-norm float64 embeddings, some duplicated.
    # Near zero the float32 rounding of the square (~1e-7) becomes ~3e-4 in
    # the distance after the square root, hence atol 1e-3 there.
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(40, 128))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query = gallery[::4].copy()
    dist = evaluation.pairwise_distance(query, gallery, query_chunk_size=4)
    expected = np.linalg.norm(query[:, None] - gallery[None], axis=-1)
    self.assertEqual(dist.dtype, np.float32)
    np.testing.assert_allclose(dist, expected, rtol=1e-5, atol=1e-3)
    self.assertTrue(np.all(dist >= 0))
    np.testing.assert_array_equal(np.argmin(dist, axis=1),
                                  np.arange(0, 40, 4))

  def test_identical_vectors_give_zero(self):
    # |x|^2 + |x|^2 - 2 x.x can round below zero (here to -32 in float32 on
    # XLA:CPU); the clip keeps the sqrt real and the distance at zero.
    x = np.full((2, 64), 1e3, np.float32) + np.arange(64, dtype=np.float32)
    dist = evaluation.pairwise_distance(x, x)
    self.assertTrue(np.all(np.isfinite(dist)))
    np.testing.assert_allclose(np.diag(dist), 0.0, atol=1e-3)

  def test_empty_query(self):
    dist = evaluation.pairwise_distance(np.zeros((0, 4)), np.ones((3, 4)))
    self.assertEqual(dist.shape, (0, 3))
    self.assertEqual(dist.dtype, np.float32)

  def test_dimension_mismatch(self):
    with self.assertRaisesRegex(ValueError, "gallery_features has 3"):
      evaluation.pairwise_distance(np.zeros((2, 4)), np.zeros((2, 3)))


def _clustered(num_ids, per_id, noise, seed):
  """Per identity: one query and per_id - 1 gallery embeddings around a centre.

  Returns:
    (q_g, q_q, g_g) distance matrices, query ids and gallery ids.
  """
  rng = np.random.default_rng(seed)
  ids = np.repeat(np.arange(num_ids), per_id)
  feats = (rng.normal(size=(num_ids, 32))[ids] +
           noise * rng.normal(size=(ids.size, 32)))
  is_query = np.arange(ids.size) % per_id == 0
  query, gallery = feats[is_query], feats[~is_query]
  return ((evaluation.pairwise_distance(query, gallery),
           evaluation.pairwise_distance(query, query),
           evaluation.pairwise_distance(gallery, gallery)),
          ids[is_query], ids[~is_query])


class RankReportTest(absltest.TestCase):

  def test_given_distances_are_ranked_as_they_are(self):
    rng = np.random.default_rng(0)
    query = {"embedding": rng.normal(size=(3, 4)), "pid": np.array([0, 1, 2]),
             "camid": np.zeros(3, np.int64), "sceneid": np.zeros(3, np.int64),
             "flare": np.zeros((3, 2))}
    gallery = {"embedding": rng.normal(size=(3, 4)),
               "pid": np.array([2, 1, 0]), "camid": np.ones(3, np.int64),
               "sceneid": np.zeros(3, np.int64), "flare": np.zeros((3, 2))}
    # Each query's true match (gallery 2 - i) is nearest.
    distmat = np.ones((3, 3)) - np.eye(3)[::-1]
    report = evaluation.rank_report(query, gallery, max_rank=3, rerank=True,
                                    distmat=distmat)
    self.assertEqual(report["mAP"], 1.0)
    self.assertFalse(report["reranked"])
    with self.assertRaisesRegex(ValueError, r"distmat must be \(queries, "
                                r"gallery\) \(3, 3\), got \(3, 2\)"):
      evaluation.rank_report(query, gallery, distmat=distmat[:, :2])


class RerankTest(absltest.TestCase):

  def test_hand_case(self):
    # Features q0 = (0, 0), g0 = (0, 0), g1 = (3, 4): pooled [q0, g0, g1],
    # distances scaled by the maximum 5 -> d(q0, g0) = 0, d(q0, g1) = 1.
    # k1 = k2 = 1 (half size also 1): N(q0) = {q0, g0}, N(g0) = {g0, q0},
    # N(g1) = {g1, q0} (q0 wins the tie with g0 by index).
    # R(q0) = R(g0) = {q0, g0}; R(g1) = {g1} (g1 is not in N(q0)).
    # Codes exp(-d): V_q0 = V_g0 = [1, 1, 0], V_g1 = [0, 0, 1].
    # Query expansion: V_q0 = V_g0 = [1, 1, 0]; V_g1 = mean(V_g1, V_q0)
    #   = [.5, .5, .5].
    # d_J(q0, g0) = 0; d_J(q0, g1) = 1 - (.5 + .5) / (1 + 1 + .5) = 0.6.
    # d* = 0.7 d_J + 0.3 d: [0, 0.7 * 0.6 + 0.3 * 1] = [0, 0.72].
    q_g = np.array([[0.0, 5.0]])
    q_q = np.zeros((1, 1))
    g_g = np.array([[0.0, 5.0], [5.0, 0.0]])
    out = rerank.k_reciprocal_rerank(q_g, q_q, g_g, k1=1, k2=1,
                                     lambda_value=0.3)
    np.testing.assert_allclose(out, [[0.0, 0.72]], atol=1e-6)

  def test_shape_finite_and_easy_case_rank1(self):
    # Tight, well separated clusters: the true match is nearest before and
    # must stay nearest after re-ranking.
    (q_g, q_q, g_g), q_ids, g_ids = _clustered(12, 4, 0.05, seed=1)
    out = rerank.k_reciprocal_rerank(q_g, q_q, g_g, k1=3, k2=2)
    self.assertEqual(out.shape, q_g.shape)
    self.assertEqual(out.dtype, np.float32)
    self.assertTrue(np.all(np.isfinite(out)))
    np.testing.assert_array_equal(g_ids[np.argmin(q_g, axis=1)], q_ids)
    np.testing.assert_array_equal(g_ids[np.argmin(out, axis=1)], q_ids)

  def test_improves_map_on_noisy_clusters(self):
    # Noisy clusters: neighbourhood structure should recover ranking quality
    # the raw distances lose (measured here: about 0.75 -> 0.96 mAP).
    (q_g, q_q, g_g), q_ids, g_ids = _clustered(60, 8, 1.2, seed=0)
    cams = (np.zeros(q_ids.size), np.ones(g_ids.size))
    _, ap_before = evaluation.evaluate_rank(q_g, q_ids, g_ids, *cams)
    out = rerank.k_reciprocal_rerank(q_g, q_q, g_g)
    _, ap_after = evaluation.evaluate_rank(out, q_ids, g_ids, *cams)
    self.assertGreater(ap_after, ap_before + 0.05)

  def test_lambda_one_keeps_original_order(self):
    (q_g, q_q, g_g), _, _ = _clustered(10, 4, 0.5, seed=2)
    out = rerank.k_reciprocal_rerank(q_g, q_q, g_g, lambda_value=1.0)
    # lambda = 1 leaves only the scaled original distance.
    np.testing.assert_allclose(out, q_g / max(q_g.max(), q_q.max(),
                                              g_g.max()), rtol=1e-5)

  def test_size_limit(self):
    (q_g, q_q, g_g), _, _ = _clustered(5, 4, 0.5, seed=3)
    with self.assertRaisesRegex(ValueError, "exceeds max_samples=10"):
      rerank.k_reciprocal_rerank(q_g, q_q, g_g, max_samples=10)

  def test_bad_shapes(self):
    (q_g, q_q, g_g), _, _ = _clustered(5, 4, 0.5, seed=3)
    with self.assertRaisesRegex(ValueError, "g_g_dist must have shape"):
      rerank.k_reciprocal_rerank(q_g, q_q, g_g[:-1, :-1])
    with self.assertRaisesRegex(ValueError, "q_g_dist must contain only"):
      rerank.k_reciprocal_rerank(np.full_like(q_g, np.nan), q_q, g_g)


if __name__ == "__main__":
  absltest.main()
