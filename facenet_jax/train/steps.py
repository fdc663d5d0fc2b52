"""The pure step functions: the training objective, one update, the embedding.

Nothing here reads the config or touches data: a step is a function of the
state, a batch and typed settings, jitted once by its caller. Importing this
module does not load TensorFlow.
"""

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from facenet_jax import fusion as fusion_lib
from facenet_jax import losses
from facenet_jax.constants import FLARE_MODALITIES, MODALITIES
from facenet_jax.models import FACENet
from facenet_jax.train import mesh
from facenet_jax.train.train_state import TrainState


def model_inputs(batch: Mapping[str, jax.Array]) -> dict:
  return {m: batch[m] for m in MODALITIES}


def training_loss(params: Any, *, batch_stats: Any,
                  batch: Mapping[str, jax.Array], model: FACENet,
                  loss_cfg: losses.LossConfig, dropout_rng: jax.Array):
  """The step's objective: (loss, (terms, ModelOutput, new batch_stats))."""
  out, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      model_inputs(batch), batch["flare"], train=True,
      camera=batch.get("camid"), flare_ratio=batch.get("flare_ratio"),
      rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
  loss, terms = losses.total_loss(
      out.logits, out.features, out.flare_logits, batch["label"],
      batch["flare"], loss_cfg, flare_maps=out.flare_maps,
      saturation=batch.get("saturation"), fce_guides=out.fce_guides,
      plug_features=out.plug_features)
  return loss, (terms, out, updates["batch_stats"])


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *,
               model: FACENet, optimizer: optax.GradientTransformation,
               loss_cfg: losses.LossConfig, schedule: optax.Schedule,
               seed: int = 0):
  """One optimisation step: (state, batch) -> (state, metrics).

  Metrics stay on device; the host fetches them every log_every_steps. The
  "dropout" rng (ViT stochastic depth) is a function of (seed, step), so a
  resumed run draws what the uninterrupted one would have.
  """
  step_key = jax.random.fold_in(jax.random.key(seed), state.step)
  loss_fn = functools.partial(
      training_loss, batch_stats=state.batch_stats, batch=batch, model=model,
      loss_cfg=loss_cfg, dropout_rng=step_key)
  grads, (terms, out, batch_stats) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {f"train/loss_{k}" if k != "total" else "train/loss": v
             for k, v in terms.items()}
  metrics["train/learning_rate"] = schedule(state.step)
  metrics["train/grad_norm"] = optax.tree.norm(grads)
  for m in FLARE_MODALITIES:
    if m in out.masks:
      metrics[f"train/mask_coverage_{m}"] = jnp.mean(out.masks[m])
      metrics[f"train/threshold_{m}"] = out.thresholds[m]
  new_state = TrainState(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def embed_step(variables: Any, batch: Mapping[str, jax.Array], *,
               model: FACENet, flip_average: bool
               ) -> tuple[jax.Array, jax.Array]:
  """Eval-mode embeddings (B, 3D) and segment weights (B, 3).

  "concat": the whole embedding L2-normalised (the paper). A flare-aware
  fusion: each segment normalised (fusion.normalized_segments), with the
  weights its distance needs. Flip averaging averages both.
  """
  def run(images):
    out = model.apply(variables, images, batch["flare"], train=False,
                      camera=batch.get("camid"),
                      flare_ratio=batch.get("flare_ratio"))
    return out.embedding, out.weights
  emb, weights = run(model_inputs(batch))
  if flip_average:
    flipped, flipped_weights = run({m: batch[m][:, :, ::-1]
                                    for m in MODALITIES})
    emb, weights = emb + flipped, (weights + flipped_weights) / 2
  if model.fusion != "concat":
    return fusion_lib.normalized_segments(emb), weights
  return emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True),
                           1e-12), weights


def compile_train_step(model: FACENet, optimizer: optax.GradientTransformation,
                       loss_cfg: losses.LossConfig, schedule: optax.Schedule,
                       sharding: mesh.Sharding, seed: int = 0) -> Callable:
  """train_step jitted for the mesh: state replicated and donated, batch sharded."""
  return jax.jit(
      functools.partial(train_step, model=model, optimizer=optimizer,
                        loss_cfg=loss_cfg, schedule=schedule, seed=seed),
      in_shardings=(sharding.replicated, sharding.data),
      out_shardings=(sharding.replicated, sharding.replicated),
      donate_argnums=0)

