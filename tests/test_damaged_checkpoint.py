"""A damaged checkpoint: resume skips it, evaluation says so, nothing is lost.

A workdir with the checkpoints of steps 2 and 4 (tests/run_fixtures.py);
step 4's files are then damaged the ways a copy cut short or a lost file
leave them. Restoring step 4 names it as damaged (not as another model);
resuming restores step 2 bit-exactly and moves step 4 aside, whole. The
real-process version (scripts/main.py resuming past a truncated file) is in
tests/test_interrupt.py.
"""

import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import pytest

from configs import tiny
from facenet_jax import checkpointing
from facenet_jax.train import train_state
import run_fixtures

# Restores the tiny model's state several times: left out of the quick loop.
pytestmark = pytest.mark.slow


def _listing(directory: str) -> dict:
  return {os.path.relpath(os.path.join(root, name), directory):
          os.path.getsize(os.path.join(root, name))
          for root, _, names in os.walk(directory) for name in names}


def _delete_file(step_dir: str) -> None:
  os.remove(run_fixtures.largest_file(step_dir))


def _empty(step_dir: str) -> None:
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


def _abstract(config, workdir: str):
  info = checkpointing.read_run_info(workdir)
  _, _, abstract = train_state.abstract_state(
      config, info["num_classes"], info["steps_per_epoch"])
  return abstract


class DamagedCheckpointTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = tiny.get_config()
    cls.template = tempfile.mkdtemp(prefix="damaged_")
    run_fixtures.make_run(cls.template, cls.config, step=2)
    ckpt = checkpointing.Checkpointer(cls.template)
    ckpt.save(4, run_fixtures.random_state(cls.config, seed=4))
    ckpt.close()

  def _workdir(self) -> str:
    workdir = os.path.join(tempfile.mkdtemp(prefix="damaged_"), "run")
    shutil.copytree(self.template, workdir)
    return workdir

  @parameterized.named_parameters(
      ("truncated_file", run_fixtures.truncate_largest_file),
      ("lost_file", _delete_file),
      ("empty_directory", _empty))
  def test_resume_skips_it_and_evaluation_names_it(self, damage):
    workdir = self._workdir()
    step_dir = os.path.join(workdir, "checkpoints", "4")
    damage(step_dir)
    damaged_files = _listing(step_dir)

    # Evaluation of the latest (damaged) step: one clear error, nothing moved.
    with self.assertRaisesRegex(
        checkpointing.CheckpointDamagedError,
        r"checkpoints/4 is damaged and cannot be read \(.+\)\. Other "
        r"checkpoints: \[2\]; pass --step 2"):
      train_state.restore_for_eval(self.config, workdir)
    self.assertEqual(_listing(step_dir), damaged_files)

    # A resumed run restores step 2 and moves step 4 aside, every byte kept.
    ckpt = checkpointing.Checkpointer(workdir)
    resumed, skipped = ckpt.restore_latest_intact(
        _abstract(self.config, workdir))
    self.assertEqual([e.step for e in skipped], [4])
    self.assertEqual(ckpt.all_steps(), [2])
    # The run saves the steps after 2 again, 4 included.
    ckpt.save(4, resumed)
    ckpt.close()
    self.assertEqual(checkpointing.checkpoint_steps(workdir), [2, 4])
    aside = os.path.join(workdir, checkpointing.DAMAGED_DIRECTORY, "4")
    self.assertEqual(_listing(aside), damaged_files)
    expected = run_fixtures.random_state(self.config, seed=2)
    jax.tree.map(np.testing.assert_array_equal, resumed.params,
                 expected.params)

  def test_every_checkpoint_damaged_is_an_error_and_moves_nothing(self):
    workdir = self._workdir()
    for step in (2, 4):
      run_fixtures.truncate_largest_file(
          os.path.join(workdir, "checkpoints", str(step)))
    ckpt = checkpointing.Checkpointer(workdir)
    with self.assertRaisesRegex(checkpointing.CheckpointDamagedError,
                                r"checkpoints/4 is damaged"):
      ckpt.restore_latest_intact(_abstract(self.config, workdir))
    ckpt.close()
    self.assertEqual(checkpointing.checkpoint_steps(workdir), [2, 4])
    self.assertFalse(os.path.exists(
        os.path.join(workdir, checkpointing.DAMAGED_DIRECTORY)))

  def test_another_model_is_a_mismatch_not_damage(self):
    workdir = self._workdir()
    wider = tiny.get_config()
    wider.model.width_multiplier *= 2
    ckpt = checkpointing.Checkpointer(workdir)
    with self.assertRaisesRegex(checkpointing.CheckpointMismatchError,
                                r"does not match the model .* leaves differ"):
      ckpt.restore_latest_intact(_abstract(wider, workdir))
    ckpt.close()
    self.assertEqual(checkpointing.checkpoint_steps(workdir), [2, 4])


if __name__ == "__main__":
  absltest.main()
