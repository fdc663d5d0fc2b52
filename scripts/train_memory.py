"""Memory of one training step of a config, before renting the accelerator.

  python scripts/train_memory.py --config configs/wmveid863.py
  python scripts/train_memory.py --config configs/wmveid863.py --dtypes=bfloat16

For each compute dtype: the training state (params, batch_stats and the
optimizer's moments, from jax.eval_shape: exact, nothing allocated), one
global batch, and the temporary buffers of the compiled train step from XLA's
memory analysis on the backend this runs on (the step is compiled, not run;
other backends schedule buffers differently, so read that column as an
estimate for them). Sizes in MiB.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from facenet_jax.constants import MODALITIES  # noqa: E402
from facenet_jax.train import build  # noqa: E402
from facenet_jax.train import mesh  # noqa: E402
from facenet_jax.train import steps  # noqa: E402
from facenet_jax.train import train_state  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The run's config, e.g. configs/wmveid863.py.",
    lock_config=True)
_CLASSES = flags.DEFINE_integer("num_classes", 603,
                                "Training identities (WMVeID863: 603).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"],
                            "Compute dtypes (model.dtype) to measure.")
flags.mark_flags_as_required(["config"])

_MIB = 2.0 ** 20


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _batch(config) -> dict:
  """A global batch's shapes as the training pipeline gives them."""
  n = config.ids_per_batch * config.instances_per_id
  h, w = config.input_size
  batch = {m: jax.ShapeDtypeStruct((n, h, w, 3), jnp.float32)
           for m in MODALITIES}
  batch["label"] = jax.ShapeDtypeStruct((n,), jnp.int32)
  batch["camid"] = jax.ShapeDtypeStruct((n,), jnp.int32)
  batch["flare"] = jax.ShapeDtypeStruct((n, 2), jnp.float32)
  batch["flare_ratio"] = jax.ShapeDtypeStruct((n, 2), jnp.float32)
  if config.loss.flare_pixel_weight > 0 and config.model.use_mfmp:
    batch["saturation"] = jax.ShapeDtypeStruct((n, h, w, 2), jnp.float32)
  return batch


def measure(config, dtype: str, num_classes: int) -> dict:
  """MiB of the state, the batch and the compiled step's temporaries."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = dtype
  build.check_config(config)
  model, optimizer, abstract = train_state.abstract_state(config,
                                                          num_classes, 100)
  schedule = build.learning_rate_schedule(config, 100)
  sharding = mesh.Sharding.create(jax.devices()[:1])
  step = steps.compile_train_step(model, optimizer, build.loss_config(config),
                                  schedule, sharding)
  batch = _batch(config)
  compiled = step.lower(abstract, batch).compile()
  analysis = compiled.memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", float("nan"))
  return {"state": _nbytes(abstract) / _MIB, "batch": _nbytes(batch) / _MIB,
          "temp": temp / _MIB}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  h, w = config.input_size
  n = config.ids_per_batch * config.instances_per_id
  print(f"{config.model.backbone} streams, {h}x{w}, batch {n}, "
        f"{_CLASSES.value} classes; temporaries from XLA on "
        f"{jax.devices()[0].device_kind} ({jax.__version__})")
  print("| dtype | state MiB | batch MiB | step temporaries MiB |")
  print("|---|---:|---:|---:|")
  for dtype in _DTYPES.value:
    row = measure(config, dtype, _CLASSES.value)
    print(f"| {dtype} | {row['state']:.0f} | {row['batch']:.0f} | "
          f"{row['temp']:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
