"""Benchmark rows in processes of their own, pinned to the same CPUs.

A comparison of two frameworks on a CPU is fair only if each runs alone, in
its own process, on the same cores with as many threads: two thread pools in
one process compete for the cores. `Worker` starts such a process (a
benchmark script started again with a serving flag), reads the one JSON line
of facts it prints once ready, then sends one request line per timing and
reads one JSON reply line. Lines that are not JSON (a library's log) are
skipped.

  scripts/benchmark_train.py --torch, scripts/benchmark_ops.py
"""

import json
import os
import subprocess
from typing import Any, Optional, Sequence


def pinned_cpus(threads: int) -> list[int]:
  """The first `threads` CPUs this process may use (0: all of them)."""
  cpus = sorted(os.sched_getaffinity(0))
  return cpus[:min(threads or len(cpus), len(cpus))]


class Worker:
  """A framework's process: one JSON line of facts, then request -> reply."""

  def __init__(self, argv: Sequence[str], cpus: Sequence[int],
               env: Optional[dict[str, str]] = None):
    self.process = subprocess.Popen(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=env, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    self.facts = self._reply()

  def _reply(self) -> Any:
    for line in self.process.stdout:
      if line.startswith(("{", "[")):
        return json.loads(line)
    raise SystemExit(f"error: {os.path.basename(self.process.args[1])} "
                     f"ended with status {self.process.wait()} (its errors "
                     "are above)")

  def ask(self, request: str) -> Any:
    """Sends one request line; returns the parsed reply line."""
    self.process.stdin.write(request + "\n")
    self.process.stdin.flush()
    return self._reply()

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait()
