"""Tests of facenet_jax.pretrained: name table, files, errors, numerics.

State dicts are generated here from torchvision's architecture, written
independently of the loader (and checked against torchvision's published
parameter counts), so the loader's table is not tested against itself.
Numerics: the stem and first blocks against a NumPy reference, and a whole
ResNet50 against a PyTorch re-implementation of torchvision's.
"""

import importlib.util
import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from facenet_jax import pretrained
from facenet_jax.models import resnet

SPECS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)),
         34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
         101: ("bottleneck", (3, 4, 23, 3))}
# torchvision.models.resnet{18,34,50,101}: parameters incl. the classifier.
# ResNet-10 has no release; its count is summed by hand for the same layout
# with one block per stage (stem 9,536, stages 73,984 + 230,144 + 919,040 +
# 3,673,088, classifier 513,000).
TORCHVISION_PARAM_COUNTS = {10: 5_418_792, 18: 11_689_512, 34: 21_797_672,
                            50: 25_557_032, 101: 44_549_160}
BN_FIELDS = ("weight", "bias", "running_mean", "running_var",
             "num_batches_tracked")
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / (
    "convert_weights.py")


# --- torchvision-shaped state dicts ------------------------------------------


def torchvision_shapes(depth):
  """Name -> shape of torchvision's resnet<depth> state dict (OIHW)."""
  kind, blocks = SPECS[depth]
  expansion = 1 if kind == "basic" else 4
  shapes = {}

  def conv_bn(conv, bn, out_c, in_c, k):
    shapes[f"{conv}.weight"] = (out_c, in_c, k, k)
    for field in BN_FIELDS:
      shapes[f"{bn}.{field}"] = () if field == "num_batches_tracked" else (
          out_c,)

  conv_bn("conv1", "bn1", 64, 3, 7)
  in_c = 64
  for s, (width, num) in enumerate(zip((64, 128, 256, 512), blocks)):
    for b in range(num):
      p = f"layer{s + 1}.{b}"
      if kind == "basic":
        conv_bn(f"{p}.conv1", f"{p}.bn1", width, in_c, 3)
        conv_bn(f"{p}.conv2", f"{p}.bn2", width, width, 3)
      else:
        conv_bn(f"{p}.conv1", f"{p}.bn1", width, in_c, 1)
        conv_bn(f"{p}.conv2", f"{p}.bn2", width, width, 3)
        conv_bn(f"{p}.conv3", f"{p}.bn3", width * 4, width, 1)
      if b == 0 and (s > 0 or expansion > 1):
        conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", width * expansion,
                in_c, 1)
      in_c = width * expansion
  shapes["fc.weight"] = (1000, in_c)
  shapes["fc.bias"] = (1000,)
  return shapes


