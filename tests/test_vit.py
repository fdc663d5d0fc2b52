"""ViT streams: the registry, the module, its weights and FACENet on it.

The ViT weights are written here in timm's layout from our own parameter
shapes, and in the original JAX ViT's layouts (google-research and
big_vision names) by a conversion written independently of the loader's. The
first block is checked against a NumPy transcription of the ViT equations,
everywhere; where timm and PyTorch are installed, the final tokens are
checked against timm's VisionTransformer with the same weights. One tiny
ViT FACENet is trained end to end on synthetic_flare/tiny (configs/tiny.py).
"""

import json
import math
import os
import shutil
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import pytest

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import losses
from facenet_jax import pretrained
from facenet_jax.train import build
from facenet_jax.train import loop
from facenet_jax.train import train_state
from facenet_jax.constants import MODALITIES
from facenet_jax.models import FACENet
from facenet_jax.models import backbones
from facenet_jax.models import vit
import input_pipeline.datasets  # noqa: F401  (registers synthetic_flare)

MICRO = backbones.VIT_SPECS["vit_micro8"]
H, W = 64, 32  # An 8 x 4 grid of vit_micro8's 8x8 patches.
# timm's vit_base_patch16_224 has 86,567,656 parameters, 769,000 of them in
# its 1000-way head; at 256x128 the position grid is 16x8 instead of 14x14.
VIT_B16_STREAM_256x128 = 86_567_656 - 769_000 - (196 - 128) * 768


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _images(batch: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(
      size=(batch, h, w, 3)).astype(np.float32)


def timm_state_dict(spec: backbones.ViTSpec, grid: tuple[int, int],
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A timm-layout ViT state dict with every value random (LayerNorm scales
  around 1), a `grid` of position embeddings and a 10-way head."""
  rng = np.random.default_rng(seed)
  d, hidden = spec.width, spec.width * spec.mlp_ratio
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid[0] * grid[1], d),
            "patch_embed.proj.weight": (d, 3, spec.patch, spec.patch),
            "patch_embed.proj.bias": (d,), "norm.weight": (d,),
            "norm.bias": (d,), "head.weight": (10, d), "head.bias": (10,)}
  for i in range(spec.depth):
    b = f"blocks.{i}."
    shapes.update({
        b + "norm1.weight": (d,), b + "norm1.bias": (d,),
        b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
        b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
        b + "norm2.weight": (d,), b + "norm2.bias": (d,),
        b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
        b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
  out = {}
  for name, shape in shapes.items():
    scale = 0.5 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.1
    value = rng.normal(0.0, scale, shape)
    if "norm" in name and name.endswith("weight"):
      value = value + 1.0
    out[name] = value.astype(np.float32)
  return out


def google_npz(state: dict, big_vision: bool, heads: int) -> dict:
  """`state` (timm layout) under the original JAX ViT's names and layouts."""
  prefix = "params/" if big_vision else ""
  mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
  d = state["cls_token"].shape[-1]
  out = {prefix + "cls": state["cls_token"],
         prefix + "embedding/kernel": state["patch_embed.proj.weight"]
         .transpose(2, 3, 1, 0),
         prefix + "embedding/bias": state["patch_embed.proj.bias"],
         prefix + "Transformer/encoder_norm/scale": state["norm.weight"],
         prefix + "Transformer/encoder_norm/bias": state["norm.bias"],
         prefix + "head/kernel": state["head.weight"].T,
         prefix + "head/bias": state["head.bias"]}
  if big_vision:  # No position for the CLS token (ours is then 0).
    out[prefix + "pos_embedding"] = state["pos_embed"][:, 1:]
  else:
    out["Transformer/posembed_input/pos_embedding"] = state["pos_embed"]
  depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("b"))
  blocks = []
  for i in range(depth):
    s = lambda n, i=i: state[f"blocks.{i}.{n}"]
    qkv_w = s("attn.qkv.weight").reshape(3, heads, d // heads, d)
    qkv_b = s("attn.qkv.bias").reshape(3, heads, d // heads)
    block = {"LayerNorm_0/scale": s("norm1.weight"),
             "LayerNorm_0/bias": s("norm1.bias"),
             f"LayerNorm_{ln2}/scale": s("norm2.weight"),
             f"LayerNorm_{ln2}/bias": s("norm2.bias"),
             f"MultiHeadDotProductAttention_{mha}/out/kernel":
                 s("attn.proj.weight").T.reshape(heads, d // heads, d),
             f"MultiHeadDotProductAttention_{mha}/out/bias": s("attn.proj.bias"),
             f"MlpBlock_{mlp}/Dense_0/kernel": s("mlp.fc1.weight").T,
             f"MlpBlock_{mlp}/Dense_0/bias": s("mlp.fc1.bias"),
             f"MlpBlock_{mlp}/Dense_1/kernel": s("mlp.fc2.weight").T,
             f"MlpBlock_{mlp}/Dense_1/bias": s("mlp.fc2.bias")}
    for j, name in enumerate(("query", "key", "value")):
      # (out, in) rows of head h -> (D, heads, head width) Flax kernels.
      block[f"MultiHeadDotProductAttention_{mha}/{name}/kernel"] = (
          qkv_w[j].transpose(2, 0, 1))
      block[f"MultiHeadDotProductAttention_{mha}/{name}/bias"] = qkv_b[j]
    blocks.append(block)
  if big_vision:  # Trained with scan: every block stacked on a leading axis.
    for name in blocks[0]:
      out[f"{prefix}Transformer/encoderblock/{name}"] = np.stack(
          [b[name] for b in blocks])
  else:
    for i, block in enumerate(blocks):
      for name, value in block.items():
        out[f"Transformer/encoderblock_{i}/{name}"] = value
  return out


def _gelu(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def numpy_first_block(params: dict, images: np.ndarray, patch: int,
                      stride: int, heads: int) -> np.ndarray:
  """Stem + block 1 of a ViT, transcribed from the equations in NumPy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = images.astype(np.float64)
  b, height, width, _ = x.shape
  rows, cols = (height - patch) // stride + 1, (width - patch) // stride + 1
  kernel = p["patch_embed"]["kernel"]  # (p, p, 3, D)
  tokens = np.stack([
      np.einsum("bijc,ijcd->bd",
                x[:, r * stride:r * stride + patch,
                  c * stride:c * stride + patch], kernel)
      for r in range(rows) for c in range(cols)], axis=1)
  tokens = tokens + p["patch_embed"]["bias"]
  cls = np.broadcast_to(p["cls_token"], (b, 1, tokens.shape[-1]))
  x = np.concatenate([cls, tokens], axis=1) + p["pos_embed"]
  blk = p["blocks_0"]
  d = x.shape[-1]
  y = _layer_norm(x, blk["norm1"]["scale"], blk["norm1"]["bias"])
  qkv = y @ blk["attn"]["qkv"]["kernel"] + blk["attn"]["qkv"]["bias"]
  q, k, v = np.split(qkv, 3, axis=-1)
  split = lambda t: t.reshape(b, -1, heads, d // heads).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
  x = x + out @ blk["attn"]["proj"]["kernel"] + blk["attn"]["proj"]["bias"]
  y = _layer_norm(x, blk["norm2"]["scale"], blk["norm2"]["bias"])
  hidden = _gelu(y @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"])
  return x + hidden @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]


def _import_timm():
  """timm, or None. PyPI's torchvision is a CUDA build whose C++ ops cannot
  load beside the CPU torch (.ci/run installs it without dependencies); its
  Python modules, all that timm's ViT needs, import once the two operators
  it registers fake kernels for unconditionally are declared."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
    for name in [n for n in sys.modules if n.startswith("torchvision")]:
      del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")  # noqa: F841
    for op in ("nms", "qnms"):
      library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold)"
                     " -> Tensor")
    _import_timm.library = library  # Kept alive: it holds the definitions.
  try:
    import timm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return timm


class RegistryTest(absltest.TestCase):

  def test_unknown_backbone_is_a_clear_error(self):
    for call in (lambda: backbones.info("vgg16"),
                 lambda: build.parse_depth("vgg16")):
      with self.assertRaisesRegex(
          ValueError, r"model.backbone: expected one of resnet10, resnet18, .*vit_b16, "
          r"transreid_b16, vit_micro8; got 'vgg16'"):
        call()
    config = tiny.get_config()
    config.model.backbone = "vit_l16"
    with self.assertRaisesRegex(ValueError, "model.backbone: expected"):
      build.build_model(config, 5)
    with self.assertRaisesRegex(ValueError, "expected a ResNet"):
      build.parse_depth("vit_b16")
    self.assertEqual(build.parse_depth("resnet101"), 101)

  def test_plug_stage_defaults_and_bounds(self):
    self.assertEqual(backbones.resolve_plug_stage("resnet50", 0), 4)
    self.assertEqual(backbones.resolve_plug_stage("vit_b16", 0), 11)
    self.assertEqual(backbones.resolve_plug_stage("vit_micro8", 0), 3)
    self.assertEqual(backbones.resolve_plug_stage("vit_b16", 12), 12)
    with self.assertRaisesRegex(ValueError, r"vit_micro8 block in 1-4 \(0 = "
                                r"its default, 3\), got 5"):
      backbones.resolve_plug_stage("vit_micro8", 5)
    with self.assertRaisesRegex(ValueError, "resnet18 stage in 1-4"):
      backbones.resolve_plug_stage("resnet18", 5)

  def test_family_options(self):
    with self.assertRaisesRegex(ValueError, "ViT streams only"):
      backbones.build("resnet18", input_size=(H, W), drop_path=0.1)
    with self.assertRaisesRegex(ValueError, "no camera embedding"):
      backbones.build("resnet18", input_size=(H, W), num_cameras=3)
    config = tiny.get_config()
    config.model.camera_embedding = True
    with self.assertRaisesRegex(ValueError, "number of cameras"):
      build.build_model(config, 5)

  def test_plug_stage_zero_matches_a_saved_four(self):
    # A run saved before model.plug_stage = 0 meant "the default" spelled 4.
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    config = tiny.get_config()
    config.model.plug_stage = 4
    checkpointing.check_config(workdir, config, has_state=False)
    config.model.plug_stage = 0
    checkpointing.check_config(workdir, config, has_state=True)
    config.model.plug_stage = 3
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                "plug_stage"):
      checkpointing.check_config(workdir, config, has_state=True)


class PaperSizeTest(parameterized.TestCase):
  """ViT-B/16 FACENet through jax.eval_shape only (no compile)."""

  def _shapes(self, backbone="vit_b16", **kwargs):
    model = FACENet(num_classes=100, backbone=backbone, **kwargs)
    images = {m: jnp.zeros((2, 256, 128, 3)) for m in MODALITIES}
    return jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), images, jnp.zeros((2, 2)), train=False))

  def test_vit_b16_facenet(self):
    out, variables = self._shapes()
    self.assertEqual(out.embedding.shape, (2, 3 * 768))
    self.assertEqual(out.masks["rgb"].shape, (2, 16, 8, 768))
    self.assertEqual(out.flare_maps["ni"].shape, (2, 16, 8, 768))
    stream = variables["params"]["rgb_backbone"]
    self.assertEqual(_count(stream), VIT_B16_STREAM_256x128)
    self.assertEqual(stream["pos_embed"].shape, (1, 129, 768))
    self.assertEqual(set(stream), {"cls_token", "pos_embed", "patch_embed",
                                   "norm"} | {f"blocks_{i}" for i in range(12)})
    _, baseline = self._shapes(use_mfmp=False, use_fce=False)
    heads = 3 * (768 + 768 * 100)
    self.assertEqual(_count(baseline["params"]),
                     3 * VIT_B16_STREAM_256x128 + heads)
    self.assertNotIn("rgb_backbone", baseline["batch_stats"])

  def test_paper_size_config_builds(self):
    from configs import wmveid863_vit  # pylint: disable=g-import-not-at-top
    config = wmveid863_vit.get_config()
    build.loss_config(config)
    _, optimizer, abstract = train_state.abstract_state(config, 603, 100)
    self.assertEqual(abstract.params["ti_backbone"]["pos_embed"].shape,
                     (1, 129, 768))
    model = build.build_model(config, 603)
    self.assertEqual((model.backbone, model.plug_stage, model.drop_path),
                     ("vit_b16", 11, 0.1))
    schedule = build.learning_rate_schedule(config, 100)
    self.assertAlmostEqual(float(schedule(0)), 0.003 * 0.01, places=8)
    self.assertAlmostEqual(float(schedule(500)), 0.003, places=7)
    self.assertAlmostEqual(float(schedule(12000)), 0.003 * 0.002, places=8)
    del optimizer

  def test_transreid_overlapping_grid(self):
    out, variables = self._shapes("transreid_b16")
    self.assertEqual(out.masks["rgb"].shape, (2, 21, 10, 768))
    self.assertEqual(variables["params"]["ni_backbone"]["pos_embed"].shape,
                     (1, 1 + 210, 768))


