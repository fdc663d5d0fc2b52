"""The paper's Tables 2-5 and a measurable Figure 5 on synthetic_flare.

  # The whole study: 12 variants x 3 seeds (about 1.5-2 h on a 2-core CPU).
  python scripts/experiments.py --config configs/experiments.py \
      --workdir /tmp/facenet_study
  # One seed of Table 2 only (about 15 min).
  python scripts/experiments.py --config configs/experiments.py \
      --workdir /tmp/facenet_quick --quick

Each (variant, seed) trains in WORKDIR/runs/<variant>/seed<k>; rerunning the
same command resumes an interrupted study (finished runs are skipped, an
unfinished one continues from its last checkpoint). After every run the
tables are rewritten to WORKDIR/results.md: mean +- sample std over seeds of
mAP, R-1, R-5, R-10 for all, flare and clean queries. Then the predicted
RGB/NI masks of the MFMP variants with and without FMI are scored against the
ground-truth flare masks (WORKDIR/results.md, "Mask quality") and drawn next
to them in WORKDIR/mask_figure.png. Base-config fields can be overridden as
in main.py (--config.num_train_steps=...), which changes every variant.

--split=val evaluates every run on the validation split instead of the test
split (for design choices; the test tables stay what is reported):
synthetic_flare's val_query/val_gallery, or with --config.val_ids=N the N
training identities held out of every run. Its outputs carry a "_val" suffix
(results_val.md, mask_figure_val.png, each run's eval_results_val.json and
mask_quality_val.json), so the two splits never overwrite each other. Runs
trained under one --split are not trained again under the other, only
evaluated on its split.
"""

import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facenet_jax import console as console_lib  # noqa: E402  (no JAX, no TF)

