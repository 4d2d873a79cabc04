"""Defaults shared by every recipe: the seed's training recipe on LinTUNet.

Recipes (`unet.py`, `lintunet.py`) import this and change only what differs,
so two recipes compare fairly by construction. Every field any part of the
project reads is declared here, which makes `--config.a.b=value` overrides
fail loudly on typos.

Usage:
  python train.py --config configs/lintunet.py --workdir /tmp/lintunet
"""

import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
  """The model: a U-Net with an efficient-attention bottleneck."""
  model = ml_collections.ConfigDict()
  model.name = 'lintunet'  # 'unet' | 'lintunet'
  model.width = 64  # channels of the first level; levels are w, 2w, 4w, 8w, 16w
  model.in_channels = 1
  model.num_classes = 1  # 1 = binary (sigmoid logits); >1 = softmax over classes
  # 'float32' or 'bfloat16' compute; parameters always stay float32 and the
  # attention softmax is always computed in float32.
  model.dtype = 'float32'
  # Channel order of each decoder level's concat: 'upsampled_skip', the seed
  # notebook's torch.cat((upsampled, skip)). 'skip_upsampled' only for
  # checkpoints trained so before issue 16 (their saved config lacks this
  # field, which means the same; resuming them keeps it).
  model.decoder_concat = 'upsampled_skip'

  attn = ml_collections.ConfigDict()
  # 'dense' | 'linformer' | 'block_sparse' | 'linformer_block_sparse'
  attn.kind = 'linformer_block_sparse'
  attn.depth = 1
  attn.heads = 1
  attn.dim_head = ml_collections.config_dict.placeholder(int)  # None: dim // heads
  attn.k = 64  # Linformer projected length
  # Longest token sequence the Linformer projections cover; shorter sequences
  # use the first rows (as the `linformer` package does). (image_size/16)**2.
  attn.seq_len = 256
  attn.share_kv = False
  attn.ff_mult = 4
  attn.dropout = 0.0
  # Sparse pattern over the (H/16)x(W/16) grid of bottleneck tokens, written
  # with the constructors of `lintunet_jax.attention.masks` and combined with | and &.
  attn.pattern = 'local_2d(radius=2)'
  attn.block_size = 16  # query/key tile edge for the block-sparse layout
  # 'auto': the fused Pallas kernels on GPUs where the tiles suit them (block
  # sizes of 16, 32, ...; measured 2-4x faster than XLA's ops on an H200,
  # benchmarks/NOTES.md item 21), XLA's ops elsewhere | 'xla' (every
  # backend) | 'pallas' (GPUs only). Not a parameter: a checkpoint runs with
  # any kernel (--config.model.attention.kernel=xla on top of a saved one).
  attn.kernel = 'auto'
  model.attention = attn
  return model


def get_dataset_config() -> ml_collections.ConfigDict:
  """Where images come from and how they are shaped for the model."""
  ds = ml_collections.ConfigDict()
  ds.name = 'synthetic_mri'  # a TFDS builder name (ours or the catalogue's)
  ds.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir
  ds.manual_dir = ml_collections.config_dict.placeholder(str)  # raw files
  ds.train_split = 'train'
  ds.eval_split = 'validation'
  ds.test_split = 'test'
  ds.image_size = 256  # model input is image_size x image_size
  ds.resize = 'resize'  # 'resize' | 'pad' for sizes that differ
  ds.channels = 1  # 1 = grayscale, 3 = RGB (converted as needed)
  ds.normalization = 'unit'  # 'unit' (0..1) | 'standardize' (per image) | 'seed' | 'stored' (nnunet_raw)
  ds.augment = True  # train split only
  # Processes that decode and augment training batches (grain); evaluation
  # uses as many threads. -1: sized to this host's cores (see
  # input_pipeline.num_workers).
  ds.num_workers = 2
  ds.prefetch = 2
  ds.num_train_examples = ml_collections.config_dict.placeholder(int)  # subset
  # Patch training at native resolution, as nnU-Net trains: with patch_size
  # set, training batches are random patch_size x patch_size crops of each
  # image at its own size (nothing is resized; images smaller than a patch
  # are padded), a foreground_fraction share of them centred on a foreground
  # pixel. The model's input is then patch_size (`image_size` is not read),
  # and whole images are predicted with the sliding window (`inference`).
  ds.patch_size = ml_collections.config_dict.placeholder(int)
  ds.foreground_fraction = 0.33
  # Cross-validation (docs/training.md): with fold = K, the train split is cut
  # into num_folds deterministic folds; fold K is validation, the others are
  # trained on (eval_split is not read). The folds are written to
  # DIR/splits.json; splits_file (a JSON in that layout) replaces them.
  ds.fold = ml_collections.config_dict.placeholder(int)
  ds.num_folds = 5
  ds.splits_file = ml_collections.config_dict.placeholder(str)
  return ds


