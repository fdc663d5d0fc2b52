"""Several processes: start jax.distributed, and stop cleanly when one is lost.

A process of a multi-host run that dies (a node lost, an out-of-memory kill)
leaves the others waiting in a collective: on GPUs NCCL waits for ever, on
CPUs Gloo fails the collective at once and JAX's shutdown then waits for the
dead process. JAX's coordination service ends every process once a peer has
missed its heartbeats for `heartbeat_timeout_seconds`, but with a C++ abort
and a stack dump that do not say what to do.

`PeerWatch` makes that a clear, bounded stop: a daemon thread in each process
counts a beat in JAX's key-value store every second and watches the others'
counts. A peer whose count has not moved for `timeout` seconds (or a
coordinator that no longer answers) is lost: the thread prints one line
naming it, the run's last checkpoint and how to resume, and ends the process
with LOST_PEER_STATUS. JAX's own heartbeat timeout is set `_BACKSTOP` seconds
later, as the backstop. The beats run in their own thread, so a long
compile, evaluation or checkpoint in the main thread does not stop them.
"""

import os
import re
import sys
import threading
import time
from typing import Callable, Optional

from absl import logging
import jax

# The exit status of a process that stopped because a peer was lost (the
# next after loop.INTERRUPTED_STATUS).
LOST_PEER_STATUS = 76
DEFAULT_TIMEOUT = 60
# JAX's heartbeat timeout is this much longer than the watch's.
_BACKSTOP = 30
_PREFIX = "facenet_jax/peers"
_STATUS = re.compile(r"(UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|"
                     r"ABORTED|CANCELLED|FAILED_PRECONDITION): ")


def initialize(coordinator_address: Optional[str],
               num_processes: Optional[int], process_id: Optional[int],
               timeout: int = DEFAULT_TIMEOUT) -> None:
  """jax.distributed.initialize with heartbeats bounded by `timeout`."""
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=timeout + _BACKSTOP,
                             shutdown_timeout_seconds=timeout + _BACKSTOP)


def _from_the_runtime(error: BaseException) -> bool:
  """Whether `error` comes from XLA's runtime (a failed collective, an RPC).

  JaxRuntimeError, or a ValueError carrying an absl status code ("UNKNOWN:
  Gloo AllGather failed ..." from a cross-process gather).
  """
  return isinstance(error, jax.errors.JaxRuntimeError) or bool(
      _STATUS.match(str(error)))


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


class PeerWatch:
  """Beats for this process and ends it when another stops beating.

  Use as a context manager around the work of a multi-process run; outside
  one (a single process) it does nothing. On a normal exit from the block
  (or sys.exit) the process marks itself done, so that a peer still
  finishing its own work does not count it as lost.
  """

  def __init__(self, timeout: float, message: Callable[[str], str],
               interval: float = 1.0):
    """Args:
      timeout: seconds without a peer's beat before it counts as lost.
      message: from the lost peer's description to the line printed.
      interval: seconds between beats.
    """
    self.timeout = timeout
    self.interval = interval
    self._message = message
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self) -> "PeerWatch":
    if jax.process_count() > 1:
      self._thread = threading.Thread(target=self._run, name="peer-watch",
                                      daemon=True)
      self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._thread is None:
      return
    logging.info("Leaving the peer watch: %s", exc_type and repr(exc)[:300])
    if exc_type is None or issubclass(exc_type, SystemExit):
      # Finished, or stopped with all the others (a signal): not lost.
      self._stop.set()
      self._thread.join()
      _client().key_value_set(f"{_PREFIX}/done/{jax.process_index()}", "1",
                              allow_overwrite=True)
    elif _from_the_runtime(exc):
      # A collective that failed because a peer died (Gloo's "connection
      # closed by peer") is reported here first: give the watch its time
      # to name the peer and end the process; if it does not, the error
      # goes on as raised.
      time.sleep(self.timeout + 5 * self.interval)
    # Any other error ends this process as raised; the others then count
    # it as lost.

  def _run(self) -> None:
    me, count = jax.process_index(), jax.process_count()
    client = _client()
    others = [p for p in range(count) if p != me]
    seen = {p: None for p in others}
    start = last_answer = time.monotonic()
    changed = {p: start for p in others}
    beat = 0
    while not self._stop.wait(self.interval):
      now = time.monotonic()
      try:
        beat += 1
        client.key_value_set(f"{_PREFIX}/beat/{me}", str(beat),
                             allow_overwrite=True)
        beats = dict(client.key_value_dir_get(f"{_PREFIX}/beat/"))
        done = dict(client.key_value_dir_get(f"{_PREFIX}/done/"))
      except Exception as e:  # pylint: disable=broad-except
        # The coordinator (process 0) runs the store: no answer for the
        # whole timeout means it is gone.
        if now - last_answer > self.timeout:
          self._give_up(f"the coordinator (process 0 of {count}) stopped "
                        f"answering for {self.timeout:.0f} s ({e})")
          return
        continue
      last_answer = now
      for p in others:
        if f"{_PREFIX}/done/{p}" in done:
          continue
        value = beats.get(f"{_PREFIX}/beat/{p}")
        if value != seen[p]:
          seen[p], changed[p] = value, now
        elif now - changed[p] > self.timeout:
          self._give_up(f"process {p} of {count} stopped responding (no "
                        f"heartbeat for {self.timeout:.0f} s)")
          return

  def _give_up(self, lost: str) -> None:
    # The main thread may be waiting in __exit__: it must not wake up and
    # print its error's traceback before this line and the exit.
    line = self._message(lost)
    logging.warning("%s", line)
    for handler in logging.get_absl_logger().handlers:
      handler.flush()
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: the main thread may be blocked in a collective, and
    # JAX's shutdown at exit would wait for the lost process.
    os._exit(LOST_PEER_STATUS)  # pylint: disable=protected-access
