"""Peak arithmetic throughput of accelerators, to put measured FLOP/s in context.

Dense bf16 peak FLOP/s per chip from the vendors' data sheets (no sparsity),
looked up by a substring of jax's `device.device_kind`. CPUs are not listed:
they have no single figure (it depends on cores, clock and vector units).
"""

from typing import Optional

# More specific names first: "TPU v5p" before "TPU v5" (v5e reports
# "TPU v5 lite"), "L40S" before "L4".
PEAK_BF16_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 46e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("L4", 121e12), ("A10G", 70e12), ("V100", 125e12), ("T4", 65e12),
)


def device_peak(device_kind: str) -> Optional[float]:
  """Dense bf16 peak FLOP/s of one device of this kind; None if unknown."""
  for name, peak in PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None
