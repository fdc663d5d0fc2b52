r"""Times the train step's operations one by one: XLA against PyTorch (oneDNN).

At the shapes of the demo's baseline stream (ResNet18 x0.25, last stride 1,
128x64 input, batch 32) it times, per distinct shape: the convolution
forward, its input gradient and its filter gradient; BatchNorm in training
mode forward and backward; the stem's max pool forward and backward. JAX
runs each as its own jitted program (NHWC, as the model; the backward from
the residuals of `jax.vjp`), PyTorch calls the ATen operators its autograd
calls (NCHW or channels-last). Each framework runs in a process of its own,
pinned to the same CPUs with as many threads; the processes take turns,
round by round, and the median is reported. "per step" multiplies a call by
how often the training step of the three streams makes it, so that the
table says which operations make up the difference between the two steps.

  python scripts/benchmark_ops.py                       # the demo's shapes
  python scripts/benchmark_ops.py --batch=8 --calls=5   # quicker
"""

import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
import numpy as np

from facenet_jax import processes

_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_INPUT_SIZE = flags.DEFINE_list("input_size", ["128", "64"],
                                "Image height, width.")
_WIDTH = flags.DEFINE_float("width_multiplier", 0.25,
                            "Scales the stage widths (64, 128, 256, 512).")
_CALLS = flags.DEFINE_integer("calls", 20, "Timed calls per op and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; the median is printed.")
_THREADS = flags.DEFINE_integer(
    "threads", 0, "CPUs and threads of each process; 0 = all.")
_FRAMEWORKS = flags.DEFINE_list(
    "frameworks", ["jax", "torch_nchw", "torch_channels_last"],
    "Processes to compare; the first is the one the ratios are of.")
_FLAVOURS = ("jax", "torch_nchw", "torch_channels_last")
_CHILD = flags.DEFINE_enum("child", None, _FLAVOURS,
                           "Internal: time the ops in this framework.")
STREAMS = 3
KINDS = ("conv forward", "conv input grad", "conv filter grad",
         "BatchNorm forward", "BatchNorm backward", "max pool forward",
         "max pool backward")


