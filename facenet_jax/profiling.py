"""Where a jitted program's time goes: a jax.profiler trace, summed by op kind.

`trace` records a few calls of a function with `jax.profiler` (the Perfetto
JSON that JAX writes beside the TensorBoard profile); `op_kinds` reads it
back and adds up the time of every XLA operation by kind, the HLO name
without its number (`fusion.12` and `fusion.40` are both `fusion`), so that
a benchmark can print a table a person reads without a trace viewer. The
TensorBoard profile in the same directory opens in TensorBoard's profile
plugin (not installed by this project) for the full timeline.

  python scripts/benchmark_train.py --trace_dir=/tmp/trace
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import time
from typing import Any, Callable

import jax

PERFETTO_FILE = "perfetto_trace.json.gz"
# An HLO instruction's name: its kind, optionally numbered ("fusion.12").
_OP_NAME = re.compile(r"^([A-Za-z_][\w\-]*?)(\.\d+)?$")


def _hlo_op(event: dict) -> str:
  """The HLO instruction a trace event executed, or "".

  JAX's CPU traces mark an operation's execution with args["hlo_op"];
  runtime events (ThunkExecutor::Execute, ParseArguments), Python frames
  and jitted-function calls have none.
  """
  return str((event.get("args") or {}).get("hlo_op") or "")


@dataclasses.dataclass(frozen=True)
class OpKind:
  """The summed events of one kind of operation."""
  name: str
  seconds: float
  count: int


def trace(fn: Callable[[], Any], calls: int, log_dir: str) -> tuple[str, float]:
  """Runs fn() `calls` times under jax.profiler; waits for its results.

  Args:
    fn: what to trace (e.g. one train step); its return value is waited for.
    calls: how many times.
    log_dir: the profile's directory (created).

  Returns:
    The Perfetto trace file written and the traced wall time in seconds.
  """
  os.makedirs(log_dir, exist_ok=True)
  before = set(glob.glob(_pattern(log_dir)))
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
  new = sorted(set(glob.glob(_pattern(log_dir))) - before)
  if not new:
    raise FileNotFoundError(f"jax.profiler wrote no {PERFETTO_FILE} under "
                            f"{log_dir}")
  return new[-1], wall


def _pattern(log_dir: str) -> str:
  return os.path.join(log_dir, "plugins", "profile", "*", PERFETTO_FILE)


def op_kinds(path: str) -> list[OpKind]:
  """The trace's XLA operations summed by kind, the most time first.

  Args:
    path: a Perfetto JSON trace (gzipped) as `trace` writes it.
  """
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  seconds: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  complete = [e for e in events if e.get("ph") == "X"]
  marked = any(_hlo_op(e) for e in complete)
  for event in complete:
    if marked:  # Only the events marked as operations.
      name = _hlo_op(event)
    else:  # A trace without the marks: names that look like HLO ones.
      name = str(event.get("name", ""))
    match = _OP_NAME.match(name)
    if not name or match is None:
      continue
    seconds[match.group(1)] += float(event.get("dur", 0.0)) * 1e-6
    counts[match.group(1)] += 1
  return [OpKind(name, s, counts[name]) for name, s in seconds.most_common()]


def table(kinds: list[OpKind], calls: int, wall: float, most: int = 12) -> str:
  """A markdown table of the kinds per call, with their share of op time.

  Args:
    kinds: from `op_kinds`.
    calls: how many calls the trace holds (the times are divided by it).
    wall: the traced wall time in seconds; op time over wall time says how
      many threads (or streams) were busy on average.
    most: rows shown; the rest are summed into one.
  """
  total = sum(k.seconds for k in kinds)
  lines = ["| op kind | ms per call | share of op time | events per call |",
           "|---|---:|---:|---:|"]
  shown, rest = kinds[:most], kinds[most:]
  if rest:
    shown = shown + [OpKind(f"({len(rest)} other kinds)",
                            sum(k.seconds for k in rest),
                            sum(k.count for k in rest))]
  for k in shown:
    share = 100 * k.seconds / total if total else 0.0
    lines.append(f"| {k.name} | {1e3 * k.seconds / calls:.1f} | "
                 f"{share:.1f} % | {k.count / calls:.0f} |")
  lines.append(f"op time {1e3 * total / calls:.1f} ms per call over "
               f"{1e3 * wall / calls:.1f} ms of wall time: "
               f"{total / wall if wall else 0.0:.2f} threads busy on average")
  return "\n".join(lines)
