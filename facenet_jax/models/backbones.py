"""Backbone registry: `model.backbone` names -> stream modules, one interface.

  name            family  stages       plug-in default      stream feature
  resnet10..101   resnet  4 stages     4 (paper)            GAP of stage 4
  vit_s16         vit     12 blocks    11 (official code)   CLS token, D 384
  vit_b16         vit     12 blocks    11                   CLS token, D 768
  transreid_b16   vit     12 blocks    11                   CLS token, D 768
  vit_micro8      vit      4 blocks     3                   CLS token, D 64

vit_s16 / vit_b16 are timm's `vit_small_patch16_224` / `vit_base_patch16_224`
(16x16 patches, stride 16: a 16 x 8 grid at 256 x 128). transreid_b16 is
ViT-B/16 with TransReID's overlapping patches (stride 12: 21 x 10 at
256 x 128), which load the same ViT-B/16 checkpoints. vit_micro8 is no
published model: a ViT for tests and CPU studies, D 64, 4 heads, 4 blocks,
8x8 patches with stride 8, so that 128 x 64 inputs give a 16 x 8 grid and
64 x 32 inputs an 8 x 4 one, both dividing the input (the pixel-level flare
target pools the input's saturation map to the grid). resnet10, one basic
block per stage, is no torchvision release either: the tests' ResNet.

Every stream module offers the interface FACENet is written against:

  stem(images, train, camera=None) -> state    input of stage 1
  stage(index, state, train) -> state          stage / block 1..num_stages
  grid(state) -> (B, h, w, C)                  the plug-in view (MFMP, FCE)
  with_grid(state, grid) -> state              state with that view replaced
  pool(state) -> (B, D) float32                the stream feature
  num_stages                                   stages (ResNet) or blocks (ViT)

A ResNet's state is its feature map (grid and with_grid are the identity); a
ViT's is its tokens, CLS first, and its grid the patch tokens reshaped.
"""

import dataclasses
from typing import Any, Callable, Union

import flax.linen as nn
import jax.numpy as jnp

from facenet_jax.models import resnet
from facenet_jax.models import vit


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """The architecture of a ViT stream (see `vit.ViT`)."""
  width: int
  depth: int
  heads: int
  patch: int
  stride: int
  mlp_ratio: int = 4


