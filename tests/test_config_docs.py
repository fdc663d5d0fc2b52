"""Every field of configs/default.py is documented where it is set."""

import os
import re

from absl.testing import absltest
import ml_collections

from configs import default

_SOURCE = os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                       "default.py")


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaves(value, f"{prefix}{key}.")
    else:
      out.append(prefix + key)
  return out


def undocumented(source: str, fields: list[str]) -> list[str]:
  """The fields whose assignment has no comment that covers it.

  A field is covered by a comment on its own line, by the comment lines
  directly above it, or by the comment above a run of assignments it
  belongs to when that comment names it (its last dotted part).
  """
  lines = source.split("\n")
  missing = []
  for field in fields:
    pattern = re.compile(rf"^\s*config\.{re.escape(field)}\s*=")
    rows = [i for i, line in enumerate(lines) if pattern.match(line)]
    if not rows:
      missing.append(f"{field} (not assigned in the file)")
      continue
    row = rows[0]
    if "#" in lines[row] or lines[row - 1].strip().startswith("#"):
      continue
    above = row - 1
    while above >= 0 and re.match(r"^\s*config\.", lines[above]):
      above -= 1
    comment = []
    while above >= 0 and lines[above].strip().startswith("#"):
      comment.append(lines[above])
      above -= 1
    if not re.search(rf"\b{re.escape(field.split('.')[-1])}\b",
                     " ".join(comment)):
      missing.append(field)
  return missing


class ConfigDocsTest(absltest.TestCase):

  def test_every_field_has_a_comment(self):
    with open(_SOURCE) as f:
      source = f.read()
    fields = _leaves(default.get_config())
    self.assertGreater(len(fields), 50)
    self.assertEqual(undocumented(source, fields), [])

  def test_a_field_added_without_a_comment_is_found(self):
    source = "\n".join([
        "  # The P x K batch: ids_per_batch identities x instances_per_id.",
        "  config.ids_per_batch = 8",
        "  config.instances_per_id = 4",
        "  config.eval_batch_size = 64",
        "  # Augmentation.",
        "  config.augment.flip_prob = 0.5",
        "  config.augment.pad = 10  # pixels",
    ])
    fields = ["ids_per_batch", "instances_per_id", "eval_batch_size",
              "augment.flip_prob", "augment.pad", "seed"]
    self.assertEqual(undocumented(source, fields),
                     ["eval_batch_size", "seed (not assigned in the file)"])


if __name__ == "__main__":
  absltest.main()
