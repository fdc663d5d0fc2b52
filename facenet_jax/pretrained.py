"""ImageNet ResNet and ViT weights from torchvision, timm or JAX files.

`load_backbone_variables(path, model.backbone, input_size)` picks the loader
of the backbone's family; the ResNet one is described first, the ViT one
(`load_vit_variables`) after it.

ResNets.

torchvision's `resnet{18,34,50,101}` and timm's plain ResNets of the same
depths (`resnet50.a1_in1k`, `resnet50.tv_in1k`, ...) share one state-dict
layout: `conv1`, `bn1`, `layer{1-4}.{block}.{conv,bn}{1-3}`,
`layer*.0.downsample.{0,1}` and the classifier `fc`. Our `ResNet` mirrors
it (see `facenet_jax/models/resnet.py`), so loading is a fixed name table
(`torchvision_name_map`) plus two layout changes:

  * convolution weights go from PyTorch's OIHW to Flax's HWIO;
  * BatchNorm `weight`/`bias` become params `scale`/`bias`, and
    `running_mean`/`running_var` become batch_stats `mean`/`var`.

`num_batches_tracked` and the ImageNet classifier `fc.*` are dropped.
Deep-stem variants (timm's `resnet50d` and the like) have other names and are
reported as mismatches.

Files: `.safetensors` and `.npz` are read with NumPy only; a PyTorch
`.pth`/`.pt`/`.pth.tar`/`.bin` file needs PyTorch and is read with
`torch.load(..., weights_only=True)`, which refuses pickled objects other than
tensors and plain containers. `scripts/convert_weights.py` turns a `.pth` into
a `.safetensors` or `.npz` file for machines without PyTorch.

ViTs. timm's `VisionTransformer` state dicts (`model.safetensors` of
`vit_base_patch16_224.augreg2_in21k_ft_in1k` and friends, or the `.pth` the
official code uses, `jx_vit_base_p16_224-80ecf9dd.pth`) map onto
`facenet_jax/models/vit.py` by `timm_vit_name_map`: Linear weights are
transposed to Dense kernels, the patch convolution goes OIHW -> HWIO, the
classifier `head.*` is dropped. The original JAX ViT's `.npz` files (big_vision
and google-research/vision_transformer) are first renamed to timm's names
(`timm_state_dict_from_google`). Position embeddings trained on another grid
(14 x 14 at 224 x 224) are resampled bilinearly to the input's token grid
(16 x 8 at 256 x 128), as the official code does, and the resampling is
logged. `vit_tokens` runs a file's ViT on images, for checks and features.

One file, though long: both families share the file readers (safetensors,
npz, PyTorch), the name-and-shape checks against the model's own tree with
their error reports, and the merge into it; split per family, each half would
need the other's machinery.
"""

import functools
import os
import pickle
import re
from typing import Any, Mapping, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from facenet_jax.models import backbones
from facenet_jax.models import resnet
from facenet_jax.models import vit

# (collection, path in it), e.g. ("params", ("conv1", "kernel")).
Target = tuple[str, tuple[str, ...]]
Variables = dict[str, Any]

TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".bin")
# torchvision BatchNorm2d field -> (collection, Flax BatchNorm variable).
_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
# Entries of a state dict that have no counterpart in the backbone.
_CLASSIFIER_PREFIX = "fc."
_IGNORED_SUFFIX = ".num_batches_tracked"
# Keys of training checkpoints that wrap the state dict itself.
_WRAPPER_KEYS = ("state_dict", "model")
# How many names of each kind an error message shows.
_MAX_LISTED = 20
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


class StateDictMismatchError(ValueError):
  """A state dict (or a variables subtree) does not fit the model's tree.

  Attributes:
    missing: names the model needs that the source lacks.
    unexpected: names in the source the model has no place for.
    shape_mismatches: (name, expected shape, shape found) triples.
  """

  def __init__(self, source: str, missing: Sequence[str],
               unexpected: Sequence[str],
               shape_mismatches: Sequence[tuple[str, tuple[int, ...],
                                                tuple[int, ...]]]):
    self.missing = tuple(missing)
    self.unexpected = tuple(unexpected)
    self.shape_mismatches = tuple(shape_mismatches)
    lines = [f"{source}: names or shapes do not match the model's variables:"]
    lines += _listing("missing keys", self.missing)
    lines += _listing("unexpected keys", self.unexpected)
    lines += _listing("shape mismatches", [
        f"{name}: expected {expected}, got {got}"
        for name, expected, got in self.shape_mismatches])
    super().__init__("\n".join(lines))


