r"""Times training: the pure jitted step, the full loop, and PyTorch eager.

For a config (default: the demo config, configs/synthetic.py) it measures:

  jax step   the jitted train step alone, on one fixed batch already on the
             device: what XLA and the hardware give.
  jax loop   the same step fed by the real input (the config's training
             split, cached in memory or streamed as config.input says, put on
             the device ahead of the step) with the training loop's metric
             fetches: what scripts/main.py gets per step.
  torch      (--torch) the same baseline network in plain PyTorch eager mode
             (scripts/benchmark_torch.py), in NCHW and in channels-last
             memory format: three ResNet streams (same depth, width and last
             stride), GAP, BN neck, bias-free classifier; CE + batch-hard
             triplet per stream; Adam with L2 weight decay on kernels; the
             same batch, starting from the JAX model's initial parameters.

Each framework runs in a process of its own (this script started again with
--serve, and scripts/benchmark_torch.py --serve), both pinned to the same
--threads CPUs with as many threads; the processes take turns, one row at a
time, round by round, with a pause between them so that one's spinning
threads do not slow the other, and the median of the rounds is reported.
The PyTorch network is checked against the JAX one before any timing: the
same parameter count, and the same loss at initialisation on the same batch.

FACENet's modules have no PyTorch twin, so with --torch a config that uses
them is also measured as its baseline (use_mfmp, use_fce off, no modality
loss), and the JAX/PyTorch ratio compares the baseline rows. TFLOP/s divide
XLA's FLOP count of the compiled step (a multiply-add is 2 FLOPs) by its
time; "% peak" compares them with the dense bf16 peak of the device kind
where the table below knows it (accelerators; run with
--config.model.dtype=bfloat16 there).

  python scripts/benchmark_train.py --torch
  python scripts/benchmark_train.py --config configs/experiments.py
  python scripts/benchmark_train.py --trace_dir=/tmp/trace   # + op kinds
  python scripts/benchmark_train.py --config configs/wmveid863.py \
      --data=generated --steps=10            # ResNet50, 256x128, no dataset
"""

import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Sequence

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
from facenet_jax import processes  # noqa: E402
from facenet_jax import profiling  # noqa: E402
from facenet_jax.train import build  # noqa: E402
from facenet_jax.train import feed  # noqa: E402
from facenet_jax.train import mesh  # noqa: E402
from facenet_jax.train import steps  # noqa: E402
from facenet_jax.train import train_state  # noqa: E402
from flax import traverse_util  # noqa: E402
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
_THREADS = flags.DEFINE_integer(
    "threads", 0, "CPUs (and threads) of each framework's process: both are "
    "pinned to the first N CPUs; 0 = all of this process's CPUs.")
_FORMATS = flags.DEFINE_list(
    "torch_formats", ["nchw", "channels_last"],
    "PyTorch memory formats to time (--torch), each in its own process.")
_SERVE = flags.DEFINE_string(
    "serve", None, "Internal: be the JAX process; write the batch and the "
    "baseline's initial parameters to this .npz, print one JSON line, then "
    "answer requests read on stdin.")
_PAUSE_SECONDS = 0.5  # Between two processes' turns: spinning threads sleep.

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


def _busy(timer, num_steps: int) -> tuple[float, float]:
  """(seconds per step, CPU seconds of this process per wall second)."""
  cpu = time.process_time()
  start = time.perf_counter()
  seconds = timer(num_steps)
  return seconds, (time.process_time() - cpu) / (time.perf_counter() - start)


