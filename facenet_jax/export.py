"""The Embedder's network as a file that runs without this codebase.

  python scripts/export.py --workdir /runs/wmveid863 --format onnx \
      --output facenet.onnx

The exported function is the eval-mode network of `inference.Embedder` (the
same `steps.embed_step`, flip averaging included when the run used it), with
the checkpoint's weights baked in as constants:

  inputs   rgb, ni, ti  float32 (B, H, W, 3), resized and normalised
           flare        float32 (B, 2), pseudo-labels delta for [RGB, NI]
           flare_ratio  float32 (B, 2), saturated fraction of raw [RGB, NI]
  outputs  embedding    float32 (B, 3D), unit L2 norm; B is symbolic
           weights      float32 (B, 3), the [RGB | NI | TI] segment weights
                        of the run's fusion (all 1 for "concat"): two
                        embeddings are compared with
                        facenet_jax.fusion.fused_distances (docs/model.md).

`Embedder.inputs(rgb, ni, ti)` (or `inference.network_inputs`, from the run's
config alone) makes those inputs from raw uint8 images, so every runtime is
fed the same way (docs/export.md). Two formats:
  onnx       an ONNX model from jax2onnx, for ONNX Runtime and its kin (needs
             the export extra: pip install -e ".[export]").
  stablehlo  a serialised `jax.export.Exported` for JAX serving; called with
             the dict of `Embedder.inputs`.
"""

import importlib
import json
import logging
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from facenet_jax import checkpointing
from facenet_jax import inference
from facenet_jax.train import steps
from facenet_jax.constants import FLARE_MODALITIES, MODALITIES

FORMATS = ("onnx", "stablehlo")
# The check's default tolerance per model.dtype: float32 runs agree to
# rounding; a 16-bit compute dtype keeps about three significant digits, and
# the export and the JAX Embedder may order its sums differently (a
# bfloat16 run differed by 8e-3 on 8 triplets, 0 on one).
TOLERANCES = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}


def default_tolerance(config) -> float:
  """The check's tolerance for a run's model.dtype (TOLERANCES)."""
  return TOLERANCES.get(config.model.dtype, TOLERANCES["float32"])
OUTPUT_NAMES = ("embedding", "weights")
INSTALL_HINT = ('pip install -e ".[export]" && pip install --no-deps '
                '"jax2onnx==0.17.1"')
# Default ONNX opset. The network needs nothing newer than 17 (opset 23,
# jax2onnx's default, gives the same results), and older runtimes read 17
# (ONNX Runtime implements it since 1.13).
ONNX_OPSET = 17
# Default platforms of a StableHLO export: the serving machine may have a GPU
# even when the exporting one has not (JAX lowers for both without one).
STABLEHLO_PLATFORMS = ("cpu", "cuda")
# Largest ONNX file protobuf can hold; bigger models keep their weights in a
# side file (<output>.data) next to the model.
_PROTOBUF_LIMIT = 2 ** 31 - 1
# ONNX Runtime's MaxPool takes at most 3 pooled (spatial) axes.
_MAX_POOLED_AXES = 3


class MissingExtraError(ImportError):
  """A package of the optional export extra is not installed."""


def _unknown_format(fmt: str) -> ValueError:
  return ValueError(f"--format must be one of {', '.join(FORMATS)}, got "
                    f"{fmt!r}")


def _require(module: str, what: str) -> Any:
  """Imports `module` or says in one line how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingExtraError(f"{what} needs the Python package {module}, which "
                            f"is not installed: {INSTALL_HINT}") from e


def check_installed(fmt: str) -> None:
  """Raises MissingExtraError unless everything `fmt` needs is importable.

  Raises:
    ValueError: an unknown format.
    MissingExtraError: naming the first missing package of the extra.
  """
  if fmt not in FORMATS:
    raise _unknown_format(fmt)
  if fmt == "onnx":
    for module in ("jax2onnx", "onnx", "onnxruntime"):
      _require(module, "--format onnx")


# --- The exported function ----------------------------------------------------


def input_specs(input_size: Sequence[int]) -> list[jax.ShapeDtypeStruct]:
  """Shapes of the network's inputs (INPUT_NAMES order), batch symbolic "B"."""
  batch, = jax.export.symbolic_shape("B")
  h, w = (int(s) for s in input_size)
  images = [jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
            for _ in MODALITIES]
  return images + [jax.ShapeDtypeStruct((batch, 2), jnp.float32)] * 2


