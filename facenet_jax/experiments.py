"""The paper's ablation tables (2-5) as a resumable multi-seed study.

A *variant* is a named set of config overrides on top of the study's base
config; a *table* lists (row label, variant) pairs in the paper's order.
Variants shared by several tables (e.g. MFMP + FCE is a row of Tables 2, 3, 4
and 5) are trained once per seed. Every run has its own workdir
(ROOT/runs/<variant>/seed<k>), so an interrupted study resumes: finished runs
are skipped, an unfinished one resumes from its last checkpoint.

Results are aggregated over seeds as mean +- sample standard deviation and
written as markdown (`results_markdown`). A study run may not change its
length or evaluation settings between invocations (STUDY_FIXED_FIELDS), but
for the evaluation split (eval.split): each split has its own results file
(checkpointing.split_file), a run counts as finished for the split it has
results of, and a run trained for one split is only evaluated on the other.
"""

import dataclasses
import json
import os
import time
from typing import Callable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from facenet_jax import checkpointing
from input_pipeline import pipeline

# Overrides (dotted config path -> value) of each variant.
_NO_MODALITY = {"loss.modality": "none"}
# plug_stage 0: the backbone's default (ResNet stage 4, the paper's; a ViT's
# last-but-one block), so that the study runs on either family.
_MFMP_FCE = {"model.use_mfmp": True, "model.use_fmi": True,
             "model.use_fce": True, "model.plug_stage": 0, **_NO_MODALITY}
VARIANTS: dict[str, dict] = {
    "baseline": {"model.use_mfmp": False, "model.use_fce": False,
                 **_NO_MODALITY},
    "baseline_clahe": {"model.use_mfmp": False, "model.use_fce": False,
                       "preprocess.clahe": True, **_NO_MODALITY},
    "mfmp": {**_MFMP_FCE, "model.use_fce": False},
    "mfmp_fce": _MFMP_FCE,
    "mfmp_nofmi_fce": {**_MFMP_FCE, "model.use_fmi": False},
    **{f"mfmp_fce_stage{s}": {**_MFMP_FCE, "model.plug_stage": s}
       for s in (1, 2, 3)},
    **{f"mfmp_fce_{loss}": {**_MFMP_FCE, "loss.modality": loss}
       for loss in ("3m", "hc", "cdc")},
    "facenet": {**_MFMP_FCE, "loss.modality": "ic"},
}
# Table 8's other backbone on a CPU: the tiny ViT of the registry (8x8
# patches, a 16x8 token grid at the study's 128x64), plugged in before its
# last block. Its recipe is the ResNet study's (Adam, lr 1e-3), not the
# official ViT recipe (SGD, configs/*_vit.py), which was made for ImageNet
# ViT-B/16 weights.
_VIT = {"model.backbone": "vit_micro8"}
VARIANTS.update({"vit_baseline": {**VARIANTS["baseline"], **_VIT},
                 "vit_facenet": {**VARIANTS["facenet"], **_VIT}})
# Warm-started variants (beyond the paper): the same model, initialised from
# the same seed's finished run of another variant of the study ("@variant"),
# and trained for the same number of steps again. The baseline gets the same
# second run, so that every row of the warm-start table trains equally long.
_WARM = {"model.init_from": "@baseline"}
VARIANTS.update({f"{v}_ws": {**VARIANTS[v], **_WARM}
                 for v in ("baseline", "mfmp_fce", "facenet")})
# Masks that find the flare (the mask branch reads stage 1; the third
# study's runs, in no table, for scripts/diagnose_study.py).
VARIANTS["mfmp_fce_ms1"] = {**_MFMP_FCE, "model.mask_stage": 1}


@dataclasses.dataclass(frozen=True)
class Table:
  """A table: rows of (label, variant, paper mAP/R-1/R-5/R-10 or None)."""
  number: int
  title: str
  rows: tuple[tuple[str, str, tuple[float, float, float, float]], ...]


