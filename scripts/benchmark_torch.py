r"""The demo's baseline network in plain PyTorch eager mode, timed alone.

The network a PyTorch user would write for the JAX baseline: three ResNet
streams (RGB, NI, TI; torchvision's layout and names, a width multiplier,
last stride 1), global average pooling, a BatchNorm neck without bias, a
bias-free classifier; cross-entropy and batch-hard triplet loss per stream;
Adam with L2 weight decay on kernels (PyTorch's `weight_decay`, as the JAX
optimizer adds it to the gradient). Nothing but PyTorch and NumPy is imported,
so the process holds PyTorch's threads only.

It prints the parameter count, the FLOPs of one training step (PyTorch's
FlopCounterMode: convolutions and matrix products, forward and backward), the
loss at initialisation and the step time, in NCHW and channels-last memory
format. With --init_file (written by `scripts/benchmark_train.py --torch`)
the network starts from the JAX model's initial parameters and takes its
batch, so that the two losses at initialisation must agree to float
round-off: the check that both sides train the same network.

  python scripts/benchmark_torch.py                   # the demo's shapes
  python scripts/benchmark_torch.py --threads=1 --steps=10

`scripts/benchmark_train.py --torch` runs this script as a separate process
(`--serve`), alternating timing rounds with the JAX process.
"""

import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

MODALITIES = ("rgb", "ni", "ti")  # As facenet_jax.constants; no import of it.
# As facenet_jax.models.resnet.RESNET_SPECS (ResNet-10 is the tests' ResNet).
_SPECS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)),
          34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3))}

_DEPTH = flags.DEFINE_enum("depth", "18", [str(d) for d in _SPECS],
                           "ResNet depth of each stream.")
_WIDTH = flags.DEFINE_float("width_multiplier", 0.25,
                            "Scales the stage widths (64, 128, 256, 512).")
_LAST_STRIDE = flags.DEFINE_integer("last_stride", 1, "Stride of stage 4.")
_INPUT_SIZE = flags.DEFINE_list("input_size", ["128", "64"],
                                "Image height, width.")
_BATCH = flags.DEFINE_list("batch", ["8", "4"],
                           "Identities per batch, instances per identity.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 100,
                                    "Training identities (classifier width).")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam's learning rate.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 5e-4,
                                   "L2 decay of kernels (ndim > 1).")
_MARGIN = flags.DEFINE_float("triplet_margin", 0.3, "Triplet margin.")
_SOFT = flags.DEFINE_bool("triplet_soft_margin", False,
                          "Soft-margin triplet (softplus) instead.")
_SMOOTHING = flags.DEFINE_float("label_smoothing", 0.0,
                                "Cross-entropy label smoothing.")
_CE_WEIGHT = flags.DEFINE_float("ce_weight", 1.0, "Weight of each CE term.")
_TRIPLET_WEIGHT = flags.DEFINE_float("triplet_weight", 1.0,
                                     "Weight of each triplet term.")
_THREADS = flags.DEFINE_integer(
    "threads", 0, "torch.set_num_threads and the CPUs this process may use; "
    "0 = os.cpu_count().")