def _listing(title: str, items: Sequence[str]) -> list[str]:
  if not items:
    return []
  shown = [f"    {item}" for item in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    shown.append(f"    ... and {len(items) - _MAX_LISTED} more")
  return [f"  {len(items)} {title}:"] + shown


def torchvision_name_map(depth: int) -> dict[str, Target]:
  """The table from torchvision/timm state-dict names to our variables.

  Args:
    depth: 10, 18, 34, 50 or 101.

  Returns:
    An ordered dict `torch name -> (collection, path)`, e.g.
    `"layer2.0.downsample.1.running_var" -> ("batch_stats",
    ("layer2", "0", "downsample_bn", "var"))`. It covers every variable of
    `ResNet(depth=depth)` exactly once.
  """
  if depth not in resnet.RESNET_SPECS:
    raise ValueError(f"unsupported ResNet depth {depth}; choose one of "
                     f"{sorted(resnet.RESNET_SPECS)}")
  kind, blocks_per_stage = resnet.RESNET_SPECS[depth]
  convs_per_block = 2 if kind == "basic" else 3
  table: dict[str, Target] = {}

  def add_conv_bn(torch_conv: str, torch_bn: str,
                  ours_conv: tuple[str, ...], ours_bn: tuple[str, ...]):
    table[f"{torch_conv}.weight"] = ("params", ours_conv + ("kernel",))
    for field, (collection, name) in _BN_FIELDS.items():
      table[f"{torch_bn}.{field}"] = (collection, ours_bn + (name,))

  add_conv_bn("conv1", "bn1", ("conv1",), ("bn1",))
  for stage, num_blocks in zip(resnet.STAGE_NAMES, blocks_per_stage):
    for block in range(num_blocks):
      torch_prefix, ours = f"{stage}.{block}", (stage, str(block))
      for i in range(1, convs_per_block + 1):
        add_conv_bn(f"{torch_prefix}.conv{i}", f"{torch_prefix}.bn{i}",
                    ours + (f"conv{i}",), ours + (f"bn{i}",))
      # The first block of a stage changes resolution or width (layer1 of a
      # basic-block ResNet does neither), so it carries the projection.
      if block == 0 and (stage != "layer1" or kind == "bottleneck"):
        add_conv_bn(f"{torch_prefix}.downsample.0",
                    f"{torch_prefix}.downsample.1",
                    ours + ("downsample_conv",), ours + ("downsample_bn",))
  return table


def infer_depth(state_dict: Mapping[str, Any]) -> int:
  """The ResNet depth a torchvision/timm state dict was saved from.

  Args:
    state_dict: torch name -> array.

  Returns:
    10, 18, 34, 50 or 101, from the number of blocks per stage and whether blocks
    have a third convolution (bottlenecks).

  Raises:
    ValueError: if the names do not form one of the supported ResNets.
  """
  blocks = [set() for _ in resnet.STAGE_NAMES]
  for name in state_dict:
    match = _BLOCK_KEY.match(name)
    if match:
      blocks[int(match.group(1)) - 1].add(int(match.group(2)))
  counts = tuple(len(b) for b in blocks)
  kind = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
  for depth, spec in resnet.RESNET_SPECS.items():
    if spec == (kind, counts):
      return depth
  raise ValueError(
      f"not a supported ResNet state dict: {kind} blocks per stage {counts};"
      f" known: {dict(resnet.RESNET_SPECS)}")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a state dict from `.safetensors`, `.npz` or (with PyTorch) `.pth`.

  Args:
    path: the weights file. Its suffix chooses the reader.

  Returns:
    torch name -> NumPy array, with the dtypes stored in the file (bfloat16
    tensors of a PyTorch file become float32, which NumPy can hold). A
    PyTorch training checkpoint that wraps its weights as
    `{"state_dict": ...}` or `{"model": ...}` is unwrapped.

  Raises:
    FileNotFoundError: no such file.
    ImportError: a `.pth` file and PyTorch is not installed.
    ValueError: unknown suffix, or contents that are not a flat mapping from
      names to tensors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"model.pretrained: no such file: {path}")
  if path.endswith(".safetensors"):
    try:
      return safetensors.numpy.load_file(path)
    except TypeError as e:
      # NumPy has no bfloat16; safetensors' NumPy reader fails on it.
      raise ValueError(
          f"{path}: cannot read it with NumPy ({e}); convert it with "
          "scripts/convert_weights.py on a machine with PyTorch, which "
          "stores float32") from e
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {name: data[name] for name in data.files}
  if path.endswith(TORCH_SUFFIXES):
    return _load_torch(path)
  raise ValueError(f"{path}: unknown weights format; expected .safetensors, "
                   f".npz or a PyTorch file ({', '.join(TORCH_SUFFIXES)})")


