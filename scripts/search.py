"""Index captures into a persistent gallery and search it (docs/search.md).

  python scripts/search.py index --workdir /tmp/facenet_demo \
      --gallery /tmp/demo_gallery --split test
  python scripts/search.py index --workdir /runs/wmveid863 \
      --gallery /data/city_gallery --images /data/captures
  python scripts/search.py query --workdir /tmp/facenet_demo \
      --gallery /tmp/demo_gallery --split test --queries 0,5 --k 10
  python scripts/search.py query --workdir /runs/wmveid863 \
      --gallery /data/city_gallery --rgb q_vis.jpg --ni q_ni.jpg --ti q_th.jpg

index embeds triplets with the run's latest (or --step) checkpoint
(inference.Embedder) into the gallery directory (facenet_jax/gallery.py):
the gallery split of --split (test: the dataset's "gallery", val: its
"val_gallery", or any split name), or a folder of images (--images) in the
per-identity layout the WMVeID863 and MSVR310 builders read,
FOLDER/<vid>/{vis,ni,th}/<file>, or without identities, FOLDER/{vis,ni,th}/
<file>; the three images of a triplet share a file name, a v<digit> token
in it is the camera. It saves after every --chunk triplets and skips what the
gallery holds already, so an interrupted run continues where it stopped.

query embeds query triplets (--rgb/--ni/--ti, comma-separated for several;
--images FOLDER; or the query split of --split, --queries picking some) and
prints the top --k of each with distances and metadata; queries with a known
identity leave out the entries of their identity and camera, as evaluation
ranks. It draws the rank list in scripts/visualize.py's style to --png
(default GALLERY/query_ranks.png). The full log goes to GALLERY/log.txt; a
user error (missing modality, an image that does not decode, a gallery of
another model, an empty gallery) prints one line and exits with status 2.
"""

import os
import sys

# The repository root, so that `configs` and the packages import from a clone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facenet_jax import console as console_lib  # noqa: E402  (no JAX, no TF)

with console_lib.quiet_imports() as _STARTUP:
  from absl import app  # noqa: E402
  from absl import flags  # noqa: E402
  from facenet_jax import checkpointing  # noqa: E402
  # Imports input_pipeline, which hides GPUs from TensorFlow.
  from facenet_jax import search_inputs  # noqa: E402

COMMANDS = ("index", "query")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (the model).")
_GALLERY = flags.DEFINE_string("gallery", None, "Gallery directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")
_SPLIT = flags.DEFINE_string(
    "split", None, "test or val (the gallery / query split of that pair), or "
    "a split name of the run's dataset.")
_IMAGES = flags.DEFINE_string(
    "images", None, "A folder of triplets: FOLDER/<vid>/{vis,ni,th}/<file> or "
    "FOLDER/{vis,ni,th}/<file>.")
_RGB = flags.DEFINE_list("rgb", [], "query: RGB image(s) of the query "
                         "triplet(s).")
_NI = flags.DEFINE_list("ni", [], "query: near-infrared image(s).")
_TI = flags.DEFINE_list("ti", [], "query: thermal image(s).")
_QUERIES = flags.DEFINE_list(
    "queries", [], "query --split: query indices, e.g. 0,5 (default the "
    "first four).")
_K = flags.DEFINE_integer("k", 10, "query: entries per query.")
_BACKEND = flags.DEFINE_enum(
    "backend", "auto", ["auto", "flat", "ivf", "hnsw"],
    "index: the faiss index of a new gallery (docs/search.md).")
_CHUNK = flags.DEFINE_integer(
    "chunk", 256, "index: triplets embedded between two saves.")
_EXCLUDE = flags.DEFINE_boolean(
    "exclude_same_camera", True, "query: leave out entries of the query's "
    "identity and camera when its identity is known (the evaluation "
    "protocol).")
_PNG = flags.DEFINE_string("png", None, "query: where the rank list goes "
                           "(default GALLERY/query_ranks.png).")
_TILE_HEIGHT = flags.DEFINE_integer("tile_height", 96,
                                    "query: image height in the PNG, px.")
flags.mark_flags_as_required(["workdir", "gallery"])