def embedding_fn(embedder: inference.Embedder) -> Callable[..., tuple]:
  """The Embedder's network as f(rgb, ni, ti, flare, flare_ratio).

  Args:
    embedder: the Embedder whose model, weights and flip averaging to use.

  Returns:
    A function of the five (B, ...) float32 arrays of `Embedder.inputs`, in
    INPUT_NAMES order, returning the (B, 3D) L2-normalised embedding and the
    (B, 3) segment weights (OUTPUT_NAMES). The
    weights are host arrays closed over, so they become constants of an export
    instead of arguments (and carry no device placement).
  """
  variables = jax.device_get(embedder.variables)
  model = embedder.model
  flip_average = embedder.config.eval.flip_average

  def embed(rgb: jax.Array, ni: jax.Array, ti: jax.Array,
            flare: jax.Array, flare_ratio: jax.Array) -> tuple:
    batch = dict(zip(MODALITIES, (rgb, ni, ti)), flare=flare,
                 flare_ratio=flare_ratio)
    embedding, weights = steps.embed_step(variables, batch, model=model,
                                          flip_average=flip_average)
    # An input the fusion does not read still reaches the graph (as a zero
    # contribution), so that every export has the same five inputs.
    weights = weights + 0.0 * flare_ratio[:, :1]
    return embedding, weights

  return embed


