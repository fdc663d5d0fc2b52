r"""Chooses finished runs' flare-aware fusion on val; evaluates the choice on test.

  # Sweep every training-free fusion on each run's val split, record the
  # best (all-query mAP) in RUN/fusion.json:
  python scripts/fusion.py --runs /runs/seed0,/runs/seed1 --split val
  # Then, once, the test split with concat and the recorded choice:
  python scripts/fusion.py --runs /runs/seed0,/runs/seed1 --split test

The recorded choice is what the Embedder, scripts/export.py, the pictures and
`scripts/main.py --mode eval` use for that run afterwards. --rendered_flare
query ranks with a flare of facenet_jax/flare_render.py rendered onto the
query images (a robustness probe; it never changes the recorded choice).
The table (mAP in %, mean ± std over the runs) is printed and written to
--output; each run keeps its rows in RUN/fusion_sweep[_...]_<split>.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facenet_jax import console as console_lib  # noqa: E402  (no JAX, no TF)

with console_lib.quiet_imports() as _STARTUP:
  from absl import app  # noqa: E402
  from absl import flags  # noqa: E402
  import input_pipeline  # noqa: E402,F401  (hides GPUs from TensorFlow)
  from facenet_jax import checkpointing  # noqa: E402
  from facenet_jax import experiments  # noqa: E402
  from facenet_jax import fusion_choice  # noqa: E402
  from facenet_jax.train import extract  # noqa: E402

_RUNS = flags.DEFINE_list("runs", None, "Finished run directories (e.g. the "
                          "seeds of one study variant).")
_SPLIT = flags.DEFINE_enum("split", "val", ["val", "test"],
                           "val: sweep and record the choice; test: rank "
                           "concat and the recorded choice only.")
_RENDERED = flags.DEFINE_enum("rendered_flare", "none", extract.RENDER_SIDES,
                              "Render a flare onto these images first.")
_OUTPUT = flags.DEFINE_string("output", None, "Markdown file of the table "
                              "(default: beside the first run).")
flags.mark_flags_as_required(["runs"])


def table(per_run: list[list[dict]], title: str) -> str:
  """Markdown: one line per row label, mean ± std of each subset's mAP."""
  labels = []
  for rows in per_run:
    labels += [r["label"] for r in rows if r["label"] not in labels]
  lines = [title, "", "| fusion | runs | all | flare | clean |",
           "|---|---:|---:|---:|---:|"]
  for label in labels:
    found = [r for rows in per_run for r in rows if r["label"] == label]
    cells = [experiments.cell(experiments.mean_std(
        [r["mAP"][s] for r in found if s in r["mAP"]]))
             for s in fusion_choice.SUBSETS]
    lines.append(f"| {label} | {len(found)} | {' | '.join(cells)} |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runs = _RUNS.value
  for run in runs:
    checkpointing.check_run_dir(run)
  with console_lib.session(runs[0], _STARTUP) as log_file:
    console = console_lib.Console()
    per_run = []
    for run in runs:
      config = checkpointing.load_config(run, recorded_fusion=False)
      config.eval.split = _SPLIT.value
      config.eval.rendered_flare = _RENDERED.value
      console.print(f"{run}: {config.eval.split} split"
                    + (f", rendered flare on the {_RENDERED.value}"
                       if _RENDERED.value != "none" else ""))
      embedded = fusion_choice.embed_run(config, run, console)
      if _SPLIT.value == "val":
        rows = fusion_choice.sweep(config, embedded)
        choice = fusion_choice.choose(rows)
        console.print(f"  chosen: {choice['label']} "
                      f"({choice['mAP']['all']:.1f} mAP)")
      else:
        rows, choice = fusion_choice.evaluate_choice(config, embedded, run), None
      fusion_choice.record(run, config, rows, choice)
      per_run.append(rows)
    title = (f"Fusion on the {_SPLIT.value} split"
             + (f", rendered flare on the {_RENDERED.value}"
                if _RENDERED.value != "none" else "")
             + f" (mAP %, mean ± std over {len(runs)} runs)")
    text = table(per_run, title)
    output = _OUTPUT.value or os.path.join(
        runs[0], fusion_choice.sweep_file(config).replace(".json", ".md"))
    with open(output, "w") as f:
      f.write(text)
    console.print("")
    console.print(text)
    console.print(f"table  {output}\nlog    {log_file}")


if __name__ == "__main__":
  app.run(main, flags_parser=console_lib.parse_flags)
