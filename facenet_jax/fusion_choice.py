"""Choosing a finished run's training-free fusion on its validation split.

How much to trust a flared RGB or NI stream depends on the data (how much
identity glare hides), so the weights of the training-free fusions
(facenet_jax/fusion.py) are chosen per run on the val split: every
candidate of CANDIDATES ranks the same extracted embeddings, the best
all-query mAP wins (ties: the earlier candidate, "concat" first), and the
choice is written to WORKDIR/fusion.json, which the Embedder, the export,
the pictures and `--mode eval` then use (checkpointing.apply_recorded_fusion).
The test split is only ever evaluated with a choice already made.

  python scripts/fusion.py --runs /runs/a,/runs/b --split val
  python scripts/fusion.py --runs /runs/a,/runs/b --split test
"""

import dataclasses
import json
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np

from facenet_jax import checkpointing
from facenet_jax import console as console_lib
from facenet_jax import fusion
from facenet_jax.train import evaluate
from facenet_jax.train import extract
from facenet_jax.train import feed
from facenet_jax.train import train_state

SUBSETS = ("all", "flare", "clean")
CRITERION = "all-query mAP"


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One training-free fusion setting (the model fields it sets)."""
  label: str
  fusion: str
  fusion_weight: float = 0.5
  fusion_full_ratio: float = 0.2

  def fields(self) -> dict:
    return {"fusion": self.fusion, "fusion_weight": self.fusion_weight,
            "fusion_full_ratio": self.fusion_full_ratio}


CANDIDATES = (
    Candidate("concat (paper)", "concat"),
    *(Candidate(f"fixed, flared w {w:g}", "fixed", w)
      for w in (1.0, 0.75, 0.5, 0.25, 0.0)),
    *(Candidate(f"saturation, w {w:g} at {r:g}", "saturation", w, r)
      for w in (0.5, 0.25, 0.0) for r in (0.1, 0.2, 0.4)),
)
# configs/default.py's fusion, the candidate that held across glare strengths
# on val (docs/studies.md): ranked on test beside concat and a run's choice.
DEFAULT = Candidate("saturation, w 0.5 at 0.4", "saturation", 0.5, 0.4)


def _metrics(results: dict) -> dict:
  """{subset: mAP in %} of a rank report."""
  out = {"all": 100 * results["mAP"]}
  for subset in ("flare", "clean"):
    if "mAP" in results.get(subset, {}):
      out[subset] = 100 * results[subset]["mAP"]
  return out


def embed_run(config: ml_collections.ConfigDict, workdir: str,
              console: console_lib.Console = console_lib.SILENT) -> dict:
  """Embeds config.eval.split's query and gallery once for every candidate.

  The concat model's embedding serves every candidate: per-segment
  normalisation does not see the whole vector's scale, so
  fusion.normalized_segments of it is the flare-aware fusions' embedding.

  Returns:
    {"query", "gallery": extract(...) of the concat model}.
  """
  model, state, sharding = train_state.restore_for_eval(config, workdir)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  query_split, gallery_split = feed.eval_splits(config)
  rendered = extract.rendered_flare_side(config)
  concat = model.clone(fusion="concat")
  return {part: extract.extract(config, concat, variables, split, sharding,
                                console=console,
                                render=rendered in (part, "both"))
          for part, split in (("query", query_split),
                              ("gallery", gallery_split))}


def sweep(config: ml_collections.ConfigDict, embedded: dict,
          candidates: Sequence[Candidate] = CANDIDATES) -> list[dict]:
  """Ranks with every candidate: one row each.

  Returns:
    Rows {"label", the Candidate's fields, "mAP": {subset: %}}, in
    `candidates` order.
  """
  rows = []
  query, gallery = embedded["query"], embedded["gallery"]
  fused = [{**x, "embedding": np.asarray(
      fusion.normalized_segments(x["embedding"]))}
           for x in (query, gallery)]
  for candidate in candidates:
    if candidate.fusion == "concat":
      q, g = query, gallery
    else:
      q, g = ({**x, "weights": np.asarray(fusion.stream_weights(
          candidate.fusion, x["flare_input"], x["flare_ratio_input"],
          candidate.fusion_weight, candidate.fusion_full_ratio))}
              for x in fused)
    rows.append({"label": candidate.label, **candidate.fields(),
                 "mAP": _metrics(evaluate.rank(config, q, g))})
  return rows


def choose(rows: Sequence[dict]) -> dict:
  """The row of best all-query mAP (first of equals)."""
  return max(rows, key=lambda r: (round(r["mAP"]["all"], 6),
                                  -list(rows).index(r)))


def sweep_file(config: ml_collections.ConfigDict) -> str:
  """fusion_sweep_<split>[_rendered-flare-<side>].json."""
  name = "fusion_sweep.json"
  rendered = extract.rendered_flare_side(config)
  if rendered != "none":
    name = f"fusion_sweep_rendered-flare-{rendered}.json"
  return checkpointing.split_file(name, config.eval.split)


def record(workdir: str, config: ml_collections.ConfigDict,
           rows: Sequence[dict], choice: Optional[dict]) -> None:
  """Writes the sweep's rows; a val choice without rendered flare is the run's.

  The run's choice (WORKDIR/fusion.json) is made on the val split as it is:
  a rendered flare is a robustness probe, not the data the run serves.
  """
  with open(os.path.join(workdir, sweep_file(config)), "w") as f:
    json.dump({"criterion": CRITERION, "rows": list(rows),
               "choice": choice}, f, indent=2)
  if (choice is not None and config.eval.split == "val" and
      extract.rendered_flare_side(config) == "none"):
    path = os.path.join(workdir, checkpointing.FUSION_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"chosen_on": "val", "criterion": CRITERION,
                 "choice": {k: choice[k] for k in checkpointing.FUSION_FIELDS},
                 "label": choice["label"], "mAP": choice["mAP"]}, f, indent=2)
    os.replace(tmp, path)


def evaluate_choice(config: ml_collections.ConfigDict, embedded: dict,
                    workdir: str) -> list[dict]:
  """Rows of concat, DEFAULT and the run's recorded val choice.

  For the test split: only what was chosen on val is ranked.
  """
  choice = checkpointing.read_recorded_fusion(workdir)
  wanted = [c for c in CANDIDATES if c.fields() in (CANDIDATES[0].fields(),
                                                     DEFAULT.fields())]
  if choice is not None:
    wanted.append(Candidate("chosen on val", **choice))
  return sweep(config, embedded, wanted)
