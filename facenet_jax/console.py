"""What a person sees of a run: a short header, progress bars, the results.

scripts/main.py shows a `Console`; the library takes one as an optional
argument and is silent without it. Library logs (absl INFO of this code,
Orbax, TFDS, clu's overviews) go to WORKDIR/log.txt (`route_logs`); with
absl's --verbosity >= 1 they reach the console as well.

A progress bar is live (tqdm, redrawn in place) when the stream is a
terminal. Otherwise (CI, nohup, a pipe) it prints a plain line at most every
`interval` seconds and at the end: no carriage returns in a log file.

The scripts share the rest of the chrome from here: the native start-up lines
held back (`quiet_imports`), the log file and a user error as one line with
exit status 2 (`parse_flags`, `session`). This module imports no JAX
or TensorFlow, so the scripts can import it before them.
"""

import ast
import contextlib
import logging as std_logging
import os
import sys
import tempfile
import time
from typing import Iterator, Optional, Sequence, TextIO

from absl import flags
from absl import logging

LOG_FILE = "log.txt"
PARAMETERS_FILE = "parameters.txt"


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return (f"{hours}:{minutes:02d}:{seconds:02d}" if hours else
          f"{minutes}:{seconds:02d}")


class Progress:
  """One progress bar over `total` units (steps or batches)."""

  def __init__(self, stream: Optional[TextIO], total: int, desc: str,
               unit: str, initial: int, live: bool, interval: float):
    self._stream = stream
    self._total = max(0, int(total))
    self._desc = desc
    self._unit = unit
    self._initial = self._n = int(initial)
    self._postfix: dict[str, str] = {}
    self._start = self._last_line = time.perf_counter()
    self._interval = interval
    self._bar = None
    if stream is not None and live:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=self._total, initial=self._n, desc=desc,
                            unit=unit, file=stream, dynamic_ncols=True,
                            leave=True)

  def update(self, n: int, **postfix: float) -> None:
    """Moves the bar to position n; postfix values are shown beside it."""
    self._postfix.update({k: f"{v:.4g}" for k, v in postfix.items()})
    if self._bar is not None:
      self._bar.update(n - self._bar.n)
      if postfix:
        self._bar.set_postfix(self._postfix, refresh=False)
    self._n = n
    now = time.perf_counter()
    if self._bar is None and self._stream is not None and (
        now - self._last_line >= self._interval or n >= self._total):
      self._last_line = now
      self._stream.write(self.line(now) + "\n")
      self._stream.flush()

  def line(self, now: Optional[float] = None) -> str:
    """The plain-text state: 'desc 120/568 (21%)  loss 3.2  2.4 step/s  ETA 3:06'."""
    now = time.perf_counter() if now is None else now
    done = self._n - self._initial
    elapsed = max(now - self._start, 1e-9)
    parts = [f"{self._desc} {self._n}/{self._total}"]
    if self._total:
      parts[0] += f" ({100 * self._n // self._total}%)"
    parts += [f"{k} {v}" for k, v in self._postfix.items()]
    if done > 0:
      rate = done / elapsed
      parts.append(f"{rate:.2f} {self._unit}/s")
      left = self._total - self._n
      parts.append(f"ETA {_clock(left / rate)}" if left > 0 else
                   f"took {_clock(elapsed)}")
    return "  ".join(parts)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Console:
  """Prints for a person; a disabled console prints nothing.

  Attributes:
    stream: where it prints (None = disabled).
    live: redraw progress bars in place (default: the stream is a terminal).
    interval: seconds between the plain progress lines when not live.
  """

  def __init__(self, stream: Optional[TextIO] = None, enabled: bool = True,
               live: Optional[bool] = None, interval: float = 30.0):
    self.stream = (stream or sys.stdout) if enabled else None
    if live is None:
      live = bool(self.stream is not None and
                  getattr(self.stream, "isatty", lambda: False)())
    self.live = live
    self.interval = interval

  @property
  def enabled(self) -> bool:
    return self.stream is not None

  def print(self, text: str = "") -> None:
    if self.stream is not None:
      self.stream.write(text + "\n")
      self.stream.flush()

  def progress(self, total: int, desc: str, unit: str = "step",
               initial: int = 0) -> Progress:
    return Progress(self.stream, total, desc, unit, initial, self.live,
                    self.interval)


# A console that prints nothing: the library's default.
SILENT = Console(enabled=False)