# The paper's numbers (WMVeID863, ResNet50, %): Tables 2-5.
_BASELINE = ("Baseline", "baseline", (53.7, 60.3, 69.1, 74.4))
_PAPER_MFMP_FCE = (60.5, 66.5, 76.2, 79.7)
_PAPER_FACENET = (62.1, 67.3, 76.7, 80.1)
TABLES: dict[int, Table] = {
    2: Table(2, "Ablation of the components", (
        _BASELINE,
        ("+ MFMP (SMP + FMI)", "mfmp", (53.9, 59.1, 72.2, 77.6)),
        ("+ MFMP + FCE", "mfmp_fce", _PAPER_MFMP_FCE),
        ("+ MFMP (w/o FMI) + FCE", "mfmp_nofmi_fce", (57.5, 64.9, 73.3, 76.3)),
        ("+ MFMP + FCE + IC (FACENet)", "facenet", _PAPER_FACENET),
    )),
    3: Table(3, "Comparison with a classical de-flare method", (
        _BASELINE,
        ("+ CLAHE", "baseline_clahe", (54.5, 60.5, 70.8, 74.8)),
        ("+ MFMP + FCE", "mfmp_fce", _PAPER_MFMP_FCE),
    )),
    4: Table(4, "Plug-in stage of MFMP + FCE", (
        ("Stage 1", "mfmp_fce_stage1", (50.6, 56.8, 68.5, 73.0)),
        ("Stage 2", "mfmp_fce_stage2", (53.8, 60.5, 71.2, 76.2)),
        ("Stage 3", "mfmp_fce_stage3", (55.5, 60.7, 72.6, 75.6)),
        ("Stage 4", "mfmp_fce", _PAPER_MFMP_FCE),
    )),
    5: Table(5, "Modality-relation losses", (
        ("FACENet w/o IC", "mfmp_fce", _PAPER_MFMP_FCE),
        ("+ 3M", "mfmp_fce_3m", (50.3, 55.3, 70.3, 77.4)),
        ("+ HC", "mfmp_fce_hc", (59.4, 64.9, 75.4, 79.5)),
        ("+ CdC", "mfmp_fce_cdc", (54.1, 58.2, 70.1, 74.7)),
        ("+ IC (FACENet)", "facenet", _PAPER_FACENET),
    )),
    8: Table(8, "Other backbones (ResNet18 x0.25 and the tiny ViT here; "
             "the paper: ResNet50, ViT-B/16, TransReID)", (
        ("ResNet", "baseline", (53.7, 60.3, 69.1, 74.4)),
        ("ResNet + MFMP + FCE + IC", "facenet", _PAPER_FACENET),
        ("ViT", "vit_baseline", (54.7, 61.2, 72.8, 78.1)),
        ("ViT + MFMP + FCE + IC", "vit_facenet", (58.4, 62.6, 74.6, 79.9)),
    )),
    # Not in the paper: its streams start from ImageNet, ours from random, so
    # the nearest stand-in is starting from a finished baseline run.
    9: Table(9, "Warm start from the baseline (beyond the paper)", (
        _BASELINE,
        ("Baseline, warm-started", "baseline_ws", None),
        ("+ MFMP + FCE, warm-started", "mfmp_fce_ws", None),
        ("FACENet", "facenet", _PAPER_FACENET),
        ("FACENet, warm-started", "facenet_ws", None),
    )),
}
# Config fields a study run may not change between invocations: unlike a
# single run (checkpointing.RESUMABLE_FIELDS), a study must not splice two LR
# schedules into one run (num_epochs, num_train_steps) or reuse results made
# with other evaluation settings (eval). The split (eval.split) may change:
# the results of each split are kept apart.
STUDY_FIXED_FIELDS = ("num_epochs", "num_train_steps", "eval")
STUDY_RESUMABLE_FIELDS = tuple(f for f in checkpointing.RESUMABLE_FIELDS
                               if f not in STUDY_FIXED_FIELDS) + ("eval.split",)
