r"""Times training: the pure jitted step, the full loop, and PyTorch eager.

For a config (default: the demo config, configs/synthetic.py) it measures in
one process, round by round interleaved so that the machine's load falls on
every row alike:

  jax step   the jitted train step alone, on one fixed batch already on the
             device: what XLA and the hardware give.
  jax loop   the same step fed by the real input (the config's training
             split, cached in memory or streamed as config.input says, put on
             the device ahead of the step) with the training loop's metric
             fetches: what scripts/main.py gets per step.
  torch      (--torch) the same baseline network in PyTorch eager mode: three
             ResNet streams (same depth, width and last stride), GAP, BN neck,
             bias-free classifier; CE + batch-hard triplet per stream; Adam
             with L2 weight decay on kernels; the same batch size and input.

FACENet's modules have no PyTorch twin here, so with --torch a config that
uses them is also measured as its baseline (use_mfmp, use_fce off, no
modality loss), and the JAX/PyTorch ratio compares
the baseline rows. TFLOP/s divide XLA's FLOP count of the compiled step (a
multiply-add is 2 FLOPs) by its time; "% peak" compares them with the dense
bf16 peak of the device kind where the table below knows it (accelerators;
run with --config.model.dtype=bfloat16 there).

  python scripts/benchmark_train.py --torch
  python scripts/benchmark_train.py --config configs/experiments.py
  python scripts/benchmark_train.py --trace_dir=/tmp/trace   # + op kinds
  python scripts/benchmark_train.py --config configs/wmveid863.py \
      --data=generated --steps=10            # ResNet50, 256x128, no dataset
"""

import os
import statistics
import sys
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import input_pipeline  # noqa: E402,F401  (hides GPUs from TensorFlow)
from facenet_jax import hardware  # noqa: E402
from facenet_jax import profiling  # noqa: E402
from facenet_jax.train import build  # noqa: E402
from facenet_jax.train import feed  # noqa: E402
from facenet_jax.train import mesh  # noqa: E402
from facenet_jax.train import steps  # noqa: E402
from facenet_jax.train import train_state  # noqa: E402
from facenet_jax.constants import MODALITIES  # noqa: E402
from input_pipeline import generated  # noqa: E402
from input_pipeline import pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "synthetic.py"),
    "Training configuration (default: the demo config).", lock_config=True)
_DATA = flags.DEFINE_enum(
    "data", "config", ["config", "generated"],
    "Input of the loop: the config's training split (prepared on first use) "
    "or generated JPEG triplets at the input size (needs no dataset).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per row and round.")
_WARMUP = flags.DEFINE_integer("warmup", 3,
                               "Untimed steps per row before the first round.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Rounds; each times every row once. The median is reported.")
_TORCH = flags.DEFINE_bool("torch", False,
                           "Also time the baseline network in PyTorch eager.")
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", None,
    "After the timing, trace --steps pure steps of the config with "
    "jax.profiler into this directory and print where their time goes, by "
    "XLA op kind (the TensorBoard profile is written there too).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads; 0 = os.cpu_count().")

def baseline_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config's network without FACENet's modules and relation loss."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.use_mfmp = False
  config.model.use_fce = False
  config.loss.modality = "none"
  return config


def is_baseline(config: ml_collections.ConfigDict) -> bool:
  return (not config.model.use_mfmp and not config.model.use_fce and
          config.loss.modality == "none")