_FORMATS = flags.DEFINE_list("formats", ["nchw", "channels_last"],
                             "Memory formats to time.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; the median is printed.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
_SEED = flags.DEFINE_integer("seed", 0, "torch.manual_seed of the init.")
_INIT_FILE = flags.DEFINE_string(
    "init_file", None, "An .npz of the batch (rgb, ni, ti NHWC, label) and "
    "optionally the JAX model's parameters (keys 'params/...'): start from "
    "them instead of PyTorch's initialisation and random images.")
_SERVE = flags.DEFINE_bool(
    "serve", False, "Internal (benchmark_train.py): build the first format, "
    "print one JSON line, then time --steps steps per line read on stdin.")


def limit_threads(threads: int) -> int:
  """Pins this process to `threads` CPUs (0: all) before torch starts."""
  cpus = sorted(os.sched_getaffinity(0))
  threads = threads or len(cpus)
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
  for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[name] = str(threads)
  return threads


def build_network(torch, depth: int, width_multiplier: float,
                  last_stride: int, num_classes: int):
  """Three torchvision-layout ResNet streams, each with GAP, neck, classifier.

  Returns a module mapping {modality: (B, 3, H, W)} to {modality: (features
  (B, D) before the neck, logits (B, num_classes))}.
  """
  nn = torch.nn
  kind, blocks = _SPECS[depth]
  expansion = 1 if kind == "basic" else 4
  widths = [max(1, int(round(w * width_multiplier)))
            for w in (64, 128, 256, 512)]

  def conv(cin, cout, k, stride):
    return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False)

  class Block(nn.Module):
    """BasicBlock or Bottleneck (stride on the 3x3), torchvision's names."""

    def __init__(self, cin, width, stride):
      super().__init__()
      cout = width * expansion
      if kind == "basic":
        shapes = [(cin, width, 3, stride), (width, cout, 3, 1)]
      else:
        shapes = [(cin, width, 1, 1), (width, width, 3, stride),
                  (width, cout, 1, 1)]
      for i, (a, b, k, s) in enumerate(shapes, 1):
        setattr(self, f"conv{i}", conv(a, b, k, s))
        setattr(self, f"bn{i}", nn.BatchNorm2d(b))
      self.count = len(shapes)
      self.downsample = (nn.Sequential(conv(cin, cout, 1, stride),
                                       nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
      out = x
      for i in range(1, self.count + 1):
        out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
        if i < self.count:
          out = torch.relu(out)
      shortcut = x if self.downsample is None else self.downsample(x)
      return torch.relu(out + shortcut)

  class Stream(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = conv(3, widths[0], 7, 2)
      self.bn1 = nn.BatchNorm2d(widths[0])
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin = widths[0]
      for stage, (width, count) in enumerate(zip(widths, blocks)):
        stride = (1, 2, 2, last_stride)[stage]
        layers = []
        for b in range(count):
          layers.append(Block(cin, width, stride if b == 0 else 1))
          cin = width * expansion
        setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
      self.neck = nn.BatchNorm1d(cin)
      self.neck.bias.requires_grad_(False)  # BoT's neck: no bias.
      self.classifier = nn.Linear(cin, num_classes, bias=False)
      nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      for stage in range(1, 5):
        x = getattr(self, f"layer{stage}")(x)
      features = x.mean((2, 3))
      return features, self.classifier(self.neck(features))

  class Baseline(nn.Module):

    def __init__(self):
      super().__init__()
      self.streams = nn.ModuleDict({m: Stream() for m in MODALITIES})
      for module in self.modules():
        if isinstance(module, nn.Conv2d):  # torchvision's initialisation.
          nn.init.kaiming_normal_(module.weight, mode="fan_out",
                                  nonlinearity="relu")

    def forward(self, images):
      return {m: self.streams[m](images[m]) for m in MODALITIES}

  return Baseline()


def batch_hard_triplet(torch, features, labels, margin: float, soft: bool):
  """Batch-hard triplet loss (facenet_jax.losses' definition)."""
  sq = (features * features).sum(1)
  distances = (sq[:, None] + sq[None, :] - 2.0 * features @ features.T).clamp(
      min=1e-12).sqrt()
  same = labels[:, None] == labels[None, :]
  eye = torch.eye(len(labels), dtype=torch.bool)
  positive, negative = same & ~eye, ~same
  hardest_pos = torch.where(positive, distances, 0.0).max(1).values
  hardest_neg = torch.where(negative, distances, float("inf")).min(1).values
  valid = positive.any(1) & negative.any(1)
  gap = hardest_pos - torch.where(valid, hardest_neg, 0.0)
  per_anchor = (torch.nn.functional.softplus(gap) if soft
                else torch.relu(margin + gap))
  return (per_anchor * valid).sum() / valid.sum().clamp(min=1)


def jax_to_torch_name(name: str) -> tuple[str, bool]:
  """A JAX parameter path -> (torch parameter name, is a HWIO/IO kernel).

  'rgb_backbone/layer2/0/downsample_conv/kernel' ->
  'streams.rgb.layer2.0.downsample.0.weight'; heads: 'rgb_head/neck/scale' ->
  'streams.rgb.neck.weight', 'rgb_head/classifier/kernel' (D, C) ->
  'streams.rgb.classifier.weight' (C, D).
  """
  parts = name.split("/")
  stream, module = parts[0].rsplit("_", 1)
  rest = parts[1:]
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[rest[-1]]
  path = [{"downsample_conv": "downsample.0",
           "downsample_bn": "downsample.1"}.get(p, p) for p in rest[:-1]]
  return ".".join(["streams", stream, *path, leaf]), rest[-1] == "kernel"


def load_jax_parameters(torch, model, arrays: dict) -> int:
  """Copies the 'params/...' arrays of an .npz into the network; their count."""
  state = {n: p for n, p in model.named_parameters() if p.requires_grad}
  copied = set()
  with torch.no_grad():
    for key, value in arrays.items():
      if not key.startswith("params/"):
        continue
      name, is_kernel = jax_to_torch_name(key[len("params/"):])
      value = np.asarray(value, np.float32)
      if is_kernel:
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      if name not in state or tuple(state[name].shape) != value.shape:
        raise ValueError(f"{key}: no torch parameter {name} of shape "
                         f"{value.shape}")
      state[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
      copied.add(name)
  missing = set(state) - copied
  if copied and missing:
    raise ValueError(f"not given by the JAX parameters: {sorted(missing)[:5]}")
  return len(copied)


class TorchStep:
  """One training step of the baseline in one memory format."""

  def __init__(self, torch, memory_format: str, arrays: dict):
    self.torch = torch
    torch.manual_seed(_SEED.value)
    self.model = build_network(torch, int(_DEPTH.value), _WIDTH.value,
                               _LAST_STRIDE.value, _NUM_CLASSES.value)
    self.from_jax = load_jax_parameters(torch, self.model, arrays) > 0
    self.format = (torch.channels_last if memory_format == "channels_last"
                   else torch.contiguous_format)
    self.model.to(memory_format=self.format)
    params = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.Adam(
        [{"params": [p for p in params if p.ndim > 1],
          "weight_decay": _WEIGHT_DECAY.value},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
        lr=_LR.value)
    # NHWC arrays -> NCHW tensors (channels-last strides if asked).
    self.images = {m: torch.from_numpy(np.ascontiguousarray(
        arrays[m].transpose(0, 3, 1, 2))).contiguous(
            memory_format=self.format) for m in MODALITIES}
    self.labels = torch.from_numpy(arrays["label"].astype(np.int64))
    self.model.train()
    self.num_parameters = sum(p.numel() for p in params)

  def loss(self):
    torch = self.torch
    total = 0.0
    for features, logits in self.model(self.images).values():
      ce = torch.nn.functional.cross_entropy(
          logits, self.labels, label_smoothing=_SMOOTHING.value)
      triplet = batch_hard_triplet(torch, features, self.labels,
                                   _MARGIN.value, _SOFT.value)
      total = total + _CE_WEIGHT.value * ce + _TRIPLET_WEIGHT.value * triplet
    return total

  def step(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss()
    loss.backward()
    self.optimizer.step()
    return loss

  def flops(self) -> float:
    """Convolution and matmul FLOPs of one step (2 per multiply-add)."""
    from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
    state = {k: v.clone() for k, v in self.model.state_dict().items()}
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
      self.optimizer.zero_grad(set_to_none=True)
      self.loss().backward()
    self.optimizer.zero_grad(set_to_none=True)
    self.model.load_state_dict(state)  # The BN statistics as before.
    return float(counter.get_total_flops())

  def time_steps(self, num_steps: int) -> float:
    start = time.perf_counter()
    for _ in range(num_steps):
      loss = self.step()
    float(loss.detach())
    return (time.perf_counter() - start) / num_steps


def _arrays() -> dict:
  """The batch (and maybe JAX parameters) of --init_file, or random images."""
  if _INIT_FILE.value:
    with np.load(_INIT_FILE.value) as f:
      return {k: f[k] for k in f.files}
  ids, per_id = (int(v) for v in _BATCH.value)
  h, w = (int(v) for v in _INPUT_SIZE.value)
  rng = np.random.default_rng(_SEED.value)
  arrays = {m: rng.standard_normal((ids * per_id, h, w, 3)).astype(np.float32)
            for m in MODALITIES}
  arrays["label"] = np.repeat(np.arange(ids), per_id)
  return arrays


def describe(torch, threads: int) -> dict:
  return {"torch": torch.__version__, "threads": threads,
          "mkldnn": bool(torch.backends.mkldnn.is_available())}


def serve(torch, threads: int) -> None:
  """One format; a JSON line of facts, then one of seconds per request."""
  step = TorchStep(torch, _FORMATS.value[0], _arrays())
  loss = float(step.loss().detach())  # Before any update.
  flops = step.flops()
  step.time_steps(max(1, _WARMUP.value))
  print(json.dumps({**describe(torch, threads), "params": step.num_parameters,
                    "flops": flops, "init_loss": loss,
                    "from_jax": step.from_jax}), flush=True)
  for line in sys.stdin:
    steps = int(line.split()[0]) if line.strip() else _STEPS.value
    cpu, start = time.process_time(), time.perf_counter()
    seconds = step.time_steps(steps)
    busy = (time.process_time() - cpu) / (time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "busy": busy}), flush=True)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = set(_FORMATS.value) - {"nchw", "channels_last"}
  if unknown:
    raise app.UsageError(f"--formats: unknown {sorted(unknown)}")
  if importlib.util.find_spec("torch") is None:
    raise SystemExit('error: benchmark_torch.py needs PyTorch: pip install '
                     '-e ".[torch]"')
  threads = limit_threads(_THREADS.value)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  if _SERVE.value:
    serve(torch, threads)
    return
  arrays = _arrays()
  steps = {f: TorchStep(torch, f, arrays) for f in _FORMATS.value}
  facts = {f: (s.num_parameters, s.flops(), float(s.loss().detach()))
           for f, s in steps.items()}
  for s in steps.values():
    s.time_steps(max(1, _WARMUP.value))
  times = {f: [] for f in steps}
  for _ in range(_ROUNDS.value):
    for f, s in steps.items():
      times[f].append(s.time_steps(_STEPS.value))
  info = describe(torch, threads)
  h, w = _INPUT_SIZE.value
  ids, per_id = _BATCH.value
  print(f"3 x ResNet{_DEPTH.value} x{_WIDTH.value:g}, {h}x{w}, batch "
        f"{int(ids) * int(per_id)}; torch {info['torch']}, {threads} "
        f"threads; median of {_ROUNDS.value} rounds x {_STEPS.value} steps")
  print("| format | parameters | GFLOP/step | loss at init | ms/step |")
  print("|---|---:|---:|---:|---:|")
  for f in steps:
    params, flops, loss = facts[f]
    print(f"| {f} | {params:,} | {flops / 1e9:.2f} | {loss:.4f} | "
          f"{1e3 * statistics.median(times[f]):.1f} |")


if __name__ == "__main__":
  app.run(main)
