"""The study of configs/experiments.py under the paper's reading (configs/paper.py).

  python scripts/experiments.py --config configs/experiments_paper.py \
      --workdir /tmp/facenet_study_paper --split val
"""

from configs import experiments
from configs import paper


def get_config():
  return paper.apply_paper_reading(experiments.get_config())