class ViTModuleTest(parameterized.TestCase):

  def _module(self, stride=MICRO.patch, **kwargs):
    return vit.ViT(MICRO.width, MICRO.depth, MICRO.heads, MICRO.patch, stride,
                   (H, W), **kwargs)

  def _random_params(self, module, seed=0):
    abstract = jax.eval_shape(lambda: module.init(
        jax.random.key(0), jnp.zeros((1, H, W, 3)), False,
        jnp.zeros((1,), jnp.int32)))
    rng = np.random.default_rng(seed)

    def noise(path, leaf):
      name = jax.tree_util.keystr(path)
      offset = 1.0 if "scale" in name else 0.0
      std = 0.5 / math.sqrt(leaf.shape[-2]) if leaf.ndim >= 2 else 0.1
      return jnp.asarray(offset + rng.normal(0.0, std, leaf.shape),
                         jnp.float32)
    return jax.tree_util.tree_map_with_path(noise, abstract)

  @parameterized.parameters(8, 6)  # ViT patches, and overlapping ones.
  def test_first_block_matches_numpy(self, stride):
    module = self._module(stride)
    variables = self._random_params(module)
    images = _images(2)
    ours = module.apply(variables, images, False,
                        method=lambda m, x, t: m.stage(1, m.stem(x, t), t))
    expected = numpy_first_block(variables["params"], images, MICRO.patch,
                                 stride, MICRO.heads)
    self.assertEqual(ours.shape, expected.shape)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4,
                               atol=1e-5)

  def test_camera_embedding_and_grid_views(self):
    module = self._module(num_cameras=3, camera_scale=3.0)
    variables = self._random_params(module)
    images = _images(2)
    stem = lambda cams: np.asarray(module.apply(
        variables, images, False, jnp.asarray(cams),
        method=lambda m, x, t, c: m.stem(x, t, c)))
    sie = np.asarray(variables["params"]["sie_embed"])
    np.testing.assert_allclose(stem([2, 0]) - stem([1, 1]),
                               3.0 * (sie[[2, 0]] - sie[[1, 1]]) +
                               np.zeros((2, 33, 64)), atol=1e-5)
    with self.assertRaisesRegex(ValueError, "camera ids"):
      module.apply(variables, images, method=lambda m, x: m.stem(x, False))
    tokens = jnp.arange(2 * 33 * 64, dtype=jnp.float32).reshape(2, 33, 64)
    grid = module.apply(variables, tokens, method=lambda m, x: m.grid(x))
    self.assertEqual(grid.shape, (2, 8, 4, 64))
    np.testing.assert_array_equal(grid[:, 0, 1], tokens[:, 2])  # Row-major.
    back = module.apply(variables, tokens, grid,
                        method=lambda m, x, g: m.with_grid(x, g))
    np.testing.assert_array_equal(back, tokens)

  def test_stochastic_depth(self):
    block = vit.Block(16, 2, drop_path=0.5)
    x = jnp.asarray(_images(64, 5, 16)[..., 0].reshape(64, 5, 16))
    variables = block.init(jax.random.key(0), x, False)
    evaluated = block.apply(variables, x, False)
    dropped = block.apply(variables, x, True,
                          rngs={"dropout": jax.random.key(1)})
    # Per sample, each branch is kept (scaled by 2) or dropped entirely.
    same = np.all(np.isclose(dropped, x), axis=(1, 2))
    self.assertTrue(0 < same.sum() < 64)
    self.assertFalse(np.allclose(evaluated, dropped))
    self.assertGreater(
        float(jnp.abs(dropped - block.apply(variables, x, True, rngs={
            "dropout": jax.random.key(2)})).max()), 0.0)

  def test_bfloat16_compute_float32_params(self):
    module = self._module(dtype=jnp.bfloat16)
    out, variables = jax.eval_shape(lambda: module.init_with_output(
        jax.random.key(0), jnp.zeros((1, H, W, 3))))
    self.assertEqual(out.dtype, jnp.bfloat16)
    self.assertTrue(all(x.dtype == jnp.float32
                        for x in jax.tree.leaves(variables)))
    feature = jax.eval_shape(lambda: module.apply(
        jax.tree.map(jnp.zeros_like, variables), jnp.zeros((1, H, W, 3)),
        method=lambda m, x: m.pool(m.stem(x, False))))
    self.assertEqual(feature.dtype, jnp.float32)


