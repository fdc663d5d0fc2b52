r"""Renders the synthetic_flare picture grid for docs/data.md.

Rows are identities (one car, van and truck first); columns are conditions,
each seen by a different camera. Each cell shows RGB | NI | TI | flare masks
(red: RGB mask, green: NI mask, yellow: both).

Run:
  python scripts/make_synthetic_grid.py --output docs/images/synthetic_flare_grid.png
"""

from collections.abc import Callable
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageDraw

from input_pipeline.datasets import synthetic_flare
from input_pipeline.datasets import synthetic_render

_OUTPUT = flags.DEFINE_string("output", "docs/images/synthetic_flare_grid.png",
                              "Where to write the PNG.")
_CONFIG = flags.DEFINE_enum("config", "small", ["tiny", "small", "large"],
                            "synthetic_flare builder config whose renderer settings to use.")
_ROWS = flags.DEFINE_integer("rows", 5, "Number of identities (rows).")
_SCALE = flags.DEFINE_integer("scale", 1, "Integer upscaling of every pixel.")

# (column title, camera, condition on a rendered sample).
_COLUMNS: list[tuple[str, int, Callable[[synthetic_render.Sample], bool]]] = [
    ("day", 0, lambda s: not s.night and s.flare == "none" and not s.blurred),
    ("day, other camera", 5, lambda s: not s.night and s.flare == "none" and not s.blurred),
    ("night", 2, lambda s: s.night and s.flare == "none"),
    ("sun flare", 3, lambda s: s.flare == "sun"),
    ("headlamp glare", 6, lambda s: s.flare == "headlamp"),
    ("motion blur", 7, lambda s: s.blurred and s.flare == "none"),
]
_HEADER = 14
_GAP = 6
# Draws per cell before giving up on a condition (probabilities are >= 0.1).
_MAX_TRIES = 300


def _pick_pids(config: synthetic_render.RenderConfig, seed: int, rows: int) -> list[int]:
  """One train identity of each shape first, then the next unused pids."""
  pids = []
  for shape in range(len(synthetic_render.SHAPES)):
    pids.append(next(p for p in range(1000)
                     if synthetic_render.make_identity(config, seed, p).shape == shape))
  pids += [p for p in range(1000) if p not in pids][:max(0, rows - len(pids))]
  return pids[:rows]


def _cell(sample: synthetic_render.Sample) -> np.ndarray:
  """RGB | NI | TI | masks side by side, uint8 (H, 4 W, 3)."""
  masks = np.zeros_like(sample.rgb)
  masks[..., 0] = sample.flare_mask_rgb[..., 0] * 255
  masks[..., 1] = sample.flare_mask_ni[..., 0] * 255
  return np.concatenate([sample.rgb, sample.ni, sample.ti, masks], axis=1)


def make_grid(config: synthetic_flare.SyntheticFlareConfig, rows: int) -> Image.Image:
  """Renders the grid.

  Args:
    config: builder config (its render settings and seed are used).
    rows: number of identities.

  Returns:
    The grid image.
  """
  render = config.render
  h, w = render.height, render.width
  cell_w = 4 * w
  width = len(_COLUMNS) * (cell_w + _GAP) - _GAP
  height = _HEADER + rows * (h + _GAP) - _GAP
  canvas = np.full((height, width, 3), 255, np.uint8)
  for r, pid in enumerate(_pick_pids(render, config.seed, rows)):
    for c, (title, camid, wanted) in enumerate(_COLUMNS):
      camid %= render.num_cameras
      sample = next((s for s in (synthetic_render.render_sample(render, config.seed, pid,
                                                                camid, i)
                                 for i in range(_MAX_TRIES)) if wanted(s)), None)
      if sample is None:
        raise ValueError(f"No sample of pid {pid}, camera {camid} satisfies column "
                         f"{title!r} in {_MAX_TRIES} draws: check the config's probabilities")
      top, left = _HEADER + r * (h + _GAP), c * (cell_w + _GAP)
      canvas[top:top + h, left:left + cell_w] = _cell(sample)
  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  for c, (title, camid, _) in enumerate(_COLUMNS):
    label = f"{title} (cam {camid % render.num_cameras}): RGB NI TI mask"
    draw.text((c * (cell_w + _GAP) + 2, 1), label, fill=(0, 0, 0))
  return image


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = synthetic_flare.SyntheticFlare.builder_configs[_CONFIG.value]
  image = make_grid(config, _ROWS.value)
  if _SCALE.value > 1:
    image = image.resize((image.width * _SCALE.value, image.height * _SCALE.value),
                         Image.NEAREST)
  os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
  image.save(_OUTPUT.value)
  logging.info("Wrote %s (%dx%d)", _OUTPUT.value, image.width, image.height)


if __name__ == "__main__":
  app.run(main)
