"""scripts/export.py: the Embedder's network as ONNX and as a JAX export.

The run is the tiny FACENet with seeded random weights
(run_fixtures.make_run): what a trained workdir holds, without training. It
ranks with the saturation fusion (model.fusion = "saturation", whose weights
follow each image's saturated fraction), so that every output of an export,
the embedding and the weights, is checked.
Each export is run (ONNX Runtime; the deserialised jax.export function) on
`Embedder.inputs` of generated raw triplets, and compared with the JAX
Embedder on the same raw images.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import export
from facenet_jax import inference
import run_fixtures
import subprocess_env

# Trains runs, starts scripts or compiles the tiny model: left out of the
# quick loop (-m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 5
TOLERANCE = 1e-4
# The ONNX tests need the export extra; the README's test command may not
# install it.
_HAS_EXTRA = all(importlib.util.find_spec(m) is not None
                 for m in ("jax2onnx", "onnx", "onnxruntime"))


# The module's run: root (temp dir), workdir, embedder, raw (rgb, ni, ti).
_RUN = {}


def setUpModule():
  _RUN["root"] = tempfile.mkdtemp(prefix="export_")
  _RUN["workdir"] = os.path.join(_RUN["root"], "run")
  config = tiny.get_config()
  config.model.fusion = "saturation"
  run_fixtures.make_run(_RUN["workdir"], config)
  _RUN["embedder"] = export.load_embedder(_RUN["workdir"])
  _RUN["raw"] = export.check_triplets(_RUN["embedder"].config.input_size,
                                      BATCH, seed=1)


class InputsTest(absltest.TestCase):

  def test_the_five_arrays_of_the_contract(self):
    embedder = _RUN["embedder"]
    inputs = embedder.inputs(*_RUN["raw"])
    h, w = embedder.config.input_size
    self.assertEqual(tuple(inputs), inference.INPUT_NAMES)
    for m in ("rgb", "ni", "ti"):
      self.assertEqual(inputs[m].shape, (BATCH, h, w, 3))
      self.assertEqual(inputs[m].dtype, np.float32)
    self.assertEqual(inputs["flare"].dtype, np.float32)
    self.assertEqual(inputs["flare_ratio"].dtype, np.float32)
    # delta is the saturated fraction against the run's threshold.
    np.testing.assert_array_equal(inputs["flare"],
                                  inputs["flare_ratio"] > 0.1)
    # check_triplets: white quarters on RGB for samples 0, 2 mod 4 and on NI
    # for 1, 2 mod 4, so every pair of pseudo-labels occurs.
    np.testing.assert_array_equal(
        inputs["flare"], [[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]])


  def test_the_embedder_refuses_bad_images_naming_them(self):
    embedder = _RUN["embedder"]
    rgb, ni, ti = _RUN["raw"]
    cases = [
        ((rgb / 255.0, ni, ti), r"^rgb: expected raw uint8 images, got "
         r"float64 \(floats in \[0, 1\]\? pass \(x \* 255\)"),
        ((rgb, ni[..., :2], ti), r"^ni: expected 3 channels \(or 1, "
         r"repeated\), got 2"),
        ((rgb, ni, np.concatenate([ti, ti[..., :1]], -1)),
         r"^ti: expected 3 channels .* got 4"),
        ((rgb, ni, ti[None]), r"^ti: expected \(H, W, 3\) or \(B, H, W, 3\)"),
        ((rgb, ni, ti[:2]), r"different numbers of images: "
         r"\{'rgb': 5, 'ni': 5, 'ti': 2\}"),
        ((rgb[:0], ni[:0], ti[:0]), r"^rgb: no pixels or no images"),
        ((rgb[:, :0], ni, ti), r"^rgb: no pixels or no images"),
    ]
    for images, message in cases:
      with self.subTest(message):
        with self.assertRaisesRegex(ValueError, message):
          embedder(*images)

  def test_the_exported_contract_is_checked_input_by_input(self):
    config = _RUN["embedder"].config
    good = _RUN["embedder"].inputs(*_RUN["raw"])
    inference.check_network_inputs(good, config)

    def spoiled(name, value):
      return {**good, name: value}

    nan = good["ni"].copy()
    nan[1, 2, 3, 0] = np.nan
    wrong_flare = good["flare"].copy()
    wrong_flare[3, 0] = 1.0 - wrong_flare[3, 0]
    extra = {**good, "mask": good["flare"]}
    missing = {k: v for k, v in good.items() if k != "ti"}
    cases = [
        (spoiled("rgb", good["rgb"].astype(np.float64)),
         r"^rgb: expected float32, got float64"),
        (spoiled("ti", good["ti"][:, :-1]), r"^ti: expected shape \(B, 64, "
         r"32, 3\), got \(5, 63, 32, 3\)"),
        (spoiled("ni", nan), r"^ni: 1 values are NaN or infinite"),
        (spoiled("rgb", good["rgb"] * 255.0), r"^rgb: values in .* outside "
         r"the .* that normalising uint8 pixels gives"),
        (spoiled("flare_ratio", good["flare_ratio"] * 20.0),
         r"^flare_ratio: saturated fractions must be in \[0, 1\]"),
        (spoiled("flare", wrong_flare), r"^flare: must be flare_ratio > "
         r"flare.ratio_threshold \(0.1\) as 0/1; differs in 1 of 10"),
        (spoiled("flare", good["flare"][:3]), r"^flare: 3 rows, but rgb "
         r"has 5"),
        (extra, r"^inputs: expected .* missing \[\], unknown \['mask'\]"),
        (missing, r"^inputs: expected .* missing \['ti'\], unknown \[\]"),
    ]
    for inputs, message in cases:
      with self.subTest(message):
        with self.assertRaisesRegex(ValueError, message):
          inference.check_network_inputs(inputs, config)


@pytest.mark.extras
@absltest.skipUnless(_HAS_EXTRA, 'needs pip install -e ".[export]"')
class OnnxTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.path = os.path.join(_RUN["root"], "facenet.onnx")
    cls.files = export.export(_RUN["embedder"], "onnx", cls.path)

  def test_matches_the_jax_embedder(self):
    embedder, raw = _RUN["embedder"], _RUN["raw"]
    self.assertEqual(self.files, [self.path])
    diffs = export.max_differences(embedder, "onnx", self.path, raw)
    self.assertEqual(set(diffs), {BATCH, 1})
    self.assertLessEqual(max(diffs.values()), TOLERANCE)
    out = export.onnx_runner(self.path)(embedder.inputs(*raw))
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0,
                               rtol=1e-5)
    # The weights differ between images: the output is not a constant.
    self.assertGreater(np.ptp(out["weights"][:, :2]), 1e-3)
    np.testing.assert_array_equal(out["weights"][:, 2], 1.0)

  def test_names_shapes_and_metadata(self):
    import onnx  # pylint: disable=g-import-not-at-top
    model = onnx.load(self.path)
    onnx.checker.check_model(model)
    embedder = _RUN["embedder"]
    h, w = embedder.config.input_size

    def dims(value):
      return [d.dim_param or d.dim_value
              for d in value.type.tensor_type.shape.dim]

    self.assertEqual([(i.name, dims(i)) for i in model.graph.input],
                     [("rgb", ["B", h, w, 3]), ("ni", ["B", h, w, 3]),
                      ("ti", ["B", h, w, 3]), ("flare", ["B", 2]),
                      ("flare_ratio", ["B", 2])])
    self.assertEqual([(o.name, dims(o)) for o in model.graph.output],
                     [("embedding", ["B", embedder.dim]),
                      ("weights", ["B", 3])])
    # Opset 17 and its IR version 8, for older runtimes.
    self.assertEqual([(o.domain, o.version) for o in model.opset_import],
                     [("", 17)])
    self.assertEqual(model.ir_version, 8)
    props = {p.key: p.value for p in model.metadata_props}
    self.assertEqual(props["embedding_dim"], str(embedder.dim))
    self.assertIn('"ratio_threshold": 0.1', props["preprocessing"])
    # The stem's max-pool exports as a 3-D MaxPool (see export.py).
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    self.assertLen(pools, 3)  # One stem per modality.
    for node in pools:
      kernel = [a.ints for a in node.attribute if a.name == "kernel_shape"][0]
      self.assertEqual(list(kernel), [1, 3, 3])


class StableHloTest(absltest.TestCase):

  def test_matches_the_jax_embedder(self):
    embedder = _RUN["embedder"]
    path = os.path.join(_RUN["root"], "facenet.stablehlo")
    self.assertEqual(export.export(embedder, "stablehlo", path), [path])
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    self.assertEqual(exported.platforms, ("cpu", "cuda"))
    self.assertEqual(str(exported.in_avals[0].shape[0]), "B")
    diffs = export.max_differences(embedder, "stablehlo", path, _RUN["raw"])
    self.assertEqual(set(diffs), {BATCH, 1})
    self.assertLessEqual(max(diffs.values()), TOLERANCE)
    # Given the config, the loaded export checks what it is fed.
    inputs = embedder.inputs(*_RUN["raw"])
    inputs["rgb"][0, 0, 0, 0] = np.inf
    with self.assertRaisesRegex(ValueError, "^rgb: 1 values are NaN"):
      export.runner("stablehlo", path, embedder.config)(inputs)


class ErrorsTest(absltest.TestCase):

  def test_workdir_without_config_or_checkpoint(self):
    missing = os.path.join(_RUN["root"], "nowhere")
    with self.assertRaisesRegex(FileNotFoundError,
                                "--workdir .*nowhere/config.json not found"):
      export.load_embedder(missing)
    untrained = os.path.join(_RUN["root"], "untrained")
    checkpointing.check_config(untrained, tiny.get_config(), has_state=False)
    with self.assertRaisesRegex(FileNotFoundError,
                                "--workdir .*untrained: no checkpoint in"):
      export.load_embedder(untrained)
    # Nothing was created while looking.
    self.assertFalse(os.path.exists(os.path.join(untrained, "checkpoints")))
    with self.assertRaisesRegex(FileNotFoundError,
                                r"--step 9: .*available steps: \[2\]"):
      export.load_embedder(_RUN["workdir"], step=9)

  def test_unknown_format(self):
    with self.assertRaisesRegex(ValueError, "--format must be one of onnx, "
                                "stablehlo, got 'tflite'"):
      export.check_installed("tflite")

  def test_missing_extra(self):
    # Each package of the extra missing alone, the others present, whatever
    # this environment has installed.
    real_import = importlib.import_module
    for module in ("jax2onnx", "onnx", "onnxruntime"):

      def fake_import(name, *args, missing=module):
        if name == missing:
          raise ImportError(f"No module named {name!r}")
        if name in ("jax2onnx", "onnx", "onnxruntime"):
          return mock.MagicMock(name=name)
        return real_import(name, *args)

      with mock.patch.object(importlib, "import_module", fake_import):
        with self.assertRaisesRegex(
            export.MissingExtraError,
            f"--format onnx needs the Python package {module},.*"
            r'pip install -e "\.\[export\]"'):
          export.check_installed("onnx")
    # stablehlo needs JAX only.
    with mock.patch.dict(sys.modules, {"jax2onnx": None, "onnx": None,
                                       "onnxruntime": None}):
      export.check_installed("stablehlo")


class Bfloat16RunTest(absltest.TestCase):

  def test_the_check_tolerates_what_the_compute_dtype_rounds(self):
    config = tiny.get_config()
    self.assertEqual(export.default_tolerance(config), 1e-4)
    config.model.dtype = "bfloat16"
    self.assertEqual(export.default_tolerance(config), 3e-2)

  def test_a_bfloat16_run_is_exported_computing_in_float32(self):
    # jax2onnx lowers no bfloat16 pooling: the ONNX export computes in
    # float32, with the run's own (float32) parameters.
    config = tiny.get_config()
    config.model.dtype = "bfloat16"
    workdir = os.path.join(_RUN["root"], "bf16")
    run_fixtures.make_run(workdir, config)
    trained = export.load_embedder(workdir)
    exported = export.load_embedder(workdir, float32=True)
    self.assertEqual(trained.config.model.dtype, "bfloat16")
    self.assertEqual(exported.config.model.dtype, "float32")
    self.assertEqual(exported.model.dtype, jnp.float32)
    raw = export.check_triplets(config.input_size, 2)
    np.testing.assert_allclose(exported.embed(*raw)["embedding"],
                               trained.embed(*raw)["embedding"], atol=3e-2)


class ScriptTest(absltest.TestCase):

  def _run(self, *args):
    env = subprocess_env.script_env()
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "export.py"), *args],
        env=env, capture_output=True, text=True, timeout=600, check=False)

  def test_export_and_check(self):
    # stablehlo: the quickest export; the command prints the check's result.
    output = os.path.join(_RUN["root"], "script", "facenet.stablehlo")
    done = self._run("--workdir", _RUN["workdir"], "--format", "stablehlo",
                     "--output", output, "--check_batch", "4")
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    self.assertIn("checkpoint step 2", done.stdout)
    self.assertRegex(done.stdout, r"max \|stablehlo - JAX Embedder\| = "
                     r"\S+ on 4 triplets, \S+ on 1 triplet \(tolerance "
                     r"1e-04\): ok")
    self.assertTrue(os.path.exists(output))

  def test_user_errors_are_one_line(self):
    for args, message in (
        (["--workdir", os.path.join(_RUN["root"], "nowhere"), "--format",
          "stablehlo", "--output", "x"],
         "config.json not found"),
        (["--workdir", _RUN["workdir"], "--format", "tflite", "--output", "x"],
         "flag --format=tflite: value should be one of <onnx|stablehlo>")):
      done = self._run(*args)
      self.assertEqual(done.returncode, 2, done.stderr[-3000:])
      errors = [line for line in done.stderr.splitlines()
                if line.startswith("error: ")]
      self.assertLen(errors, 1, done.stderr)
      self.assertIn(message, errors[0])


if __name__ == "__main__":
  absltest.main()
