"""Why does a variant rank as it does? Diagnostics of a finished study.

  python scripts/diagnose_study.py --config configs/experiments.py \
      --workdir /tmp/facenet_study

For each finished run of the chosen variants (the same --config and
--workdir as scripts/experiments.py), on the test split
(--config.eval.split=val: on the validation split, as experiments.py
--split=val; the runs need results on that split):
  * per-stream retrieval: rank with the RGB, NI or TI segment of the
    embedding alone, next to the full embedding;
  * for variants with FCE, "FCE off at test": the same checkpoint evaluated
    with every flare pseudo-label set to 0, so no sample's RGB/NI features
    are replaced by TI features at test time (training is unchanged);
  * "rendered flare on the query": every query's RGB and NI images get a
    flare of facenet_jax/flare_render.py's family (config.eval.rendered_
    flare=query), which neither the dataset's generator nor training
    produces: ranking under a flare the model has never seen. Its flare /
    clean rows are the queries whose real images have / have no flare, so
    "clean" is the queries whose only flare is the rendered one.
  * "flared streams at weight w" (w = 0.5, 0): the full network, ranked
    with the segments' distances re-weighted so that a flared image's RGB /
    NI segment counts w times (fusion.stream_weights "fixed"): how
    much identity a flared stream still carries, next to "equal segments"
    (w = 1, every segment L2-normalised and weighted alike).
  * "rendered_masks" (variants with MFMP, synthetic_flare only): the masks
    scored as scripts/experiments.py scores them, on the split's images as
    they are and with every image's RGB and NI rendered flare
    (mask_quality.with_rendered_flare, whose ground truth is the pixels the
    rendered flare saturated): does a mask find a flare it was not trained
    on? A second table, below the first.
--probes picks among segments, fce_off, rendered_flare, flare_weighting and
rendered_masks (default: all; with rendered_masks alone nothing is ranked).
The script reuses the study's compiled programs (WORKDIR/xla_cache).
These are measurements of the final checkpoints, not a model selection: the
tables of scripts/experiments.py stay what is reported. The markdown goes to
WORKDIR/diagnostics.md (diagnostics_val.md for the validation split).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facenet_jax import console as console_lib  # noqa: E402  (no JAX, no TF)

with console_lib.quiet_imports() as _STARTUP:
  from absl import app  # noqa: E402
  from absl import flags  # noqa: E402
  from ml_collections import config_flags  # noqa: E402
  import numpy as np  # noqa: E402
  import input_pipeline  # noqa: E402,F401  (hides GPUs from TensorFlow)
  from facenet_jax import checkpointing  # noqa: E402
  from facenet_jax import experiments  # noqa: E402
  from facenet_jax import fusion  # noqa: E402
  from facenet_jax import mask_quality  # noqa: E402
  from facenet_jax.train import evaluate  # noqa: E402
  from facenet_jax.train import extract  # noqa: E402
  from facenet_jax.train import feed  # noqa: E402
  from facenet_jax.train import train_state  # noqa: E402
  from facenet_jax.constants import FLARE_MODALITIES, MODALITIES  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The study's base configuration.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The study directory.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["baseline", "mfmp", "mfmp_fce", "facenet"],
    "Variants to diagnose.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
PROBES = ("segments", "fce_off", "rendered_flare", "flare_weighting",
          "rendered_masks")
FLARE_WEIGHTS = (1.0, 0.5, 0.0)
_PROBES = flags.DEFINE_multi_enum(
    "probes", list(PROBES), PROBES,
    "Probes beside the full embedding: per-stream segments, FCE off at "
    "test, rendered flare on the query, flared streams re-weighted, masks "
    "scored under rendered flare.")
flags.mark_flags_as_required(["config", "workdir"])

DIAGNOSTICS_FILE = "diagnostics.md"


def diagnose_run(config, workdir: str, probes=PROBES) -> dict:
  """{probe name: rank_report} for one finished run."""
  model, state, sharding = train_state.restore_for_eval(config, workdir)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  query_split, gallery_split = feed.eval_splits(config)
  split = {"query": extract.extract(config, model, variables, query_split,
                                  sharding),
           "gallery": extract.extract(config, model, variables, gallery_split,
                                    sharding)}
  reports = {"full embedding": evaluate.rank(config, split["query"],
                                          split["gallery"])}
  if "segments" in probes:
    segments = {s: experiments.modality_segments(split[s]["embedding"],
                                                 MODALITIES) for s in split}
    for m in MODALITIES:
      # One segment alone: Euclidean, whatever fusion the run ranks with.
      alone = [{**{k: v for k, v in split[s].items() if k != "weights"},
                "embedding": segments[s][m]} for s in ("query", "gallery")]
      reports[f"{m.upper()} segment only"] = evaluate.rank(config, *alone)
  if "flare_weighting" in probes:
    for w in FLARE_WEIGHTS:
      name = ("equal segments" if w == 1 else
              f"flared streams at weight {w:g}")
      fused = [(np.asarray(fusion.normalized_segments(x["embedding"])),
                np.asarray(fusion.stream_weights("fixed", x["flare"], None,
                                                 w)))
               for x in (split["query"], split["gallery"])]
      reports[name] = evaluate.rank(config, split["query"], split["gallery"],
                                 distmat=fusion.numpy_distances(*fused[0],
                                                                *fused[1]))
  if "rendered_flare" in probes:
    rendered = extract.extract(config, model, variables, query_split, sharding,
                             render=True)
    reports["rendered flare on the query"] = evaluate.rank(config, rendered,
                                                        split["gallery"])
  if config.model.use_fce and "fce_off" in probes:
    off = {s: extract.extract(config, model, variables, name, sharding,
                            zero_flare=True)
           for s, name in (("query", query_split),
                           ("gallery", gallery_split))}
    reports["FCE off at test"] = evaluate.rank(config, off["query"],
                                            off["gallery"])
  return reports


def _mask_rows(base, root, seeds) -> list[str]:
  """Rows of the mask table: each MFMP variant, as is and rendered."""
  data = mask_quality.load_eval_split_with_masks(
      base.dataset, base.eval.split, base.dataset_config,
      base.data_dir or None, base.val_ids)
  sets = {"as is": data,
          "rendered flare": mask_quality.with_rendered_flare(
              data, pixel_low=base.flare.pixel_low)}
  rows = []
  for variant in _VARIANTS.value:
    per_set: dict = {name: {} for name in sets}
    for seed in seeds:
      config = experiments.variant_config(base, variant, seed, root)
      workdir = experiments.run_dir(root, variant, seed)
      if (not config.model.use_mfmp or
          experiments.finished_results(workdir, config) is None):
        continue
      print(f"scoring the masks of {variant} seed {seed}", flush=True)
      for name, scores in mask_quality.score_run_sets(config, workdir,
                                                      sets).items():
        per_set[name][seed] = scores
    for name, per_seed in per_set.items():
      if not per_seed:
        continue
      cells = []
      for m in FLARE_MODALITIES:
        for key in ("iou", "iou_all_ones"):
          cells.append(experiments.cell(experiments.mean_std(
              [100 * r[m][key] for r in per_seed.values()])))
      for key in ("coverage_flare", "coverage_clean"):
        cells.append(experiments.cell(experiments.mean_std(
            [100 * r["rgb"][key] for r in per_seed.values()])))
      rows.append(f"| {variant} | {name} | {len(per_seed)} | "
                  + " | ".join(cells) + " |")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  base, root = _CONFIG.value, _WORKDIR.value
  try:
    seeds = experiments.parse_seeds(_SEEDS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  unknown = [v for v in _VARIANTS.value if v not in experiments.VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; known: "
                         f"{sorted(experiments.VARIANTS)}")
  if not os.path.isdir(os.path.join(root, "runs")):
    raise app.UsageError(f"--workdir={root} holds no study (no runs/ "
                         "directory): give scripts/experiments.py's --workdir")
  with console_lib.session(root, _STARTUP) as log_file:
    _diagnose(base, root, seeds)
  print(f"log: {log_file}")


def _diagnose(base, root, seeds) -> None:
  """Runs the probes of every finished run; writes and prints the tables."""
  experiments.use_compilation_cache(root)
  ranking = [p for p in _PROBES.value if p != "rendered_masks"]
  rows = []
  for variant in _VARIANTS.value if ranking else ():
    per_probe: dict = {}
    for seed in seeds:
      config = experiments.variant_config(base, variant, seed, root)
      workdir = experiments.run_dir(root, variant, seed)
      if experiments.finished_results(workdir, config) is None:
        continue
      print(f"diagnosing {variant} seed {seed}", flush=True)
      for probe, report in diagnose_run(config, workdir, ranking).items():
        per_probe.setdefault(probe, {})[seed] = report
    for probe, per_seed in per_probe.items():
      cells = []
      for subset in experiments.SUBSETS:
        agg = experiments.aggregate(per_seed, subset)
        cells += [experiments.cell(agg[k]) for k in ("mAP", "rank1")]
      rows.append(f"| {variant} | {probe} | {len(per_seed)} | "
                  + " | ".join(cells) + " |")
  text = "" if not ranking else "\n".join([
      f"### Diagnostics (final checkpoints, {base.eval.split} split; not "
      "used to select anything)", "",
      "| variant | probe | seeds | mAP | R-1 | flare mAP | flare R-1 | "
      "clean mAP | clean R-1 |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|", *rows, ""])
  if "rendered_masks" in _PROBES.value:
    text += "\n".join([
        *([""] if text else []),
        f"### Masks as they are and under a rendered flare "
        f"({base.eval.split} split)", "",
        "| variant | images | seeds | RGB IoU | all-ones | NI IoU | all-ones "
        "| RGB coverage, flare images | RGB coverage, flare-free images |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *_mask_rows(base, root, seeds), ""])
  path = os.path.join(root, checkpointing.split_file(DIAGNOSTICS_FILE,
                                                     base.eval.split))
  with open(path, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main, flags_parser=console_lib.parse_flags)
