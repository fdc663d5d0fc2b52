"""Pictures of a trained run: rank lists, flare masks, a t-SNE map.

  python scripts/visualize.py --workdir /runs/wmveid863
  python scripts/visualize.py --config configs/synthetic.py \
      --workdir /tmp/facenet --config.eval.split=val --queries=3,17 --topk 8

Reads the run's latest (or --step) checkpoint and its evaluation split
(config.eval.split), and writes WORKDIR/figures/ranks_flare.png,
ranks_clean.png, masks.png and tsne.png (facenet_jax/visualize.py says what
each shows). Without --config the run's own config.json is used. The t-SNE
map needs the viz extra (pip install -e ".[viz]"); without it, it is skipped.
The full log goes to WORKDIR/log.txt; a user error (no checkpoint, bad flag)
prints one line and exits with status 2. `scripts/main.py --mode visualize`
makes the same pictures with the default options.
"""

import os
import sys

# The repository root, so that `configs` and the packages import from a clone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facenet_jax import console as console_lib  # noqa: E402  (no JAX, no TF)

with console_lib.quiet_imports() as _STARTUP:
  from absl import app  # noqa: E402
  from absl import flags  # noqa: E402
  from ml_collections import config_flags  # noqa: E402
  import jax  # noqa: E402
  import input_pipeline  # noqa: E402,F401  (hides GPUs from TensorFlow)
  from facenet_jax import visualize  # noqa: E402

_DEFAULTS = visualize.Options()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Configuration file (configs/*.py); default: the run's "
    "config.json.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")
_FIGURES = flags.DEFINE_multi_enum(
    "figures", list(_DEFAULTS.figures), list(visualize.FIGURES),
    "Figures to draw (repeat the flag for several).")
_NUM_QUERIES = flags.DEFINE_integer(
    "num_queries", _DEFAULTS.num_queries,
    "Rows of each rank list, queries drawn at random (--seed).")
_QUERIES = flags.DEFINE_list(
    "queries", [], "Query indices to show instead, e.g. --queries=3,17; each "
    "goes to the flare or the clean rank list.")
_TOPK = flags.DEFINE_integer("topk", _DEFAULTS.topk,
                             "Gallery entries per query.")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed,
                             "Seed of the random choices and of t-SNE.")
_NUM_MASKS = flags.DEFINE_integer("num_masks", _DEFAULTS.num_masks,
                                  "Images in masks.png (flare ones first).")
_MAX_POINTS = flags.DEFINE_integer(
    "max_points", _DEFAULTS.max_points,
    "Most embeddings in tsne.png (a sample drawn with --seed).")
_TILE_HEIGHT = flags.DEFINE_integer("tile_height", _DEFAULTS.tile_height,
                                    "Height of an image in the figures, px.")
flags.mark_flags_as_required(["workdir"])


def _options() -> visualize.Options:
  try:
    queries = tuple(int(q) for q in _QUERIES.value)
  except ValueError as e:
    raise ValueError(f"--queries must be comma-separated query indices, got "
                     f"{','.join(_QUERIES.value)!r}") from e
  return visualize.Options(
      figures=tuple(_FIGURES.value), num_queries=_NUM_QUERIES.value,
      queries=queries, topk=_TOPK.value, seed=_SEED.value,
      num_masks=_NUM_MASKS.value, max_points=_MAX_POINTS.value,
      tile_height=_TILE_HEIGHT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with console_lib.session(_WORKDIR.value, _STARTUP) as log_file:
    console = console_lib.Console(enabled=jax.process_index() == 0)
    written = visualize.visualize_run(_CONFIG.value, _WORKDIR.value,
                                      _STEP.value, _options(), console)
    console.print("")
    console.print(visualize.where(written, log_file))


if __name__ == "__main__":
  app.run(main, flags_parser=console_lib.parse_flags)
