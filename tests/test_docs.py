"""The README's and docs' commands name real scripts, flags and config fields.

Every `python scripts/X.py ...` line of a fenced code block in README.md and
docs/*.md is parsed: the script must exist, each `--flag` must be defined by
it (or be one of absl's own), and each `--config.a.b=...` override must name
a field of the config the command passes. The README's demo table must be
what `evaluation.format_results` prints for the numbers it shows.
"""

import ast
import glob
import importlib.util
import os
import re
import shlex

from absl.testing import absltest
import ml_collections

from facenet_jax import evaluation

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
# absl's own flags, which every script accepts.
_ABSL_FLAGS = {"verbosity", "v", "logtostderr", "alsologtostderr", "help",
               "helpfull", "log_dir", "flagfile"}


def _doc_files() -> list[str]:
  return [os.path.join(_ROOT, "README.md")] + sorted(
      glob.glob(os.path.join(_ROOT, "docs", "*.md")))


def code_blocks(text: str) -> list[tuple[str, str]]:
  """(info string, body) of each fenced code block of a markdown text."""
  blocks, info, body = [], None, []
  for line in text.split("\n"):
    if line.startswith("```"):
      if info is None:
        info, body = line[3:].strip(), []
      else:
        blocks.append((info, "\n".join(body) + "\n"))
        info = None
    elif info is not None:
      body.append(line)
  return blocks


def script_commands(text: str) -> list[list[str]]:
  """The `python scripts/...` commands of a markdown text's code blocks."""
  commands = []
  for _, block in code_blocks(text):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.split("\n"):
      line = line.split(" #")[0]
      for part in line.split("&&"):
        part = part.strip()
        if part.startswith("python scripts/"):
          commands.append(shlex.split(part)[1:])
  return commands


def defined_flags(script: str) -> dict[str, object]:
  """{flag name: default} a script defines (absl DEFINE_*, config_flags)."""
  with open(script) as f:
    tree = ast.parse(f.read())
  names = {}
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith("DEFINE_") and node.args
        and isinstance(node.args[0], ast.Constant)):
      default = node.args[1] if len(node.args) > 1 else None
      if isinstance(default, ast.Constant):
        default = default.value
      elif default is not None:
        # A default config file built with os.path.join(..., "configs",
        # "x.py"): its file name.
        files = [n.value for n in ast.walk(default)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and n.value.endswith(".py")]
        default = f"configs/{files[0]}" if files else None
      names[node.args[0].value] = default
  return names


def _load_config(spec: str) -> ml_collections.ConfigDict:
  path, _, argument = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      "doc_config", os.path.join(_ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def problems(command: list[str]) -> list[str]:
  """What is wrong with one command: a missing script, flag or field."""
  script = os.path.join(_ROOT, command[0])
  if not os.path.exists(script):
    return [f"{command[0]} does not exist"]
  flags = defined_flags(script)
  out = []
  overrides = []
  config = flags.get("config")
  args = command[1:]
  for i, arg in enumerate(args):
    if not arg.startswith("--"):
      continue
    name, _, value = arg[2:].partition("=")
    if name.startswith("config."):
      overrides.append(name[len("config."):])
      continue
    if name == "config":
      config = value or args[i + 1]
    bare = name[2:] if name.startswith("no") and name[2:] in flags else name
    if bare not in flags and bare not in _ABSL_FLAGS:
      out.append(f"{command[0]}: no flag --{name}")
  if overrides:
    if config is None:
      out.append(f"{command[0]}: --config.* without --config")
      return out
    loaded = _load_config(config)
    for field in overrides:
      node = loaded
      for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
          out.append(f"{config}: no field {field}")
          break
        node = node[part]
  return out


class DocsTest(absltest.TestCase):

  def test_every_documented_command_is_real(self):
    found, wrong = 0, []
    for path in _doc_files():
      with open(path) as f:
        text = f.read()
      for command in script_commands(text):
        found += 1
        wrong += [f"{os.path.basename(path)}: {p}" for p in problems(command)]
    self.assertGreater(found, 20)
    self.assertEqual(wrong, [])

  def test_the_checker_finds_what_is_wrong(self):
    text = "\n".join([
        "```bash",
        "python scripts/main.py --config configs/tiny.py --workdir /tmp/w \\",
        "    --config.model.fce_fill=add --mode eval --nosuch",
        "python scripts/nosuch.py --x",
        "```"])
    commands = script_commands(text)
    self.assertLen(commands, 2)
    self.assertEqual(problems(commands[0]),
                     ["scripts/main.py: no flag --nosuch",
                      "configs/tiny.py: no field model.fce_fill"])
    self.assertEqual(problems(commands[1]),
                     ["scripts/nosuch.py does not exist"])

  def test_readme_table_is_what_the_evaluation_prints(self):
    with open(os.path.join(_ROOT, "README.md")) as f:
      text = f.read()
    table = next(block for info, block in code_blocks(text)
                 if not info and block.lstrip().startswith("queries"))
    rows = {}
    for line in table.strip().split("\n")[1:]:
      name, n, *values = line.split()
      rows[name] = dict(zip(("mAP", "rank1", "rank5", "rank10", "mINP"),
                            (float(v) / 100 for v in values)),
                        num_query=int(n))
    results = {**rows["all"], "flare": rows["flare"], "clean": rows["clean"]}
    self.assertEqual(evaluation.format_results(results), table.strip("\n"))


if __name__ == "__main__":
  absltest.main()
