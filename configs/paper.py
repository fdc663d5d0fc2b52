"""The paper's reading of FACENet, with no extension (configs/default.py's base).

configs/default.py keeps the paper's training recipe but sets the flare
mechanism to what the validation split chose, several choices beyond the
paper. This config undoes each of those: SMP supervises the mask through the
pooled image-level pseudo-label only, FCE pastes f_T itself under the hard
mask and feeds A_S to flare-free samples, retrieval ranks the concatenated
embedding (no flare-aware fusion), the identity losses reach the mask
through the straight-through gradient, the mask branch shares the backbones'
gradients, and IC is the modality loss.

  python scripts/main.py --config configs/paper.py --workdir /tmp/facenet_paper
"""

from configs import default


def apply_paper_reading(config):
  """Sets every flare-mechanism field to the paper's reading, in place."""
  config.model.smp = "mask"
  config.model.mask_detach = False
  config.model.mask_stage = 0
  config.model.fce_projection = False
  config.model.fce_clean = "enhanced"
  config.model.fce_mask_gradient = True
  config.loss.flare_pixel_weight = 0.0
  config.loss.fce_consistency_weight = 0.0
  config.loss.modality = "ic"
  config.model.fusion = "concat"
  return config


def get_config():
  return apply_paper_reading(default.get_config())
