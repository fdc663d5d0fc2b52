"""Exports a trained run's embedding network for deployment, and checks it.

  python scripts/export.py --workdir /runs/wmveid863 --format onnx \
      --output /runs/wmveid863/facenet.onnx
  python scripts/export.py --workdir /runs/wmveid863 --format stablehlo \
      --output /runs/wmveid863/facenet.stablehlo

onnx needs the export extra (pip install -e ".[export]"); stablehlo needs
JAX only. The exported network takes `Embedder.inputs(rgb, ni, ti)` of raw
uint8 images (docs/export.md): rgb, ni, ti float32 (B, H, W, 3) and flare
float32 (B, 2); it returns embedding float32 (B, 3D), L2-normalised.

After writing the file, the command runs it (ONNX Runtime, or the deserialised
JAX export) on a generated batch and on one example, and compares with the JAX
Embedder on the same raw images. It prints the largest difference and exits
with status 1 if that is over --tolerance. A user error (no checkpoint, bad
flag, missing extra) prints one line and exits with status 2.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

# The repository root, so that `configs` and the packages import from a clone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facenet_jax import checkpointing  # noqa: E402
from facenet_jax import export  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to export.")
_FORMAT = flags.DEFINE_enum("format", "onnx", list(export.FORMATS),
                            "onnx: ONNX model (jax2onnx); stablehlo: "
                            "serialised jax.export function.")
_OUTPUT = flags.DEFINE_string("output", None, "File to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")
_OPSET = flags.DEFINE_integer("opset", export.ONNX_OPSET,
                              "--format onnx: ONNX opset.")
_PLATFORMS = flags.DEFINE_list(
    "platforms", list(export.STABLEHLO_PLATFORMS),
    "--format stablehlo: JAX platforms the function is lowered for.")
_CHECK_BATCH = flags.DEFINE_integer(
    "check_batch", 8, "Generated triplets the export is checked on (>= 1).")
_TOLERANCE = flags.DEFINE_float(
    "tolerance", None, "Largest accepted |export - JAX| of an embedding "
    "value; default 1e-4 for a float32 run, 3e-2 for bfloat16 or float16.")
flags.mark_flags_as_required(["workdir", "output"])

USER_ERROR_STATUS = 2
CHECK_FAILED_STATUS = 1
# Errors that mean "the input is wrong", not "the code is".
USER_ERRORS = (ValueError, FileNotFoundError, export.MissingExtraError)


def _user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USER_ERROR_STATUS)


def _one_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return "; ".join(lines) or type(error).__name__


def _parse_flags(argv):
  """absl's flag parsing, but a bad or missing flag is one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _user_error(f"{str(e).rstrip('.')}. Try --helpfull.")


def _size(path: str) -> str:
  return f"{os.path.getsize(path) / 2 ** 20:.1f} MiB"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and jax2onnx log every step at INFO; the console shows results.
    logging.set_verbosity(logging.WARNING)
  fmt, output = _FORMAT.value, _OUTPUT.value
  try:
    if _CHECK_BATCH.value < 1:
      raise ValueError(f"--check_batch must be >= 1, got {_CHECK_BATCH.value}")
    # Before the (slow) restore: a missing package is known at once.
    export.check_installed(fmt)
    embedder = export.load_embedder(_WORKDIR.value, _STEP.value,
                                    float32=fmt == "onnx")
    step = _STEP.value
    if step is None:
      step = checkpointing.checkpoint_steps(_WORKDIR.value)[-1]
    trained = checkpointing.load_config(_WORKDIR.value).model.dtype
    computed = ("" if trained == embedder.config.model.dtype else
                f", computed in float32 (trained in {trained})")
    print(f"workdir   {_WORKDIR.value} (checkpoint step {step}, input "
          f"{tuple(embedder.config.input_size)}{computed})")
    start = time.perf_counter()
    files = export.export(embedder, fmt, output, opset=_OPSET.value,
                          platforms=_PLATFORMS.value)
    seconds = time.perf_counter() - start
    print(f"exported  {', '.join(f'{f} ({_size(f)})' for f in files)} as "
          f"{fmt} in {seconds:.1f} s")
    raw = export.check_triplets(embedder.config.input_size, _CHECK_BATCH.value)
    diffs = export.max_differences(embedder, fmt, output, raw)
  except USER_ERRORS as e:
    _user_error(_one_line(e))
  worst = max(diffs.values())
  tolerance = (_TOLERANCE.value if _TOLERANCE.value is not None else
               export.default_tolerance(embedder.config))
  shown = ", ".join(f"{d:.2e} on {b} triplet{'s' * (b > 1)}"
                    for b, d in diffs.items())
  verdict = "ok" if worst <= tolerance else "FAILED"
  print(f"check     max |{fmt} - JAX Embedder| = {shown} (tolerance "
        f"{tolerance:.0e}): {verdict}")
  if worst > tolerance:
    sys.exit(CHECK_FAILED_STATUS)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
