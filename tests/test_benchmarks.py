"""The benchmark scripts run on the CPU (tiny config) and print their tables."""

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

from facenet_jax import hardware
from facenet_jax import profiling
import subprocess_env

# Trains runs, starts scripts or compiles the tiny model: left out of the
# quick loop (-m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(test: absltest.TestCase, name: str, *args: str) -> str:
  """The stdout of scripts/NAME ARGS, which must exit 0."""
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", name), *args],
      env=subprocess_env.script_env(), capture_output=True, text=True,
      timeout=600, check=False)
  test.assertEqual(done.returncode, 0, done.stderr[-3000:])
  return done.stdout


class BenchmarkTrainTest(absltest.TestCase):

  def _run(self, *extra) -> str:
    # The tiny config as its baseline: one network to compile.
    args = ["--config", os.path.join(ROOT, "configs", "tiny.py"),
            "--config.model.use_mfmp=False", "--config.model.use_fce=False",
            "--config.loss.modality=none", "--data=generated", "--steps=2",
            "--rounds=1", "--warmup=1", *extra]
    return _script(self, "benchmark_train.py", *args)

  def _rows(self, out: str, expected: set[str]) -> dict:
    rows = {}
    for line in out.splitlines():
      cells = [c.strip() for c in line.strip("|").split("|")]
      if len(cells) == 9 and cells[0].startswith(("jax ", "torch ")):
        rows[cells[0]] = cells
    self.assertEqual(set(rows), expected, out)
    for cells in rows.values():
      self.assertEqual(cells[1], "baseline")
      ms, steps_per_s, triplets_per_s = (float(c) for c in cells[2:5])
      self.assertGreater(ms, 0.0)
      self.assertAlmostEqual(steps_per_s, 1e3 / ms, delta=0.02 * steps_per_s)
      # Tiny batch: 4 ids x 2 instances.
      self.assertAlmostEqual(triplets_per_s, 8 * steps_per_s,
                             delta=0.02 * triplets_per_s + 0.1)
      self.assertGreater(float(cells[8]), 0.0)  # Cores busy.
    return rows

  def test_tiny_baseline_rows_and_where_the_time_goes(self):
    out = self._run(
        f"--trace_dir={os.path.join(tempfile.mkdtemp(), 'trace')}")
    rows = self._rows(out, {"jax step", "jax loop"})
    self.assertGreater(float(rows["jax step"][6]), 0.0)  # TFLOP/s.
    self.assertRegex(out, r"loop/step \(baseline\): \d+\.\d\d")
    self.assertRegex(out, r"jax \d+\.\d+\.\d+, jaxlib \d+\.\d+\.\d+; .*"
                     r"own process, pinned to \d+ CPU")
    # The traced steps, by op kind: shares of op time that add up to 100 %.
    self.assertIn("Where the step's time goes (baseline, 2 pure steps", out)
    shares = [float(m) for m in re.findall(r"^\| [^|]+ \| [\d.]+ \| ([\d.]+) %",
                                           out, flags=re.M)]
    self.assertNotEmpty(shares, out)
    self.assertAlmostEqual(sum(shares), 100.0, delta=0.1 * len(shares) + 0.1)
    self.assertRegex(out, r"op time \d+\.\d ms per call over \d+\.\d ms")

  @pytest.mark.extras
  def test_pytorch_processes_train_the_same_network(self):
    if importlib.util.find_spec("torch") is None:
      self.skipTest('needs PyTorch: pip install -e ".[torch]"')
    out = self._run("--torch")
    rows = self._rows(out, {"jax step", "jax loop", "torch nchw",
                            "torch channels_last"})
    match = re.search(r"JAX/PyTorch \(baseline, against (torch \w+)\): "
                      r"step (\d+\.\d+)x", out)
    self.assertIsNotNone(match, out)
    torch_ms = min(float(rows[k][2]) for k in rows if k.startswith("torch"))
    self.assertEqual(float(rows[match.group(1)][2]), torch_ms)
    ratio = torch_ms / float(rows["jax step"][2])
    self.assertAlmostEqual(float(match.group(2)), ratio,
                           delta=0.02 * ratio + 0.01)
    self.assertRegex(out, r"pinned to (\d+) CPU\(s\) with \1 thread\(s\)")
    # The PyTorch twin is the JAX network: parameters, and the loss at
    # initialisation from the same parameters on the same batch.
    twin = re.search(r"PyTorch twin: ([\d,]+) parameters \(JAX ([\d,]+)\); "
                     r"loss at init .* ([\d.]+) \(JAX ([\d.]+), difference",
                     out)
    self.assertIsNotNone(twin, out)
    self.assertEqual(twin.group(1), twin.group(2))
    self.assertAlmostEqual(float(twin.group(3)), float(twin.group(4)),
                           delta=1e-3)

  @pytest.mark.extras
  def test_torch_benchmark_alone(self):
    if importlib.util.find_spec("torch") is None:
      self.skipTest('needs PyTorch: pip install -e ".[torch]"')
    out = _script(self, "benchmark_torch.py", "--batch=2,2",
                  "--input_size=32,16", "--num_classes=4", "--steps=1",
                  "--rounds=1", "--warmup=1", "--threads=1")
    rows = re.findall(r"^\| (nchw|channels_last) \| ([\d,]+) \| ([\d.]+) \| "
                      r"([\d.]+) \| ([\d.]+) \|$", out, flags=re.M)
    self.assertEqual([r[0] for r in rows], ["nchw", "channels_last"],
                     out)
    # Same network and initialisation in both memory formats.
    self.assertEqual(rows[0][1:4], rows[1][1:4])
    self.assertGreater(float(rows[0][2]), 0.0)

  def test_without_pytorch_the_torch_benchmark_says_what_to_install(self):
    # The script run with PyTorch hidden, as in the bare [test] install.
    hide_torch = (
        "import importlib.util, runpy, sys\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: (\n"
        "    None if name == 'torch' else find(name, *a, **k))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    done = subprocess.run(
        [sys.executable, "-c", hide_torch,
         os.path.join(ROOT, "scripts", "benchmark_torch.py")],
        env=subprocess_env.script_env(), capture_output=True, text=True,
        timeout=300, check=False)
    self.assertEqual(done.returncode, 1, done.stderr[-3000:])
    self.assertIn('needs PyTorch: pip install -e ".[torch]"', done.stderr)
    self.assertNotIn("Traceback", done.stderr)

  @pytest.mark.extras
  def test_ops_benchmark_rows(self):
    if importlib.util.find_spec("torch") is None:
      self.skipTest('needs PyTorch: pip install -e ".[torch]"')
    out = _script(self, "benchmark_ops.py", "--batch=1",
                  "--input_size=32,16", "--calls=1", "--rounds=1",
                  "--threads=1", "--frameworks=jax,torch_nchw")
    kinds = re.findall(r"^\| ([a-zA-Z ]+) \| ([\d.]+) \| ([\d.]+) \| "
                       r"([+-][\d.]+) \|$", out, flags=re.M)
    self.assertEqual(
        [k[0] for k in kinds],
        ["conv forward", "conv input grad", "conv filter grad",
         "BatchNorm forward", "BatchNorm backward", "max pool forward",
         "max pool backward", "all"], out)
    total = kinds[-1]
    self.assertAlmostEqual(sum(float(k[1]) for k in kinds[:-1]),
                           float(total[1]), delta=0.1 * len(kinds))
    self.assertAlmostEqual(float(total[3]),
                           float(total[1]) - float(total[2]), delta=0.11)

  def test_grouped_conv_benchmark_prints_its_rows_and_agreeing_gradients(self):
    out = _script(self, "benchmark_grouped_conv.py", "--batch=1", "--calls=1")
    rows = re.findall(r"^\| (\d+x\d+, \d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$",
                      out, flags=re.M)
    self.assertEqual([r[0] for r in rows],
                     ["32x16, 16", "16x8, 32", "8x4, 64", "8x4, 128"])
    for _, apart, grouped, ratio in rows:
      self.assertAlmostEqual(float(ratio), float(grouped) / float(apart),
                             delta=0.05 * float(ratio) + 0.05)
    agree = re.search(r"agree to ([\d.e+-]+)", out)
    self.assertIsNotNone(agree, out)
    self.assertLess(float(agree.group(1)), 1e-4)

  def test_op_kinds_sum_numbered_ops_and_skip_runtime_events(self):
    ops = [("fusion.12", 300.0), ("fusion.40", 100.0), ("convolution", 50.0),
           ("wrapped_reduce-window.2", 25.0)]
    runtime = ["ThunkExecutor::Execute", "$api.py:2479 block_until_ready",
               "PjitFunction(train_step)", "ParseArguments",
               "AllocateOutputBuffersWithInputReuse"]

    def kinds_of(marked: bool):
      events = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": 2},
                {"ph": "i", "name": "fusion.1", "dur": 1e6,
                 "args": {"hlo_op": "fusion.1"}}]
      events += [{"ph": "X", "name": n, "dur": d,
                  **({"args": {"hlo_op": n}} if marked else {})}
                 for n, d in ops]
      events += [{"ph": "X", "name": n, "dur": 1e6} for n in runtime]
      path = os.path.join(tempfile.mkdtemp(), "perfetto_trace.json.gz")
      with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
      return profiling.op_kinds(path)

    kinds = kinds_of(marked=True)
    self.assertEqual([(k.name, k.count) for k in kinds],
                     [("fusion", 2), ("convolution", 1),
                      ("wrapped_reduce-window", 1)])
    self.assertAlmostEqual(kinds[0].seconds, 400e-6)
    text = profiling.table(kinds, calls=2, wall=1e-3, most=2)
    self.assertIn("| fusion | 0.2 | 84.2 % | 1 |", text)
    self.assertIn("| (1 other kinds) | 0.0 | 5.3 % | 0 |", text)
    self.assertIn("0.47 threads busy on average", text)
    # Without the marks, names shaped like HLO ones count; the runtime's
    # single words (ParseArguments) then do too.
    unmarked = {k.name for k in kinds_of(marked=False)}
    self.assertEqual(unmarked, {"fusion", "convolution",
                                "wrapped_reduce-window", "ParseArguments",
                                "AllocateOutputBuffersWithInputReuse"})

  def test_device_peaks(self):
    self.assertEqual(hardware.device_peak("TPU v4"), 275e12)
    self.assertEqual(hardware.device_peak("NVIDIA H100 80GB HBM3"), 989e12)
    self.assertEqual(hardware.device_peak("TPU v5 lite"), 197e12)
    self.assertEqual(hardware.device_peak("TPU v5p"), 459e12)
    self.assertEqual(hardware.device_peak("NVIDIA L40S"), 362e12)
    self.assertIsNone(hardware.device_peak("cpu"))


@pytest.mark.extras
class BenchmarkSearchTest(absltest.TestCase):

  def test_table_rows_and_exact_recall(self):
    if importlib.util.find_spec("faiss") is None:
      self.skipTest('needs faiss: pip install -e ".[search]"')
    out = _script(self, "benchmark_search.py", "--sizes=3000", "--dims=48",
                  "--queries=40", "--batch=16")
    table = out.split("\n\n")[-1]
    rows = {}
    for line in table.splitlines():
      cells = [c.strip() for c in line.strip("|").split("|")]
      if len(cells) == 9 and cells[0] == "48":
        rows[cells[3]] = cells
    self.assertEqual(set(rows), {"brute", "flat", "ivf", "hnsw"}, table)
    for method, cells in rows.items():
      self.assertEqual(cells[1], "3,000")
      self.assertGreater(float(cells[6].replace(",", "")), 0.0)
      recall = float(cells[7])
      # Brute force and the exact backend agree; the others come close.
      self.assertGreaterEqual(recall, 0.999 if method in ("brute", "flat")
                              else 0.8, method)
    self.assertEqual(rows["flat"][7], "1.000")


if __name__ == "__main__":
  absltest.main()