def _load_torch(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict with `weights_only=True` (no arbitrary code)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{path}: reading a PyTorch file needs PyTorch (pip install torch); "
        "without it, convert the file elsewhere with scripts/convert_weights.py"
        " and point model.pretrained at the .safetensors or .npz") from e
  try:
    contents = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(f"{path}: not a plain state dict; torch.load(weights_only"
                     f"=True) refused it: {e}") from e
  if not isinstance(contents, Mapping):
    raise ValueError(f"{path}: holds a {type(contents).__name__}, expected a "
                     "state dict (name -> tensor)")
  # Training checkpoints wrap the weights: {"state_dict": {...}, "epoch": ...}.
  for key in _WRAPPER_KEYS:
    if isinstance(contents.get(key), Mapping):
      contents = contents[key]
      break
  not_tensors = sorted(name for name, value in contents.items()
                       if not isinstance(value, torch.Tensor))
  if not_tensors:
    raise ValueError(f"{path}: entries that are not tensors: "
                     f"{not_tensors[:_MAX_LISTED]}")
  state_dict = {}
  for name, tensor in contents.items():
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
      tensor = tensor.float()
    state_dict[name] = tensor.numpy()
  return state_dict


def _ignored(name: str) -> bool:
  return name.startswith(_CLASSIFIER_PREFIX) or name.endswith(_IGNORED_SUFFIX)


def _to_ours(array: np.ndarray) -> np.ndarray:
  """A torch-layout array in our layout: OIHW -> HWIO for kernels, float32."""
  array = np.asarray(array, np.float32)
  if array.ndim == 4:
    array = np.transpose(array, (2, 3, 1, 0))
  return np.ascontiguousarray(array)


def _to_torch_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """Our shape in torch's layout (HWIO -> OIHW), for messages and checks."""
  shape = tuple(int(s) for s in shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def expected_torch_shapes(depth: int) -> dict[str, tuple[int, ...]]:
  """Torch-layout shapes of every mapped name, from our full-width ResNet.

  Shapes come from `jax.eval_shape` of `ResNet(depth).init`, so nothing is
  computed and the table is checked against the real module tree.

  Args:
    depth: 10, 18, 34, 50 or 101.

  Returns:
    torch name -> shape (OIHW for kernels).
  """
  return dict(_expected_torch_shapes(depth))


# Tracing ResNet101 takes about a second; the three streams ask for the same.
@functools.lru_cache(maxsize=None)
def _expected_torch_shapes(depth: int) -> tuple[tuple[str, tuple[int, ...]],
                                                ...]:
  abstract = jax.eval_shape(
      lambda: resnet.ResNet(depth=depth).init(
          jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32),
          train=False))
  flat = {(collection,) + path: leaf.shape
          for collection in ("params", "batch_stats")
          for path, leaf in flax.traverse_util.flatten_dict(
              abstract[collection]).items()}
  table = torchvision_name_map(depth)
  return tuple((name, _to_torch_shape(flat[(collection,) + path]))
               for name, (collection, path) in table.items())


def resnet_variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray], depth: int,
    source: str = "state dict") -> Variables:
  """Maps a torchvision/timm state dict onto `ResNet(depth=depth)` variables.

  Args:
    state_dict: torch name -> array (torch layout, any float dtype).
    depth: the configured ResNet depth.
    source: what to call the state dict in errors (e.g. its file).

  Returns:
    `{"params": ..., "batch_stats": ...}` nested dicts of float32 NumPy arrays
    with exactly the structure and shapes of `ResNet(depth=depth).init(...)`
    at width multiplier 1.

  Raises:
    ValueError: the state dict is a ResNet of another depth.
    StateDictMismatchError: missing keys, unexpected keys or wrong shapes.
  """
  try:
    found = infer_depth(state_dict)
  except ValueError:
    # Not a recognisable ResNet layout: the key-by-key report below says why.
    found = depth
  if found != depth:
    raise ValueError(f"{source} holds a ResNet{found}, but the model is a "
                     f"ResNet{depth} (model.backbone)")
  table = torchvision_name_map(depth)
  shapes = expected_torch_shapes(depth)
  missing = [name for name in table if name not in state_dict]
  unexpected = sorted(name for name in state_dict
                      if name not in table and not _ignored(name))
  mismatched = [(name, shapes[name], tuple(np.shape(state_dict[name])))
                for name in table
                if name in state_dict
                and tuple(np.shape(state_dict[name])) != shapes[name]]
  if missing or unexpected or mismatched:
    raise StateDictMismatchError(source, missing, unexpected, mismatched)
  flat = {(collection,) + path: _to_ours(state_dict[name])
          for name, (collection, path) in table.items()}
  return flax.traverse_util.unflatten_dict(flat)


