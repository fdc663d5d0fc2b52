r"""Times XLA CPU flags on the train step: compile and run, default alongside.

Each flag set runs in a fresh process (XLA reads its flags once, at backend
start), on the same generated batch: the jitted state initialisation and
train step of the config are compiled and the step is timed. The default
flags run first and again last, so that drift of the machine shows in the
table; ratios are against the mean of the two default rows.

  python scripts/benchmark_xla_flags.py                  # the demo config
  python scripts/benchmark_xla_flags.py --steps=10 \
      --flag_sets="--xla_cpu_use_onednn=true;--xla_cpu_enable_fast_math=true"
"""

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The flags tried for docs/performance.md (XLA's CPU backend in jaxlib 0.10).
FLAG_SETS = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_backend_optimization_level=1",
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "synthetic.py"),
    "Training configuration (default: the demo config).", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per flag set.")
_FLAG_SETS = flags.DEFINE_string(
    "flag_sets", ";".join(FLAG_SETS),
    "Flag sets to try, separated by ';' (each a space-separated XLA_FLAGS).")
_CHILD = flags.DEFINE_bool("child", False,
                           "Internal: time this process's flags, print JSON.")


def _time_here(config, num_steps: int) -> dict:
  """Compile and step times of the config under this process's XLA flags."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import input_pipeline  # noqa: F401  pylint: disable=g-import-not-at-top
  from facenet_jax.train import build  # pylint: disable=g-import-not-at-top
  from facenet_jax.train import feed  # pylint: disable=g-import-not-at-top
  from facenet_jax.train import mesh  # pylint: disable=g-import-not-at-top
  from facenet_jax.train import steps  # pylint: disable=g-import-not-at-top
  from facenet_jax.train import train_state  # pylint: disable=g-import-not-at-top
  from input_pipeline import generated  # pylint: disable=g-import-not-at-top
  h, w = config.input_size
  data = generated.generated_split(max(2 * config.ids_per_batch, 16),
                                   max(2 * config.instances_per_id, 8), h, w)
  sharding = mesh.Sharding.create()
  num_classes = len(set(data.pid.tolist()))
  model = build.build_model(config, num_classes)
  schedule = build.learning_rate_schedule(config, 100)
  optimizer = build.build_optimizer(config, schedule)
  start = time.perf_counter()
  state = jax.jit(functools.partial(train_state.create_state, model, optimizer,
                                    tuple(config.input_size)),
                  out_shardings=sharding.replicated)(jax.random.key(0))
  jax.block_until_ready(state)
  init_seconds = time.perf_counter() - start
  batches = feed.input_batches(config, data, sharding, 0)
  batch = next(batches)
  batches.close()
  step_fn = steps.compile_train_step(model, optimizer,
                                     build.loss_config(config), schedule,
                                     sharding)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {"init_s": init_seconds, "compile_s": compile_seconds,
          "step_ms": 1e3 * statistics.median(times),
          "loss": float(metrics["train/loss"])}


def _run_child(flag_set: str, argv_config: list) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if flag_set:
    env["XLA_FLAGS"] = flag_set
  done = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--child",
       f"--steps={_STEPS.value}", *argv_config], env=env,
      capture_output=True, text=True, check=False)
  if done.returncode:
    return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def _config_args(args: Sequence[str]) -> list:
  """The command line without this script's own flags: what the children get."""
  own = ("--flag_sets", "--steps", "--child", "--nochild")
  out, skip = [], False
  for arg in args:
    if skip:
      skip = False
    elif arg in own[:2]:
      skip = True  # "--steps 5": the value is the next argument.
    elif not arg.startswith(own):
      out.append(arg)
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _STEPS.value < 1:
    raise app.UsageError(f"--steps must be >= 1, got {_STEPS.value}")
  if _CHILD.value:
    print(json.dumps(_time_here(_CONFIG.value, _STEPS.value)))
    return
  config_args = _config_args(sys.argv[1:])
  sets = [s.strip() for s in _FLAG_SETS.value.split(";") if s.strip()]
  rows = [("(default)", _run_child("", config_args))]
  for flag_set in sets:
    print(f"timing {flag_set} ...", file=sys.stderr, flush=True)
    rows.append((flag_set, _run_child(flag_set, config_args)))
  rows.append(("(default, again)", _run_child("", config_args)))
  reference = [r for name, r in rows if name.startswith("(default")
               and "step_ms" in r]
  if not reference:
    raise SystemExit("error: the default flags failed: " +
                     rows[0][1].get("error", ""))
  ref_step = statistics.mean(r["step_ms"] for r in reference)
  ref_compile = statistics.mean(r["compile_s"] for r in reference)
  print(f"{_STEPS.value} steps per set, median step; ratios against the "
        f"mean of the two default rows (step {ref_step:.1f} ms, compile "
        f"{ref_compile:.1f} s)")
  print("| XLA_FLAGS | init compile s | step compile s | ms/step | "
        "step speed-up | final loss |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, r in rows:
    if "error" in r:
      print(f"| `{name}` | failed: {r['error'][:80]} | | | | |")
      continue
    print(f"| `{name}` | {r['init_s']:.1f} | {r['compile_s']:.1f} | "
          f"{r['step_ms']:.1f} | {ref_step / r['step_ms']:.2f}x | "
          f"{r['loss']:.4f} |")


if __name__ == "__main__":
  app.run(main)
