"""Evaluation of a run: ranking, results files, the missing-modality sweep.

`evaluate` ranks the gallery of config.eval.split for every query with the
embeddings of `train.extract` and writes WORKDIR/eval_results.json (the test
split) or eval_results_val.json; `evaluate_checkpoint` is --mode eval.
"""

import json
import os
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from facenet_jax import checkpointing
from facenet_jax import console as console_lib
from facenet_jax import evaluation
from facenet_jax.constants import MODALITIES
from facenet_jax.models import FACENet
from facenet_jax.train import build
from facenet_jax.train import extract
from facenet_jax.train import feed
from facenet_jax.train import mesh
from facenet_jax.train import train_state


MSVR_SCENE_DATASETS = ("msvr310",)


# The sweep's outputs in the workdir (checkpointing.split_file names the val
# split's; missing_in other than "both" adds _query / _gallery).
MISSING_TABLE_FILE = "missing_modality.md"


MISSING_ROWS_FILE = "missing_modality.json"


def rank(config: ml_collections.ConfigDict, query: dict,
         gallery: dict, distmat: Optional[np.ndarray] = None) -> dict:
  """evaluation.rank_report with the dataset's protocol and eval settings."""
  return evaluation.rank_report(
      query, gallery, max_rank=config.eval.max_rank,
      use_scenes=config.dataset in MSVR_SCENE_DATASETS,
      rerank=config.eval.rerank, distmat=distmat)


def results_file(split: str, missing: Sequence[str] = (),
                 side: str = "both", rendered: str = "none") -> str:
  """The name of the results file of one evaluation, in the workdir.

  eval_results.json (test) / eval_results_val.json (val) with every
  modality: the files the study driver reads. A missing set writes
  eval_results_missing-<m>[+<m>]_<side>[_val].json, so that it never
  overwrites them (e.g. eval_results_missing-rgb+ni_both.json); a rendered
  flare (config.eval.rendered_flare) adds _rendered-flare-<side> before
  the split's suffix (eval_results_rendered-flare-query_val.json).
  """
  name = checkpointing.EVAL_RESULTS_FILE
  stem, ext = os.path.splitext(name)
  if missing:
    stem += f"_missing-{'+'.join(missing)}_{side}"
  if rendered != "none":
    stem += f"_rendered-flare-{rendered}"
  return checkpointing.split_file(stem + ext, split)


def _sweep_file(name: str, split: str, side: str,
                rendered: str = "none") -> str:
  stem, ext = os.path.splitext(name)
  if side != "both":
    stem += f"_{side}"
  if rendered != "none":
    stem += f"_rendered-flare-{rendered}"
  return checkpointing.split_file(stem + ext, split)