def load_resnet_variables(path: str | os.PathLike[str],
                          depth: int) -> Variables:
  """`load_state_dict` followed by `resnet_variables_from_state_dict`.

  Args:
    path: a `.safetensors`, `.npz` or PyTorch file.
    depth: the configured ResNet depth.

  Returns:
    `{"params": ..., "batch_stats": ...}` for `ResNet(depth=depth)`.
  """
  path = os.fspath(path)
  variables = resnet_variables_from_state_dict(load_state_dict(path), depth,
                                               source=path)
  logging.info("Loaded ResNet%d weights from %s.", depth, path)
  return variables


def _split_prefix(prefix: str | Sequence[str]) -> tuple[str, ...]:
  if isinstance(prefix, str):
    return tuple(part for part in prefix.split("/") if part)
  return tuple(prefix)


def merge_into(variables: Mapping[str, Any], subtree: Mapping[str, Any],
               prefix: str | Sequence[str]) -> Variables:
  """Returns `variables` with the subtree at `prefix` replaced.

  Used to put ImageNet weights into one stream's backbone of a larger model,
  e.g. `merge_into(variables, load_resnet_variables(path, 50),
  "rgb_backbone")`.

  Args:
    variables: the full variables, e.g. `{"params": ..., "batch_stats": ...}`.
    subtree: collection -> nested dict to put at `prefix` (every collection in
      it must exist in `variables`; collections it lacks stay untouched).
    prefix: the path of the subtree inside each collection, as
      "a/b" or ("a", "b").

  Returns:
    A new dict of plain nested dicts; `variables` is not modified. Leaves
    outside the subtree are the same objects as before.

  Raises:
    ValueError: a collection or the prefix path does not exist.
    StateDictMismatchError: the subtree's names or shapes differ from the ones
      it replaces.
  """
  path = _split_prefix(prefix)
  if not path:
    raise ValueError("merge_into: empty prefix; give the backbone's path, "
                     "e.g. 'rgb_backbone'")
  merged = {name: _plain(tree) for name, tree in variables.items()}
  where = "/".join(path)
  for collection, replacement in subtree.items():
    if collection not in merged:
      raise ValueError(f"merge_into: variables have no collection "
                       f"{collection!r} (have {sorted(merged)})")
    parent = merged[collection]
    for level, key in enumerate(path):
      if not isinstance(parent, dict) or key not in parent:
        here = "/".join((collection,) + path[:level])
        have = sorted(parent) if isinstance(parent, dict) else []
        raise ValueError(f"merge_into: {here} has no {key!r} (has {have})")
      if level < len(path) - 1:
        parent = parent[key]
    old = flax.traverse_util.flatten_dict(parent[path[-1]], sep="/")
    new = flax.traverse_util.flatten_dict(_plain(replacement), sep="/")
    mismatched = [(name, tuple(np.shape(old[name])), tuple(np.shape(value)))
                  for name, value in new.items()
                  if name in old and np.shape(old[name]) != np.shape(value)]
    missing = sorted(set(old) - set(new))
    unexpected = sorted(set(new) - set(old))
    if missing or unexpected or mismatched:
      raise StateDictMismatchError(f"{collection}/{where}", missing,
                                   unexpected, mismatched)
    parent[path[-1]] = flax.traverse_util.unflatten_dict(new, sep="/")
  return merged


def _plain(tree: Any) -> Any:
  """Copies the dict structure of `tree` (FrozenDict included), not leaves."""
  if isinstance(tree, Mapping):
    return {key: _plain(value) for key, value in tree.items()}
  return tree


