"""The gallery index (facenet_jax/gallery.py) and scripts/search.py.

The exact backend is checked against a brute-force ranking with
fusion.numpy_distances (the evaluation's float64 reference) for the three
fusions, with and without the same-camera exclusion, with ties; then save /
load, removal, the model fingerprint, the approximate backends' recall, and
on a run (run_fixtures.make_run, synthetic_flare/tiny) that mAP and CMC from
the exact top k equal evaluation.evaluate_rank's. Everything that needs faiss
is marked `extras` and skips without the search extra; the fingerprint and
the import message do not need it.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from facenet_jax import fusion
from facenet_jax import gallery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HAS_FAISS = importlib.util.find_spec("faiss") is not None
_NEEDS_FAISS = 'needs faiss: pip install -e ".[search]"'
DIM = 24


def fused(rng: np.random.Generator, num: int, dim: int = DIM,
          centres: np.ndarray = None, noise: float = 0.5) -> np.ndarray:
  """(num, dim) fused embeddings: unit segments / sqrt(3), near centres."""
  x = rng.normal(size=(num, 3, dim // 3))
  if centres is not None:
    x = centres[rng.integers(0, len(centres), num)] + noise * x
  x /= np.linalg.norm(x, axis=-1, keepdims=True) * np.sqrt(3)
  return x.reshape(num, dim).astype(np.float32)


def segment_weights(rng: np.random.Generator, num: int,
                    kind: str) -> np.ndarray:
  if kind == "concat":
    return np.ones((num, 3), np.float32)
  if kind == "fixed":
    flare = np.where(rng.random((num, 2)) < 0.4, 0.5, 1.0)
  else:
    flare = rng.uniform(0.5, 1.0, (num, 2))
  return np.concatenate([flare, np.ones((num, 1))], 1).astype(np.float32)


def brute_force(query, q_weights, embedding, weights, k, pids=None,
                cams=None, q_pids=None, q_cams=None):
  """evaluation's ranking: numpy_distances, stable sort, same id+cam out."""
  dist = fusion.numpy_distances(query, q_weights, embedding, weights)
  out_ids, out_d = [], []
  for i in range(len(query)):
    order = np.argsort(dist[i], kind="stable")
    if pids is not None:
      order = order[~((pids[order] == q_pids[i]) &
                      (cams[order] == q_cams[i]))]
    out_ids.append(order[:k])
    out_d.append(dist[i, order[:k]])
  return np.array(out_ids), np.array(out_d)


class NoFaissTest(absltest.TestCase):
  """What works without the search extra."""

  def test_import_error_names_the_extra(self):
    with mock.patch.dict(sys.modules, {"faiss": None}):
      with self.assertRaisesRegex(ImportError, r'pip install -e "\.\[search\]"'):
        gallery.import_faiss()
      gal = gallery.Gallery(DIM, "concat", backend="flat")
      gal.add(fused(np.random.default_rng(0), 3))
      with self.assertRaisesRegex(ImportError, "search"):
        gal.search(fused(np.random.default_rng(1), 1), k=2)

  def test_fingerprint_follows_the_model_and_the_step(self):
    from configs import tiny  # pylint: disable=g-import-not-at-top
    config = tiny.get_config()
    first = gallery.run_fingerprint(config, 4, 96)
    self.assertEqual(first, gallery.run_fingerprint(tiny.get_config(), 4, 96))
    self.assertNotEqual(first["id"],
                        gallery.run_fingerprint(config, 6, 96)["id"])
    config.model.fusion = "concat" if first["fusion"]["fusion"] != (
        "concat") else "fixed"
    other = gallery.run_fingerprint(config, 4, 96)
    self.assertNotEqual(first["id"], other["id"])
    self.assertEqual(other["fusion"]["fusion"], config.model.fusion)
    # A training-only field leaves the embeddings, and the id, as they were.
    config.model.fusion = first["fusion"]["fusion"]
    config.optimizer.learning_rate *= 2
    self.assertEqual(first["id"], gallery.run_fingerprint(config, 4, 96)["id"])

  def test_rows_must_be_fused_embeddings(self):
    gal = gallery.Gallery(DIM, "saturation")
    rng = np.random.default_rng(0)
    with self.assertRaisesRegex(ValueError, "not a fused embedding"):
      gal.add(rng.normal(size=(2, DIM)), segment_weights(rng, 2, "fixed"))
    with self.assertRaisesRegex(ValueError, "needs the segment weights"):
      gal.add(fused(rng, 2))
    with self.assertRaisesRegex(gallery.ModelMismatchError, r"\(N, 24\)"):
      gal.add(fused(rng, 2, dim=12), segment_weights(rng, 2, "fixed"))


