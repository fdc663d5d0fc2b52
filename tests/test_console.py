"""The console a person reads: progress lines, log routing, one-line errors."""

import io
import logging as std_logging
import os
import subprocess
import sys
import tempfile
import time

from absl import logging
from absl.testing import absltest
import pytest

from facenet_jax import console
import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ProgressTest(absltest.TestCase):

  def test_plain_lines_at_most_every_interval_and_at_the_end(self):
    out = io.StringIO()
    bar = console.Console(out, live=False, interval=3600.0).progress(
        100, "train", initial=20)
    for step in range(21, 101):
      bar.update(step, loss=1.0 / step)
    bar.close()
    lines = out.getvalue().splitlines()
    self.assertLen(lines, 1)  # Only the last: the interval never passed.
    self.assertRegex(lines[0], r"^train 100/100 \(100%\)  loss 0\.01  "
                     r"[\d.]+ step/s  took \d+:\d\d$")
    self.assertNotIn("\r", out.getvalue())

  def test_every_update_with_zero_interval_and_an_eta(self):
    out = io.StringIO()
    bar = console.Console(out, live=False, interval=0.0).progress(
        4, "embed query (7)", unit="batch")
    bar.update(1)
    time.sleep(0.01)
    bar.update(2)
    lines = out.getvalue().splitlines()
    self.assertLen(lines, 2)
    self.assertTrue(lines[0].startswith("embed query (7) 1/4 (25%)"))
    self.assertRegex(lines[1], r"batch/s  ETA \d+:\d\d$")

  def test_disabled_console_prints_nothing(self):
    silent = console.Console(enabled=False)
    silent.print("hello")
    with silent.progress(3, "train") as bar:
      bar.update(3, loss=1.0)
    self.assertFalse(silent.enabled)
    self.assertFalse(console.SILENT.enabled)

  def test_live_bar_on_a_terminal_like_stream(self):
    out = io.StringIO()
    with console.Console(out, live=True).progress(5, "train") as bar:
      bar.update(5, loss=2.0)
    self.assertIn("5/5", out.getvalue())
    self.assertIn("loss=2", out.getvalue())


class RouteLogsTest(absltest.TestCase):

  def test_log_records_and_warnings_go_to_the_file_only(self):
    workdir = tempfile.mkdtemp()
    absl_handler = logging.get_absl_handler()
    level = absl_handler.level
    absl_logger = std_logging.getLogger("absl")
    absl_level = absl_logger.level
    root = std_logging.getLogger()
    before = list(root.handlers)
    try:
      path = console.route_logs(workdir, verbosity=0)
      logging.info("a line for the log file %d", 42)
      self.assertEqual(absl_handler.level, std_logging.ERROR)
    finally:
      for handler in root.handlers:
        if handler not in before:
          handler.close()
          root.removeHandler(handler)
      absl_handler.setLevel(level)
      # Not set_verbosity: that would pin a level the logger did not have.
      absl_logger.setLevel(absl_level)
      std_logging.captureWarnings(False)
    self.assertEqual(path, os.path.join(workdir, console.LOG_FILE))
    with open(path) as f:
      self.assertIn("a line for the log file 42", f.read())


class QuietImportsTest(absltest.TestCase):

  def test_native_lines_are_held_back_unless_verbose(self):
    with console.quiet_imports(["prog", "--workdir=w"]) as startup:
      os.write(2, b"a native start-up line\n")
    self.assertTrue(startup.active)
    self.assertEqual(startup.text, "a native start-up line\n")
    with console.quiet_imports(["prog", "--verbosity=1"]) as verbose:
      pass
    self.assertFalse(verbose.active)
    self.assertEqual(verbose.text, "")


@pytest.mark.slow
class MainErrorsTest(absltest.TestCase):
  """scripts/main.py: a user error is one line on stderr and exit status 2."""

  def _main(self, *args):
    workdir = tempfile.mkdtemp()
    env = subprocess_env.script_env()
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "main.py"), "--config",
         os.path.join(ROOT, "configs", "tiny.py"), "--workdir", workdir,
         *args], env=env, capture_output=True, text=True, timeout=300,
        check=False)
    return done, workdir

  def test_config_typo(self):
    done, _ = self._main("--config.model.bakbone=resnet18")
    self.assertEqual(done.returncode, 2, done.stderr)
    lines = done.stderr.strip().splitlines()
    self.assertLen(lines, 1, done.stderr)
    self.assertIn("bakbone", lines[0])
    self.assertIn('Did you mean "backbone"', lines[0])
    self.assertEqual(done.stdout, "")

  def test_unknown_backbone_keeps_the_traceback_in_the_log(self):
    done, workdir = self._main("--config.model.backbone=vgg16")
    self.assertEqual(done.returncode, 2, done.stderr)
    lines = done.stderr.strip().splitlines()
    self.assertLen(lines, 1, done.stderr)
    self.assertStartsWith(lines[0], "error: model.backbone: expected")
    self.assertIn(os.path.join(workdir, console.LOG_FILE), lines[0])
    with open(os.path.join(workdir, console.LOG_FILE)) as f:
      log = f.read()
    self.assertIn("Traceback", log)
    self.assertIn("check_backbone", log)


if __name__ == "__main__":
  absltest.main()