METRICS = (("mAP", "mAP"), ("R-1", "rank1"), ("R-5", "rank5"),
           ("R-10", "rank10"))
SUBSETS = ("all", "flare", "clean")
# Results of the test split; checkpointing.split_file names the val split's.
RESULTS_FILE = checkpointing.EVAL_RESULTS_FILE


def parse_tables(numbers: Sequence) -> list[int]:
  """Validates table numbers (e.g. from --tables) and returns them as ints."""
  out = []
  for n in numbers:
    try:
      number = int(n)
    except ValueError:
      number = -1
    if number not in TABLES:
      raise ValueError(f"--tables: unknown table {n!r}; the study has tables "
                       f"{sorted(TABLES)}")
    if number in out:
      raise ValueError(f"--tables: table {number} is listed twice")
    out.append(number)
  return out


def parse_seeds(values: Sequence) -> list[int]:
  """Validates seeds (e.g. from --seeds): distinct non-negative integers."""
  try:
    seeds = [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--seeds must be integers, got {list(values)}") from e
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(f"--seeds must be distinct non-negative integers, got "
                     f"{list(values)}")
  return seeds


def variants_of(tables: Sequence[int]) -> list[str]:
  """The distinct variants the tables need, in first-use order."""
  seen = []
  for number in tables:
    for _, variant, _ in TABLES[number].rows:
      if variant not in seen:
        seen.append(variant)
  return seen


def variant_config(base: ml_collections.ConfigDict, variant: str,
                   seed: int, root: str = "") -> ml_collections.ConfigDict:
  """The base config with the variant's overrides and the seed.

  A string override "@other" (warm starts) names the same seed's run of
  variant `other` under the study directory `root`.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
  config = ml_collections.ConfigDict(base.to_dict())
  for path, value in VARIANTS[variant].items():
    if isinstance(value, str) and value.startswith("@"):
      if not root:
        raise ValueError(f"variant {variant} starts from the {value[1:]} run "
                         "of the study: variant_config needs the study root")
      value = run_dir(root, value[1:], seed)
    node = config
    *parents, leaf = path.split(".")
    for key in parents:
      node = node[key]
    if leaf not in node:
      raise KeyError(f"variant {variant}: the base config has no field {path}")
    node[leaf] = value
  config.seed = seed
  return config


def use_compilation_cache(root: str) -> None:
  """Keeps the study's compiled programs in ROOT/xla_cache, so that the seeds
  of a variant and scripts/diagnose_study.py compile them once; a cache the
  user set (JAX_COMPILATION_CACHE_DIR) is kept instead."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(root, "xla_cache"))


def run_dir(root: str, variant: str, seed: int) -> str:
  return os.path.join(root, "runs", variant, f"seed{seed}")


def check_run(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a run directory started with another config (if it has one).

  Raises:
    CheckpointMismatchError: naming the differing fields, including the run
      length and evaluation settings (STUDY_FIXED_FIELDS).
  """
  checkpointing.check_config(workdir, config, has_state=True, write=False,
                             ignore=STUDY_RESUMABLE_FIELDS)


def expected_steps(workdir: str,
                   config: ml_collections.ConfigDict) -> Optional[int]:
  """The step a finished run reached; None if not yet known (no run_info)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  try:
    info = checkpointing.read_run_info(workdir)
  except FileNotFoundError:
    return None
  return int(config.num_epochs * info["steps_per_epoch"])


def finished_results(workdir: str, config: ml_collections.ConfigDict,
                     split: Optional[str] = None) -> Optional[dict]:
  """The run's eval results on a split if it finished training with config.

  A run counts as finished when its config.json matches `config` and its
  results file of the split (eval_results.json for test,
  eval_results_val.json for val) is of the final step; anything else (no
  results, no config.json, an evaluation of an earlier step) is unfinished.

  Args:
    workdir: the run directory.
    config: the run's config.
    split: "test" or "val"; None = config.eval.split.

  Raises:
    CheckpointMismatchError: the workdir was started with another config.
  """
  split = config.eval.split if split is None else split
  path = os.path.join(workdir, checkpointing.split_file(RESULTS_FILE, split))
  if not (os.path.exists(path) and
          os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE))):
    return None
  check_run(workdir, config)
  with open(path) as f:
    results = json.load(f)
  # Files written before eval.split existed hold test results.
  if (results.get("step") != expected_steps(workdir, config) or
      results.get("split", "test") != split):
    return None
  return results


