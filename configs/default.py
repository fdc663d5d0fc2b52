"""Default configuration: the paper's recipe (FACENet, section 5) on WMVeID863-like data.

Every field here is read by the trainer only (`facenet_jax/train.py`); models,
losses and the evaluator take typed arguments. Derived values (steps per epoch,
number of classes) are computed from the data, never stored here.

Run:
  python scripts/main.py --config configs/default.py --workdir /tmp/facenet
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the paper-faithful configuration."""
  config = ml_collections.ConfigDict()

  # --- Data -------------------------------------------------------------------
  # TFDS name: synthetic_flare | wmveid863 | rgbnt100 | msvr310.
  config.dataset = "synthetic_flare"
  # TFDS builder config (synthetic_flare: tiny | small | large); "" = builder default.
  config.dataset_config = "small"
  # Where TFDS keeps prepared datasets ("" = TFDS default, ~/tensorflow_datasets).
  config.data_dir = ""
  # Root of a manually downloaded dataset in its original layout (real datasets).
  config.manual_dir = ""
  # Network input (H, W).
  config.input_size = (256, 128)
  # P x K identity-balanced training batches (official code: 8 x 4).
  config.ids_per_batch = 8
  config.instances_per_id = 4
  config.eval_batch_size = 64
  # Per-modality normalisation, in [RGB, NI, TI] order (ImageNet statistics).
  config.normalization = ml_collections.ConfigDict()
  config.normalization.mean = ((0.485, 0.456, 0.406),) * 3
  config.normalization.std = ((0.229, 0.224, 0.225),) * 3
  # Augmentation; geometry is shared by the three images of a triplet.
  config.augment = ml_collections.ConfigDict()
  config.augment.flip_prob = 0.5
  config.augment.pad = 10
  config.augment.random_erasing_prob = 0.5
  # Flare pseudo-label: delta = 1 when the fraction of raw uint8 channel values
  # in [pixel_low, 255] exceeds ratio_threshold (per modality, RGB and NI).
  config.flare = ml_collections.ConfigDict()
  config.flare.pixel_low = 250
  config.flare.ratio_threshold = 0.1
  # Classical de-flare baseline (Table 3): CLAHE on the RGB and NI images
  # before anything else (input_pipeline/deflare.py); off in the paper's model.
  config.preprocess = ml_collections.ConfigDict()
  config.preprocess.clahe = False
  # scikit-image's normalised clip limit, in (0, 1].
  config.preprocess.clahe_clip_limit = 0.01

  # --- Model ------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.backbone = "resnet50"
  config.model.width_multiplier = 1.0
  config.model.last_stride = 1
  # Compute dtype (float32 | bfloat16); parameters stay float32.
  config.model.dtype = "float32"
  # Path to an ImageNet ResNet state dict (.safetensors/.npz/.pth); "" = random.
  config.model.pretrained = ""
  # Ablation switches (all off = the paper's baseline).
  config.model.use_mfmp = True
  config.model.use_fmi = True
  config.model.use_fce = True
  # ResNet stage (1-4) after which MFMP/FCE are plugged in.
  config.model.plug_stage = 4
  # Inner width of the FMI convolutions; 0 = full width C (paper-faithful).
  config.model.fmi_width = 0
  # Reduction of the FMI channel attention.
  config.model.fmi_attention_reduction = 16
  # Temperature of the straight-through mask gradient sigmoid((m - Delta)/tau).
  config.model.mask_temperature = 1.0
  # Retrieval embedding from stream features "before_bn" or "after_bn" (neck).
  config.model.embedding = "before_bn"

  # --- Loss -------------------------------------------------------------------
  config.loss = ml_collections.ConfigDict()
  config.loss.ce_weight = 1.0
  config.loss.label_smoothing = 0.0
  config.loss.triplet_weight = 1.0
  config.loss.triplet_margin = 0.3
  config.loss.triplet_soft_margin = False
  config.loss.flare_weight = 1.0
  # Modality relation loss: ic (paper) | none | 3m | hc | cdc (Table 5).
  config.loss.modality = "ic"
  config.loss.modality_weight = 1.0
  config.loss.modality_margin = 0.1

  # --- Optimisation -----------------------------------------------------------
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3.5e-4
  config.optimizer.weight_decay = 5e-4
  # piecewise (paper: x0.1 at epochs 40 and 70) | cosine (with warmup).
  config.optimizer.schedule = "piecewise"
  config.optimizer.decay_epochs = (40, 70)
  config.optimizer.decay_factor = 0.1
  config.optimizer.warmup_epochs = 0
  config.num_epochs = 120
  # > 0 overrides num_epochs.
  config.num_train_steps = -1

  # --- Loop -------------------------------------------------------------------
  config.seed = 0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3

  # --- Evaluation -------------------------------------------------------------
  config.eval = ml_collections.ConfigDict()
  config.eval.flip_average = False
  config.eval.rerank = False
  config.eval.max_rank = 50
  return config