def resnet_features(path: str | os.PathLike[str], images: np.ndarray,
                    depth: int = 50, last_stride: int = 2) -> np.ndarray:
  """Stage-4 feature map of `images` under the weights in `path` (eval mode).

  Args:
    path: a `.safetensors`, `.npz` or PyTorch file of a ResNet`depth`.
    images: float32 (B, H, W, 3), already normalised.
    depth: ResNet depth.
    last_stride: stride of stage 4 (2 as in ImageNet training).

  Returns:
    float32 NumPy (B, h, w, C4), e.g. (B, H/32, W/32, 2048) for ResNet50.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"resnet_features: images must be (B, H, W, 3), got "
                     f"{images.shape}")
  variables = load_resnet_variables(path, depth)
  model = resnet.ResNet(depth=depth, last_stride=last_stride)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(apply(variables, images), np.float32)


# --- Every backbone -----------------------------------------------------------

# Stream variables that no ImageNet file holds (TransReID's camera
# embedding): a loaded stream keeps its own initialisation of them.
NOT_IN_CHECKPOINTS = ("sie_embed",)


def load_backbone_variables(path: str | os.PathLike[str], backbone: str,
                            input_size: tuple[int, int] = (256, 128)
                            ) -> Variables:
  """One stream's variables for `backbone` (model.backbone) from `path`.

  Args:
    path: a ResNet (`load_resnet_variables`) or ViT (`load_vit_variables`)
      weights file.
    backbone: a registry name (facenet_jax/models/backbones.py).
    input_size: the network input (H, W): a ViT's position embeddings are
      resampled to its token grid. ResNets ignore it.

  Returns:
    `{"params": ...}` (and `"batch_stats"` for a ResNet) of one stream,
    without the variables of NOT_IN_CHECKPOINTS.
  """
  entry = backbones.info(backbone)
  return _LOADERS[entry.family](path, entry, tuple(input_size))


# --- ViT ----------------------------------------------------------------------

# timm state-dict entries with no counterpart in a stream: the classifier
# (and the pre-logits layer of older ImageNet-21k checkpoints).
_VIT_IGNORED_PREFIXES = ("head.", "pre_logits.")
# timm Linear layers of one block, as (timm name, our module path).
_VIT_BLOCK_DENSE = (("attn.qkv", ("attn", "qkv")),
                    ("attn.proj", ("attn", "proj")),
                    ("mlp.fc1", ("mlp", "fc1")), ("mlp.fc2", ("mlp", "fc2")))
_VIT_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
# Prefixes of the original JAX ViT's npz files: none (google-research/
# vision_transformer), "params/" (big_vision), "opt/target/" (old Flax
# optimizer checkpoints).
_GOOGLE_PREFIXES = ("", "params/", "opt/target/")
_GOOGLE_IGNORED = ("head/", "pre_logits/")


def timm_vit_name_map(depth: int) -> dict[str, tuple[str, ...]]:
  """The table from timm ViT state-dict names to our `vit.ViT` params.

  Args:
    depth: number of blocks.

  Returns:
    An ordered dict `timm name -> path in params`, e.g.
    `"blocks.3.attn.qkv.weight" -> ("blocks_3", "attn", "qkv", "kernel")`.
    It covers every parameter of a ViT without camera embedding once.
  """
  table = {"cls_token": ("cls_token",), "pos_embed": ("pos_embed",),
           "patch_embed.proj.weight": ("patch_embed", "kernel"),
           "patch_embed.proj.bias": ("patch_embed", "bias")}
  for i in range(depth):
    torch_block, ours = f"blocks.{i}", (f"blocks_{i}",)
    for norm in ("norm1", "norm2"):
      table[f"{torch_block}.{norm}.weight"] = ours + (norm, "scale")
      table[f"{torch_block}.{norm}.bias"] = ours + (norm, "bias")
    for torch_name, path in _VIT_BLOCK_DENSE:
      table[f"{torch_block}.{torch_name}.weight"] = ours + path + ("kernel",)
      table[f"{torch_block}.{torch_name}.bias"] = ours + path + ("bias",)
  table["norm.weight"] = ("norm", "scale")
  table["norm.bias"] = ("norm", "bias")
  return table


@functools.lru_cache(maxsize=None)
def _expected_vit_shapes(spec: backbones.ViTSpec) -> tuple[
    tuple[str, tuple[int, ...]], ...]:
  """Torch-layout shapes of every mapped name but pos_embed, from our tree."""
  size = (spec.patch, spec.patch)
  abstract = jax.eval_shape(lambda: vit.ViT(
      spec.width, spec.depth, spec.heads, spec.patch, spec.stride, size,
      spec.mlp_ratio).init(jax.random.key(0),
                           jnp.zeros((1,) + size + (3,), jnp.float32)))
  flat = flax.traverse_util.flatten_dict(abstract["params"])
  out = []
  for name, path in timm_vit_name_map(spec.depth).items():
    if name == "pos_embed":  # Its grid is the checkpoint's; checked apart.
      continue
    shape = tuple(int(s) for s in flat[path].shape)
    if name.endswith(".weight") and len(shape) == 2:
      shape = shape[::-1]  # Dense kernels are (in, out); Linear (out, in).
    out.append((name, _to_torch_shape(shape)))
  return tuple(out)


def _vit_to_ours(name: str, array: np.ndarray) -> np.ndarray:
  """A timm-layout array in ours: Linear transposed, OIHW -> HWIO."""
  array = np.asarray(array, np.float32)
  if name.endswith(".weight") and array.ndim == 2:
    array = array.T
  elif array.ndim == 4:
    array = np.transpose(array, (2, 3, 1, 0))
  return np.ascontiguousarray(array)


def is_google_vit(state_dict: Mapping[str, Any]) -> bool:
  """Whether the names are the original JAX ViT's (an npz of big_vision or
  google-research/vision_transformer) rather than timm's."""
  return any(f"{p}embedding/kernel" in state_dict for p in _GOOGLE_PREFIXES)