def finished_training(workdir: str,
                      config: ml_collections.ConfigDict) -> bool:
  """Whether the run finished training (it has final results on a split)."""
  return any(finished_results(workdir, config, split) is not None
             for split in pipeline.EVAL_SPLITS)


def run_study(base: ml_collections.ConfigDict, root: str, tables: Sequence[int],
              seeds: Sequence[int],
              train_fn: Callable[[ml_collections.ConfigDict, str], dict],
              on_result: Optional[Callable[[], None]] = None,
              evaluate_fn: Optional[Callable[[ml_collections.ConfigDict, str],
                                             dict]] = None) -> dict:
  """Trains and evaluates every (variant, seed) the tables need, resuming.

  Everything is evaluated on base.eval.split. A run that finished training
  but has no results on that split (it was evaluated on the other one) is
  evaluated only.

  Args:
    base: the study's base config.
    root: the study directory.
    tables: table numbers.
    seeds: seeds; each variant runs once per seed.
    train_fn: train_and_evaluate(config, workdir) -> results.
    on_result: called after every finished run (e.g. to rewrite the tables).
    evaluate_fn: evaluate_checkpoint(config, workdir) -> results, for runs
      that finished training; None = train_fn (which then only evaluates).

  Returns:
    {variant: {seed: eval results}}.
  """
  variants = variants_of(tables)
  # A warm-started variant needs its source run first.
  sources = {value[1:] for v in variants for value in VARIANTS[v].values()
             if isinstance(value, str) and value.startswith("@")}
  variants = ([v for v in variants if v in sources] +
              [v for v in variants if v not in sources])
  missing = sources - set(variants)
  if missing:
    raise ValueError(f"the tables' warm-started variants start from "
                     f"{sorted(missing)}, which no requested table trains")
  plan = [(v, s) for v in variants for s in seeds]
  results: dict = {v: {} for v in variants}
  start = time.time()
  trained = 0
  for i, (variant, seed) in enumerate(plan, 1):
    config = variant_config(base, variant, seed, root)
    workdir = run_dir(root, variant, seed)
    check_run(workdir, config)
    done = finished_results(workdir, config)
    if done is not None:
      print(f"[{i}/{len(plan)}] {variant} seed {seed}: finished earlier, "
            f"mAP {100 * done['mAP']:.1f}", flush=True)
      results[variant][seed] = done
      continue
    if evaluate_fn is not None and finished_training(workdir, config):
      print(f"[{i}/{len(plan)}] evaluating {variant} seed {seed} (trained "
            f"earlier) on the {config.eval.split} split", flush=True)
      results[variant][seed] = evaluate_fn(config, workdir)
      print(f"[{i}/{len(plan)}] {variant} seed {seed}: mAP "
            f"{100 * results[variant][seed]['mAP']:.1f} on the "
            f"{config.eval.split} split", flush=True)
      if on_result is not None:
        on_result()
      continue
    remaining = len(plan) - i + 1
    eta = ""
    if trained:
      eta = f", about {(time.time() - start) / trained * remaining / 60:.0f} min left"
    print(f"[{i}/{len(plan)}] training {variant} seed {seed} in {workdir}"
          f"{eta}", flush=True)
    run_start = time.time()
    results[variant][seed] = train_fn(config, workdir)
    trained += 1
    print(f"[{i}/{len(plan)}] {variant} seed {seed}: mAP "
          f"{100 * results[variant][seed]['mAP']:.1f} in "
          f"{time.time() - run_start:.0f} s", flush=True)
    if on_result is not None:
      on_result()
  return results


