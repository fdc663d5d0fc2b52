"""ImageNet ResNet weights from torchvision or timm files, without PyTorch.

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

from facenet_jax.models import resnet

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
    depth: 18, 34, 50 or 101.

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
    18, 34, 50 or 101, from the number of blocks per stage and whether blocks
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
    depth: 18, 34, 50 or 101.

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