def timm_state_dict_from_google(npz: Mapping[str, np.ndarray],
                                source: str = "npz") -> dict[str, np.ndarray]:
  """The original JAX ViT's parameters under timm's names and layouts.

  Two layouts are read: google-research/vision_transformer (`cls`,
  `embedding`, `Transformer/posembed_input/pos_embedding` with the CLS
  position, blocks `Transformer/encoderblock_<i>/{LayerNorm_0,
  MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`,
  `Transformer/encoder_norm`) and big_vision (the same with `params/` before
  the names, a top-level `pos_embedding` without the CLS position, blocks
  `{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}`,
  one per block or stacked along a leading axis in
  `Transformer/encoderblock/` when trained with scan). Attention kernels are
  (D, heads, head width) per query/key/value and are fused into timm's qkv.

  Args:
    npz: name -> array as stored in the file.
    source: what to call it in errors.

  Returns:
    timm name -> array (torch layout), ready for vit_variables_from_state_dict.
    big_vision's CLS token, which gets no position embedding, gets a zero one.

  Raises:
    StateDictMismatchError: names missing or left over (in the file's names).
  """
  prefix = next((p for p in _GOOGLE_PREFIXES if f"{p}embedding/kernel" in npz),
                None)
  if prefix is None:
    raise ValueError(f"{source}: not a JAX ViT (no embedding/kernel)")
  used = set()

  def take(name: str) -> np.ndarray:
    key = prefix + name
    if key not in npz:
      missing.append(key)
      return None
    used.add(key)
    return np.asarray(npz[key], np.float32)

  missing: list[str] = []
  big_vision = f"{prefix}pos_embedding" in npz
  stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in npz
  mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
  if stacked:
    depth = npz[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
  else:
    depth = len({int(m.group(1)) for m in (
        re.match(rf"^{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k)
        for k in npz) if m})
  out = {}
  kernel = take("embedding/kernel")
  if kernel is not None:
    out["patch_embed.proj.weight"] = np.transpose(kernel, (3, 2, 0, 1))
  out["patch_embed.proj.bias"] = take("embedding/bias")
  out["cls_token"] = take("cls")
  pos = take("pos_embedding" if big_vision
             else "Transformer/posembed_input/pos_embedding")
  if pos is not None and big_vision:
    pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  out["pos_embed"] = pos
  for i in range(depth):
    block = ("Transformer/encoderblock/" if stacked
             else f"Transformer/encoderblock_{i}/")

    def leaf(name: str, block=block, i=i) -> np.ndarray:
      value = take(block + name)
      return value[i] if stacked and value is not None else value

    ours = f"blocks.{i}."
    out[ours + "norm1.weight"] = leaf("LayerNorm_0/scale")
    out[ours + "norm1.bias"] = leaf("LayerNorm_0/bias")
    out[ours + "norm2.weight"] = leaf(f"LayerNorm_{ln2}/scale")
    out[ours + "norm2.bias"] = leaf(f"LayerNorm_{ln2}/bias")
    attention = f"MultiHeadDotProductAttention_{mha}/"
    kernels = [leaf(f"{attention}{n}/kernel") for n in ("query", "key",
                                                        "value")]
    biases = [leaf(f"{attention}{n}/bias") for n in ("query", "key", "value")]
    if all(k is not None for k in kernels):
      # (D, heads, head width) -> Linear weight (heads * head width, D).
      out[ours + "attn.qkv.weight"] = np.concatenate(
          [k.reshape(k.shape[0], -1).T for k in kernels])
    if all(b is not None for b in biases):
      out[ours + "attn.qkv.bias"] = np.concatenate([b.reshape(-1)
                                                    for b in biases])
    proj = leaf(f"{attention}out/kernel")
    if proj is not None:  # (heads, head width, D) -> (D, D) out x in.
      out[ours + "attn.proj.weight"] = proj.reshape(-1, proj.shape[-1]).T
    out[ours + "attn.proj.bias"] = leaf(f"{attention}out/bias")
    for r in (0, 1):
      dense = leaf(f"MlpBlock_{mlp}/Dense_{r}/kernel")
      if dense is not None:
        out[ours + f"mlp.fc{r + 1}.weight"] = dense.T
      out[ours + f"mlp.fc{r + 1}.bias"] = leaf(f"MlpBlock_{mlp}/Dense_{r}/bias")
  out["norm.weight"] = take("Transformer/encoder_norm/scale")
  out["norm.bias"] = take("Transformer/encoder_norm/bias")
  unexpected = sorted(k for k in npz if k not in used and not any(
      k.startswith(prefix + p) for p in _GOOGLE_IGNORED))
  if missing or unexpected:
    raise StateDictMismatchError(source, sorted(set(missing)), unexpected, [])
  return {name: value for name, value in out.items() if value is not None}


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of 1-D linear interpolation, half-pixel
  centres (torch's bilinear with align_corners=False, no antialiasing)."""
  scale = size_in / size_out
  source = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
  low = np.minimum(np.floor(source).astype(int), size_in - 1)
  high = np.minimum(low + 1, size_in - 1)
  frac = source - low
  weights = np.zeros((size_out, size_in))
  np.add.at(weights, (np.arange(size_out), low), 1.0 - frac)
  np.add.at(weights, (np.arange(size_out), high), frac)
  return weights


def resample_position_grid(grid: np.ndarray,
                           size: tuple[int, int]) -> np.ndarray:
  """Bilinear resampling of an (h, w, D) grid of position embeddings.

  What TransReID and the official FACENet code do when they load ImageNet
  ViT weights (torch's `F.interpolate(mode="bilinear")`, align_corners
  False, no antialiasing); timm's own default is bicubic.

  Args:
    grid: (h, w, D) embeddings.
    size: (h', w') target grid.

  Returns:
    (h', w', D) float32.
  """
  grid = np.asarray(grid, np.float64)
  rows = _bilinear_matrix(grid.shape[0], size[0])
  cols = _bilinear_matrix(grid.shape[1], size[1])
  return np.einsum("ah,bw,hwd->abd", rows, cols, grid).astype(np.float32)


def _source_grid(num_patches: int, target: tuple[int, int],
                 source: str) -> tuple[int, int]:
  """The grid a checkpoint's position embeddings were trained on.

  Square when the count is a square (ImageNet checkpoints: 14 x 14 at 224),
  else the target grid when the counts agree (a checkpoint of this very
  model); anything else cannot be told from the count alone.
  """
  side = int(round(num_patches ** 0.5))
  if side * side == num_patches:
    return side, side
  if num_patches == target[0] * target[1]:
    return target
  raise ValueError(f"{source}: pos_embed holds {num_patches} patch positions,"
                   " neither a square grid nor the model's "
                   f"{target[0]}x{target[1]}")


def vit_variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray], backbone: str,
    input_size: tuple[int, int], source: str = "state dict") -> Variables:
  """Maps a timm (or JAX ViT) state dict onto one ViT stream's params.

  Args:
    state_dict: name -> array, timm's names and layouts, or the original
      JAX ViT's (`timm_state_dict_from_google` converts those first).
    backbone: a ViT registry name, e.g. "vit_b16".
    input_size: the network input (H, W); the position embeddings are
      resampled bilinearly from the checkpoint's grid to its token grid
      (logged), unless the two agree.
    source: what to call the state dict in errors.

  Returns:
    `{"params": ...}` with the structure and shapes of the stream
    (`vit.ViT`), without a camera embedding.

  Raises:
    ValueError: the state dict is a ViT of another width or depth.
    StateDictMismatchError: missing keys, unexpected keys or wrong shapes.
  """
  entry = backbones.info(backbone)
  if entry.family != "vit":
    raise ValueError(f"{backbone} is not a ViT backbone")
  spec = entry.spec
  if is_google_vit(state_dict):
    state_dict = timm_state_dict_from_google(state_dict, source)
  blocks = {int(m.group(1)) for m in map(_VIT_BLOCK_KEY.match, state_dict)
            if m}
  cls = state_dict.get("cls_token")
  width = int(np.shape(cls)[-1]) if cls is not None else None
  if width not in (None, spec.width) or (blocks and len(blocks) != spec.depth):
    raise ValueError(f"{source} holds a ViT of width {width} with "
                     f"{len(blocks)} blocks, but model.backbone={backbone} "
                     f"has width {spec.width} and {spec.depth} blocks")
  table = timm_vit_name_map(spec.depth)
  shapes = dict(_expected_vit_shapes(spec))
  missing = [name for name in table if name not in state_dict]
  unexpected = sorted(name for name in state_dict if name not in table and
                      not name.startswith(_VIT_IGNORED_PREFIXES))
  mismatched = [(name, shapes[name], tuple(np.shape(state_dict[name])))
                for name in table
                if name in state_dict and name in shapes
                and tuple(np.shape(state_dict[name])) != shapes[name]]
  pos = state_dict.get("pos_embed")
  if pos is not None and (np.ndim(pos) != 3 or np.shape(pos)[0] != 1 or
                          np.shape(pos)[2] != spec.width or
                          np.shape(pos)[1] < 2):
    mismatched.append(("pos_embed", (1, "1 + patches", spec.width),
                       tuple(np.shape(pos))))
  if missing or unexpected or mismatched:
    raise StateDictMismatchError(source, missing, unexpected, mismatched)
  flat = {path: _vit_to_ours(name, state_dict[name])
          for name, path in table.items()}
  target = vit.grid_size(tuple(input_size), spec.patch, spec.stride)
  pos = flat[("pos_embed",)]
  found = _source_grid(pos.shape[1] - 1, target, source)
  if found != target:
    grid = pos[0, 1:].reshape(found + (spec.width,))
    grid = resample_position_grid(grid, target).reshape(1, -1, spec.width)
    flat[("pos_embed",)] = np.concatenate([pos[:, :1], grid], axis=1)
    logging.info("%s: position embeddings resampled bilinearly from the "
                 "checkpoint's %dx%d grid to the %dx%d grid of %dx%d inputs.",
                 source, *found, *target, *input_size)
  return {"params": flax.traverse_util.unflatten_dict(flat)}


def load_vit_variables(path: str | os.PathLike[str], backbone: str,
                       input_size: tuple[int, int]) -> Variables:
  """`load_state_dict` followed by `vit_variables_from_state_dict`.

  Args:
    path: timm's `model.safetensors` (e.g. of
      vit_base_patch16_224.augreg2_in21k_ft_in1k), a timm/TransReID `.pth`
      such as `jx_vit_base_p16_224-80ecf9dd.pth` (read with
      `torch.load(weights_only=True)`), or a big_vision /
      google-research/vision_transformer `.npz`.
    backbone: a ViT registry name.
    input_size: the network input (H, W).

  Returns:
    `{"params": ...}` of one stream.
  """
  path = os.fspath(path)
  variables = vit_variables_from_state_dict(load_state_dict(path), backbone,
                                            input_size, source=path)
  logging.info("Loaded %s weights from %s.", backbone, path)
  return variables


def vit_tokens(path: str | os.PathLike[str], images: np.ndarray,
               backbone: str = "vit_b16") -> np.ndarray:
  """Every token of `images` after the final LayerNorm, under `path`'s weights.

  Eval mode (no stochastic depth), no camera embedding. At the checkpoint's
  own resolution (224 x 224 for ImageNet ViTs) nothing is interpolated;
  other sizes resample the position embeddings as training does.

  Args:
    path: a ViT weights file (`load_vit_variables`).
    images: float32 (B, H, W, 3), already normalised.
    backbone: the ViT registry name the file holds.

  Returns:
    float32 NumPy (B, 1 + N, D), the CLS token first, then the patches in
    row-major grid order.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"vit_tokens: images must be (B, H, W, 3), got "
                     f"{images.shape}")
  size = tuple(images.shape[1:3])
  variables = load_vit_variables(path, backbone, size)
  spec = backbones.info(backbone).spec
  model = vit.ViT(spec.width, spec.depth, spec.heads, spec.patch, spec.stride,
                  size, spec.mlp_ratio)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(apply(variables, images), np.float32)


_LOADERS = {
    "resnet": lambda path, entry, size: load_resnet_variables(path,
                                                              entry.spec),
    "vit": lambda path, entry, size: load_vit_variables(path, entry.name,
                                                        size),
}