def random_state_dict(depth, seed=0):
  """A torchvision-like state dict with non-trivial BN statistics."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in torchvision_shapes(depth).items():
    if name.endswith("num_batches_tracked"):
      state[name] = np.array(1000, np.int64)
    elif len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      state[name] = (rng.standard_normal(shape, np.float32) *
                     np.float32(np.sqrt(2.0 / fan_in)))
    elif name.endswith(("running_var", ".weight")) and not name.startswith(
        "fc."):
      state[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      state[name] = 0.1 * rng.standard_normal(shape, np.float32)
  return state


def abstract_variables(depth):
  return jax.eval_shape(lambda: resnet.ResNet(depth=depth).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))


@pytest.mark.parametrize("depth", sorted(SPECS))
def test_generated_shapes_match_torchvision_counts(depth):
  shapes = torchvision_shapes(depth)
  params = sum(int(np.prod(s)) for n, s in shapes.items()
               if not n.endswith(("running_mean", "running_var",
                                  "num_batches_tracked")))
  assert params == TORCHVISION_PARAM_COUNTS[depth]


@pytest.mark.parametrize("depth", sorted(SPECS))
def test_name_map_covers_every_variable_once(depth):
  table = pretrained.torchvision_name_map(depth)
  targets = [(c,) + path for c, path in table.values()]
  assert len(set(targets)) == len(targets)
  abstract = abstract_variables(depth)
  leaves = {(c,) + path for c in ("params", "batch_stats")
            for path in flax.traverse_util.flatten_dict(abstract[c])}
  assert set(targets) == leaves
  # Every torchvision name except the classifier and BN counters is mapped,
  # with the torchvision shape.
  kept = {n: s for n, s in torchvision_shapes(depth).items()
          if not n.startswith("fc.") and not n.endswith("num_batches_tracked")}
  assert pretrained.expected_torch_shapes(depth) == kept


def test_name_map_entries_are_readable():
  table = pretrained.torchvision_name_map(50)
  assert table["conv1.weight"] == ("params", ("conv1", "kernel"))
  assert table["bn1.running_mean"] == ("batch_stats", ("bn1", "mean"))
  assert table["layer2.0.downsample.0.weight"] == (
      "params", ("layer2", "0", "downsample_conv", "kernel"))
  assert table["layer4.2.bn3.weight"] == ("params",
                                          ("layer4", "2", "bn3", "scale"))
  assert table["layer3.5.bn2.running_var"] == (
      "batch_stats", ("layer3", "5", "bn2", "var"))
  assert "layer1.0.downsample.0.weight" not in pretrained.torchvision_name_map(
      18)


@pytest.mark.parametrize("depth", sorted(SPECS))
def test_infer_depth(depth):
  assert pretrained.infer_depth(torchvision_shapes(depth)) == depth


def test_infer_depth_rejects_other_layouts():
  shapes = {n: s for n, s in torchvision_shapes(18).items()
            if not n.startswith("layer3.1.")}
  with pytest.raises(ValueError, match=r"\(2, 2, 1, 2\)"):
    pretrained.infer_depth(shapes)


# --- files and mapping --------------------------------------------------------


def write(state, path):
  if path.suffix == ".safetensors":
    safetensors.numpy.save_file(state, str(path))
  else:
    np.savez(path, **state)
  return path


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_resnet18(tmp_path, suffix):
  state = random_state_dict(18)
  path = write(state, tmp_path / f"resnet18{suffix}")
  loaded = pretrained.load_state_dict(path)
  assert set(loaded) == set(state)
  variables = pretrained.load_resnet_variables(path, 18)

  abstract = abstract_variables(18)
  assert (jax.tree.structure(variables) ==
          jax.tree.structure(jax.tree.map(lambda _: 0, abstract)))
  jax.tree.map(lambda ours, ref: np.testing.assert_equal(ours.shape,
                                                         ref.shape),
               variables, abstract)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))

  params, stats = variables["params"], variables["batch_stats"]
  # OIHW -> HWIO: kernel[kh, kw, i, o] == weight[o, i, kh, kw].
  w = state["layer2.0.conv1.weight"]
  k = params["layer2"]["0"]["conv1"]["kernel"]
  assert k.shape == (3, 3, 64, 128)
  assert k[2, 0, 5, 7] == w[7, 5, 2, 0]
  np.testing.assert_array_equal(k, w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      params["layer2"]["0"]["downsample_conv"]["kernel"][0, 0],
      state["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(params["bn1"]["scale"], state["bn1.weight"])
  np.testing.assert_array_equal(params["bn1"]["bias"], state["bn1.bias"])
  np.testing.assert_array_equal(stats["layer4"]["1"]["bn2"]["mean"],
                                state["layer4.1.bn2.running_mean"])
  np.testing.assert_array_equal(stats["layer3"]["0"]["downsample_bn"]["var"],
                                state["layer3.0.downsample.1.running_var"])
  # Every mapped entry, by the table.
  for name, (collection, path) in pretrained.torchvision_name_map(18).items():
    leaf = flax.traverse_util.flatten_dict(variables[collection])[path]
    expected = state[name] if state[name].ndim != 4 else state[name].transpose(
        2, 3, 1, 0)
    np.testing.assert_array_equal(leaf, expected, err_msg=name)


def test_full_size_resnet50_maps():
  state = random_state_dict(50)
  variables = pretrained.resnet_variables_from_state_dict(state, 50)
  abstract = abstract_variables(50)
  jax.tree.map(lambda ours, ref: np.testing.assert_equal(ours.shape,
                                                         ref.shape),
               variables, abstract)
  k = variables["params"]["layer1"]["0"]["conv3"]["kernel"]
  assert k.shape == (1, 1, 64, 256)
  np.testing.assert_array_equal(
      k[0, 0], state["layer1.0.conv3.weight"][:, :, 0, 0].T)


def test_mismatches_are_listed():
  state = random_state_dict(18)
  del state["layer1.1.bn2.running_var"]
  state["layer1.0.se.fc1.weight"] = np.zeros((4, 64, 1, 1), np.float32)
  state["layer2.0.conv1.weight"] = np.zeros((128, 64, 1, 1), np.float32)
  with pytest.raises(pretrained.StateDictMismatchError) as info:
    pretrained.resnet_variables_from_state_dict(state, 18, source="x.npz")
  error = info.value
  assert error.missing == ("layer1.1.bn2.running_var",)
  assert error.unexpected == ("layer1.0.se.fc1.weight",)
  assert error.shape_mismatches == (
      ("layer2.0.conv1.weight", (128, 64, 3, 3), (128, 64, 1, 1)),)
  message = str(error)
  for text in ("x.npz", "1 missing keys", "layer1.1.bn2.running_var",
               "1 unexpected keys", "layer1.0.se.fc1.weight",
               "layer2.0.conv1.weight: expected (128, 64, 3, 3), got "
               "(128, 64, 1, 1)"):
    assert text in message


def test_long_lists_are_shortened():
  state = {n: v for n, v in random_state_dict(18).items()
           if not n.startswith("layer4.")}
  with pytest.raises(pretrained.StateDictMismatchError) as info:
    pretrained.resnet_variables_from_state_dict(state, 18)
  assert len(info.value.missing) == 25
  assert "... and 5 more" in str(info.value)


def test_depth_disagreement():
  with pytest.raises(ValueError, match="holds a ResNet18, but the model is a "
                     "ResNet34"):
    pretrained.resnet_variables_from_state_dict(random_state_dict(18), 34)


def test_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="model.pretrained"):
    pretrained.load_state_dict(tmp_path / "absent.safetensors")
  (tmp_path / "weights.h5").write_bytes(b"x")
  with pytest.raises(ValueError, match="weights.h5: unknown weights format"):
    pretrained.load_state_dict(tmp_path / "weights.h5")


# --- numerics against NumPy ---------------------------------------------------


def np_conv(x, w, stride, pad):
  """NHWC x, OIHW w: a sum over kernel taps of strided patch einsums."""
  o_c, _, kh, kw = w.shape
  x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, o_c))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
      out += np.einsum("bhwc,oc->bhwo", patch, w[:, :, i, j])
  return out


def np_bn(x, state, prefix):
  scale = state[f"{prefix}.weight"] / np.sqrt(
      state[f"{prefix}.running_var"].astype(np.float64) + 1e-5)
  return (x - state[f"{prefix}.running_mean"]) * scale + state[
      f"{prefix}.bias"]


def np_maxpool(x):
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return np.max([x[:, i:i + 2 * out_h:2, j:j + 2 * out_w:2]
                 for i in range(3) for j in range(3)], axis=0)


def np_stem(x, state):
  x = np.maximum(np_bn(np_conv(x, state["conv1.weight"], 2, 3), state, "bn1"),
                 0)
  return np_maxpool(x)


def np_block(x, state, prefix, stride, bottleneck):
  relu = lambda v: np.maximum(v, 0)
  if bottleneck:
    out = relu(np_bn(np_conv(x, state[f"{prefix}.conv1.weight"], 1, 0), state,
                     f"{prefix}.bn1"))
    out = relu(np_bn(np_conv(out, state[f"{prefix}.conv2.weight"], stride, 1),
                     state, f"{prefix}.bn2"))
    out = np_bn(np_conv(out, state[f"{prefix}.conv3.weight"], 1, 0), state,
                f"{prefix}.bn3")
  else:
    out = relu(np_bn(np_conv(x, state[f"{prefix}.conv1.weight"], stride, 1),
                     state, f"{prefix}.bn1"))
    out = np_bn(np_conv(out, state[f"{prefix}.conv2.weight"], 1, 1), state,
                f"{prefix}.bn2")
  if f"{prefix}.downsample.0.weight" in state:
    x = np_bn(np_conv(x, state[f"{prefix}.downsample.0.weight"], stride, 0),
              state, f"{prefix}.downsample.1")
  return relu(out + x)


def relative_error(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def apply_block(block, variables, name, x):
  stage, index = name.split(".")
  sub = {c: variables[c][stage][index] for c in variables}
  return jax.jit(lambda v, y: block.apply(v, y, False))(sub, x)


def test_stem_and_first_blocks_match_numpy():
  x = np.random.default_rng(1).standard_normal((1, 32, 32, 3)).astype(
      np.float32)
  # ResNet18: stem, both basic blocks of layer1, the strided layer2.0.
  state = random_state_dict(18, seed=2)
  variables = pretrained.resnet_variables_from_state_dict(state, 18)
  model = resnet.ResNet(depth=18)
  ours = jax.jit(lambda v, y: model.apply(v, y, False,
                                          method=resnet.ResNet.stem))(
                                              variables, x)
  ref = np_stem(x, state)
  assert ours.shape == (1, 8, 8, 64)
  assert relative_error(np.asarray(ours), ref) < 1e-4
  stage1 = jax.jit(lambda v, y: model.apply(
      v, 1, y, False, method=resnet.ResNet.stage))(variables, ours)
  ref = np_block(np_block(ref, state, "layer1.0", 1, False), state,
                 "layer1.1", 1, False)
  assert relative_error(np.asarray(stage1), ref) < 1e-4
  ours = apply_block(resnet.BasicBlock(width=128, stride=2), variables,
                     "layer2.0", stage1)
  ref = np_block(ref, state, "layer2.0", 2, False)
  assert ours.shape == (1, 4, 4, 128)
  assert relative_error(np.asarray(ours), ref) < 1e-4

  # ResNet50: stem and the first bottleneck with its projection shortcut.
  state = random_state_dict(50, seed=3)
  variables = pretrained.resnet_variables_from_state_dict(state, 50)
  model = resnet.ResNet(depth=50)
  stem = jax.jit(lambda v, y: model.apply(v, y, False,
                                          method=resnet.ResNet.stem))(
                                              variables, x)
  ours = apply_block(resnet.Bottleneck(width=64, stride=1), variables,
                     "layer1.0", stem)
  ref = np_block(np_stem(x, state), state, "layer1.0", 1, True)
  assert ours.shape == (1, 8, 8, 256)
  assert relative_error(np.asarray(ours), ref) < 1e-4


# --- merge_into ---------------------------------------------------------------


def test_merge_into_replaces_one_backbone():
  abstract = abstract_variables(18)
  zeros = lambda: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  rgb, ni = zeros(), zeros()
  head = {"kernel": np.ones((512, 8), np.float32)}
  variables = {
      "params": {"rgb_backbone": rgb["params"], "ni_backbone": ni["params"],
                 "head": head},
      "batch_stats": {"rgb_backbone": rgb["batch_stats"],
                      "ni_backbone": ni["batch_stats"]},
  }
  loaded = pretrained.resnet_variables_from_state_dict(random_state_dict(18),
                                                       18)
  merged = pretrained.merge_into(flax.core.freeze(variables), loaded,
                                 "rgb_backbone")
  jax.tree.map(np.testing.assert_array_equal, merged["params"]["rgb_backbone"],
               loaded["params"])
  jax.tree.map(np.testing.assert_array_equal,
               merged["batch_stats"]["rgb_backbone"], loaded["batch_stats"])
  assert merged["params"]["ni_backbone"]["conv1"]["kernel"] is (
      ni["params"]["conv1"]["kernel"])
  assert merged["params"]["head"]["kernel"] is head["kernel"]
  # The input is left as it was.
  assert not variables["params"]["rgb_backbone"]["conv1"]["kernel"].any()


def small_variables():
  return {"params": {"streams": {"rgb": {"conv": {"kernel": np.zeros((2, 3))}},
                                 "ti": {"conv": {"kernel": np.zeros((2, 3))}}}},
          "batch_stats": {"streams": {"rgb": {"bn": {"mean": np.zeros(3)}}}}}


@pytest.mark.parametrize("prefix", ["streams/rgb", ("streams", "rgb")])
def test_merge_into_nested_prefix(prefix):
  new = {"params": {"conv": {"kernel": np.ones((2, 3))}}}
  merged = pretrained.merge_into(small_variables(), new, prefix)
  assert merged["params"]["streams"]["rgb"]["conv"]["kernel"].all()
  assert not merged["params"]["streams"]["ti"]["conv"]["kernel"].any()
  assert not merged["batch_stats"]["streams"]["rgb"]["bn"]["mean"].any()


def test_merge_into_errors():
  variables = small_variables()
  kernel = lambda shape: {"params": {"conv": {"kernel": np.ones(shape)}}}
  with pytest.raises(pretrained.StateDictMismatchError) as info:
    pretrained.merge_into(variables, kernel((3, 3)), "streams/rgb")
  assert info.value.shape_mismatches == (("conv/kernel", (2, 3), (3, 3)),)
  assert "params/streams/rgb" in str(info.value)
  with pytest.raises(pretrained.StateDictMismatchError) as info:
    pretrained.merge_into(variables, {"params": {"conv2": {"kernel": 0}}},
                          "streams/rgb")
  assert info.value.missing == ("conv/kernel",)
  assert info.value.unexpected == ("conv2/kernel",)
  with pytest.raises(ValueError, match=r"params/streams has no 'ni'"):
    pretrained.merge_into(variables, kernel((2, 3)), "streams/ni")
  with pytest.raises(ValueError, match="no collection 'cache'"):
    pretrained.merge_into(variables, {"cache": {}}, "streams/rgb")
  with pytest.raises(ValueError, match="empty prefix"):
    pretrained.merge_into(variables, kernel((2, 3)), "")


def test_resnet_features_checks_images(tmp_path):
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    pretrained.resnet_features(tmp_path / "w.npz", np.zeros((4, 4, 3)))


# --- PyTorch ------------------------------------------------------------------


def load_script():
  spec = importlib.util.spec_from_file_location("convert_weights", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


convert_weights = load_script()


def torch_resnet50():
  """torchvision's ResNet50 (v1.5) layout, built from torch.nn."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class Bottleneck(nn.Module):

    def __init__(self, in_c, width, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(in_c, width, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(width * 4)
      self.relu = nn.ReLU()
      self.downsample = None
      if stride != 1 or in_c != width * 4:
        self.downsample = nn.Sequential(
            nn.Conv2d(in_c, width * 4, 1, stride, bias=False),
            nn.BatchNorm2d(width * 4))

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      shortcut = x if self.downsample is None else self.downsample(x)
      return self.relu(out + shortcut)

  class ResNet50(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU()
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      in_c = 64
      for s, (width, num) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        blocks = []
        for b in range(num):
          blocks.append(Bottleneck(in_c, width, 2 if b == 0 and s > 0 else 1))
          in_c = width * 4
        setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
      self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  torch.manual_seed(0)
  model = ResNet50()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return torch, model.eval()


@pytest.mark.extras
@pytest.mark.slow
def test_torch_resnet50_feature_map_matches(tmp_path):
  torch, model = torch_resnet50()
  path = tmp_path / "resnet50.pth"
  torch.save(model.state_dict(), path)
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = model(x).numpy().transpose(0, 2, 3, 1)
  ours = pretrained.resnet_features(path, x.numpy().transpose(0, 2, 3, 1),
                                    depth=50, last_stride=2)
  assert ours.shape == ref.shape == (1, 2, 2, 2048)
  assert ours.dtype == np.float32
  assert relative_error(ours, ref) < 1e-4

  # The converted files hold the same arrays, readable without PyTorch.
  outputs = [str(tmp_path / "resnet50.safetensors"),
             str(tmp_path / "resnet50.npz")]
  assert convert_weights.convert(str(path), outputs) == 50
  state = {n: t.numpy() for n, t in model.state_dict().items()}
  for output in outputs:
    converted = pretrained.load_state_dict(output)
    assert set(converted) == set(state)
    for name, array in state.items():
      np.testing.assert_array_equal(converted[name], array, err_msg=name)


@pytest.mark.extras
def test_pth_refuses_pickled_objects(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "evil.pth"
  torch.save({"conv1.weight": torch.zeros(1), "hook": pathlib.PurePosixPath(
      "/x")}, path)
  with pytest.raises(ValueError, match="weights_only=True"):
    pretrained.load_state_dict(path)


@pytest.mark.extras
def test_pth_checkpoint_wrapper_and_bfloat16(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "checkpoint.pth.tar"
  torch.save({"epoch": 3, "state_dict": {
      "bn1.weight": torch.ones(4, dtype=torch.bfloat16),
      "bn1.num_batches_tracked": torch.tensor(7)}}, path)
  state = pretrained.load_state_dict(path)
  assert state["bn1.weight"].dtype == np.float32
  np.testing.assert_array_equal(state["bn1.weight"], np.ones(4))
  assert int(state["bn1.num_batches_tracked"]) == 7


@pytest.mark.extras
def test_pth_entries_must_be_tensors(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "mixed.pth"
  torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, path)
  with pytest.raises(ValueError, match=r"not tensors: \['epoch'\]"):
    pretrained.load_state_dict(path)


@pytest.mark.extras
def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  path = tmp_path / "resnet18.pth"
  torch.save({"conv1.weight": torch.zeros(1)}, path)
  # A None entry makes `import torch` raise ImportError.
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="needs PyTorch.*convert_weights.py"):
    convert_weights.convert(str(path), [str(tmp_path / "out.safetensors")])
  assert not (tmp_path / "out.safetensors").exists()


def test_convert_rejects_bad_outputs(tmp_path):
  path = write(random_state_dict(18), tmp_path / "resnet18.npz")
  with pytest.raises(ValueError, match="--output out.h5"):
    convert_weights.convert(str(path), ["out.h5"])
  with pytest.raises(ValueError, match="at least one"):
    convert_weights.convert(str(path), [])
  # .npz -> .safetensors works without PyTorch.
  out = str(tmp_path / "resnet18.safetensors")
  assert convert_weights.convert(str(path), [out]) == 18
  assert set(pretrained.load_state_dict(out)) == set(np.load(path).files)