def get_inference_config() -> ml_collections.ConfigDict:
  """How whole images are predicted (eval.py, predict.py, the export)."""
  inference = ml_collections.ConfigDict()
  # Tiles of the model's input size slid over the image at its own size,
  # blended with Gaussian weights (nnU-Net). None: on when the model was
  # trained on patches (dataset.patch_size), else the image is resized to
  # the model's size and the mask resized back.
  inference.sliding_window = ml_collections.config_dict.placeholder(bool)
  inference.overlap = 0.5  # share of a tile that overlaps its neighbour
  inference.sigma_scale = 0.125  # Gaussian sigma / tile size (nnU-Net's 1/8)
  inference.tile_batch_size = ml_collections.config_dict.placeholder(int)  # None: eval_batch_size
  inference.tta = 'none'  # 'none' | 'flips' (mirror test-time augmentation)
  return inference


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = get_model_config()
  config.dataset = get_dataset_config()
  config.inference = get_inference_config()

  # The seed's recipe: Adam 1e-3, x0.1 every 10 epochs, clip 1.0, BCE, 40 ep.
  # (docs/training.md describes every training field.)
  config.seed = 0  # parameters, data order and augmentation, dropout
  config.batch_size = 32  # global, across all devices and hosts
  config.eval_batch_size = 32  # global; must also divide over the devices
  # Accelerator recipes state the batch per chip instead: when set, the
  # global batch_size / eval_batch_size become per-device x device count at
  # start-up (parallel.resolve_batch_sizes), so one recipe fits a v5e-8, a
  # v4-32 pod slice or one GPU. A batch_size given alongside must agree.
  config.per_device_batch_size = ml_collections.config_dict.placeholder(int)
  config.per_device_eval_batch_size = ml_collections.config_dict.placeholder(int)
  config.num_epochs = 40
  config.num_train_steps = -1  # > 0 overrides num_epochs
  # 'bce' (sigmoid BCE on logits; softmax CE if num_classes > 1) | 'dice'
  # (1 - soft Dice per image) | 'bce_dice' (their sum)
  config.loss = 'bce'
  config.optimizer = 'adam'  # 'adam' | 'adamw' (decoupled decay on kernels)
  config.learning_rate = 1e-3
  config.weight_decay = 0.0  # used by adamw
  config.schedule = 'step'  # 'step' | 'cosine' | 'constant'
  config.step_every_epochs = 10  # step schedule: x step_factor every N epochs
  config.step_factor = 0.1
  config.warmup_epochs = 0.0  # linear warm-up (any schedule), may be fractional
  config.grad_clip_norm = 1.0  # global-norm clipping; <= 0: none
  # A step with a NaN/Inf loss or gradient is skipped (nothing updated);
  # this many in a row stop the run (docs/training.md).
  config.max_consecutive_nonfinite_steps = 5
  config.threshold = 0.5  # probability threshold for binary masks
  # Fail at start-up when JAX found no GPU/TPU and fell back to the CPU
  # (a CUDA or TPU install gone wrong would otherwise train for hours on
  # the host). The :gpu and :tpu recipes set it.
  config.require_accelerator = False

  config.log_every_steps = 10  # one 'train' record (mean loss) per N steps
  config.eval_every_steps = -1  # -1: once per epoch (and always at the end)
  config.checkpoint_every_steps = -1  # -1: once per epoch (also after evals, at the end)
  config.keep_checkpoints = 3  # the last K ...
  config.keep_best_checkpoints = 1  # ... plus the best N by validation IoU
  config.async_checkpointing = True  # write checkpoints while training goes on
  config.progress_bar = True  # tqdm bar on process 0 (step, loss, images/s, ETA)

  # Multi-host (docs/training.md): None joins the other processes with
  # jax.distributed.initialize() when a launcher started several (SLURM
  # srun, Open MPI, a Cloud TPU VM's workers, JAX_COORDINATOR_ADDRESS with
  # JAX_NUM_PROCESSES / JAX_PROCESS_ID); True always, False never. The three
  # fields below replace JAX's auto-detection for a hand-made cluster.
  config.distributed = ml_collections.config_dict.placeholder(bool)
  config.coordinator_address = ml_collections.config_dict.placeholder(str)  # 'host:port'
  config.num_processes = ml_collections.config_dict.placeholder(int)
  config.process_id = ml_collections.config_dict.placeholder(int)
  return config