def index(console: console_lib.Console) -> None:
  """The index command."""
  if bool(_SPLIT.value) == bool(_IMAGES.value):
    raise ValueError("index needs exactly one of --split (a split of the "
                     "run's dataset) and --images (a folder of triplets)")
  if _CHUNK.value < 1:
    raise ValueError(f"--chunk must be >= 1, got {_CHUNK.value}")
  if _IMAGES.value:
    source = search_inputs.folder_source(_IMAGES.value)
  else:
    checkpointing.check_run_dir(_WORKDIR.value, _STEP.value)
    source = search_inputs.split_source(
        checkpointing.load_config(_WORKDIR.value), _SPLIT.value, "gallery")
  run = search_inputs.load_run(_WORKDIR.value, _STEP.value)
  gal = search_inputs.open_gallery(_GALLERY.value, run, _BACKEND.value)
  console.print(f"Indexing {source.description} into {_GALLERY.value} with "
                f"step {run.step} of {_WORKDIR.value} ({run.describe()})")
  added = search_inputs.index_source(gal, run, source, _GALLERY.value,
                                     _CHUNK.value, console)
  console.print(f"{_GALLERY.value}: {len(gal)} entries ({added} added), "
                f"{gal.backend} index")


def query(console: console_lib.Console) -> None:
  """The query command."""
  if _K.value < 1:
    raise ValueError(f"--k must be >= 1, got {_K.value}")
  given = [bool(_RGB.value or _NI.value or _TI.value), bool(_IMAGES.value),
           bool(_SPLIT.value)]
  if sum(given) != 1:
    raise ValueError("query needs one of --rgb/--ni/--ti (query triplets), "
                     "--images (a folder of them) or --split (the query "
                     "split of the run's dataset)")
  if given[0]:
    source = search_inputs.path_source(_RGB.value, _NI.value, _TI.value)
  elif given[1]:
    source = search_inputs.folder_source(_IMAGES.value)
  else:
    checkpointing.check_run_dir(_WORKDIR.value, _STEP.value)
    source = search_inputs.split_source(
        checkpointing.load_config(_WORKDIR.value), _SPLIT.value, "query")
    try:
      picked = [int(q) for q in _QUERIES.value] or list(
          range(min(4, len(source))))
    except ValueError as e:
      raise ValueError(f"--queries must be comma-separated query indices, "
                       f"got {','.join(_QUERIES.value)!r}") from e
    source = source.subset(picked)
  # Cheap checks first: the images decode, the gallery is one and not empty.
  triplets = source.read(range(len(source)))
  gal = search_inputs.load_gallery(_GALLERY.value)
  run = search_inputs.load_run(_WORKDIR.value, _STEP.value)
  gal.check_model(run.fingerprint)
  found, query_meta = search_inputs.search(gal, run, source, triplets, _K.value,
                                           _EXCLUDE.value)
  console.print(f"Top {_K.value} of {len(gal)} gallery entries "
                f"({gal.backend} index) for {len(source)} "
                f"quer{'y' if len(source) == 1 else 'ies'}, step {run.step} "
                f"of {_WORKDIR.value}:")
  console.print(search_inputs.format_table(found, query_meta))
  png = _PNG.value or os.path.join(_GALLERY.value, "query_ranks.png")
  search_inputs.draw(gal, run, found, query_meta, triplets, png, _K.value,
                     _TILE_HEIGHT.value)
  console.print(f"\nrank list  {png}")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    console_lib.user_error(f"usage: scripts/search.py {{{'|'.join(COMMANDS)}}} "
                           f"--workdir RUN --gallery DIR ...; got "
                           f"{' '.join(argv[1:]) or 'no command'}")
  if argv[1] == "query" and not os.path.isdir(_GALLERY.value):
    console_lib.user_error(f"--gallery {_GALLERY.value}: no such directory "
                           "(scripts/search.py index makes one)")
  with console_lib.session(_GALLERY.value, _STARTUP):
    # faiss's ImportError names the extra that installs it: a user error too.
    try:
      console = console_lib.Console()
      (index if argv[1] == "index" else query)(console)
    except ImportError as e:
      raise ValueError(str(e)) from e


if __name__ == "__main__":
  app.run(main, flags_parser=console_lib.parse_flags)