def preprocessing_spec(config: Any) -> dict:
  """What `Embedder.inputs` does to raw images, as JSON-ready values."""
  return {
      "input_size": [int(s) for s in config.input_size],
      "resize": "bilinear (tf.image.resize), rounded and clipped to uint8; "
                "skipped when an image already has input_size",
      "clahe": (float(config.preprocess.clahe_clip_limit)
                if config.preprocess.clahe else None),
      "normalization": {
          m: {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
          for m, mean, std in zip(MODALITIES, config.normalization.mean,
                                  config.normalization.std)},
      "flare": {"modalities": list(FLARE_MODALITIES),
                "pixel_low": int(config.flare.pixel_low),
                "ratio_threshold": float(config.flare.ratio_threshold)},
      "inputs": list(inference.INPUT_NAMES),
      "outputs": list(OUTPUT_NAMES),
  }


# --- ONNX ---------------------------------------------------------------------


def _pooled_axes_last_max(x: jax.Array, window_dimensions, window_strides,
                          padding, base_dilation, window_dilation) -> jax.Array:
  """lax.reduce_window_max with the unpooled axes folded into one.

  jax2onnx lowers reduce_window_max on an (N, ...) array to a MaxPool with
  N pooled axes; on the ResNet stem's NHWC (B, H, W, C) that is a 4-D pool,
  which ONNX Runtime rejects. Moving the axes the window leaves alone (size
  1, stride 1, no padding: B and C) in front and merging them gives the same
  maximum over a (B * C, H, W) array, which exports as a 3-D MaxPool (kernel
  1 x 3 x 3). The values are identical: only the layout changes.
  """
  dims = range(x.ndim)
  kept = [d for d in dims if window_dimensions[d] == 1 and
          window_strides[d] == 1 and tuple(padding[d]) == (0, 0) and
          window_dilation[d] == 1 and base_dilation[d] == 1]
  pooled = [d for d in dims if d not in kept]
  if not kept or 1 + len(pooled) > _MAX_POOLED_AXES:
    return jax.lax.reduce_window_max_p.bind(
        x, window_dimensions=window_dimensions, window_strides=window_strides,
        padding=padding, base_dilation=base_dilation,
        window_dilation=window_dilation)
  order = kept + pooled
  moved = jax.lax.transpose(x, order)
  kept_shape = moved.shape[:len(kept)]
  folded = jax.lax.reshape(moved, (math.prod(kept_shape),
                                   *moved.shape[len(kept):]))

  def only_pooled(values: Sequence[Any], neutral: Any) -> tuple:
    return (neutral, *(values[d] for d in pooled))

  out = jax.lax.reduce_window_max_p.bind(
      folded,
      window_dimensions=only_pooled(window_dimensions, 1),
      window_strides=only_pooled(window_strides, 1),
      padding=only_pooled(padding, (0, 0)),
      base_dilation=only_pooled(base_dilation, 1),
      window_dilation=only_pooled(window_dilation, 1))
  out = jax.lax.reshape(out, (*kept_shape, *out.shape[1:]))
  return jax.lax.transpose(out, np.argsort(order).tolist())


def _bind(eqn: Any, inputs: Sequence[Any]) -> list:
  """Applies one jaxpr equation as jax.core.eval_jaxpr does."""
  params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(params, tuple):
    # Older JAX returns (subfuns, params); the subfuns come first in bind.
    subfuns, params = params
    inputs = [*subfuns, *inputs]
  out = eqn.primitive.bind(*inputs, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _eval_exportable(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list:
  """Evaluates a jaxpr, max-pools rewritten by `_pooled_axes_last_max`.

  Nested jit calls are inlined so that a pool inside one is rewritten too;
  every other equation is bound as it stands, with the same numerics.
  """
  env = {}

  def read(atom: Any) -> Any:
    return atom.val if isinstance(atom, jex.core.Literal) else env[atom]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    if eqn.primitive is jax.lax.reduce_window_max_p:
      outputs = [_pooled_axes_last_max(*inputs, **eqn.params)]
    elif eqn.primitive.name in ("jit", "pjit"):
      inner = eqn.params["jaxpr"]
      outputs = _eval_exportable(inner.jaxpr, inner.consts, *inputs)
    else:
      outputs = _bind(eqn, inputs)
    env.update(zip(eqn.outvars, outputs))
  return [read(v) for v in jaxpr.outvars]


def to_onnx(embedder: inference.Embedder, opset: int = ONNX_OPSET) -> Any:
  """The Embedder's network as an onnx.ModelProto (see the module docstring).

  The network is traced to a jaxpr here, with plain JAX, and jax2onnx
  converts that jaxpr's primitives: jax2onnx replaces some Flax functions
  while it traces (flax.linen.max_pool among them, with a signature that the
  ResNet stem's call does not fit), and converting primitives keeps the
  exported numerics those of the JAX function.

  Raises:
    MissingExtraError: jax2onnx or onnx is not installed.
  """
  jax2onnx = _require("jax2onnx", "--format onnx")
  onnx = _require("onnx", "--format onnx")
  specs = input_specs(embedder.config.input_size)
  closed = jax.make_jaxpr(embedding_fn(embedder))(*specs)

  def exportable(*args: jax.Array) -> tuple:
    return tuple(_eval_exportable(closed.jaxpr, closed.consts, *args))

  # onnx_ir warns about every shape tensor of a symbolic-batch reshape whose
  # value_info it leaves out; those annotations are optional in ONNX.
  serde_log = logging.getLogger("onnx_ir.serde")
  level = serde_log.level
  serde_log.setLevel(logging.ERROR)
  try:
    model = jax2onnx.to_onnx(
        exportable, specs, model_name="facenet", opset=opset,
        input_names=list(inference.INPUT_NAMES),
        output_names=list(OUTPUT_NAMES))
  finally:
    serde_log.setLevel(level)
  # jax2onnx stamps its newest IR version; the oldest one the opset allows
  # lets older runtimes load the model (the graph uses nothing newer).
  model.ir_version = min(model.ir_version, onnx.helper.find_min_ir_version_for(
      list(model.opset_import)))
  model.doc_string = ("FACENet multi-spectral re-ID embedding. Inputs: "
                      "Embedder.inputs() of raw uint8 images; see the "
                      "metadata 'preprocessing' and docs/export.md.")
  onnx.helper.set_model_props(model, {
      "preprocessing": json.dumps(preprocessing_spec(embedder.config)),
      "embedding_dim": str(closed.out_avals[0].shape[-1])})
  return model


def save_onnx(model: Any, path: str) -> list[str]:
  """Writes the model; returns the files written (model, maybe <path>.data)."""
  onnx = _require("onnx", "--format onnx")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  data_file = os.path.basename(path) + ".data"
  # The weights are nearly all of the size; counting them avoids serialising
  # the whole model once just to measure it.
  big = sum(len(t.raw_data) for t in model.graph.initializer) > _PROTOBUF_LIMIT
  onnx.save_model(model, path, save_as_external_data=big,
                  all_tensors_to_one_file=True, location=data_file)
  return [path] + ([os.path.join(directory, data_file)] if big else [])


def onnx_runner(path: str) -> Callable[[Mapping[str, np.ndarray]], dict]:
  """An ONNX Runtime (CPU) session of the model, as inputs -> outputs.

  The outputs are a dict keyed by OUTPUT_NAMES.
  """
  ort = _require("onnxruntime", "--format onnx")
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  return lambda inputs: dict(zip(OUTPUT_NAMES, session.run(
      list(OUTPUT_NAMES), dict(inputs))))


# --- StableHLO ----------------------------------------------------------------


def to_stablehlo(embedder: inference.Embedder,
                 platforms: Sequence[str] = STABLEHLO_PLATFORMS) -> bytes:
  """The Embedder's network as a serialised jax.export.Exported.

  Its one argument is the dict of `Embedder.inputs` (batch symbolic), so a
  JAX server calls `jax.export.deserialize(blob).call(inputs)`.
  """
  embed = embedding_fn(embedder)
  specs = dict(zip(inference.INPUT_NAMES,
                   input_specs(embedder.config.input_size)))

  def from_dict(inputs: Mapping[str, jax.Array]) -> tuple:
    return embed(*(inputs[k] for k in inference.INPUT_NAMES))

  exported = jax.export.export(jax.jit(from_dict),
                               platforms=tuple(platforms))(specs)
  return bytes(exported.serialize())


def stablehlo_runner(
    path: str) -> Callable[[Mapping[str, np.ndarray]], dict]:
  """The deserialised StableHLO export, as inputs -> outputs (OUTPUT_NAMES)."""
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return lambda inputs: dict(zip(OUTPUT_NAMES, (np.asarray(x) for x in (
      exported.call({k: jnp.asarray(v) for k, v in inputs.items()})))))


# --- Both formats -------------------------------------------------------------


def export(embedder: inference.Embedder, fmt: str, path: str,
           opset: int = ONNX_OPSET,
           platforms: Sequence[str] = STABLEHLO_PLATFORMS) -> list[str]:
  """Writes the network in format `fmt` to `path`; returns the files written.

  Args:
    embedder: whose network to export.
    fmt: one of FORMATS.
    path: the output file.
    opset: ONNX opset (onnx only).
    platforms: JAX platforms to lower for (stablehlo only).

  Returns:
    The files written: `path`, and for an ONNX model over 2 GB its weights
    file `path`.data.

  Raises:
    ValueError: an unknown format.
    MissingExtraError: --format onnx without the export extra.
  """
  if fmt == "onnx":
    return save_onnx(to_onnx(embedder, opset), path)
  if fmt == "stablehlo":
    blob = to_stablehlo(embedder, platforms)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
      f.write(blob)
    return [path]
  raise _unknown_format(fmt)


def runner(fmt: str, path: str, config: Any = None
           ) -> Callable[[Mapping[str, np.ndarray]], dict]:
  """An exported file, loaded once, as `Embedder.inputs` dict -> outputs.

  Args:
    fmt: one of FORMATS.
    path: the exported file.
    config: the run's config; given, every call first checks its inputs
      (inference.check_network_inputs: names, dtypes, shapes, NaN, ranges)
      and raises ValueError naming the bad one, where the runtimes would
      check dtypes and shapes only.

  Returns:
    inputs -> {"embedding": (B, 3D), "weights": (B, 3)}.
  """
  if fmt == "onnx":
    run = onnx_runner(path)
  elif fmt == "stablehlo":
    run = stablehlo_runner(path)
  else:
    raise _unknown_format(fmt)
  if config is None:
    return run

  def checked(inputs: Mapping[str, np.ndarray]) -> dict:
    inference.check_network_inputs(inputs, config)
    return run(inputs)

  return checked


def check_triplets(input_size: Sequence[int], num: int,
                   seed: int = 0) -> tuple[np.ndarray, ...]:
  """Raw uint8 (rgb, ni, ti) batches for checking an export.

  Smooth random images 1.5x the input size (so the resize runs), below the
  flare bar except for a white quarter on RGB (samples 0, 2 mod 4) and on NI
  (1, 2 mod 4): every combination of the two pseudo-labels, hence both
  branches of the flare-gated FCE, is in a batch of four or more.

  Args:
    input_size: the run's (H, W).
    num: batch size B.
    seed: NumPy seed.

  Returns:
    (rgb, ni, ti), each (B, 1.5 H, 1.5 W, 3) uint8.
  """
  rng = np.random.default_rng(seed)
  h, w = (int(s) * 3 // 2 for s in input_size)
  images = []
  for m in MODALITIES:
    coarse = rng.uniform(0, 240, size=(num, 8, 4, 3))
    fine = np.repeat(np.repeat(coarse, -(-h // 8), 1), -(-w // 4), 2)
    batch = np.clip(fine[:, :h, :w] + rng.normal(0, 8, (num, h, w, 3)), 0,
                    240).astype(np.uint8)
    flared = {"rgb": (0, 2), "ni": (1, 2)}.get(m, ())
    for i in range(num):
      if i % 4 in flared:
        batch[i, :h // 2, :w // 2] = 255
    images.append(batch)
  return tuple(images)


def max_differences(embedder: inference.Embedder, fmt: str, path: str,
                    raw: Sequence[np.ndarray]) -> dict[int, float]:
  """Max |exported - Embedder| on a raw batch, and on its first example alone.

  The reference is the JAX Embedder on the raw images; the export gets
  `embedder.inputs` of the same images. The single example exercises a second
  batch size, as the batch dimension of an export is symbolic. Every output
  (embedding and weights) is compared.

  Returns:
    {batch size: max absolute difference over the outputs} for B and 1.
  """
  expected = embedder.embed(*raw)
  inputs = embedder.inputs(*raw)
  run = runner(fmt, path, embedder.config)
  out = {}
  for size in sorted({len(expected["embedding"]), 1}, reverse=True):
    got = run({k: v[:size] for k, v in inputs.items()})
    out[size] = 0.0
    for name in OUTPUT_NAMES:
      want = expected[name][:size]
      if got[name].shape != want.shape:
        raise ValueError(f"{path}: output {name} has shape "
                         f"{got[name].shape}, expected {want.shape}")
      out[size] = max(out[size], float(np.max(np.abs(got[name] - want))))
  return out


def load_embedder(workdir: str, step: Optional[int] = None,
                  float32: bool = False) -> inference.Embedder:
  """Embedder.from_workdir, with one-line errors for a workdir unfit to export.

  Args:
    workdir: the run.
    step: its checkpoint; None = the latest.
    float32: compute in float32 whatever the run's model.dtype (its
      parameters are float32 anyway). The ONNX export needs it: jax2onnx
      lowers no bfloat16 pooling, and ONNX Runtime's CPU kernels are float32.

  Raises:
    FileNotFoundError: WORKDIR/config.json missing, or no (such) checkpoint.
  """
  checkpointing.check_run_dir(workdir, step)
  embedder = inference.Embedder.from_workdir(workdir, step)
  if not float32 or embedder.config.model.dtype == "float32":
    return embedder
  config = embedder.config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = "float32"
  return inference.Embedder(embedder.model.clone(dtype=jnp.float32),
                            embedder.variables, config, embedder.batch_size)