VIT_SPECS = {
    "vit_s16": ViTSpec(width=384, depth=12, heads=6, patch=16, stride=16),
    "vit_b16": ViTSpec(width=768, depth=12, heads=12, patch=16, stride=16),
    "transreid_b16": ViTSpec(width=768, depth=12, heads=12, patch=16,
                             stride=12),
    "vit_micro8": ViTSpec(width=64, depth=4, heads=4, patch=8, stride=8),
}
RESNET_NAMES = {f"resnet{depth}": depth for depth in resnet.RESNET_SPECS}


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
  """What the rest of the code needs to know about a backbone, statically.

  Attributes:
    name: the registry name (model.backbone).
    family: "resnet" or "vit"; selects the module and the weight loader.
    spec: the ResNet depth, or the ViTSpec.
    num_stages: stages (ResNet) or blocks (ViT) the plug-in point counts.
    default_plug_stage: where MFMP/FCE go when model.plug_stage is 0: after
      ResNet stage 4 (the paper), before a ViT's last block (the official
      code).
    reads: the config.model fields of the backbone's own that it uses.
    camera_embedding: whether the stream can add a camera embedding.
  """
  name: str
  family: str
  spec: Union[int, ViTSpec]
  num_stages: int
  default_plug_stage: int
  reads: frozenset[str]
  camera_embedding: bool

  def plug_grid(self, input_size: tuple[int, int], plug_stage: int,
                last_stride: int = 1) -> tuple[int, int]:
    """(h, w) of the plug-in grid for `input_size` at `plug_stage`."""
    height, width = input_size
    if self.family == "vit":
      return vit.grid_size((height, width), self.spec.patch, self.spec.stride)
    # Stem /4, then stages 2-4 halve (stage 4 by last_stride), rounding up
    # like the padded convolutions do.
    stride = 4 * 2**max(0, min(plug_stage, 3) - 1) * (
        last_stride if plug_stage == 4 else 1)
    return -(-height // stride), -(-width // stride)


def names() -> tuple[str, ...]:
  """Every registered backbone name."""
  return tuple(RESNET_NAMES) + tuple(VIT_SPECS)


def info(name: str) -> BackboneInfo:
  """The registry entry of `name`.

  Raises:
    ValueError: naming model.backbone and listing the known names.
  """
  if name in RESNET_NAMES:
    return BackboneInfo(name, "resnet", RESNET_NAMES[name], 4, 4,
                        frozenset({"width_multiplier", "last_stride"}), False)
  if name in VIT_SPECS:
    spec = VIT_SPECS[name]
    return BackboneInfo(name, "vit", spec, spec.depth, spec.depth - 1,
                        frozenset({"drop_path", "camera_embedding"}), True)
  raise ValueError(f"model.backbone: expected one of {', '.join(names())}; "
                   f"got {name!r}")


def resolve_plug_stage(name: str, plug_stage: int) -> int:
  """model.plug_stage, with 0 meaning the backbone's default, validated."""
  entry = info(name)
  stage = plug_stage or entry.default_plug_stage
  if not 1 <= stage <= entry.num_stages:
    unit = "stage" if entry.family == "resnet" else "block"
    raise ValueError(
        f"model.plug_stage must be a {name} {unit} in 1-{entry.num_stages} "
        f"(0 = its default, {entry.default_plug_stage}), got {plug_stage}")
  return stage


def _build_resnet(entry: BackboneInfo, options: dict, dtype: Any,
                  name: str) -> nn.Module:
  return resnet.ResNet(entry.spec, options["width_multiplier"],
                       options["last_stride"], dtype, name=name)


def _build_vit(entry: BackboneInfo, options: dict, dtype: Any,
               name: str) -> nn.Module:
  spec = entry.spec
  return vit.ViT(spec.width, spec.depth, spec.heads, spec.patch, spec.stride,
                 tuple(options["input_size"]), spec.mlp_ratio,
                 options["drop_path"], options["num_cameras"],
                 options["camera_scale"], dtype, name=name)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet": _build_resnet, "vit": _build_vit}


def build(backbone: str, *, input_size: tuple[int, int],
          width_multiplier: float = 1.0, last_stride: int = 1,
          drop_path: float = 0.0, num_cameras: int = 0,
          camera_scale: float = 3.0, dtype: Any = jnp.float32,
          name: str = None) -> nn.Module:
  """One stream module of `backbone`; each family reads its own options.

  Args:
    backbone: a registry name (model.backbone).
    input_size: (H, W) of the images (a ViT sizes its position grid by it).
    width_multiplier: ResNet stage widths (ViTs ignore it).
    last_stride: ResNet stage-4 stride (ViTs ignore it).
    drop_path: ViT stochastic depth of the last block.
    num_cameras: ViT camera-embedding table size; 0 = none.
    camera_scale: weight of the camera embedding.
    dtype: compute dtype.
    name: the module's name in the parent (e.g. "rgb_backbone").

  Returns:
    An unbound Flax module with the interface of this module's docstring.

  Raises:
    ValueError: an unknown name, or an option the family does not have.
  """
  entry = info(backbone)
  if drop_path and "drop_path" not in entry.reads:
    raise ValueError(f"model.drop_path={drop_path}: stochastic depth is "
                     f"implemented for ViT streams only, not {backbone}")
  if num_cameras and not entry.camera_embedding:
    raise ValueError(f"model.camera_embedding: {backbone} streams have no "
                     "camera embedding (TransReID's side information is a "
                     "ViT option)")
  options = dict(input_size=input_size, width_multiplier=width_multiplier,
                 last_stride=last_stride, drop_path=drop_path,
                 num_cameras=num_cameras, camera_scale=camera_scale)
  return _BUILDERS[entry.family](entry, options, dtype, name)