@pytest.mark.extras
@absltest.skipUnless(_HAS_FAISS, _NEEDS_FAISS)
class ExactSearchTest(parameterized.TestCase):

  def _data(self, kind, num=1200, num_q=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num // 8, 3, DIM // 3))
    data = {
        "g": fused(rng, num, centres=centres),
        "gw": segment_weights(rng, num, kind),
        "q": fused(rng, num_q, centres=centres),
        "qw": segment_weights(rng, num_q, kind),
        "pid": rng.integers(0, 30, num), "cam": rng.integers(0, 4, num),
        "q_pid": rng.integers(0, 30, num_q),
        "q_cam": rng.integers(0, 4, num_q)}
    return data

  @parameterized.product(kind=("concat", "fixed", "saturation"),
                         exclude=(False, True))
  def test_top_k_is_the_brute_force_ranking(self, kind, exclude):
    d = self._data(kind)
    gal = gallery.Gallery(DIM, kind, backend="flat")
    ids = gal.add(d["g"], d["gw"], {"pid": d["pid"], "camid": d["cam"]})
    np.testing.assert_array_equal(ids, np.arange(len(d["g"])))
    protocol = ((d["q_pid"], d["q_cam"]) if exclude else None)
    found = gal.search(d["q"], d["qw"], k=10, exclude_same_camera=protocol)
    labels = ({"pids": d["pid"], "cams": d["cam"], "q_pids": d["q_pid"],
               "q_cams": d["q_cam"]} if exclude else {})
    weights = d["qw"] if kind != "concat" else np.ones_like(d["qw"])
    want_ids, want_d = brute_force(d["q"], weights, d["g"], d["gw"], 10,
                                   **labels)
    np.testing.assert_array_equal(found.ids, want_ids)
    np.testing.assert_array_equal(found.distances, want_d)
    if exclude:
      for q, row in enumerate(found.metadata):
        for entry in row:
          self.assertFalse(entry["pid"] == d["q_pid"][q] and
                           entry["camid"] == d["q_cam"][q])

  def test_ties_go_to_the_earlier_entry_and_k_beyond_the_gallery(self):
    d = self._data("saturation", num=300, num_q=10, seed=3)
    # Every entry twice (the copy later): equal distances in pairs.
    g = np.concatenate([d["g"], d["g"]])
    gw = np.concatenate([d["gw"], d["gw"]])
    gal = gallery.Gallery(DIM, "saturation", backend="flat")
    gal.add(g, gw)
    found = gal.search(d["q"], d["qw"], k=len(g) + 5)
    want_ids, want_d = brute_force(d["q"], d["qw"], g, gw, len(g))
    np.testing.assert_array_equal(found.ids[:, :len(g)], want_ids)
    np.testing.assert_array_equal(found.distances[:, :len(g)], want_d)
    np.testing.assert_array_equal(found.ids[:, len(g):], -1)
    self.assertTrue(np.all(np.isinf(found.distances[:, len(g):])))
    self.assertTrue(np.all(found.ids[:, 0] < found.ids[:, 1]))

  @parameterized.parameters("flat", "ivf", "hnsw")
  def test_embeddings_in_a_narrow_cone(self, backend):
    # Trained features: every score near 1, the weights' spread larger than
    # the scores'. Ranking by N alone would rank by the weights.
    rng = np.random.default_rng(7)
    axis = rng.normal(size=(1, 3, DIM // 3))
    centres = axis + 0.08 * rng.normal(size=(300, 3, DIM // 3))
    g = fused(rng, 4000, centres=centres, noise=0.02)
    gw = segment_weights(rng, 4000, "saturation")
    q = fused(rng, 30, centres=centres, noise=0.02)
    qw = segment_weights(rng, 30, "saturation")
    gal = gallery.Gallery(DIM, "saturation", backend=backend)
    gal.add(g, gw)
    found = gal.search(q, qw, k=10)
    want, want_d = brute_force(q, qw, g, gw, 10)
    self.assertLess(float(want_d.max()), 0.3)
    if backend == "flat":
      np.testing.assert_array_equal(found.ids, want)
    else:
      recall = np.mean([len(set(a) & set(b)) / 10
                        for a, b in zip(found.ids, want)])
      self.assertGreater(recall, 0.9)

  def test_search_pages_through_many_near_candidates(self):
    # One tight cluster: hundreds of entries near the query, so the exact
    # search must widen its candidates several times.
    rng = np.random.default_rng(5)
    centre = rng.normal(size=(1, 3, DIM // 3))
    g = fused(rng, 800, centres=centre, noise=0.05)
    gw = segment_weights(rng, 800, "saturation")
    q = fused(rng, 5, centres=centre, noise=0.05)
    qw = segment_weights(rng, 5, "saturation")
    gal = gallery.Gallery(DIM, "saturation", backend="flat")
    gal.add(g, gw)
    found = gal.search(q, qw, k=50)
    want_ids, _ = brute_force(q, qw, g, gw, 50)
    np.testing.assert_array_equal(found.ids, want_ids)

  def test_remove(self):
    d = self._data("fixed", num=400, num_q=10)
    gal = gallery.Gallery(DIM, "fixed", backend="flat")
    gal.add(d["g"], d["gw"])
    gal.search(d["q"][:1], d["qw"][:1], k=3)  # The index exists now.
    gone = np.arange(0, 400, 3)
    self.assertEqual(gal.remove(gone), len(gone))
    self.assertLen(gal, 400 - len(gone))
    kept = np.setdiff1d(np.arange(400), gone)
    found = gal.search(d["q"], d["qw"], k=10)
    want, _ = brute_force(d["q"], d["qw"], d["g"][kept], d["gw"][kept], 10)
    np.testing.assert_array_equal(found.ids, kept[want])
    with self.assertRaises(KeyError):
      gal.remove([0])
    # New entries get new ids, never a removed one.
    self.assertEqual(int(gal.add(d["g"][:1], d["gw"][:1])[0]), 400)

  def test_hnsw_says_it_cannot_remove(self):
    d = self._data("saturation", num=200, num_q=2)
    gal = gallery.Gallery(DIM, "saturation", backend="hnsw")
    gal.add(d["g"], d["gw"])
    gal.search(d["q"], d["qw"], k=3)
    with self.assertRaisesRegex(NotImplementedError, "cannot remove"):
      gal.remove([1])

  def test_save_load_roundtrip(self):
    d = self._data("saturation", num=500, num_q=8)
    fingerprint = {"id": "0123456789abcdef", "step": 7, "dim": DIM,
                   "fusion": {"fusion": "saturation"}}
    gal = gallery.Gallery(DIM, "saturation", fingerprint, backend="flat")
    times = [float(i) if i % 2 else f"2026-01-0{i % 9 + 1}" for i in
             range(500)]
    gal.add(d["g"], d["gw"], {"pid": d["pid"], "camid": d["cam"],
                              "time": times,
                              "rgb": [f"/c/{i}_vis.jpg" for i in range(500)]})
    before = gal.search(d["q"], d["qw"], k=10)
    directory = tempfile.mkdtemp()
    gal.save(directory)
    gal.remove([before.ids[0, 0]])
    gal.save(directory)  # A second generation replaces the first.
    with open(os.path.join(directory, gallery.MANIFEST_FILE)) as f:
      manifest = json.load(f)
    self.assertEqual(manifest["format_version"], gallery.FORMAT_VERSION)
    self.assertEqual(manifest["fingerprint"], fingerprint)
    self.assertEqual(manifest["index"]["kind"], "flat")
    self.assertEqual(manifest["count"], 499)
    self.assertEqual(sorted(os.listdir(directory)), sorted(
        [gallery.MANIFEST_FILE] + list(manifest["files"].values())))
    loaded = gallery.Gallery.load(directory)
    after = loaded.search(d["q"], d["qw"], k=10)
    np.testing.assert_array_equal(after.ids, gal.search(d["q"], d["qw"],
                                                        k=10).ids)
    self.assertEqual(after.metadata, gal.search(d["q"], d["qw"],
                                                k=10).metadata)
    entry = loaded.metadata([3])[0]
    self.assertEqual(entry["time"], 3.0)
    self.assertEqual(loaded.metadata([4])[0]["time"], "2026-01-05")
    self.assertEqual(entry["rgb"], "/c/3_vis.jpg")
    self.assertEqual(entry["ni"], "")
    self.assertEqual(int(loaded.add(d["g"][:1], d["gw"][:1])[0]), 500)
    # Without its index file the gallery rebuilds the index when searched.
    os.remove(os.path.join(directory, manifest["files"]["index"]))
    manifest["files"]["index"] = None
    with open(os.path.join(directory, gallery.MANIFEST_FILE), "w") as f:
      json.dump(manifest, f)
    np.testing.assert_array_equal(
        gallery.Gallery.load(directory).search(d["q"], d["qw"], k=10).ids,
        after.ids)

  def test_refuses_another_models_queries_and_an_empty_gallery(self):
    d = self._data("saturation", num=50, num_q=2)
    ours = {"id": "aaaaaaaaaaaaaaaa", "step": 4, "dim": DIM,
            "fusion": {"fusion": "saturation"}}
    theirs = dict(ours, id="bbbbbbbbbbbbbbbb", step=9)
    gal = gallery.Gallery(DIM, "saturation", ours)
    with self.assertRaisesRegex(gallery.EmptyGalleryError, "empty"):
      gal.search(d["q"], d["qw"], k=3, fingerprint=ours)
    gal.add(d["g"], d["gw"])
    with self.assertRaisesRegex(gallery.ModelMismatchError,
                                "aaaaaaaaaaaaaaaa.*bbbbbbbbbbbbbbbb"):
      gal.search(d["q"], d["qw"], k=3, fingerprint=theirs)
    with self.assertRaisesRegex(gallery.ModelMismatchError, "dimension"):
      gal.search(fused(np.random.default_rng(0), 2, dim=2 * DIM), d["qw"])
    gal.search(d["q"], d["qw"], k=3, fingerprint=ours)

  @parameterized.parameters("ivf", "hnsw")
  def test_approximate_recall(self, backend):
    d = self._data("saturation", num=6000, num_q=60, seed=1)
    exact = gallery.Gallery(DIM, "saturation", backend="flat")
    exact.add(d["g"], d["gw"])
    approx = gallery.Gallery(DIM, "saturation", backend=backend)
    approx.add(d["g"], d["gw"])
    truth = exact.search(d["q"], d["qw"], k=10).ids
    found = approx.search(d["q"], d["qw"], k=10)
    self.assertEqual(approx.backend, backend)
    recall = np.mean([len(set(a) & set(b)) / 10
                      for a, b in zip(found.ids, truth)])
    self.assertGreater(recall, 0.9)
    # Whatever it finds, it reports with the exact distance.
    rows = found.ids[:, :1]
    want = fusion.numpy_distances(d["q"][:1], d["qw"][:1],
                                  d["g"][rows[0]], d["gw"][rows[0]])
    self.assertEqual(found.distances[0, 0], want[0, 0])

  def test_auto_switches_to_hnsw_beyond_the_threshold(self):
    d = self._data("saturation", num=3000, num_q=4)
    gal = gallery.Gallery(DIM, "saturation", exact_threshold=1000)
    gal.add(d["g"][:800], d["gw"][:800])
    gal.search(d["q"], d["qw"], k=5)
    self.assertEqual(gal.backend, "flat")
    gal.add(d["g"][800:], d["gw"][800:])
    gal.search(d["q"], d["qw"], k=5)
    self.assertEqual(gal.backend, "hnsw")
    manifest = gal.manifest()["index"]
    self.assertEqual((manifest["kind"], manifest["params"]["M"]),
                     ("hnsw", 32))
    self.assertEqual(manifest["trained_on"], 3000)


# --- On a run -----------------------------------------------------------------


def _script(*args: str) -> subprocess.CompletedProcess:
  import subprocess_env  # pylint: disable=g-import-not-at-top
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "search.py"), *args],
      env=subprocess_env.script_env(), capture_output=True, text=True,
      timeout=600, check=False)


@pytest.mark.slow
@pytest.mark.extras
@absltest.skipUnless(_HAS_FAISS, _NEEDS_FAISS)
class RunTest(absltest.TestCase):
  """A tiny run of seeded random weights on synthetic_flare/tiny."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from configs import tiny  # pylint: disable=g-import-not-at-top
    from facenet_jax import search_inputs  # pylint: disable=g-import-not-at-top
    import run_fixtures  # pylint: disable=g-import-not-at-top
    cls.root = tempfile.mkdtemp(prefix="gallery_")
    cls.workdir = os.path.join(cls.root, "run")
    config = tiny.get_config()
    config.data_dir = os.path.join(absltest.get_default_test_tmpdir(), "tfds")
    config.model.fusion = "saturation"
    run_fixtures.make_run(cls.workdir, config)
    cls.trained = search_inputs.load_run(cls.workdir)
    cls.sources = {part: search_inputs.split_source(cls.trained.config, "test",
                                                    part)
                   for part in ("query", "gallery")}
    cls.embedded = {
        part: search_inputs.embed(cls.trained, source.read(range(len(source))))
        for part, source in cls.sources.items()}

  def test_metrics_from_the_top_k_equal_evaluate_rank(self):
    from facenet_jax import evaluation  # pylint: disable=g-import-not-at-top
    q, g = self.embedded["query"], self.embedded["gallery"]
    q_meta = self.sources["query"].metadata(range(len(q["embedding"])))
    g_meta = self.sources["gallery"].metadata(range(len(g["embedding"])))
    gal = gallery.Gallery(self.trained.embedder.dim, "saturation",
                          self.trained.fingerprint, backend="flat")
    gal.add(g["embedding"], g["weights"], g_meta)
    q_pids, q_cams = np.array(q_meta["pid"]), np.array(q_meta["camid"])
    g_pids, g_cams = np.array(g_meta["pid"]), np.array(g_meta["camid"])
    distmat = fusion.numpy_distances(q["embedding"], q["weights"],
                                     g["embedding"], g["weights"])
    num_g = len(g_pids)
    cmc, mean_ap = evaluation.evaluate_rank(distmat, q_pids, g_pids, q_cams,
                                            g_cams, max_rank=num_g)
    # The whole ranking from the index (k = the gallery): mAP and the CMC.
    found = gal.search(q["embedding"], q["weights"], k=num_g,
                       exclude_same_camera=(q_pids, q_cams),
                       fingerprint=self.trained.fingerprint)
    matches = (g_pids[found.ids] == q_pids[:, None]) & (found.ids >= 0)
    valid = matches.any(axis=1)
    first = np.argmax(matches, axis=1)[valid]
    cmc_index = np.array([np.mean(first <= r) for r in range(num_g)])
    np.testing.assert_allclose(cmc_index, cmc, rtol=0, atol=1e-12)
    ap = [np.mean(np.cumsum(m)[m] / (np.flatnonzero(m) + 1))
          for m in matches[valid]]
    self.assertAlmostEqual(float(np.mean(ap)), mean_ap, places=12)
    # A short top k gives the CMC to rank k: the ranks it covers.
    k = 5
    top = gal.search(q["embedding"], q["weights"], k=k,
                     exclude_same_camera=(q_pids, q_cams)).ids
    np.testing.assert_array_equal(top, found.ids[:, :k])
    hit = (g_pids[top] == q_pids[:, None])[valid]
    np.testing.assert_allclose(
        [np.mean(hit[:, :r + 1].any(axis=1)) for r in range(k)], cmc[:k],
        rtol=0, atol=1e-12)
    # And the entries are evaluation.ranked_gallery's.
    np.testing.assert_array_equal(top, evaluation.ranked_gallery(
        distmat, q_pids, g_pids, q_cams, g_cams, k))

  def test_index_resumes_and_query_prints_and_draws(self):
    directory = os.path.join(self.root, "gallery")
    done = _script("index", f"--workdir={self.workdir}",
                   f"--gallery={directory}", "--split=test", "--chunk=7")
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    total = len(self.sources["gallery"])
    self.assertIn(f"{total} entries ({total} added), flat index",
                  done.stdout)
    # Resumed after an interruption (here: the last 5 entries lost), only
    # the missing triplets are embedded again.
    from facenet_jax import search_inputs  # pylint: disable=g-import-not-at-top
    interrupted = gallery.Gallery.load(directory)
    lost = interrupted.ids()[-5:]
    interrupted.remove(lost)
    interrupted.save(directory, with_index=False)
    resumed = search_inputs.open_gallery(directory, self.trained)
    self.assertEqual(search_inputs.index_source(
        resumed, self.trained, self.sources["gallery"], directory, 7), 5)
    self.assertLen(gallery.Gallery.load(directory), total)
    self.assertEqual(resumed.keys(), set(self.sources["gallery"].keys))
    png = os.path.join(self.root, "ranks.png")
    shown = _script("query", f"--workdir={self.workdir}",
                    f"--gallery={directory}", "--split=test",
                    "--queries=0,2", "--k=3", f"--png={png}")
    self.assertEqual(shown.returncode, 0, shown.stderr[-3000:])
    self.assertIn("Top 3 of", shown.stdout)
    self.assertRegex(shown.stdout, r"\n\s+1\s+\d\.\d{4}\s+\d+")
    self.assertTrue(os.path.getsize(png) > 0)
    # The empty gallery: one line, status 2.
    empty = os.path.join(self.root, "empty")
    gallery.Gallery(self.trained.embedder.dim, "saturation",
                    self.trained.fingerprint).save(empty)
    refused = _script("query", f"--workdir={self.workdir}",
                      f"--gallery={empty}", "--split=test")
    self.assertEqual(refused.returncode, 2, refused.stderr[-3000:])
    self.assertRegex(refused.stderr, r"^error: --gallery .* is empty")
    self.assertLen(refused.stderr.strip().splitlines(), 1)

  def test_bad_input_is_one_clear_error(self):
    from facenet_jax import search_inputs  # pylint: disable=g-import-not-at-top
    from input_pipeline.datasets import layout  # pylint: disable=g-import-not-at-top
    import dataset_fixtures  # pylint: disable=g-import-not-at-top
    root = pathlib.Path(tempfile.mkdtemp())
    samples = dataset_fixtures.write_wmveid863(root)
    gallery_dir = root / "test"
    # A folder in the builders' layout reads with its labels.
    source = search_inputs.folder_source(str(gallery_dir))
    expected = sorted((s.pid, s.camid) for s in samples
                      if s.split == "gallery")
    self.assertEqual(sorted(zip(source.columns["pid"],
                                source.columns["camid"])), expected)
    # A missing modality.
    with self.assertRaisesRegex(ValueError, "missing modality.*--ti"):
      search_inputs.path_source(["a.jpg"], ["b.jpg"], [])
    victim = source.columns["ti"][0]
    os.remove(victim)
    with self.assertRaisesRegex(layout.BadSampleError,
                                f"missing modality.*{victim}"):
      search_inputs.folder_source(str(gallery_dir))
    # An image that does not decode.
    broken = root / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [source.columns[m][1] for m in ("rgb", "ni")] + [str(broken)]
    with self.assertRaisesRegex(layout.BadSampleError,
                                "broken.jpg: cannot read or decode"):
      search_inputs.path_source(*[[p] for p in paths]).read([0])
    # A gallery of another model.
    other = os.path.join(self.root, "other")
    gallery.Gallery(self.trained.embedder.dim, "saturation",
                    dict(self.trained.fingerprint, id="0" * 16)).save(other)
    with self.assertRaisesRegex(gallery.ModelMismatchError,
                                f"0{{16}}.*{self.trained.fingerprint['id']}"):
      search_inputs.open_gallery(other, self.trained)
    # An empty gallery.
    with self.assertRaisesRegex(gallery.EmptyGalleryError, "is empty"):
      search_inputs.load_gallery(other)


if __name__ == "__main__":
  absltest.main()