def results_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where an evaluation of config writes its results (the sweep: its table)."""
  side = extract.missing_side(config)
  if extract.is_sweep(config.eval.missing):
    name = _sweep_file(MISSING_TABLE_FILE, config.eval.split, side,
                       extract.rendered_flare_side(config))
  else:
    name = results_file(config.eval.split,
                        extract.parse_missing(config.eval.missing), side,
                        extract.rendered_flare_side(config))
  return os.path.join(workdir, name)


def _evaluate_set(config: ml_collections.ConfigDict, workdir: str,
                  model: FACENet, state: train_state.TrainState,
                  sharding: mesh.Sharding, missing: tuple[str, ...],
                  side: str, embed_fn: dict,
                  console: console_lib.Console) -> dict:
  """Ranks one missing set (() = every modality) and writes its results file.

  embed_fn: {render: extract.embedding_function(..., render)}, filled here
  as the sides of config.eval.rendered_flare need them, so that a sweep
  compiles each once.
  """
  query_split, gallery_split = feed.eval_splits(config)
  lacks = extract.missing_by_side(missing, side)
  rendered = extract.rendered_flare_side(config)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  start = time.time()
  embedded = {}
  for part, split in (("query", query_split), ("gallery", gallery_split)):
    render = rendered in (part, "both")
    if render not in embed_fn:
      embed_fn[render] = extract.embedding_function(config, model, sharding,
                                                    render)
    embedded[part] = extract.extract(config, model, variables, split,
                                     sharding, console=console,
                                     missing=lacks[part],
                                     embed_fn=embed_fn[render], render=render)
  results = rank(config, embedded["query"], embedded["gallery"])
  results["step"] = int(mesh.to_host(state.step))
  results["dataset"] = config.dataset
  results["split"] = config.eval.split
  results["missing"] = extract.missing_label(missing)
  # Nothing is blanked anywhere when nothing is missing: the full-modality
  # file does not depend on an eval.missing_in that has no effect.
  results["missing_in"] = side if missing else "none"
  results["rendered_flare"] = rendered
  results["fusion"] = {k: config.model[k]
                       for k in checkpointing.FUSION_FIELDS}
  logging.info("Evaluated step %d on %s/%s in %.1fs: %s", results["step"],
               query_split, gallery_split, time.time() - start,
               json.dumps(results))
  if jax.process_index() == 0:
    path = os.path.join(workdir, results_file(config.eval.split, missing,
                                              side, rendered))
    with open(path, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results


def evaluate(config: ml_collections.ConfigDict, workdir: str, model: FACENet,
             state: train_state.TrainState, sharding: mesh.Sharding,
             console: console_lib.Console = console_lib.SILENT) -> dict:
  """Ranks the gallery for every query of config.eval.split.

  The modalities of config.eval.missing are blanked on the side(s)
  config.eval.missing_in names. Writes results_file(...): with every
  modality WORKDIR/eval_results.json (test split) or eval_results_val.json
  (val split), so that evaluating one split keeps the other's results; a
  missing set writes a file of its own.

  Raises:
    ValueError: config.eval.missing is invalid, or "all" (a sweep:
      evaluate_missing_sweep).
  """
  if extract.is_sweep(config.eval.missing):
    raise ValueError("config.eval.missing='all' is a sweep: use "
                     "evaluate_missing_sweep (--mode eval)")
  (missing,) = extract.missing_sets(config)
  side = extract.missing_side(config)
  results = _evaluate_set(config, workdir, model, state, sharding, missing,
                          side, {}, console)
  query_split, gallery_split = feed.eval_splits(config)
  sides = lambda s: "query and gallery" if s == "both" else s
  without = (f", without {extract.missing_label(missing)} in the {sides(side)}"
             if missing else "")
  rendered = extract.rendered_flare_side(config)
  if rendered != "none":
    without += f", rendered flare on the {sides(rendered)}"
  console.print(f"\n{config.dataset} {config.eval.split} split "
                f"({query_split} vs {gallery_split}), step {results['step']}"
                f"{without}, percentages:")
  console.print(evaluation.format_results(results))
  return results


def _percent(results: Mapping[str, Any], key: str) -> str:
  return f"{100 * results[key]:.1f}" if key in results else "-"


def missing_modality_table(sweep: Mapping[str, Any]) -> str:
  """A sweep (evaluate_missing_sweep) as a markdown table of percentages."""
  where = {"both": "the query and the gallery", "query": "the query only",
           "gallery": "the gallery only"}[sweep["missing_in"]]
  rendered = sweep.get("rendered_flare", "none")
  flare = ("" if rendered == "none" else
           f", with a rendered flare on the "
           f"{'query and gallery' if rendered == 'both' else rendered}")
  lines = [
      f"Missing modalities blanked in {where}{flare}: {sweep['dataset']}, "
      f"{sweep['split']} split, step {sweep['step']}; percentages. flare / "
      "clean: the queries whose real RGB or NI image has flare / neither "
      "has.",
      "",
      "| missing | present | mAP | R-1 | R-5 | R-10 | flare mAP | "
      "clean mAP |",
      "|---|---|---:|---:|---:|---:|---:|---:|"]
  for row in sweep["rows"]:
    missing = extract.parse_missing(row["missing"])
    present = "+".join(m for m in MODALITIES if m not in missing)
    cells = [row["missing"], present] + [
        _percent(row, k) for k in ("mAP", "rank1", "rank5", "rank10")] + [
            _percent(row[s], "mAP") for s in ("flare", "clean")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def evaluate_missing_sweep(
    config: ml_collections.ConfigDict, workdir: str, model: FACENet,
    state: train_state.TrainState, sharding: mesh.Sharding,
    console: console_lib.Console = console_lib.SILENT) -> dict:
  """config.eval.missing="all": every set of MISSING_SWEEP from one state.

  Each set writes the results file that evaluating it alone writes
  (results_file; "none" rewrites eval_results.json with the same numbers).
  The rows go to WORKDIR/missing_modality.md (the table) and
  missing_modality.json; _val for the val split, and _query / _gallery
  before those for config.eval.missing_in other than "both".

  Returns:
    {"step", "dataset", "split", "missing_in", "rows"}: rows are the
    results of every set, in extract.MISSING_SWEEP order.
  """
  side = extract.missing_side(config)
  embed_fn = {}
  rows = [_evaluate_set(config, workdir, model, state, sharding, missing,
                        side, embed_fn, console)
          for missing in extract.MISSING_SWEEP]
  rendered = extract.rendered_flare_side(config)
  sweep = {"step": rows[0]["step"], "dataset": config.dataset,
           "split": config.eval.split, "missing_in": side,
           "rendered_flare": rendered, "rows": rows}
  table = missing_modality_table(sweep)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, _sweep_file(
        MISSING_ROWS_FILE, config.eval.split, side, rendered)), "w") as f:
      json.dump(sweep, f, indent=2, sort_keys=True)
    with open(os.path.join(workdir, _sweep_file(
        MISSING_TABLE_FILE, config.eval.split, side, rendered)), "w") as f:
      f.write(table)
  console.print("")
  console.print(table.rstrip())
  return sweep


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str,
    step: Optional[int] = None,
    console: console_lib.Console = console_lib.SILENT,
    recorded_fusion: bool = True) -> dict:
  """--mode eval: restores the latest (or given) checkpoint and evaluates it.

  With `recorded_fusion`, the fusion chosen on the run's val split
  (scripts/fusion.py) is used where config keeps the trained one
  (checkpointing.apply_recorded_fusion); the study evaluates every run as
  its variant is configured instead.

  config.eval.missing="all" restores once and sweeps every missing set
  (evaluate_missing_sweep, whose summary it returns).
  """
  # Config errors before the checkpoint is read.
  sets = extract.missing_sets(config)
  rendered = extract.rendered_flare_side(config)
  chosen = (checkpointing.apply_recorded_fusion(config, workdir)
            if recorded_fusion else None)
  model, state, sharding = train_state.restore_for_eval(config, workdir, step)
  what = (f"with each of the {len(sets)} missing-modality sets "
          if len(sets) > 1 else "")
  if chosen:
    what += f"with the fusion chosen on val, {build.fusion_summary(config)}, "
  if rendered != "none":
    what += (f"with a rendered flare on the "
             f"{'query and gallery' if rendered == 'both' else rendered} ")
  console.print(f"Evaluating step {int(mesh.to_host(state.step))} of "
                f"{workdir} {what}on the {config.eval.split} split; "
                f"{mesh.describe_devices()}")
  if extract.is_sweep(config.eval.missing):
    return evaluate_missing_sweep(config, workdir, model, state, sharding,
                                  console)
  return evaluate(config, workdir, model, state, sharding, console)