def collect(base: ml_collections.ConfigDict, root: str,
            variants: Sequence[str], seeds: Sequence[int]) -> dict:
  """{variant: {seed: results}} of the finished runs under root."""
  out = {}
  for variant in variants:
    for seed in seeds:
      results = finished_results(run_dir(root, variant, seed),
                                 variant_config(base, variant, seed, root))
      if results is not None:
        out.setdefault(variant, {})[seed] = results
  return out


def _subset(results: dict, subset: str) -> Optional[dict]:
  return results if subset == "all" else results.get(subset)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample std (ddof=1); std is NaN for one value, both for none."""
  values = np.asarray(values, np.float64)
  if not values.size:
    return float("nan"), float("nan")
  std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
  return float(values.mean()), std


def cell(mean_and_std: tuple[float, float]) -> str:
  """"m ± s"; just "m" when s is undefined (one seed); "-" without data."""
  mean, std = mean_and_std
  if np.isnan(mean):
    return "-"
  return f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def aggregate(per_seed: Mapping[int, dict], subset: str) -> dict:
  """Mean and sample std over seeds of each metric, in %.

  Seeds whose subset has no metrics (no such queries, or none with a true
  match) are left out.

  Returns:
    {metric key: (mean, std)} plus "n" (seeds) and "num_query" (queries of
    the subset in the first seed; the split is the same for every seed).
  """
  rows = [_subset(r, subset) for r in per_seed.values()]
  rows = [r for r in rows if r and "mAP" in r]
  out = {"n": len(rows), "num_query": rows[0]["num_query"] if rows else 0}
  for _, key in METRICS:
    out[key] = mean_std([100.0 * r[key] for r in rows])
  return out


def table_markdown(table: Table, results: Mapping[str, Mapping[int, dict]],
                   split: str = "test") -> str:
  """One paper table as markdown: rows x {all, flare, clean} queries.

  The title names the evaluation split the results come from.
  """
  names = [name for name, _ in METRICS]
  lines = [f"### Table {table.number}: {table.title} ({split} split)", "",
           "| Method | queries | seeds | " + " | ".join(names)
           + " | paper mAP / R-1 |",
           "|---|---|---:|" + "---:|" * len(names) + "---:|"]
  for label, variant, paper in table.rows:
    per_seed = results.get(variant, {})
    for j, subset in enumerate(SUBSETS):
      agg = aggregate(per_seed, subset)
      cells = [cell(agg[key]) for _, key in METRICS]
      first = label if j == 0 else ""
      ref = f"{paper[0]:.1f} / {paper[1]:.1f}" if j == 0 and paper else ""
      queries = f"{subset} ({agg['num_query']})" if agg["n"] else subset
      lines.append(f"| {first} | {queries} | {agg['n']} | "
                   + " | ".join(cells) + f" | {ref} |")
  return "\n".join(lines) + "\n"


def results_markdown(tables: Sequence[int],
                     results: Mapping[str, Mapping[int, dict]],
                     header: str = "", split: str = "test") -> str:
  """All requested tables of one evaluation split, after a header."""
  parts = [header] if header else []
  parts += [table_markdown(TABLES[n], results, split) for n in tables]
  return "\n".join(parts)


def modality_segments(embedding: np.ndarray,
                      modalities: Sequence[str]) -> dict:
  """Splits (N, M * D) [m_1 | ... | m_M] embeddings, each part L2-normalised.

  The retrieval embedding concatenates the per-stream features; ranking with
  one segment shows what that stream alone contributes.
  """
  embedding = np.asarray(embedding, np.float32)
  if embedding.ndim != 2 or embedding.shape[1] % len(modalities):
    raise ValueError(f"embedding (N, {len(modalities)} * D) expected, got "
                     f"{embedding.shape}")
  parts = np.split(embedding, len(modalities), axis=1)
  return {m: p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
          for m, p in zip(modalities, parts)}
