"""XLA settings of the suite, and the environment of the scripts it runs.

XLA's CPU compiles dominate this suite: the tiny programs run a few steps
each. Backend optimisation level 1 (of 0-3; the default is 2) measured
here: the tiny model's state initialisation compiled in 9 s instead of 28 s
and its train step in 15 s instead of 18 s, for 16 % slower steps. Only
the tests use it; scripts and benchmarks run at XLA's default.
"""

import os
import socket

COMPILE_FLAGS = "--xla_backend_optimization_level=1"


def script_env() -> dict:
  """os.environ for a script subprocess: one CPU device, the suite's flags."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = COMPILE_FLAGS
  return env


def free_port() -> int:
  """A TCP port free on localhost now, for a coordinator of test processes."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]