def route_logs(workdir: str, verbosity: int) -> str:
  """Sends every log record to WORKDIR/log.txt; the console only at verbosity.

  Python and absl logging (this code, Orbax, clu, TFDS) and Python warnings
  are appended to the file. Below verbosity 1 the console's log handler only
  passes errors, and TFDS's progress bars are switched off.

  Returns:
    The log file's path.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOG_FILE)
  handler = std_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())
  handler.setLevel(std_logging.DEBUG if verbosity >= 1 else std_logging.INFO)
  root = std_logging.getLogger()
  root.addHandler(handler)
  # The file gets INFO even where absl's verbosity was left lower.
  if logging.get_verbosity() < logging.INFO:
    logging.set_verbosity(logging.INFO)
  std_logging.captureWarnings(True)
  if verbosity < 1:
    logging.get_absl_handler().setLevel(std_logging.ERROR)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
  return path


def start_script_logs(workdir: str, verbosity: int, startup_text: str) -> str:
  """`route_logs`, then the native libraries' start-up lines into the log.

  Args:
    workdir: the run directory.
    verbosity: absl's --verbosity.
    startup_text: what `NativeStartupLines` caught while the script imported.

  Returns:
    The log file's path.
  """
  path = route_logs(workdir, verbosity)
  if startup_text.strip():
    logging.info("Start-up output of native libraries:\n%s",
                 startup_text.rstrip())
  return path


# --- The scripts' chrome ------------------------------------------------------

# Errors that mean "the input is wrong", not "the code is": bad config values,
# datasets, checkpoints (ValueError and its subclasses), a missing file, a
# training that diverged, a workdir that cannot be written (a full or
# read-only disk). Shown as one line with exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError,
               PermissionError)
USER_ERROR_STATUS = 2


def verbose_requested(argv: Sequence[str]) -> bool:
  """Whether the command line sets absl's --verbosity (or -v)."""
  return any(a.startswith(("--verbosity", "-v")) for a in argv[1:])


def quiet_imports(argv: Optional[Sequence[str]] = None) -> "NativeStartupLines":
  """A script's heavy imports go in `with quiet_imports() as startup:`.

  Unless the command line asks for --verbosity, TensorFlow's C++ INFO lines
  are switched off and what native libraries still print while they load is
  held back for the log (`session` writes it there).

  Args:
    argv: the command line (default sys.argv).
  """
  verbose = verbose_requested(sys.argv if argv is None else argv)
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return NativeStartupLines(active=not verbose)


class NativeStartupLines:
  """Holds back what C++ libraries write to fd 2 while they are imported.

  TensorFlow prints start-up lines (oneDNN, absl::InitializeLog) that no
  environment variable silences; below --verbosity=1 they go to log.txt
  (`text`) instead of the console. If the imports fail, they are printed.
  """

  def __init__(self, active: bool):
    self.active = active
    self.text = ""

  def __enter__(self):
    if self.active:
      sys.stderr.flush()
      self._file = tempfile.TemporaryFile()
      self._saved = os.dup(2)
      os.dup2(self._file.fileno(), 2)
    return self

  def __exit__(self, exc_type, *_):
    if self.active:
      sys.stderr.flush()
      os.dup2(self._saved, 2)
      os.close(self._saved)
      self._file.seek(0)
      self.text = self._file.read().decode("utf-8", "replace")
      self._file.close()
      if exc_type is not None:
        sys.stderr.write(self.text)


def one_line(error: BaseException) -> str:
  """An exception's message as one line (its lines joined by "; ")."""
  text = str(error)
  # ml_collections re-raises a KeyError's repr ("'\\'field\\'\\nDid you
  # mean ...'"): unquote it.
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return "; ".join(lines) or type(error).__name__


def user_error(message: str, log_file: str = "") -> None:
  """Prints "error: message" on stderr and exits with USER_ERROR_STATUS."""
  where = f" (traceback in {log_file})" if log_file else ""
  print(f"error: {message}{where}", file=sys.stderr)
  sys.exit(USER_ERROR_STATUS)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, but a bad flag or config override is one line.

  For `app.run(main, flags_parser=parse_flags)`.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    user_error(f"{e}. Try --helpfull.")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # ml_collections raises these for a --config.* value it cannot apply.
    user_error(f"bad config override: {one_line(e)}")


@contextlib.contextmanager
def stop_on_user_error(log_file: str, verbosity: int) -> Iterator[None]:
  """A USER_ERRORS exception in the block becomes `user_error`'s one line.

  The traceback goes to log.txt only (INFO stays off the console); with
  --verbosity >= 1 the exception is raised as it is.
  """
  try:
    yield
  except USER_ERRORS as e:
    logging.info("Stopped by a user error", exc_info=True)
    if verbosity >= 1:
      raise
    user_error(one_line(e), log_file)


@contextlib.contextmanager
def session(workdir: str, startup: "NativeStartupLines") -> Iterator[str]:
  """A script's main work: logs to WORKDIR/log.txt, user errors as one line.

  `start_script_logs` with absl's --verbosity, then the block runs under
  `stop_on_user_error`.

  Args:
    workdir: the run or study directory (created if missing).
    startup: what `quiet_imports` returned.

  Yields:
    The log file's path.
  """
  verbosity = flags.FLAGS.verbosity
  log_file = start_script_logs(workdir, verbosity, startup.text)
  with stop_on_user_error(log_file, verbosity):
    yield log_file
