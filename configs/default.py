"""Default configuration: the paper's training recipe (section 5), WMVeID863-like data.

The training recipe is the paper's. The flare mechanism's defaults are what
the validation split of synthetic_flare chose (docs/studies.md), several of
them beyond the paper and labelled so below; configs/paper.py is the same
with the paper's reading of every one of them.

Every field here is read by the trainer only (`facenet_jax/train/`); models,
losses and the evaluator take typed arguments. Derived values (steps per epoch,
number of classes) are computed from the data, never stored here.

Run:
  python scripts/main.py --config configs/default.py --workdir /tmp/facenet
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The paper's training recipe with the flare mechanism chosen on val."""
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
  # > 0: hold out this many training identities (a fixed-seed choice) as a
  # validation query/gallery (eval.split = "val"); they leave training. 0: no
  # carving; "val" then reads the dataset's own val_query/val_gallery
  # (synthetic_flare has them, the real datasets do not).
  config.val_ids = 0
  # Network input (H, W).
  config.input_size = (256, 128)
  # P x K identity-balanced training batches: ids_per_batch identities x
  # instances_per_id triplets each (official code: 8 x 4).
  config.ids_per_batch = 8
  config.instances_per_id = 4
  # Triplets per evaluation batch (rounded up to a multiple of the devices).
  config.eval_batch_size = 64
  # Per-modality normalisation, mean and std, rows in [RGB, NI, TI] order
  # (ImageNet statistics).
  config.normalization = ml_collections.ConfigDict()
  config.normalization.mean = ((0.485, 0.456, 0.406),) * 3
  config.normalization.std = ((0.229, 0.224, 0.225),) * 3
  # Augmentation; geometry is shared by the three images of a triplet:
  # horizontal flip with flip_prob, zero pad by pad pixels then a random crop
  # back, random erasing with random_erasing_prob.
  config.augment = ml_collections.ConfigDict()
  config.augment.flip_prob = 0.5
  config.augment.pad = 10
  config.augment.random_erasing_prob = 0.5
  # Flare pseudo-label: delta = 1 when the fraction of raw uint8 channel values
  # in [pixel_low, 255] exceeds ratio_threshold (per modality, RGB and NI).
  config.flare = ml_collections.ConfigDict()
  config.flare.pixel_low = 250
  config.flare.ratio_threshold = 0.1
  config.preprocess = ml_collections.ConfigDict()
  # Classical de-flare baseline (Table 3): CLAHE on the RGB and NI images
  # before anything else (input_pipeline/deflare.py); off in the paper's model.
  config.preprocess.clahe = False
  # scikit-image's normalised clip limit, in (0, 1].
  config.preprocess.clahe_clip_limit = 0.01
  # How training images reach the step (no effect on the batches themselves):
  # cache = "auto" decodes and resizes the training split once into memory
  # when it fits in cache_max_gb (uint8, 3 images + the saturation map when
  # the pixel target is on) and streams from the encoded bytes otherwise;
  # "memory" always caches, "stream" never does. device_prefetch batches are
  # put on the device in a background thread while the previous step runs.
  config.input = ml_collections.ConfigDict()
  config.input.cache = "auto"
  config.input.cache_max_gb = 4.0
  config.input.device_prefetch = 2
  # tf.data threads preparing training batches: -1 = 1 when the step runs on
  # the CPU (the threads would take its cores: loop/step 0.95 against 0.91
  # with AUTOTUNE on the demo, docs/performance.md), TF's AUTOTUNE otherwise;
  # 0 = AUTOTUNE; n = n threads.
  config.input.threads = -1

  # --- Model ------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  # Stream backbone (facenet_jax/models/backbones.py): resnet18 | resnet34 |
  # resnet50 (paper) | resnet101 | resnet10 (one block per stage, for tests
  # and CPU studies) | vit_s16 | vit_b16 (official code) |
  # transreid_b16 (ViT-B/16, overlapping patches, stride 12) | vit_micro8
  # (a 64-wide 4-block ViT with 8x8 patches, for tests and CPU studies).
  config.model.backbone = "resnet50"
  # ResNets only: width_multiplier scales the stage widths; last_stride is
  # the stride of stage 4 (re-ID convention: 1).
  config.model.width_multiplier = 1.0
  config.model.last_stride = 1
  # ViTs only: stochastic depth of the last block, linear over the blocks
  # (official ViT recipe: 0.1).
  config.model.drop_path = 0.0
  # ViTs only: TransReID's side information, a learned embedding per camera
  # of the training split added to every token, weighted by
  # camera_embedding_scale (TransReID: 3.0). Off in the official FACENet code. Needs camera ids, so
  # the inference Embedder and exported models cannot run such a model.
  config.model.camera_embedding = False
  config.model.camera_embedding_scale = 3.0
  # Compute dtype (float32 | bfloat16); parameters stay float32.
  config.model.dtype = "float32"
  # Path to ImageNet weights of the backbone, "" = random: a torchvision/timm
  # ResNet or timm ViT state dict (.safetensors/.pth), or a JAX ViT .npz.
  config.model.pretrained = ""
  # Warm start from another run: "WORKDIR" (its latest checkpoint) or
  # "WORKDIR:STEP". Every params/batch_stats leaf whose name and shape match
  # is copied (the stream backbones must match exactly), the rest keeps its
  # random init; optimizer and step start afresh. Exclusive with pretrained;
  # ignored when the run resumes from its own checkpoint. "" = off.
  config.model.init_from = ""
  # Ablation switches (Table 2; all off = the paper's baseline): use_mfmp
  # predicts the flare masks, use_fmi predicts them from the common RGB + NI
  # feature (off: each modality from itself), use_fce pastes TI features
  # under them (needs use_mfmp).
  config.model.use_mfmp = True
  config.model.use_fmi = True
  config.model.use_fce = True
  # Stage (ResNet, 1-4) or block (ViT, 1..depth) after which MFMP/FCE are
  # plugged in; 0 = the backbone's default: ResNet stage 4 (the paper), ViT
  # before the last block (the official code).
  config.model.plug_stage = 0
  # Inner width of the FMI convolutions; 0 = full width C (paper-faithful).
  config.model.fmi_width = 0
  # Reduction of the FMI channel attention.
  config.model.fmi_attention_reduction = 16
  # Temperature of the straight-through mask gradient sigmoid((m - Delta)/tau).
  config.model.mask_temperature = 1.0
  # SMP: "mask" pools, per channel, the mask margins (m - Delta)/tau over
  # positions into image-level flare logits and averages their BCE over the
  # channels, so the flare loss supervises the mask and Delta (this project's
  # reading of "SMP supervises the flare mask", docs/model.md); "head" is the
  # first reading, a separate classifier on the masked feature.
  config.model.smp = "mask"
  # smp = "mask": the share of positions (the highest margins) averaged into
  # the image-level logit.
  config.model.smp_topk_fraction = 0.25
  # The five fields below and loss.flare_pixel_weight,
  # loss.fce_consistency_weight and loss.modality are set to what the
  # validation split chose (docs/studies.md, "Choosing on the validation
  # split"); configs/paper.py restores the paper's reading of each.
  # Beyond the paper (paper: False): the mask branch reads stop-gradient
  # features, so the flare losses train the branch but not the backbones.
  config.model.mask_detach = True
  # Stage (1-4) whose map the mask branch reads, box-pooled to the plug-in
  # grid; 0 = the plug-in stage itself (the paper). Beyond the paper when
  # earlier: low-level features still show the saturation that identity
  # training removes from late ones.
  config.model.mask_stage = 0
  # Beyond the paper (paper: False): FCE pastes an identity-initialised
  # conv1x1(f_T) instead of f_T.
  config.model.fce_projection = True
  # What a flare-free sample gets from FCE: "enhanced" (A_S, the paper) or
  # "identity" (f_S unchanged; beyond the paper).
  config.model.fce_clean = "identity"
  # Beyond the paper (paper: True): FCE's straight-through gradient from the
  # identity losses does not reach the mask; only the flare losses train it.
  config.model.fce_mask_gradient = False
  # Retrieval embedding from stream features "before_bn" or "after_bn" (neck).
  config.model.embedding = "before_bn"
  # How retrieval compares two images' stream features (facenet_jax/fusion.py,
  # docs/model.md#flare-aware-fusion-beyond-the-paper): "concat" (the paper:
  # one L2-normalised vector, Euclidean) or a flare-aware fusion that weights
  # each image's RGB and NI segments by its own flare evidence in a
  # pair-normalised distance: "fixed" (fusion_weight where delta = 1) or
  # "saturation" (falls linearly with the raw image's saturated fraction to
  # fusion_weight at fusion_full_ratio). Beyond the paper
  # (paper: "concat"): "saturation", weight 0.5 at a fraction of 0.4, is the
  # candidate that held on the validation split under mild, rendered and
  # severe glare (docs/studies.md); scripts/fusion.py chooses a finished
  # run's own on its val split (the real-dataset configs keep "concat").
  config.model.fusion = "saturation"
  config.model.fusion_weight = 0.5
  config.model.fusion_full_ratio = 0.4

  # --- Loss -------------------------------------------------------------------
  config.loss = ml_collections.ConfigDict()
  # Per stream: identity cross-entropy (ce_weight, label_smoothing eps) and
  # batch-hard triplet (triplet_weight, triplet_margin; triplet_soft_margin:
  # softplus instead of the hinge, as the official code).
  config.loss.ce_weight = 1.0
  config.loss.label_smoothing = 0.0
  config.loss.triplet_weight = 1.0
  config.loss.triplet_margin = 0.3
  config.loss.triplet_soft_margin = False
  # SMP's flare BCE against the pseudo-label (L_f, paper eq. 1), per flare
  # modality.
  config.loss.flare_weight = 1.0
  # Beyond the paper (paper: 0 = off): per-position BCE of the mask margins against
  # the raw image's saturation map (same >= pixel_low bar as delta), brought
  # to the mask grid through the same augmentation.
  config.loss.flare_pixel_weight = 1.0
  # Beyond the paper (paper: 0 = off): on flare-free samples, regress what FCE
  # pastes (conv1x1(f_T) with model.fce_projection) onto the stream's own map.
  config.loss.fce_consistency_weight = 1.0
  # Modality relation loss: ic (paper) | none | 3m | hc | cdc (Table 5).
  # "none" departs from the paper: IC cost mAP on the validation split.
  # modality_weight weighs it; modality_margin is the 3M loss's margin.
  config.loss.modality = "none"
  config.loss.modality_weight = 1.0
  config.loss.modality_margin = 0.1

  # --- Optimisation -----------------------------------------------------------
  config.optimizer = ml_collections.ConfigDict()
  # adam (paper) | sgd (with momentum; the official ViT recipe), with L2
  # weight_decay on kernels and base learning_rate.
  config.optimizer.name = "adam"
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 3.5e-4
  config.optimizer.weight_decay = 5e-4
  # piecewise (paper: x decay_factor 0.1 at decay_epochs 40 and 70) | cosine;
  # either after a linear warmup of warmup_epochs (0 = none).
  config.optimizer.schedule = "piecewise"
  config.optimizer.decay_epochs = (40, 70)
  config.optimizer.decay_factor = 0.1
  config.optimizer.warmup_epochs = 0
  # The warmup starts at warmup_factor x learning_rate; the cosine ends at
  # min_lr_factor x learning_rate.
  config.optimizer.warmup_factor = 0.0
  config.optimizer.min_lr_factor = 0.0
  # Training length in epochs of the training split (paper: 120).
  config.num_epochs = 120
  # > 0 overrides num_epochs.
  config.num_train_steps = -1

  # --- Loop -------------------------------------------------------------------
  # Seeds the initialisation, the batch order and the augmentation.
  config.seed = 0
  # Metrics (TensorBoard, the progress bar's loss) every log_every_steps; a
  # checkpoint every checkpoint_every_steps and at the end, the newest
  # keep_checkpoints kept.
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3

  # --- Evaluation -------------------------------------------------------------
  config.eval = ml_collections.ConfigDict()
  # flip_average: embed each image and its mirror image and average; rerank:
  # k-reciprocal re-ranking (Zhong et al. 2017) of the distances; max_rank:
  # the CMC curve's length.
  config.eval.flip_average = False
  config.eval.rerank = False
  config.eval.max_rank = 50
  # Which split is ranked: "test" (query vs gallery; reported numbers) or
  # "val" (val_query vs val_gallery; for model and design choices).
  config.eval.split = "test"
  # Missing-modality evaluation (the protocol of TOP-ReID, DeMo and IDEA):
  # "none", or a comma-separated set of rgb, ni, ti (e.g. "rgb,ni") to blank
  # (network input 0, flare pseudo-label 0) on the missing_in side of the
  # ranking: "query", "gallery" or "both". Its results go to
  # eval_results_missing-<set>_<side>.json, beside eval_results.json. "all"
  # (--mode eval only): "none" and the six non-empty proper subsets from one
  # checkpoint, tabulated in WORKDIR/missing_modality.md.
  config.eval.missing = "none"
  config.eval.missing_in = "both"
  # Beyond the paper: a flare of facenet_jax/flare_render.py's family (not
  # synthetic_flare's, and not seen in training) rendered onto the RGB and
  # NI images of the "query", the "gallery" or
  # "both" at evaluation, keyed by rendered_flare_seed and each image's
  # index: ranking under flare the model was not trained on. Its results go
  # to eval_results_rendered-flare-<side>.json. "none" (default): as is.
  config.eval.rendered_flare = "none"
  config.eval.rendered_flare_seed = 0
  return config