class JaxRows:
  """The jitted step of one config, timed alone and inside the loop."""

  def __init__(self, config: ml_collections.ConfigDict,
               data: pipeline.SplitData):
    self.config = config
    self.sharding = mesh.Sharding.create()
    labels = pipeline.train_label_map(data)
    spe = pipeline.steps_per_epoch(data, config.ids_per_batch,
                                   config.instances_per_id)
    model = build.build_model(config, len(labels))
    schedule = build.learning_rate_schedule(config, spe)
    optimizer = build.build_optimizer(config, schedule)
    self.step_fn = steps.compile_train_step(
        model, optimizer, build.loss_config(config), schedule, self.sharding)
    state_sharding = self.sharding.replicated
    init = lambda rng: train_state.create_state(model, optimizer,
                                          tuple(config.input_size), rng)
    self.state = jax.jit(init, out_shardings=state_sharding)(
        jax.random.key(config.seed))
    start = time.perf_counter()
    self.batches = feed.input_batches(config, data, self.sharding, 0)
    self.input_seconds = time.perf_counter() - start
    # The pure step's fixed batch is the loop's first: same keys and shapes.
    self.fixed = next(self.batches)
    compiled = self.step_fn.lower(self.state, self.fixed).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    self.flops = float((cost or {}).get("flops", float("nan")))

  def warm_up(self, num_steps: int) -> None:
    for _ in range(num_steps):
      self.state, _ = self.step_fn(self.state, self.fixed)
      self.state, _ = self.step_fn(self.state, next(self.batches))
    jax.block_until_ready(self.state)

  def time_step(self, num_steps: int) -> float:
    """Seconds per step of the step alone."""
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    for _ in range(num_steps):
      self.state, metrics = self.step_fn(self.state, self.fixed)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - start) / num_steps

  def time_loop(self, num_steps: int) -> float:
    """Seconds per step of input + step + the loop's metric fetches."""
    jax.block_until_ready(self.state)
    log_every = max(1, self.config.log_every_steps)
    pending = []
    start = time.perf_counter()
    for step in range(1, num_steps + 1):
      self.state, metrics = self.step_fn(self.state, next(self.batches))
      pending.append(metrics)
      if step % log_every == 0 or step == num_steps:
        mesh.to_host(pending)
        pending = []
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / num_steps

  def trace(self, num_steps: int, log_dir: str):
    """The pure step under jax.profiler: (trace file, op kinds, wall s)."""
    jax.block_until_ready(self.state)

    def one_step():
      self.state, metrics = self.step_fn(self.state, self.fixed)
      return self.state, metrics

    path, wall = profiling.trace(one_step, num_steps, log_dir)
    return path, profiling.op_kinds(path), wall

  def close(self) -> None:
    self.batches.close()


