"""One process of a 2-process data-parallel run on CPU (tests/test_multiprocess.py).

  python tests/multiprocess_worker.py PROCESS_ID PORT OUTPUT_JSON

Each process has 4 CPU devices and feeds its own half of every P x K batch
(whole identity groups) through jax.make_array_from_process_local_data, as a
host of a multi-host slice does. Process 0 writes the losses and a parameter
checksum to OUTPUT_JSON.
"""

import functools
import json
import os
import sys

import numpy as np

NUM_PROCESSES = 2
LOCAL_DEVICES = 4


def worker_config():
  """The tiny config as the baseline network (MFMP and FCE off).

  The multi-host path (jax.distributed, per-process feeding, cross-process
  BatchNorm statistics and gradient sums) does not depend on the flare
  modules, whose data-parallel equivalence tests/test_train.py checks on 8
  devices; the baseline compiles in a fraction of FACENet's time.
  """
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.use_mfmp = False
  config.model.use_fce = False
  return config


def make_batches(config, num: int = 2) -> list:
  """The global P x K batches both runs use (fixed seed)."""
  rng = np.random.default_rng(0)
  p, k = config.ids_per_batch, config.instances_per_id
  h, w = config.input_size
  batches = []
  for _ in range(num):
    batch = {m: rng.normal(size=(p * k, h, w, 3)).astype(np.float32)
             for m in ("rgb", "ni", "ti")}
    batch["label"] = np.repeat(np.arange(p), k).astype(np.int32)
    batch["flare"] = rng.integers(0, 2, size=(p * k, 2)).astype(np.float32)
    batch["flare_ratio"] = (batch["flare"] * 0.3).astype(np.float32)
    # The pixel-level flare target (loss.flare_pixel_weight) of RGB and NI.
    batch["saturation"] = (rng.random((p * k, h, w, 2)) < 0.2).astype(np.float32)
    batches.append(batch)
  return batches


def two_steps(config, sharding, local_batches) -> dict:
  """Runs the train step on each local batch; returns losses and a checksum."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from facenet_jax.train import build  # pylint: disable=g-import-not-at-top
  from facenet_jax.train import mesh  # pylint: disable=g-import-not-at-top
  from facenet_jax.train import steps  # pylint: disable=g-import-not-at-top
  from facenet_jax.train import train_state  # pylint: disable=g-import-not-at-top
  model = build.build_model(config, num_classes=config.ids_per_batch)
  schedule = build.learning_rate_schedule(config, steps_per_epoch=10)
  optimizer = optax.sgd(1e-3)  # See tests/test_train.py for why not Adam.
  init = functools.partial(train_state.create_state, model, optimizer,
                           tuple(config.input_size))
  state = jax.jit(init, out_shardings=sharding.replicated)(jax.random.key(0))
  step = steps.compile_train_step(model, optimizer, build.loss_config(config),
                                  schedule, sharding)
  losses = []
  for local in local_batches:
    state, metrics = step(state, sharding.global_batch(local))
    losses.append(float(mesh.to_host(metrics["train/loss"])))
  params = mesh.to_host(state.params)
  return {"losses": losses,
          "checksum": float(sum(np.abs(x).astype(np.float64).sum()
                                for x in jax.tree.leaves(params))),
          "devices": jax.device_count()}


def main(process_id: int, port: int, output: str) -> None:
  import subprocess_env  # pylint: disable=g-import-not-at-top
  os.environ["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
      f"{subprocess_env.COMPILE_FLAGS}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", NUM_PROCESSES, process_id)
  from facenet_jax.train import mesh  # pylint: disable=g-import-not-at-top
  config = worker_config()
  sharding = mesh.Sharding.create()
  rows = config.ids_per_batch * config.instances_per_id // NUM_PROCESSES
  local = [{k: v[process_id * rows:(process_id + 1) * rows]
            for k, v in batch.items()} for batch in make_batches(config)]
  result = two_steps(config, sharding, local)
  if process_id == 0:
    with open(output, "w") as f:
      json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
