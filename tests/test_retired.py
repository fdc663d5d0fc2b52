"""Runs saved with switches that were retired after losing on val.

A run whose config.json holds a retired field at the value now built in (or
at one that had no effect in it) restores and embeds as before; any other
value is refused with one error naming the field and the commit that still
has its code.
"""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import pytest
import numpy as np

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax import export
from facenet_jax import inference
import run_fixtures

# Trains runs, starts scripts or compiles the tiny model: left out of the
# quick loop (-m "not slow").
pytestmark = pytest.mark.slow

# What config.json held for each retired field before it went, at the value
# the code now builds.
_AS_BUILT = {
    "model": {"fce_inference_mask": "hard", "fce_fill": "ti",
              "fce_guide_gradient": True, "smp_pooling": "topk"},
    "loss": {"fce_raw_weight": 0.0, "fusion_triplet_weight": 0.0},
    "restore": {"copies": 0, "weight": 1.0},
}


def _rewrite(workdir: str, sections: dict) -> None:
  path = os.path.join(workdir, checkpointing.CONFIG_FILE)
  with open(path) as f:
    saved = json.load(f)
  for section, fields in sections.items():
    saved.setdefault(section, {}).update(fields)
  with open(path, "w") as f:
    json.dump(saved, f)


class RetiredFieldsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = tiny.get_config()
    cls.root = tempfile.mkdtemp(prefix="retired_")
    cls.today = os.path.join(cls.root, "today")
    run_fixtures.make_run(cls.today, cls.config)
    cls.raw = export.check_triplets(cls.config.input_size, 3)
    cls.expected = inference.Embedder.from_workdir(cls.today).embed(*cls.raw)

  def _copy_of_run(self, name: str, sections: dict) -> str:
    workdir = os.path.join(self.root, name)
    run_fixtures.make_run(workdir, self.config)
    _rewrite(workdir, sections)
    return workdir

  def test_built_in_values_restore_and_embed_as_before(self):
    workdir = self._copy_of_run("as_built", _AS_BUILT)
    loaded = checkpointing.load_config(workdir)
    self.assertNotIn("restore", loaded)
    self.assertNotIn("fce_fill", loaded.model)
    self.assertNotIn("fusion_triplet_weight", loaded.loss)
    # Today's config matches the run: it resumes and evaluates.
    checkpointing.check_config(workdir, self.config, has_state=True,
                               write=False)
    out = inference.Embedder.from_workdir(workdir).embed(*self.raw)
    np.testing.assert_array_equal(out["embedding"],
                                  self.expected["embedding"])
    np.testing.assert_array_equal(out["weights"], self.expected["weights"])

  def test_values_without_effect_in_their_run_are_accepted(self):
    # The fused triplet did not act on a run ranked by "concat" (older runs
    # recorded 1.0), nor the restoration weight without copies.
    workdir = self._copy_of_run("moot", {
        "model": {"fusion": "concat"},
        "loss": {"fusion_triplet_weight": 1.0},
        "restore": {"copies": 0, "weight": 3.0}})
    self.assertEqual(checkpointing.load_config(
        workdir, recorded_fusion=False).model.fusion, "concat")

  def test_other_values_name_the_field_and_the_commit(self):
    for name, sections, field in (
        ("fill", {"model": {"fce_fill": "add"}}, "model.fce_fill='add'"),
        ("copies", {"restore": {"copies": 8, "weight": 1.0}},
         "restore.copies=8"),
        ("gate", {"model": {"fusion": "gate"},
                  "loss": {"fusion_triplet_weight": 1.0}},
         "model.fusion='gate'"),
        ("raw", {"loss": {"fce_raw_weight": 1.0}}, "loss.fce_raw_weight=1.0"),
        ("pool", {"model": {"smp_pooling": "lse"}},
         "model.smp_pooling='lse'")):
      # The config is read before anything else: no checkpoint is needed.
      workdir = os.path.join(self.root, name)
      os.makedirs(workdir)
      shutil.copy(os.path.join(self.today, checkpointing.CONFIG_FILE),
                  workdir)
      _rewrite(workdir, sections)
      message = f"{field}.*{checkpointing.RETIRED_COMMIT}"
      with self.assertRaisesRegex(checkpointing.RetiredSwitchError, message):
        checkpointing.load_config(workdir)
      with self.assertRaisesRegex(checkpointing.RetiredSwitchError, message):
        checkpointing.check_config(workdir, self.config, has_state=True)
      with self.assertRaisesRegex(checkpointing.RetiredSwitchError, message):
        inference.Embedder.from_workdir(workdir)


if __name__ == "__main__":
  absltest.main()
