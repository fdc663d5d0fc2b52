"""Vision Transformer streams (Dosovitskiy et al. 2021) in Flax, timm's layout.

One ViT stream: patch embedding (a p x p convolution with stride s; s = p
for ViT, s < p for TransReID's overlapping patches), a CLS token, learned
position embeddings, pre-norm transformer blocks with stochastic depth, and
a final LayerNorm. The parameter tree mirrors timm's `VisionTransformer`
state dict so that its checkpoints map onto it by a fixed table
(`facenet_jax/pretrained.py`):

  timm                             this tree
  cls_token                        cls_token            (1, 1, D)
  pos_embed                        pos_embed            (1, 1 + h * w, D)
  patch_embed.proj.{weight,bias}   patch_embed/{kernel,bias}
  blocks.3.norm1.{weight,bias}     blocks_3/norm1/{scale,bias}
  blocks.3.attn.qkv.*              blocks_3/attn/qkv/*  (one D -> 3D Dense)
  blocks.3.attn.proj.*             blocks_3/attn/proj/*
  blocks.3.norm2.*                 blocks_3/norm2/*
  blocks.3.mlp.fc{1,2}.*           blocks_3/mlp/fc{1,2}/*
  norm.{weight,bias}               norm/{scale,bias}
  (TransReID's sie_embed)          sie_embed            (cameras, 1, D)

The position embeddings are sized for the input the module is built for
(`input_size`); a checkpoint made at another resolution is resampled when it
is loaded, not here.

Arrays: images NHWC; tokens (B, 1 + h * w, D), CLS first, then the patches in
row-major order of the h x w grid. The stream exposes the interface of
`facenet_jax/models/backbones.py`: the stages are the blocks (1..depth), the
plug-in view is the patch tokens as an (B, h, w, D) grid, and the pooled
feature is the CLS token after the final LayerNorm.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# timm (and the original JAX ViT) use LayerNorm eps 1e-6.
LAYER_NORM_EPS = 1e-6
# timm initialises Linear layers, position embeddings and TransReID's camera
# embedding with a truncated normal of std 0.02.
_dense_init = nn.initializers.truncated_normal(0.02)


def grid_size(input_size: tuple[int, int], patch: int,
              stride: int) -> tuple[int, int]:
  """Token grid (h, w) of a p x p / stride s patch embedding, VALID padding.

  (H - p) // s + 1 per axis: H / p for non-overlapping patches, and for
  TransReID's stride 12 at 256 x 128 a 21 x 10 grid.
  """
  height, width = input_size
  if height < patch or width < patch:
    raise ValueError(f"input {height}x{width} is smaller than one {patch}x"
                     f"{patch} patch")
  return (height - patch) // stride + 1, (width - patch) // stride + 1


def _layer_norm(dtype: Dtype, name: Optional[str] = None) -> nn.LayerNorm:
  # Statistics in float32 whatever the compute dtype (Flax promotes them).
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_dense_init, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (timm's)."""
  width: int
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps (B, N, D) to (B, N, D)."""
    batch, tokens, _ = x.shape
    head_width = self.width // self.heads
    qkv = _dense(3 * self.width, self.dtype, "qkv")(x)
    # timm's order of the 3D outputs: [q | k | v], each [head 0 | head 1 ...].
    qkv = qkv.reshape(batch, tokens, 3, self.heads, head_width)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    weights = jax.nn.softmax(logits * head_width**-0.5, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    return _dense(self.width, self.dtype, "proj")(
        out.reshape(batch, tokens, self.width))


class Mlp(nn.Module):
  """Dense -> GELU (exact, as torch.nn.GELU) -> Dense."""
  width: int
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.gelu(_dense(self.hidden, self.dtype, "fc1")(x), approximate=False)
    return _dense(self.width, self.dtype, "fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  Attributes:
    width: D.
    heads: attention heads (D must divide by it).
    mlp_ratio: hidden width of the MLP, in multiples of D.
    drop_path: probability of dropping each residual branch per sample
      (stochastic depth, training only; needs the "dropout" rng).
    dtype: compute dtype; parameters are float32.
  """
  width: int
  heads: int
  mlp_ratio: int = 4
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  def _drop(self, x: Array, train: bool) -> Array:
    """Stochastic depth: zero a sample's branch with probability drop_path."""
    if not train or self.drop_path == 0.0:
      return x
    keep = 1.0 - self.drop_path
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(kept, x / keep, jnp.zeros_like(x))

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Maps tokens (B, N, D) to (B, N, D)."""
    y = Attention(self.width, self.heads, self.dtype, name="attn")(
        _layer_norm(self.dtype, "norm1")(x))
    x = x + self._drop(y, train)
    y = Mlp(self.width, self.width * self.mlp_ratio, self.dtype, name="mlp")(
        _layer_norm(self.dtype, "norm2")(x))
    return x + self._drop(y, train)


class ViT(nn.Module):
  """A ViT (or TransReID) stream without its classifier.

  Attributes:
    width: embedding width D.
    depth: number of blocks (the stages of the backbone interface).
    heads: attention heads.
    patch: patch size p (square).
    stride: patch stride s (p: ViT; 12 with p = 16: TransReID's overlap).
    input_size: (H, W) the module is built for; sets the position grid.
    mlp_ratio: MLP hidden width in multiples of D.
    drop_path: stochastic depth of the last block; block i of n drops with
      drop_path * i / (n - 1), the linear rule of timm and TransReID.
    num_cameras: > 0 adds TransReID's side information, a learned embedding
      per camera (num_cameras, 1, D) added to every token; 0 = none.
    camera_scale: TransReID's lambda (its SIE_COE, 3.0) on that embedding.
    dtype: compute dtype; parameters are float32.
  """
  width: int
  depth: int
  heads: int
  patch: int
  stride: int
  input_size: tuple[int, int]
  mlp_ratio: int = 4
  drop_path: float = 0.0
  num_cameras: int = 0
  camera_scale: float = 3.0
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.width % self.heads:
      raise ValueError(f"ViT width {self.width} does not divide into "
                       f"{self.heads} heads")
    h, w = self.grid_shape
    self.patch_embed = nn.Conv(self.width, (self.patch, self.patch),
                               strides=(self.stride, self.stride),
                               padding="VALID", dtype=self.dtype,
                               param_dtype=jnp.float32,
                               kernel_init=nn.initializers.lecun_normal())
    self.cls_token = self.param("cls_token", nn.initializers.zeros,
                                (1, 1, self.width), jnp.float32)
    self.pos_embed = self.param("pos_embed", _dense_init,
                                (1, 1 + h * w, self.width), jnp.float32)
    if self.num_cameras:
      self.sie_embed = self.param("sie_embed", _dense_init,
                                  (self.num_cameras, 1, self.width),
                                  jnp.float32)
    rates = [self.drop_path * i / max(1, self.depth - 1)
             for i in range(self.depth)]
    self.blocks = [Block(self.width, self.heads, self.mlp_ratio, rate,
                         self.dtype) for rate in rates]
    self.norm = _layer_norm(self.dtype)

  @property
  def grid_shape(self) -> tuple[int, int]:
    """The (h, w) token grid of `input_size`."""
    return grid_size(tuple(self.input_size), self.patch, self.stride)

  @property
  def num_stages(self) -> int:
    return self.depth

  def stem(self, x: Array, train: bool,
           camera: Optional[Array] = None) -> Array:
    """Patch embedding, CLS token, position (and camera) embeddings.

    Args:
      x: (B, H, W, 3) images of the size the module was built for.
      train: unused (no dropout on the embeddings); for the interface.
      camera: (B,) int camera ids, needed with num_cameras > 0.

    Returns:
      (B, 1 + h * w, D) tokens.
    """
    del train
    if tuple(x.shape[1:3]) != tuple(self.input_size):
      raise ValueError(f"ViT built for {tuple(self.input_size)} inputs got "
                       f"{tuple(x.shape[1:3])}")
    patches = self.patch_embed(x.astype(self.dtype))
    batch = patches.shape[0]
    patches = patches.reshape(batch, -1, self.width)
    cls = jnp.broadcast_to(self.cls_token.astype(patches.dtype),
                           (batch, 1, self.width))
    tokens = jnp.concatenate([cls, patches], axis=1) + self.pos_embed.astype(
        patches.dtype)
    if self.num_cameras:
      if camera is None:
        raise ValueError("model.camera_embedding needs the camera ids of the "
                         "batch ('camid'), which this caller does not pass")
      side = self.sie_embed[jnp.clip(camera, 0, self.num_cameras - 1)]
      tokens = tokens + (self.camera_scale * side).astype(tokens.dtype)
    return tokens

  def stage(self, index: int, x: Array, train: bool) -> Array:
    """Runs block `index` (1..depth) on tokens (B, 1 + N, D)."""
    return self.blocks[index - 1](x, train)

  def grid(self, x: Array) -> Array:
    """The patch tokens of (B, 1 + N, D) as their (B, h, w, D) grid."""
    h, w = self.grid_shape
    return x[:, 1:].reshape(x.shape[0], h, w, x.shape[-1])

  def with_grid(self, x: Array, grid: Array) -> Array:
    """Tokens x with their patch tokens replaced by `grid` (B, h, w, D)."""
    patches = grid.reshape(x.shape[0], -1, x.shape[-1]).astype(x.dtype)
    return jnp.concatenate([x[:, :1], patches], axis=1)

  def pool(self, x: Array) -> Array:
    """The stream feature: the CLS token after the final LayerNorm, (B, D)."""
    return self.norm(x[:, :1])[:, 0].astype(jnp.float32)

  def __call__(self, x: Array, train: bool = False,
               camera: Optional[Array] = None) -> Array:
    """Every token after the final LayerNorm: (B, H, W, 3) -> (B, 1 + N, D)."""
    x = self.stem(x, train, camera)
    for index in range(1, self.depth + 1):
      x = self.stage(index, x, train)
    return self.norm(x)