def conv_shapes(batch: int, height: int, width: int,
                multiplier: float) -> list[tuple]:
  """(name, input NHWC, kernel, stride, cout, count per stream, input grad)."""
  c = [max(1, int(round(w * multiplier))) for w in (64, 128, 256, 512)]
  h, w = height // 4, width // 4  # After the stem.
  return [
      ("stem 7x7/2", (batch, height, width, 3), 7, 2, c[0], 1, False),
      ("layer1 3x3", (batch, h, w, c[0]), 3, 1, c[0], 4, True),
      ("layer2 3x3/2", (batch, h, w, c[0]), 3, 2, c[1], 1, True),
      ("layer2 1x1/2", (batch, h, w, c[0]), 1, 2, c[1], 1, True),
      ("layer2 3x3", (batch, h // 2, w // 2, c[1]), 3, 1, c[1], 3, True),
      ("layer3 3x3/2", (batch, h // 2, w // 2, c[1]), 3, 2, c[2], 1, True),
      ("layer3 1x1/2", (batch, h // 2, w // 2, c[1]), 1, 2, c[2], 1, True),
      ("layer3 3x3", (batch, h // 4, w // 4, c[2]), 3, 1, c[2], 3, True),
      ("layer4 3x3", (batch, h // 4, w // 4, c[2]), 3, 1, c[3], 1, True),
      ("layer4 1x1", (batch, h // 4, w // 4, c[2]), 1, 1, c[3], 1, True),
      ("layer4 3x3 ", (batch, h // 4, w // 4, c[3]), 3, 1, c[3], 3, True),
  ]


def norm_shapes(batch: int, height: int, width: int,
                multiplier: float) -> list[tuple]:
  """(name, NHWC shape, BatchNorms of that shape per stream)."""
  c = [max(1, int(round(w * multiplier))) for w in (64, 128, 256, 512)]
  h, w = height // 4, width // 4
  return [("stem", (batch, 2 * h, 2 * w, c[0]), 1),
          ("layer1", (batch, h, w, c[0]), 4),
          ("layer2", (batch, h // 2, w // 2, c[1]), 5),
          ("layer3", (batch, h // 4, w // 4, c[2]), 5),
          ("layer4", (batch, h // 4, w // 4, c[3]), 5)]


def op_list() -> list[tuple[str, str, int, tuple]]:
  """(op, shape text, calls per training step of the three streams, spec)."""
  h, w = (int(v) for v in _INPUT_SIZE.value)
  ops = []
  for name, x, k, s, cout, count, dgrad in conv_shapes(
      _BATCH.value, h, w, _WIDTH.value):
    shape = f"{name.strip()}: {x[1]}x{x[2]}x{x[3]} -> {cout}"
    spec = (x, k, s, cout)
    ops.append(("conv forward", shape, STREAMS * count, ("conv", spec)))
    if dgrad:
      ops.append(("conv input grad", shape, STREAMS * count, ("dgrad", spec)))
    ops.append(("conv filter grad", shape, STREAMS * count, ("wgrad", spec)))
  for name, x, count in norm_shapes(_BATCH.value, h, w, _WIDTH.value):
    shape = f"{name}: {x[1]}x{x[2]}x{x[3]}"
    ops.append(("BatchNorm forward", shape, STREAMS * count, ("bn", x)))
    ops.append(("BatchNorm backward", shape, STREAMS * count, ("bn_bwd", x)))
  x = norm_shapes(_BATCH.value, h, w, _WIDTH.value)[0][1]
  shape = f"stem: {x[1]}x{x[2]}x{x[3]}"
  ops.append(("max pool forward", shape, STREAMS, ("pool", x)))
  ops.append(("max pool backward", shape, STREAMS, ("pool_bwd", x)))
  return ops


def _jax_ops() -> dict[str, Callable[[], Callable[[], None]]]:
  """op key -> a maker of a function that runs the op once (asynchronously)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  dn = ("NHWC", "HWIO", "NHWC")

  def conv_fn(k, s):
    pad = (k - 1) // 2
    return lambda x, w: jax.lax.conv_general_dilated(
        x, w, (s, s), ((pad, pad), (pad, pad)), dimension_numbers=dn)

  def rand(shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)

  def make(kind, spec):
    if kind in ("conv", "dgrad", "wgrad"):
      xs, k, s, cout = spec
      conv = conv_fn(k, s)
      x, w = rand(xs), rand((k, k, xs[3], cout))
      g = rand(jax.eval_shape(conv, x, w).shape)
      if kind == "conv":
        f, args = jax.jit(conv), (x, w)
      elif kind == "dgrad":
        f = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
        args = (x, w, g)
      else:
        f = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
        args = (x, w, g)
    else:
      x = rand(spec)
      if kind.startswith("bn"):
        module = nn.BatchNorm(use_running_average=False, momentum=0.9,
                              epsilon=1e-5)
        variables = module.init(jax.random.key(0), x)

        def forward(x, params):
          y, _ = module.apply({"params": params,
                               "batch_stats": variables["batch_stats"]}, x,
                              mutable=["batch_stats"])
          return y
        params = variables["params"]
      else:
        forward = lambda x, params: nn.max_pool(x, (3, 3), strides=(2, 2),
                                                padding=((1, 1), (1, 1)))
        params = {}
      if kind in ("bn", "pool"):
        f, args = jax.jit(forward), (x, params)
      else:
        y, vjp = jax.vjp(forward, x, params)
        f, args = jax.jit(lambda vjp, g: vjp(g)), (vjp, rand(y.shape))
    f(*args)

    def run():
      return f(*args)
    return run

  def timer(kind, spec):
    run = make(kind, spec)

    def calls(n):
      for _ in range(2):
        jax.block_until_ready(run())
      start = time.perf_counter()
      for _ in range(n):
        out = run()
      jax.block_until_ready(out)
      return (time.perf_counter() - start) / n
    return calls
  return timer


def _torch_ops(channels_last: bool):
  """As _jax_ops, with the ATen operators of PyTorch's autograd."""
  import torch  # pylint: disable=g-import-not-at-top
  aten = torch.ops.aten
  rng = np.random.default_rng(0)
  fmt = torch.channels_last if channels_last else torch.contiguous_format

  def rand(nhwc):
    n, h, w, c = nhwc
    return torch.from_numpy(rng.standard_normal((n, c, h, w)).astype(
        np.float32)).contiguous(memory_format=fmt)

  def make(kind, spec):
    if kind in ("conv", "dgrad", "wgrad"):
      xs, k, s, cout = spec
      pad = (k - 1) // 2
      x = rand(xs)
      w = rand((cout, k, k, xs[3]))
      y = torch.nn.functional.conv2d(x, w, None, s, pad)
      g = torch.randn(y.shape).contiguous(memory_format=fmt)
      if kind == "conv":
        return lambda: torch.nn.functional.conv2d(x, w, None, s, pad)
      mask = [kind == "dgrad", kind == "wgrad", False]
      return lambda: aten.convolution_backward(
          g, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, mask)
    x = rand(spec)
    c = spec[3]
    if kind.startswith("bn"):
      weight, bias = torch.ones(c), torch.zeros(c)
      mean, var = torch.zeros(c), torch.ones(c)
      if kind == "bn":
        return lambda: aten.native_batch_norm(x, weight, bias, mean, var, True,
                                              0.1, 1e-5)
      y, saved_mean, saved_invstd = aten.native_batch_norm(
          x, weight, bias, mean, var, True, 0.1, 1e-5)
      g = torch.randn(y.shape).contiguous(memory_format=fmt)
      return lambda: aten.native_batch_norm_backward(
          g, x, weight, mean, var, saved_mean, saved_invstd, True, 1e-5,
          [True, True, True])
    if kind == "pool":
      return lambda: aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1])
    y, indices = aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1])
    g = torch.randn(y.shape).contiguous(memory_format=fmt)
    return lambda: aten.max_pool2d_with_indices_backward(
        g, x, [3, 3], [2, 2], [1, 1], [1, 1], False, indices)

  def timer(kind, spec):
    run = make(kind, spec)

    def calls(n):
      for _ in range(2):
        run()
      start = time.perf_counter()
      for _ in range(n):
        run()
      return (time.perf_counter() - start) / n
    return calls
  return timer


def child(flavour: str) -> None:
  """Builds the ops in this framework, then times them once per stdin line."""
  threads = len(os.sched_getaffinity(0))
  if flavour == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    timer = _jax_ops()
    version = f"jax {jax.__version__}"
  else:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    timer = _torch_ops(flavour == "torch_channels_last")
    version = f"torch {torch.__version__}"
  timers = [timer(*spec) for _, _, _, spec in op_list()]
  print(json.dumps({"version": version, "threads": threads}), flush=True)
  for line in sys.stdin:
    calls = int(line)
    print(json.dumps([t(calls) for t in timers]), flush=True)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CHILD.value:
    child(_CHILD.value)
    return
  unknown = set(_FRAMEWORKS.value) - set(_FLAVOURS)
  if unknown or not _FRAMEWORKS.value:
    raise app.UsageError(f"--frameworks: from {_FLAVOURS}")
  if (any(f.startswith("torch") for f in _FRAMEWORKS.value) and
      importlib.util.find_spec("torch") is None):
    raise SystemExit('error: the torch_* frameworks need PyTorch: pip '
                     'install -e ".[torch]" (or --frameworks=jax)')
  cpus = processes.pinned_cpus(_THREADS.value)
  env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus)),
         "MKL_NUM_THREADS": str(len(cpus))}
  own = ("--rounds", "--frameworks", "--threads")
  args = [a for a in sys.argv[1:] if not a.startswith(own)]
  children = {
      flavour: processes.Worker(
          [sys.executable, os.path.abspath(__file__), f"--child={flavour}",
           *args], cpus, env)
      for flavour in _FRAMEWORKS.value}
  facts = {f: worker.facts for f, worker in children.items()}
  times = {f: [] for f in children}
  for round_index in range(_ROUNDS.value):
    order = list(children)[::1 if round_index % 2 == 0 else -1]
    for flavour in order:
      times[flavour].append(children[flavour].ask(str(_CALLS.value)))
      time.sleep(0.5)  # Spinning OpenMP threads go to sleep.
  for worker in children.values():
    worker.close()
  ms = {f: [1e3 * statistics.median(r[i] for r in rounds)
            for i in range(len(rounds[0]))] for f, rounds in times.items()}
  names = list(children)
  h, w = _INPUT_SIZE.value
  print(f"ResNet18 x{_WIDTH.value:g} stream at {h}x{w}, batch {_BATCH.value}; "
        + ", ".join(f"{f}: {facts[f]['version']}" for f in names) +
        f"; each in its own process on {len(cpus)} CPU(s) and thread(s); "
        f"median of {_ROUNDS.value} rounds x {_CALLS.value} calls")
  print("| op | shape | per step | " +
        " | ".join(f"{f} ms" for f in names) + " | " +
        " | ".join(f"{names[0]} / {f}" for f in names[1:]) + " | " +
        " | ".join(f"{f} ms/step" for f in names) + " |")
  print("|---|---|---:|" + "---:|" * (3 * len(names) - 1))
  totals = {f: {} for f in names}
  for i, (op, shape, count, _) in enumerate(op_list()):
    cells = [f"{ms[f][i]:.3f}" for f in names]
    ratios = [f"{ms[names[0]][i] / ms[f][i]:.2f}" for f in names[1:]]
    per_step = [f"{count * ms[f][i]:.1f}" for f in names]
    for f in names:
      totals[f][op] = totals[f].get(op, 0.0) + count * ms[f][i]
    print(f"| {op} | {shape} | {count} | " + " | ".join(cells + ratios +
                                                        per_step) + " |")
  print("\nBy kind, ms per training step (three streams):")
  print("| op | " + " | ".join(names) + " | " +
        " | ".join(f"{names[0]} - {f}" for f in names[1:]) + " |")
  print("|---|" + "---:|" * (2 * len(names) - 1))
  kinds = [k for k in KINDS if k in totals[names[0]]]
  for op in kinds + ["all"]:
    row = {f: (sum(totals[f].values()) if op == "all" else totals[f][op])
           for f in names}
    print(f"| {op} | " + " | ".join(f"{row[f]:.1f}" for f in names) + " | " +
          " | ".join(f"{row[names[0]] - row[f]:+.1f}" for f in names[1:]) +
          " |")


if __name__ == "__main__":
  app.run(main)