with console_lib.quiet_imports() as _STARTUP:
  from absl import app  # noqa: E402
  from absl import flags  # noqa: E402
  from ml_collections import config_flags  # noqa: E402
  import jax  # noqa: E402
  import numpy as np  # noqa: E402
  import input_pipeline  # noqa: E402,F401  (hides GPUs from TensorFlow)
  from facenet_jax import checkpointing  # noqa: E402
  from facenet_jax import experiments  # noqa: E402
  from facenet_jax import mask_quality  # noqa: E402
  from facenet_jax.train import evaluate  # noqa: E402
  from facenet_jax.train import feed  # noqa: E402
  from facenet_jax.train import loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Base configuration (configs/experiments.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory.")
_TABLES = flags.DEFINE_list("tables", ["2", "3", "4", "5"],
                            "Tables to run: the paper's 2, 3, 4, 5 and 8 (other "
                            "backbones), and beyond the paper 9 (warm start "
                            "from the baseline).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every variant.")
_QUICK = flags.DEFINE_bool("quick", False,
                           "Table 2 with one seed (the first of --seeds).")
_MASKS = flags.DEFINE_bool("mask_quality", True,
                           "Score and draw the masks after training.")
_MIN_FRACTION = flags.DEFINE_float(
    "min_fraction", 0.5, "A plug-in-resolution cell is ground-truth flare when "
    "at least this fraction of its pixels is.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Print the runs the study needs and stop.")
_SPLIT = flags.DEFINE_enum(
    "split", "test", ["test", "val"], "Evaluation split of every run (sets "
    "eval.split): test (reported) or val (for design choices).")
flags.mark_flags_as_required(["config", "workdir"])

# Mask variants: (label, figure title, variant), without FMI first (Figure
# 5's b and c).
MASK_VARIANTS = (("MFMP (w/o FMI) + FCE", "w/o FMI", "mfmp_nofmi_fce"),
                 ("MFMP + FCE", "with FMI", "mfmp_fce"),
                 ("FACENet", "FACENet", "facenet"),
                 ("FACENet, warm-started", "FACENet ws", "facenet_ws"))
FIGURE_FILE = "mask_figure.png"
FIGURE_EXAMPLES = 4
WALL_TIME_FILE = "wall_time.json"


def _seeds() -> list[int]:
  try:
    seeds = experiments.parse_seeds(_SEEDS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  return seeds[:1] if _QUICK.value else seeds


def _timed_train(config, workdir):
  start = time.time()
  results = loop.train_and_evaluate(config, workdir)
  # Time of this invocation (a resumed run counts its last part only).
  with open(os.path.join(workdir, WALL_TIME_FILE), "w") as f:
    json.dump({"seconds": time.time() - start}, f)
  return results


def _header(config, tables, seeds, root) -> str:
  seconds = []
  for variant in experiments.variants_of(tables):
    for seed in seeds:
      path = os.path.join(experiments.run_dir(root, variant, seed),
                          WALL_TIME_FILE)
      if os.path.exists(path):
        with open(path) as f:
          seconds.append(json.load(f)["seconds"])
  h, w = config.input_size
  length = (f"{config.num_train_steps} steps" if config.num_train_steps > 0
            else f"{config.num_epochs} epochs")
  if config.eval.split == "test":
    split = "the test split (query vs gallery)"
  elif config.val_ids:
    split = (f"the validation split carved from train (config.val_ids = "
             f"{config.val_ids} training identities held out of every run, "
             "one query per identity and camera)")
  else:
    split = ("the validation split (val_query vs val_gallery, identities "
             "disjoint from train and test)")
  return "\n".join([
      "# FACENet ablations on synthetic_flare", "",
      f"- Data: {config.dataset}/{config.dataset_config}; metrics on "
      f"{split}, final checkpoint, no selection.",
      f"- Model: {config.model.backbone} x{config.model.width_multiplier} per "
      f"stream, {h}x{w} inputs, last stride {config.model.last_stride}, "
      f"dtype {config.model.dtype}.",
      f"- Training: {length} of "
      f"{config.ids_per_batch}x{config.instances_per_id} triplets, lr "
      f"{config.optimizer.learning_rate} {config.optimizer.schedule}, "
      f"weight decay {config.optimizer.weight_decay}.",
      f"- Seeds: {', '.join(map(str, seeds))}; cells are mean ± sample std "
      "over seeds, in %. \"paper\" is ResNet50 on WMVeID863.",
      f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs, JAX "
      f"{jax.__version__} on {jax.devices()[0].platform}; {len(seconds)} "
      f"runs trained and evaluated in {sum(seconds) / 60:.1f} min (a resumed "
      "run counts its last invocation only).", ""])


def _mask_section(config, root, seeds, variants) -> str:
  """Scores every finished mask run, writes the figure, returns markdown."""
  present = [(label, v) for label, _, v in MASK_VARIANTS if v in variants]
  if not present:
    return ""
  split = config.eval.split
  data = mask_quality.load_eval_split_with_masks(
      config.dataset, split, config.dataset_config, config.data_dir or None,
      feed.val_ids(config))
  figure_masks = {}
  rows = []
  for label, variant in present:
    per_seed = []
    for seed in seeds:
      workdir = experiments.run_dir(root, variant, seed)
      cfg = experiments.variant_config(config, variant, seed, root)
      if experiments.finished_results(workdir, cfg) is None:
        continue
      scores = mask_quality.score_run(cfg, workdir, data, _MIN_FRACTION.value)
      per_seed.append(scores)
      with open(os.path.join(workdir, checkpointing.split_file(
          "mask_quality.json", split)), "w") as f:
        json.dump({m: scores[m] for m in ("rgb", "ni")}, f, indent=2)
      if variant not in figure_masks:
        figure_masks[variant] = scores
    for m in ("rgb", "ni"):
      if not per_seed:
        continue
      cells = [experiments.cell(experiments.mean_std(
          [100 * s[m][key] for s in per_seed if not np.isnan(s[m][key])]))
               for key in ("iou", "iou_all_ones", "coverage_flare",
                           "coverage_clean")]
      first = per_seed[0][m]
      rows.append(f"| {label} | {m} | {len(per_seed)} | {' | '.join(cells)} "
                  f"| {first['num_flare']} / {first['num_clean']} |")
  if not rows:
    return ""
  figure_file = checkpointing.split_file(FIGURE_FILE, split)
  _write_figure(os.path.join(root, figure_file), data, figure_masks)
  return "\n".join([
      f"### Mask quality (the paper's Figure 5, measured; {split} split)", "",
      "Predicted hard masks M_S (plug-in resolution, every channel) against "
      "the ground-truth flare masks area-pooled to that resolution (a cell is "
      f"flare when >= {_MIN_FRACTION.value:g} of its pixels are), on the "
      f"query + gallery images of the {split} split. IoU over the images "
      "with flare at that resolution; \"all-ones IoU\" is what predicting "
      "flare everywhere scores; coverage is the fraction of the mask that "
      "is 1.", "",
      "| Model | modality | seeds | IoU | all-ones IoU | coverage, flare "
      "images | coverage, flare-free images | images (flare / flare-free) |",
      "|---|---|---:|---:|---:|---:|---:|---:|", *rows,
      "", f"Figure: [{figure_file}]({figure_file}) (the first seed with a "
      "finished run).", ""])


def _write_figure(path, data, figure_masks) -> None:
  """Figure 5 made concrete: image, ground truth, masks w/o and with FMI."""
  variants = list(figure_masks)
  titles = {v: title for _, title, v in MASK_VARIANTS}
  columns = ["image", "ground truth", "gt at map"] + [titles[v]
                                                      for v in variants]
  first = figure_masks[variants[0]]
  rows, labels = [], []
  for m in ("rgb", "ni"):
    area = first["gt"][m].mean(axis=(1, 2))
    for i in np.argsort(-area, kind="stable")[:FIGURE_EXAMPLES // 2]:
      rows.append([data[m][i], data[f"gt_{m}"][i].astype(np.float32),
                   first["gt"][m][i].astype(np.float32)]
                  + [figure_masks[v]["masks"][m][i] for v in variants])
      labels.append(f"{m} {i}")
  with open(path, "wb") as f:
    f.write(mask_quality.figure(rows, columns, labels))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  root = _WORKDIR.value
  try:
    tables = [2] if _QUICK.value else experiments.parse_tables(_TABLES.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if config.eval.split != _SPLIT.value:
    if config.eval.split != "test":
      raise app.UsageError(
          f"--split={_SPLIT.value} but the config sets eval.split="
          f"{config.eval.split!r}; choose the split with --split only")
    config.eval.split = _SPLIT.value
  seeds = _seeds()
  variants = experiments.variants_of(tables)
  if _DRY_RUN.value:
    for variant in variants:
      for seed in seeds:
        print(f"{variant} seed {seed}: "
              f"{experiments.run_dir(root, variant, seed)} "
              f"{experiments.VARIANTS[variant]}")
    return
  with console_lib.session(root, _STARTUP) as log_file:
    _run(config, root, tables, seeds, variants)
  print(f"log: {log_file}")


def _run(config, root, tables, seeds, variants) -> None:
  """Trains and evaluates the study, then scores the masks; prints results."""
  experiments.use_compilation_cache(root)
  results_path = os.path.join(
      root, checkpointing.split_file("results.md", config.eval.split))

  def write_tables(extra: str = "") -> None:
    text = experiments.results_markdown(
        tables, experiments.collect(config, root, variants, seeds),
        _header(config, tables, seeds, root), config.eval.split)
    with open(results_path, "w") as f:
      f.write(text + ("\n" + extra if extra else ""))

  print(f"{len(variants)} variants x {len(seeds)} seeds; results in "
        f"{results_path}", flush=True)
  experiments.run_study(config, root, tables, seeds, _timed_train,
                        on_result=write_tables,
                        evaluate_fn=functools.partial(
                            evaluate.evaluate_checkpoint, recorded_fusion=False))
  masks = ""
  if _MASKS.value:
    print("Scoring the predicted masks...", flush=True)
    masks = _mask_section(config, root, seeds, variants)
  write_tables(masks)
  with open(results_path) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main, flags_parser=console_lib.parse_flags)
