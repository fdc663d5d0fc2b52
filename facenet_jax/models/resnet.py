"""ResNet backbones (He et al. 2016) in Flax, laid out like torchvision's.

The parameter tree mirrors torchvision's state-dict names one to one, so that
ImageNet weights map onto it by a fixed table (see `facenet_jax/pretrained.py`):

  torchvision                      this tree
  conv1.weight                     conv1/kernel
  bn1.{weight,bias}                bn1/{scale,bias}
  bn1.running_{mean,var}           batch_stats: bn1/{mean,var}
  layer2.0.conv1.weight            layer2/0/conv1/kernel
  layer2.0.downsample.0.weight     layer2/0/downsample_conv/kernel
  layer2.0.downsample.1.*          layer2/0/downsample_bn/*

Arrays are NHWC; kernels HWIO. Padding is explicit and equal to torchvision's
so that the same weights give the same feature maps. Bottleneck blocks put the
stride on the 3x3 convolution (torchvision's "ResNet v1.5").

The stem and the four stages are separate methods so that FACENet can insert
its modules after any stage and continue with the rest per stream; with
`grid`, `with_grid` and `pool` they make the stream interface of
`facenet_jax/models/backbones.py` (a ResNet's state is its feature map).
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# depth -> (block kind, blocks per stage). ResNet-10 (one basic block per
# stage) has no torchvision release: it is the tests' and CPU studies'
# ResNet, as vit_micro8 is their ViT; its programs compile in about two
# thirds of ResNet-18's time.
RESNET_SPECS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
_BASE_WIDTHS = (64, 128, 256, 512)

# torchvision initialises convolutions with kaiming_normal(mode="fan_out").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(dtype: Dtype, train: bool, name: str) -> nn.BatchNorm:
  # torchvision: eps 1e-5, momentum 0.1 (= 0.9 decay of the running average).
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


def _conv(features: int, kernel: int, stride: int, dtype: Dtype,
          name: str) -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32,
                 name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (ResNet18/34)."""
  width: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Maps (B, H, W, Cin) to (B, H/stride, W/stride, width)."""
    out = _conv(self.width, 3, self.stride, self.dtype, "conv1")(x)
    out = nn.relu(_batch_norm(self.dtype, train, "bn1")(out))
    out = _conv(self.width, 3, 1, self.dtype, "conv2")(out)
    out = _batch_norm(self.dtype, train, "bn2")(out)
    return nn.relu(out + _shortcut(x, self.width, self.stride, self.dtype,
                                   train))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet50/101)."""
  width: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Maps (B, H, W, Cin) to (B, H/stride, W/stride, 4 * width)."""
    out = _conv(self.width, 1, 1, self.dtype, "conv1")(x)
    out = nn.relu(_batch_norm(self.dtype, train, "bn1")(out))
    out = _conv(self.width, 3, self.stride, self.dtype, "conv2")(out)
    out = nn.relu(_batch_norm(self.dtype, train, "bn2")(out))
    out = _conv(self.width * 4, 1, 1, self.dtype, "conv3")(out)
    out = _batch_norm(self.dtype, train, "bn3")(out)
    return nn.relu(out + _shortcut(x, self.width * 4, self.stride, self.dtype,
                                   train))


def _shortcut(x: Array, features: int, stride: int, dtype: Dtype,
              train: bool) -> Array:
  """Identity, or torchvision's `downsample` (1x1 conv + BN) when shapes change.

  Called inside a block's compact `__call__`, so the modules made here belong
  to that block.
  """
  if stride == 1 and x.shape[-1] == features:
    return x
  x = _conv(features, 1, stride, dtype, "downsample_conv")(x)
  return _batch_norm(dtype, train, "downsample_bn")(x)


class Stage(nn.Module):
  """A sequence of residual blocks named "0", "1", ... like torchvision."""
  block: Callable[..., nn.Module]
  num_blocks: int
  width: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    for i in range(self.num_blocks):
      x = self.block(width=self.width, stride=self.stride if i == 0 else 1,
                     dtype=self.dtype, name=str(i))(x, train)
    return x


class ResNet(nn.Module):
  """A torchvision-compatible ResNet without its classifier.

  Attributes:
    depth: 10, 18, 34, 50 or 101.
    width_multiplier: scales every stage width (1.0 = standard; small values
      give tiny test models).
    last_stride: stride of stage 4 (re-ID convention 1; ImageNet 2).
    dtype: compute dtype; parameters are always float32.
  """
  depth: int = 50
  width_multiplier: float = 1.0
  last_stride: int = 1
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.depth not in RESNET_SPECS:
      raise ValueError(f"model.backbone: unsupported ResNet depth {self.depth};"
                       f" choose one of {sorted(RESNET_SPECS)}")
    kind, blocks = RESNET_SPECS[self.depth]
    block = BasicBlock if kind == "basic" else Bottleneck
    widths = [max(1, int(round(w * self.width_multiplier)))
              for w in _BASE_WIDTHS]
    strides = (1, 2, 2, self.last_stride)
    self.conv1 = nn.Conv(widths[0], (7, 7), strides=(2, 2),
                         padding=((3, 3), (3, 3)), use_bias=False,
                         kernel_init=conv_init, dtype=self.dtype,
                         param_dtype=jnp.float32)
    # `use_running_average` is given per call in `stem`.
    self.bn1 = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                            param_dtype=jnp.float32)
    self.layer1 = Stage(block, blocks[0], widths[0], strides[0], self.dtype)
    self.layer2 = Stage(block, blocks[1], widths[1], strides[1], self.dtype)
    self.layer3 = Stage(block, blocks[2], widths[2], strides[2], self.dtype)
    self.layer4 = Stage(block, blocks[3], widths[3], strides[3], self.dtype)

  @property
  def num_stages(self) -> int:
    return len(STAGE_NAMES)

  def stem(self, x: Array, train: bool,
           camera: Optional[Array] = None) -> Array:
    """conv1 -> bn1 -> ReLU -> 3x3/2 max pool: (B, H, W, 3) -> (B, H/4, W/4, C0).

    `camera` is part of the stream interface; a ResNet takes no camera ids.
    """
    if camera is not None:
      raise ValueError("ResNet streams have no camera embedding")
    x = self.conv1(x.astype(self.dtype))
    x = nn.relu(self.bn1(x, use_running_average=not train))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  def stage(self, index: int, x: Array, train: bool) -> Array:
    """Runs stage `index` (1-4) on x."""
    return (self.layer1, self.layer2, self.layer3,
            self.layer4)[index - 1](x, train)

  def grid(self, x: Array) -> Array:
    """The plug-in view of a stage output: the map itself."""
    return x

  def with_grid(self, x: Array, grid: Array) -> Array:
    """The state whose plug-in view is `grid`: the map itself."""
    del x
    return grid

  def pool(self, x: Array) -> Array:
    """The stream feature: global average pooling, (B, h, w, C) -> (B, C)."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

  def __call__(self, x: Array, train: bool = False) -> Array:
    """Stem and all four stages: (B, H, W, 3) -> stage-4 map (B, h, w, C4)."""
    x = self.stem(x, train)
    for index in range(1, 5):
      x = self.stage(index, x, train)
    return x


def stage_channels(depth: int, width_multiplier: float = 1.0) -> Sequence[int]:
  """Output channels of stages 1-4 for a ResNet of this depth and width."""
  kind, _ = RESNET_SPECS[depth]
  expansion = 1 if kind == "basic" else 4
  return tuple(max(1, int(round(w * width_multiplier))) * expansion
               for w in _BASE_WIDTHS)