def serve(path: str) -> None:
  """The JAX process: builds the rows, then times them on request.

  Writes the fixed batch and the baseline's initial parameters to `path`
  (for the PyTorch process), prints one JSON line of facts, then answers one
  JSON line per request line {"row": i, "what": "step" | "loop" | "trace"}.
  """
  config = _CONFIG.value
  data, source = _load_data(config)
  configs = [config]
  if _TORCH.value and not is_baseline(config):
    configs.append(baseline_of(config))
  rows = [JaxRows(c, data) for c in configs]
  base = rows[-1]
  batch = mesh.to_host(base.fixed)
  arrays = {m: np.asarray(batch[m], np.float32) for m in MODALITIES}
  arrays["label"] = np.asarray(batch["label"])
  params = traverse_util.flatten_dict(mesh.to_host(base.state.params),
                                      sep="/")
  arrays.update({f"params/{k}": np.asarray(v) for k, v in params.items()})
  np.savez(path, **arrays)
  # The loss of the first step is the initial parameters' loss.
  base.state, metrics = base.step_fn(base.state, base.fixed)
  init_loss = float(mesh.to_host(metrics)["train/loss"])
  for r in rows:
    r.warm_up(_WARMUP.value)
    logging.info("%s: compiled; input ready in %.1f s", _network(r.config),
                 r.input_seconds)
  devices = jax.devices()
  print(json.dumps({
      "source": source, "examples": int(data.num_examples),
      "devices": f"{len(devices)} x {devices[0].device_kind} "
                 f"({jax.default_backend()})",
      "device_kind": devices[0].device_kind,
      "rows": [_network(r.config) for r in rows],
      "flops": [r.flops for r in rows],
      "num_classes": len(pipeline.train_label_map(data)),
      "params": sum(int(np.size(v)) for v in params.values()),
      "init_loss": init_loss, "jax": jax.__version__,
      "jaxlib": jax.lib.__version__, "cpus": len(os.sched_getaffinity(0)),
      "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    r = rows[request["row"]]
    if request["what"] == "trace":
      trace_path, kinds, wall = r.trace(request["steps"], request["dir"])
      reply = {"text": f"\nWhere the step's time goes ({_network(r.config)}, "
                       f"{request['steps']} pure steps traced; {trace_path}):"
                       f"\n{profiling.table(kinds, request['steps'], wall)}"}
    else:
      timer = r.time_step if request["what"] == "step" else r.time_loop
      seconds, busy = _busy(timer, request["steps"])
      reply = {"seconds": seconds, "busy": busy}
    print(json.dumps(reply), flush=True)
  for r in rows:
    r.close()


def _child_args(args: Sequence[str]) -> list[str]:
  """This command line without the flags the coordinator sets itself."""
  own = ("--serve", "--noserve", "--trace_dir", "--rounds")
  return [a for a in args if not a.startswith(own)]


def _torch_args(config: ml_collections.ConfigDict, facts: dict, path: str,
                memory_format: str, threads: int) -> list[str]:
  """scripts/benchmark_torch.py's command line for the config's baseline."""
  loss, opt = config.loss, config.optimizer
  if opt.name != "adam" or not config.model.backbone.startswith("resnet"):
    raise app.UsageError("--torch: the PyTorch twin is a ResNet with Adam; "
                         f"got {config.model.backbone} with {opt.name}")
  h, w = config.input_size
  return [
      sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "benchmark_torch.py"),
      "--serve", f"--formats={memory_format}", f"--threads={threads}",
      f"--depth={build.parse_depth(config.model.backbone)}",
      f"--width_multiplier={config.model.width_multiplier}",
      f"--last_stride={config.model.last_stride}", f"--input_size={h},{w}",
      f"--batch={config.ids_per_batch},{config.instances_per_id}",
      f"--num_classes={facts['num_classes']}",
      f"--learning_rate={opt.learning_rate}",
      f"--weight_decay={opt.weight_decay}",
      f"--triplet_margin={loss.triplet_margin}",
      f"--triplet_soft_margin={loss.triplet_soft_margin}",
      f"--label_smoothing={loss.label_smoothing}",
      f"--ce_weight={loss.ce_weight}",
      f"--triplet_weight={loss.triplet_weight}",
      f"--warmup={max(1, _WARMUP.value)}", f"--init_file={path}"]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (_STEPS, _ROUNDS):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  if _WARMUP.value < 0 or _THREADS.value < 0:
    raise app.UsageError("--warmup and --threads must be >= 0")
  if _TORCH.value and importlib.util.find_spec("torch") is None:
    raise SystemExit('error: --torch needs PyTorch: pip install -e ".[torch]"')
  if _SERVE.value:
    serve(_SERVE.value)
    return
  config = _CONFIG.value
  cpus = processes.pinned_cpus(_THREADS.value)
  threads = len(cpus)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "init.npz")
    jax_worker = processes.Worker(
        [sys.executable, os.path.abspath(__file__), f"--serve={path}",
         *_child_args(sys.argv[1:])], cpus)
    facts = jax_worker.facts
    workers = [jax_worker]
    for memory_format in (_FORMATS.value if _TORCH.value else []):
      workers.append(processes.Worker(
          _torch_args(baseline_of(config), facts, path, memory_format,
                      threads), cpus))
    # (worker, request, row name, network) in the order of a round.
    rows = []
    for i, network in enumerate(facts["rows"]):
      for what in ("step", "loop"):
        rows.append((jax_worker, {"row": i, "what": what},
                     f"jax {what}", network))
    for memory_format, worker in zip(_FORMATS.value, workers[1:]):
      rows.append((worker, {}, f"torch {memory_format}", "baseline"))
    times: dict[tuple[str, str], list[float]] = {}
    busy: dict[tuple[str, str], list[float]] = {}
    for round_index in range(_ROUNDS.value):
      # Each round in the other order, so that no row always follows another.
      order = rows if round_index % 2 == 0 else rows[::-1]
      for k, (worker, request, what, network) in enumerate(order):
        if k and order[k - 1][0] is not worker:
          time.sleep(_PAUSE_SECONDS)
        reply = worker.ask(json.dumps({**request, "steps": _STEPS.value})
                           if request else str(_STEPS.value))
        times.setdefault((what, network), []).append(reply["seconds"])
        busy.setdefault((what, network), []).append(reply["busy"])
    trace = None
    if _TRACE_DIR.value:
      time.sleep(_PAUSE_SECONDS)
      trace = jax_worker.ask(json.dumps(
          {"row": 0, "what": "trace", "steps": _STEPS.value,
           "dir": os.path.abspath(_TRACE_DIR.value)}))["text"]
    for worker in workers:
      worker.close()
  _print_table(config, facts, [w.facts for w in workers[1:]], times, busy,
               threads, trace)


def _print_table(config: ml_collections.ConfigDict, facts: dict,
                 torch_facts: list[dict], times: dict, busy: dict,
                 threads: int, trace) -> None:
  """The rows' medians, the versions and the check of the PyTorch twin."""
  median = {k: statistics.median(v) for k, v in times.items()}
  batch = config.ids_per_batch * config.instances_per_id
  flops = dict(zip(facts["rows"], facts["flops"]))
  peak = hardware.device_peak(facts["device_kind"])
  torch_rows = {k: v for k, v in median.items() if k[0].startswith("torch")}
  fastest = min(torch_rows, key=torch_rows.get) if torch_rows else None
  torch_seconds = torch_rows.get(fastest)
  versions = f"jax {facts['jax']}, jaxlib {facts['jaxlib']}"
  if torch_facts:
    versions += f", torch {torch_facts[0]['torch']}"
  print(f"{_describe(config)}; input {facts['source']}, {facts['examples']} "
        f"triplets; {facts['devices']}")
  print(f"{versions}; Python {platform.python_version()}; each framework in "
        f"its own process, pinned to {threads} CPU(s) with {threads} "
        f"thread(s) (the JAX process saw {facts['cpus']} CPU(s); "
        f"XLA_FLAGS={facts['xla_flags'] or '(none)'})")
  if torch_facts:
    t = torch_facts[0]
    print(f"PyTorch twin: {t['params']:,} parameters (JAX {facts['params']:,}"
          f"); loss at init on the same batch and initial parameters "
          f"{t['init_loss']:.5f} (JAX {facts['init_loss']:.5f}, difference "
          f"{abs(t['init_loss'] - facts['init_loss']):.1e}); "
          f"{t['flops'] / 1e9:.1f} GFLOP per step in convolutions and "
          "matrix products (PyTorch's count)")
  print("| what | network | ms/step | steps/s | triplets/s | vs torch | "
        "TFLOP/s | % peak | cores busy |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
  for (what, network), seconds in median.items():
    is_jax = what.startswith("jax")
    ratio = (f"{torch_seconds / seconds:.2f}x" if torch_seconds and
             network == "baseline" else "-")
    # XLA counts the FLOPs of one device's (partitioned) program.
    tflops = flops.get(network, float("nan")) / seconds / 1e12
    achieved = f"{tflops:.3f}" if is_jax else "-"
    share = f"{100 * tflops / peak:.1f}" if peak and is_jax else "-"
    print(f"| {what} | {network} | {1e3 * seconds:.1f} | {1 / seconds:.3g} | "
          f"{batch / seconds:.1f} | {ratio} | {achieved} | {share} | "
          f"{statistics.median(busy[(what, network)]):.2f} |")
  for network in facts["rows"]:
    print(f"loop/step ({network}): "
          f"{median[('jax step', network)] / median[('jax loop', network)]:.2f}"
          f" (throughput of the loop over the pure step)")
  if torch_seconds:
    print(f"JAX/PyTorch (baseline, against {fastest[0]}): step "
          f"{torch_seconds / median[('jax step', 'baseline')]:.2f}x, loop "
          f"{torch_seconds / median[('jax loop', 'baseline')]:.2f}x "
          "(PyTorch time over JAX time: > 1 means JAX is faster)")
  if "FACENet (config)" in flops and "baseline" in flops:
    print(f"FACENet step / baseline step: "
          f"{median[('jax step', 'FACENet (config)')] / median[('jax step', 'baseline')]:.2f}")
  print(f"median of {_ROUNDS.value} rounds x {_STEPS.value} steps; XLA FLOPs "
        f"per step: " + ", ".join(f"{n} {f / 1e9:.1f} G"
                                  for n, f in flops.items()))
  if trace is not None:
    print(trace)


if __name__ == "__main__":
  app.run(main)