class WeightsTest(parameterized.TestCase):

  def test_resample_positions(self):
    grid = np.random.default_rng(0).normal(size=(4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(pretrained.resample_position_grid(grid, (4, 4)),
                               grid, atol=1e-6)
    constant = np.full((3, 5, 2), 0.7, np.float32)
    np.testing.assert_allclose(
        pretrained.resample_position_grid(constant, (8, 2)), 0.7, atol=1e-6)
    # Half-pixel centres: upsampling 2 -> 4 gives 1/4 and 3/4 mixtures.
    row = np.array([[0.0], [1.0]], np.float32)[:, :, None]
    np.testing.assert_allclose(
        pretrained.resample_position_grid(row, (4, 1))[:, 0, 0],
        [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      return
    ours = pretrained.resample_position_grid(grid, (7, 2))
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=(7, 2),
        mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)

  def test_state_dict_maps_one_to_one_and_resamples(self):
    state = timm_state_dict(MICRO, (4, 4))
    with self.assertLogs(level="INFO") as logs:
      variables = pretrained.vit_variables_from_state_dict(
          state, "vit_micro8", (H, W), source="w.safetensors")
    self.assertTrue(any("resampled bilinearly from the checkpoint's 4x4 grid "
                        "to the 8x4 grid of 64x32 inputs" in line
                        for line in logs.output), logs.output)
    params = variables["params"]
    abstract = jax.eval_shape(lambda: vit.ViT(
        MICRO.width, MICRO.depth, MICRO.heads, MICRO.patch, MICRO.stride,
        (H, W)).init(jax.random.key(0), jnp.zeros((1, H, W, 3))))
    jax.tree.map(lambda a, b: self.assertEqual(a.shape, b.shape),
                 abstract["params"], params)
    np.testing.assert_array_equal(params["blocks_2"]["attn"]["qkv"]["kernel"],
                                  state["blocks.2.attn.qkv.weight"].T)
    np.testing.assert_array_equal(
        params["patch_embed"]["kernel"],
        state["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["pos_embed"][:, 0],
                                  state["pos_embed"][:, 0])

  def test_mismatches_are_listed(self):
    state = timm_state_dict(MICRO, (8, 4))
    del state["blocks.1.norm2.bias"]
    state["blocks.0.ls1.gamma"] = np.ones(64, np.float32)
    state["blocks.3.mlp.fc1.weight"] = np.zeros((128, 64), np.float32)
    with self.assertRaises(pretrained.StateDictMismatchError) as caught:
      pretrained.vit_variables_from_state_dict(state, "vit_micro8", (H, W),
                                               source="w.pth")
    e = caught.exception
    self.assertEqual(e.missing, ("blocks.1.norm2.bias",))
    self.assertEqual(e.unexpected, ("blocks.0.ls1.gamma",))
    self.assertEqual(e.shape_mismatches,
                     (("blocks.3.mlp.fc1.weight", (256, 64), (128, 64)),))
    self.assertIn("1 missing keys:\n    blocks.1.norm2.bias", str(e))
    with self.assertRaisesRegex(ValueError, "holds a ViT of width 64 with 4 "
                                "blocks, but model.backbone=vit_s16"):
      pretrained.vit_variables_from_state_dict(timm_state_dict(MICRO, (8, 4)),
                                               "vit_s16", (H, W))
    npz = google_npz(timm_state_dict(MICRO, (8, 4)), False, MICRO.heads)
    del npz["Transformer/encoderblock_2/MlpBlock_3/Dense_1/bias"]
    npz["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3)
    with self.assertRaisesRegex(
        pretrained.StateDictMismatchError,
        r"(?s)missing keys:\n.*encoderblock_2/MlpBlock_3/Dense_1/bias.*"
        r"unexpected keys:\n.*encoderblock_0/extra/kernel"):
      pretrained.vit_variables_from_state_dict(npz, "vit_micro8", (H, W))

  @parameterized.parameters(False, True)
  def test_jax_vit_npz_round_trip(self, big_vision):
    state = timm_state_dict(MICRO, (8, 4), seed=3)
    if big_vision:
      state["pos_embed"][:, 0] = 0.0  # big_vision's CLS has no position.
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory)
    path = os.path.join(directory, "vit.npz")
    np.savez(path, **google_npz(state, big_vision, MICRO.heads))
    from_npz = pretrained.load_backbone_variables(path, "vit_micro8", (H, W))
    from_timm = pretrained.vit_variables_from_state_dict(state, "vit_micro8",
                                                         (H, W))
    jax.tree.map(np.testing.assert_array_equal, from_npz, from_timm)

  @pytest.mark.extras
  def test_timm_equivalence(self):
    timm = _import_timm()
    if timm is None:
      self.skipTest("needs timm and torch (.ci/run installs them)")
    import torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=(H, W),
        patch_size=MICRO.patch, embed_dim=MICRO.width, depth=MICRO.depth,
        num_heads=MICRO.heads, num_classes=10).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # timm starts biases at 0 and norms at 1.
      for name, value in model.named_parameters():
        value.add_(0.1 * torch.randn(value.shape, generator=generator))
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    safetensors.numpy.save_file(state, os.path.join(directory,
                                                    "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(directory, "vit.pth"))
    images = _images(2, seed=4)
    with torch.no_grad():
      expected = model.forward_features(
          torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    ours = pretrained.vit_tokens(os.path.join(directory, "model.safetensors"),
                                 images, backbone="vit_micro8")
    self.assertEqual(ours.shape, (2, 1 + 8 * 4, MICRO.width))
    relative = np.abs(ours - expected).max() / np.abs(expected).max()
    print(f"timm equivalence: max relative error {relative:.2e}")
    self.assertLess(relative, 1e-4)
    jax.tree.map(np.testing.assert_array_equal,
                 pretrained.load_vit_variables(
                     os.path.join(directory, "vit.pth"), "vit_micro8", (H, W)),
                 pretrained.load_vit_variables(
                     os.path.join(directory, "model.safetensors"),
                     "vit_micro8", (H, W)))


class FACENetOnViTTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("baseline", dict(use_mfmp=False, use_fce=False), None),
      ("mfmp", dict(use_fce=False), (8, 4)),
      ("no_fmi", dict(use_fmi=False), (8, 4)),
      ("smp_head", dict(smp="head"), (8, 4)),
      ("projection", dict(fce_projection=True, fce_clean="identity",
                          mask_detach=True, fce_mask_gradient=False), (8, 4)),
      ("first_block", dict(plug_stage=1), (8, 4)),
      ("after_last_block", dict(plug_stage=4), (8, 4)),
      ("cameras", dict(num_cameras=4), (8, 4)),
  )
  def test_ablation_switches(self, kwargs, mask_grid):
    model = FACENet(num_classes=5, backbone="vit_micro8", fmi_reduction=4,
                    **kwargs)
    images = {m: jnp.zeros((2, H, W, 3)) for m in MODALITIES}
    out, variables = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), images, jnp.ones((2, 2)), train=False,
        camera=jnp.zeros((2,), jnp.int32)))
    self.assertEqual(out.embedding.shape, (2, 3 * MICRO.width))
    if mask_grid is None:
      self.assertEmpty(out.masks)
    else:
      self.assertEqual(out.masks["rgb"].shape, (2, *mask_grid, MICRO.width))
    stream = variables["params"]["rgb_backbone"]
    self.assertEqual("sie_embed" in stream, "num_cameras" in kwargs)

  def test_pixel_target_grid(self):
    config = tiny.get_config()
    config.model.backbone = "vit_micro8"
    for size in ((128, 64), (64, 32)):
      config.input_size = size
      self.assertGreater(build.loss_config(config).flare_pixel_weight, 0)
      grid = backbones.info("vit_micro8").plug_grid(size, 3)
      self.assertEqual(grid, (size[0] // 8, size[1] // 8))
      margins = jnp.zeros((2, *grid, 4))
      saturation = jnp.asarray(
          (np.random.default_rng(0).random((2, *size)) < 0.3), jnp.float32)
      self.assertTrue(np.isfinite(float(losses.flare_pixel_bce(margins,
                                                               saturation))))
    config.model.backbone = "transreid_b16"
    config.input_size = (256, 128)
    with self.assertRaisesRegex(ValueError, "21x10 grid that does not divide"):
      build.loss_config(config)


@pytest.mark.slow
class EndToEndTest(absltest.TestCase):
  """A tiny ViT FACENet trained and evaluated by the trainer itself."""

  def test_train_and_evaluate(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root)
    # ImageNet-like weights on a square 4x4 grid (resampled to 8x4).
    weights = os.path.join(root, "vit_micro8.safetensors")
    safetensors.numpy.save_file(timm_state_dict(MICRO, (4, 4)), weights)
    config = tiny.get_config()
    # The prepared synthetic_flare/tiny that the other test modules share.
    config.data_dir = os.path.join(absltest.get_default_test_tmpdir(), "tfds")
    config.model.backbone = "vit_micro8"
    config.model.pretrained = weights
    config.model.drop_path = 0.1
    config.model.camera_embedding = True
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 1e-3
    config.num_train_steps = 3
    config.checkpoint_every_steps = 3
    workdir = os.path.join(root, "run")
    results = loop.train_and_evaluate(config, workdir)
    self.assertEqual(results["step"], 3)
    self.assertBetween(results["mAP"], 0.0, 1.0)
    with open(os.path.join(workdir, checkpointing.RUN_INFO_FILE)) as f:
      num_cameras = json.load(f)["num_cameras"]
    self.assertGreater(num_cameras, 1)
    _, state, _ = train_state.restore_for_eval(config, workdir)
    stream = state.params["rgb_backbone"]
    self.assertEqual(stream["sie_embed"].shape, (num_cameras, 1, 64))
    self.assertEqual(stream["pos_embed"].shape, (1, 33, 64))
    self.assertTrue(np.all(np.isfinite(flax.traverse_util.flatten_dict(
        jax.device_get(state.params))[("fmi", "mix1_conv", "kernel")])))


if __name__ == "__main__":
  absltest.main()
