r"""Three streams' convolutions apart, or vmapped into one grouped convolution.

Running FACENet's three ResNet streams as one batched computation (stacked
stream parameters under `jax.vmap`) turns each layer's three convolutions
into one convolution with feature_group_count=3. This times one 3x3
convolution, forward and backward (`jax.jit` of `jax.grad`), both ways, at
the demo's stage shapes (128x64 input, ResNet18 x0.25, last stride 1), and
prints a table with the ratio (docs/performance.md).

  python scripts/benchmark_grouped_conv.py
  python scripts/benchmark_grouped_conv.py --batch=8 --calls=5
"""

import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

_BATCH = flags.DEFINE_integer("batch", 32, "Images per stream.")
_CALLS = flags.DEFINE_integer("calls", 20, "Timed calls per row.")

# (height, width, channels) of the demo's stage maps.
_SHAPES = ((32, 16, 16), (16, 8, 32), (8, 4, 64), (8, 4, 128))
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
_STREAMS = 3


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=_DIMENSIONS)


def _apart(xs, ws):
  def loss(ws, xs):
    return sum(jnp.sum(_conv(x, w) ** 2) for x, w in zip(xs, ws))
  return jax.grad(loss, argnums=(0, 1))(ws, xs)


def _vmapped(xs, ws):
  def loss(w, x):
    return jnp.sum(jax.vmap(_conv)(x, w) ** 2)
  return jax.grad(loss, argnums=(0, 1))(jnp.stack(ws), jnp.stack(xs))


def _milliseconds(fn: Callable, calls: int, *args) -> tuple[float, Any]:
  """Milliseconds per call of fn(*args) after a warm-up call; its output."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  out = None
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return 1e3 * (time.perf_counter() - start) / calls, out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (_BATCH, _CALLS):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  apart, vmapped = jax.jit(_apart), jax.jit(_vmapped)
  print(f"one 3x3 convolution, forward and backward, {_STREAMS} streams of "
        f"{_BATCH.value} images, {_CALLS.value} calls; "
        f"{jax.devices()[0].device_kind}")
  print("| map, channels | three convolutions (ms) | one grouped convolution "
        "(ms) | grouped / three |")
  print("|---|---:|---:|---:|")
  worst = 0.0
  for h, w, c in _SHAPES:
    keys = jax.random.split(jax.random.key(h * w + c), 2 * _STREAMS)
    xs = [jax.random.normal(k, (_BATCH.value, h, w, c))
          for k in keys[:_STREAMS]]
    ws = [0.1 * jax.random.normal(k, (3, 3, c, c)) for k in keys[_STREAMS:]]
    a, grads_apart = _milliseconds(apart, _CALLS.value, xs, ws)
    b, grads_vmapped = _milliseconds(vmapped, _CALLS.value, xs, ws)
    print(f"| {h}x{w}, {c} | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
    # Both compute the same gradients (up to summation order).
    for part, stacked in zip(grads_apart, grads_vmapped):
      difference = max(float(jnp.max(jnp.abs(p - q)))
                       for p, q in zip(part, stacked))
      scale = max(float(jnp.max(jnp.abs(p))) for p in part)
      worst = max(worst, difference / max(scale, 1e-30))
  print(f"gradients of the two agree to {worst:.1e} (largest difference over "
        "the largest gradient)")


if __name__ == "__main__":
  app.run(main)