class TorchRow:
  """The baseline network and its training step in PyTorch eager mode."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               batch: dict, threads: int):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise app.UsageError(
          "--torch needs PyTorch: pip install -e \".[torch]\"") from e
    self.torch = torch
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    depth = build.parse_depth(config.model.backbone)
    self.model = _torch_baseline(torch, depth, config.model.width_multiplier,
                                 config.model.last_stride, num_classes)
    decay = [p for p in self.model.parameters() if p.ndim > 1]
    other = [p for p in self.model.parameters() if p.ndim <= 1]
    self.optimizer = torch.optim.Adam(
        [{"params": decay, "weight_decay": config.optimizer.weight_decay},
         {"params": other, "weight_decay": 0.0}],
        lr=config.optimizer.learning_rate)
    # NHWC -> NCHW once: the input of every timed step.
    self.images = [torch.from_numpy(np.ascontiguousarray(
        np.asarray(batch[m]).transpose(0, 3, 1, 2))) for m in MODALITIES]
    self.labels = torch.from_numpy(np.asarray(batch["label"]).astype(np.int64))
    self.margin = config.loss.triplet_margin
    self.soft = config.loss.triplet_soft_margin
    self.smoothing = config.loss.label_smoothing
    self.weights = (config.loss.ce_weight, config.loss.triplet_weight)
    self.model.train()

  def _loss(self):
    torch = self.torch
    total = 0.0
    for features, logits in self.model(self.images):
      ce = torch.nn.functional.cross_entropy(logits, self.labels,
                                             label_smoothing=self.smoothing)
      total = total + self.weights[0] * ce + self.weights[1] * _torch_triplet(
          torch, features, self.labels, self.margin, self.soft)
    return total

  def time_step(self, num_steps: int) -> float:
    start = time.perf_counter()
    for _ in range(num_steps):
      self.optimizer.zero_grad(set_to_none=True)
      loss = self._loss()
      loss.backward()
      self.optimizer.step()
    float(loss.detach())
    return (time.perf_counter() - start) / num_steps


def _torch_triplet(torch, features, labels, margin: float, soft: bool):
  """Batch-hard triplet loss, as facenet_jax.losses.batch_hard_triplet."""
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


def _torch_baseline(torch, depth: int, width_multiplier: float,
                    last_stride: int, num_classes: int):
  """Three torchvision-layout ResNet streams with GAP, BN neck, classifier."""
  nn = torch.nn
  kind, blocks = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                  50: ("bottleneck", (3, 4, 6, 3)),
                  101: ("bottleneck", (3, 4, 23, 3))}[depth]
  widths = [max(1, int(round(w * width_multiplier)))
            for w in (64, 128, 256, 512)]
  expansion = 1 if kind == "basic" else 4

  def conv_bn(cin, cout, k, stride):
    return [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False),
            nn.BatchNorm2d(cout)]

  class Block(nn.Module):

    def __init__(self, cin, width, stride):
      super().__init__()
      cout = width * expansion
      if kind == "basic":
        layers = (conv_bn(cin, width, 3, stride) + [nn.ReLU()] +
                  conv_bn(width, cout, 3, 1))
      else:
        layers = (conv_bn(cin, width, 1, 1) + [nn.ReLU()] +
                  conv_bn(width, width, 3, stride) + [nn.ReLU()] +
                  conv_bn(width, cout, 1, 1))
      self.body = nn.Sequential(*layers)
      self.down = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                   if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      return torch.relu(self.body(x) + self.down(x))

  class Stream(nn.Module):

    def __init__(self):
      super().__init__()
      layers = conv_bn(3, widths[0], 7, 2) + [nn.ReLU(),
                                               nn.MaxPool2d(3, 2, 1)]
      cin = widths[0]
      for stage, (width, count) in enumerate(zip(widths, blocks)):
        stride = (1, 2, 2, last_stride)[stage]
        for b in range(count):
          layers.append(Block(cin, width, stride if b == 0 else 1))
          cin = width * expansion
      self.body = nn.Sequential(*layers)
      self.neck = nn.BatchNorm1d(cin)
      self.neck.bias.requires_grad_(False)
      self.classifier = nn.Linear(cin, num_classes, bias=False)

    def forward(self, x):
      features = self.body(x).mean((2, 3))
      return features, self.classifier(self.neck(features))

  class Baseline(nn.Module):

    def __init__(self):
      super().__init__()
      self.streams = nn.ModuleList([Stream() for _ in MODALITIES])

    def forward(self, images):
      return [s(x) for s, x in zip(self.streams, images)]

  return Baseline()


def _describe(config: ml_collections.ConfigDict) -> str:
  m = config.model
  h, w = config.input_size
  return (f"{m.backbone} x{m.width_multiplier:g}, {h}x{w}, batch "
          f"{config.ids_per_batch * config.instances_per_id}, {m.dtype}")


def _network(config: ml_collections.ConfigDict) -> str:
  return "baseline" if is_baseline(config) else "FACENet (config)"


def _load_data(config: ml_collections.ConfigDict) -> tuple[pipeline.SplitData,
                                                          str]:
  if _DATA.value == "generated":
    per_id = max(2 * config.instances_per_id, 8)
    num_ids = max(2 * config.ids_per_batch, 16)
    h, w = config.input_size
    return (generated.generated_split(num_ids, per_id, h, w),
            f"generated JPEG {h}x{w}")
  return (feed.split_data(config, "train"),
          f"{config.dataset}/{config.dataset_config}[train]")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (_STEPS, _ROUNDS):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  if _WARMUP.value < 0:
    raise app.UsageError(f"--warmup must be >= 0, got {_WARMUP.value}")
  config = _CONFIG.value
  data, source = _load_data(config)
  configs = [config]
  if _TORCH.value and not is_baseline(config):
    configs.append(baseline_of(config))
  devices = jax.devices()
  print(f"{_describe(config)}; input {source}, {data.num_examples} triplets; "
        f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})",
        flush=True)

  jax_rows = []
  for c in configs:
    rows = JaxRows(c, data)
    rows.warm_up(_WARMUP.value)
    jax_rows.append(rows)
    logging.info("%s: compiled; input ready in %.1f s", _network(c),
                 rows.input_seconds)
  torch_row = None
  if _TORCH.value:
    torch_row = TorchRow(configs[-1], len(pipeline.train_label_map(data)),
                         mesh.to_host(jax_rows[-1].fixed),
                         _TORCH_THREADS.value)
    torch_row.time_step(max(1, _WARMUP.value))

  # name -> per-round seconds per step.
  times: dict[tuple[str, str], list[float]] = {}
  timers: list[tuple[tuple[str, str], Callable[[int], float]]] = []
  for rows in jax_rows:
    timers.append((("jax step", _network(rows.config)), rows.time_step))
    timers.append((("jax loop", _network(rows.config)), rows.time_loop))
  if torch_row is not None:
    timers.append((("torch eager", "baseline"), torch_row.time_step))
  for _ in range(_ROUNDS.value):
    for key, timer in timers:
      times.setdefault(key, []).append(timer(_STEPS.value))
  trace = None
  if _TRACE_DIR.value:
    trace = jax_rows[0].trace(_STEPS.value, _TRACE_DIR.value)
  for rows in jax_rows:
    rows.close()

  median = {k: statistics.median(v) for k, v in times.items()}
  batch = config.ids_per_batch * config.instances_per_id
  flops = {_network(r.config): r.flops for r in jax_rows}
  peak = hardware.device_peak(devices[0].device_kind)
  torch_seconds = median.get(("torch eager", "baseline"))
  print("| what | network | ms/step | steps/s | triplets/s | vs torch | "
        "TFLOP/s | % peak |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for (what, network), seconds in median.items():
    ratio = (f"{torch_seconds / seconds:.2f}x" if torch_seconds and
             network == "baseline" and what != "torch eager" else "-")
    # XLA counts the FLOPs of one device's (partitioned) program.
    tflops = flops.get(network, float("nan")) / seconds / 1e12
    achieved = f"{tflops:.3f}" if what != "torch eager" else "-"
    share = (f"{100 * tflops / peak:.1f}" if peak and what != "torch eager"
             else "-")
    print(f"| {what} | {network} | {1e3 * seconds:.1f} | {1 / seconds:.3g} | "
          f"{batch / seconds:.1f} | {ratio} | {achieved} | {share} |")
  for rows in jax_rows:
    network = _network(rows.config)
    print(f"loop/step ({network}): "
          f"{median[('jax step', network)] / median[('jax loop', network)]:.2f}"
          f" (throughput of the loop over the pure step)")
  if torch_seconds:
    print(f"JAX/PyTorch (baseline): step "
          f"{torch_seconds / median[('jax step', 'baseline')]:.2f}x, loop "
          f"{torch_seconds / median[('jax loop', 'baseline')]:.2f}x "
          "(PyTorch time over JAX time: > 1 means JAX is faster)")
  print(f"median of {_ROUNDS.value} rounds x {_STEPS.value} steps; XLA FLOPs "
        f"per step: " + ", ".join(f"{n} {f / 1e9:.1f} G"
                                  for n, f in flops.items()))
  if trace is not None:
    path, kinds, wall = trace
    print(f"\nWhere the step's time goes ({_network(config)}, {_STEPS.value} "
          f"pure steps traced; {path}):")
    print(profiling.table(kinds, _STEPS.value, wall))


if __name__ == "__main__":
  app.run(main)
