"""Parameters and FLOPs of one stream and of the model variants, as tables.

  python scripts/model_stats.py                      # paper size: ResNet50, 256x128
  python scripts/model_stats.py --backbone=resnet18 --height=128 --width=64
  python scripts/model_stats.py --backbone=vit_b16 --reduced_fmi_width=256
  python scripts/model_stats.py --backbone=transreid_b16 --reduced_fmi_width=256

Parameters come from jax.eval_shape (nothing is allocated); FLOPs from XLA's
cost analysis of the lowered eval-mode forward pass for one triplet (a
multiply-add counts as 2 FLOPs).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from facenet_jax.constants import MODALITIES  # noqa: E402
from facenet_jax.models import FACENet  # noqa: E402
from facenet_jax.models import backbones  # noqa: E402

_BACKBONE = flags.DEFINE_string("backbone", "resnet50",
                                "|".join(backbones.names()))
_HEIGHT = flags.DEFINE_integer("height", 256, "Input height.")
_WIDTH = flags.DEFINE_integer("width", 128, "Input width.")
_CLASSES = flags.DEFINE_integer("num_classes", 603,
                                "Classifier size (WMVeID863 train ids: 603).")
_REDUCED = flags.DEFINE_integer("reduced_fmi_width", 512,
                                "Inner FMI width of the reduced variant.")

VARIANTS = (
    ("baseline (3 streams, CE + triplet)", dict(use_mfmp=False,
                                                use_fce=False)),
    ("+ MFMP w/o FMI + FCE", dict(use_fmi=False)),
    ("FACENet, full-width FMI (paper reading)", dict()),
    ("FACENet, reduced FMI", dict(fmi_width=-1)),
    ("FACENet, full-width FMI, first SMP reading (head)", dict(smp="head")),
    ("FACENet, full-width FMI, defaults (+ FCE projection)",
     dict(fce_projection=True)),
)


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _stats(model: FACENet, height: int, width: int):
  images = {m: jnp.zeros((1, height, width, 3)) for m in MODALITIES}
  flare = jnp.ones((1, 2))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images,
                                                flare, train=False))
  return _count(variables["params"]), _flops(
      lambda v, i, f: model.apply(v, i, f).embedding, variables, images,
      flare)


def _stream_stats(backbone: str, height: int, width: int):
  """One stream alone: stem, every stage or block, pooled feature."""
  module = backbones.build(backbone, input_size=(height, width))
  image = jnp.zeros((1, height, width, 3))

  def run(m, x):
    x = m.stem(x, False)
    for stage in range(1, m.num_stages + 1):
      x = m.stage(stage, x, False)
    return m.pool(x)

  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), image,
                                                 method=run))
  return _count(variables["params"]), _flops(
      lambda v, x: module.apply(v, x, method=run), variables, image)


def main(argv):
  del argv
  entry = backbones.info(_BACKBONE.value)
  plug_stage = backbones.resolve_plug_stage(entry.name, 0)
  unit = "stage" if entry.family == "resnet" else "block"
  params, flops = _stream_stats(entry.name, _HEIGHT.value, _WIDTH.value)
  print(f"One {entry.name} stream at {_HEIGHT.value}x{_WIDTH.value} "
        f"(no head): {params / 1e6:.2f} M parameters, {flops / 1e9:.2f} "
        "GFLOPs per image")
  print()
  print(f"{entry.name}, input {_HEIGHT.value}x{_WIDTH.value}, "
        f"{_CLASSES.value} classes, "
        f"{'last stride 1, ' if 'last_stride' in entry.reads else ''}"
        f"plug-in after {unit} {plug_stage}")
  print("| variant | parameters (M) | GFLOPs per triplet |")
  print("|---|---:|---:|")
  for name, overrides in VARIANTS:
    if overrides.get("fmi_width") == -1:
      overrides = {**overrides, "fmi_width": _REDUCED.value}
      name = f"{name} (width {_REDUCED.value})"
    model = FACENet(num_classes=_CLASSES.value, backbone=entry.name,
                    **overrides)
    params, flops = _stats(model, _HEIGHT.value, _WIDTH.value)
    print(f"| {name} | {params / 1e6:.2f} | {flops / 1e9:.2f} |")


if __name__ == "__main__":
  app.run(main)
