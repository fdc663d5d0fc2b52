r"""Converts a PyTorch ResNet state dict to .safetensors / .npz (no pickles).

Machines without PyTorch can then load ImageNet weights through
`facenet_jax.pretrained`. Names and layouts are kept as they are (torchvision
names, OIHW kernels); only bfloat16 tensors are widened to float32, which
NumPy can hold. The file is checked to be a supported ResNet before anything
is written.

Run (PyTorch needed for a .pth input):
  python scripts/convert_weights.py --input resnet50-11ad3fa6.pth \
      --output resnet50.safetensors [--output resnet50.npz]
"""

import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import safetensors.numpy

from facenet_jax import pretrained

_INPUT = flags.DEFINE_string(
    "input", None, "State dict to convert (.pth/.pt/.bin, .safetensors, .npz).")
_OUTPUT = flags.DEFINE_multi_string(
    "output", None, "Output file(s); the suffix .safetensors or .npz chooses "
    "the format. Repeat the flag to write both.")
_OUTPUT_SUFFIXES = (".safetensors", ".npz")


def convert(input_path: str, output_paths: Sequence[str]) -> int:
  """Reads `input_path` and writes its state dict to each of `output_paths`.

  Args:
    input_path: a PyTorch, .safetensors or .npz state dict of a ResNet.
    output_paths: files ending in .safetensors or .npz.

  Returns:
    The ResNet depth the state dict was found to be.

  Raises:
    ImportError: a PyTorch input and PyTorch is not installed.
    ValueError: an unknown output suffix, or an input that is not a supported
      ResNet state dict.
  """
  if not output_paths:
    raise ValueError("--output: give at least one .safetensors or .npz file")
  for path in output_paths:
    if not path.endswith(_OUTPUT_SUFFIXES):
      raise ValueError(f"--output {path}: the suffix must be one of "
                       f"{_OUTPUT_SUFFIXES}")
  state_dict = pretrained.load_state_dict(input_path)
  depth = pretrained.infer_depth(state_dict)
  # safetensors writes raw buffers, which must be C-contiguous.
  state_dict = {name: np.ascontiguousarray(array)
                for name, array in state_dict.items()}
  for path in output_paths:
    if path.endswith(".safetensors"):
      safetensors.numpy.save_file(state_dict, path)
    else:
      np.savez(path, **state_dict)
    logging.info("Wrote ResNet%d state dict (%d arrays) to %s.", depth,
                 len(state_dict), os.path.abspath(path))
  return depth


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  convert(_INPUT.value, _OUTPUT.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["input", "output"])
  app.run(main)
