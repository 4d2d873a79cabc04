"""LinTUNet recipes.

  python train.py --config configs/lintunet.py --workdir DIR        # the seed's recipe, 256x256
  python train.py --config configs/lintunet.py:quick --workdir DIR  # CPU-sized, synthetic data
  python train.py --config configs/lintunet.py:volumes_quick --workdir DIR  # NIfTI volumes, CPU
  python train.py --config configs/lintunet.py:seed --workdir DIR   # the seed's exact model

Variants (the part after the colon):
  (none)  LinTUNet with Linformer + block-sparse attention (the default).
  seed    exactly the seed's model: Linformer only, dim 512, seq_len 256,
          depth 1, heads 1, k 64 (34,220,097 parameters).
  quick   a small LinTUNet on the embedded synthetic dataset at 64x64 that
          trains on a 2-core CPU in minutes.
  gpu     the default model and schedule sized for NVIDIA GPUs: bfloat16
          compute, 64 images per GPU, one epoch of warm-up.
  tpu     the same for Cloud TPU VMs (v4/v5e/v5p/v6e): bfloat16, 32 images
          per chip (a v5e-8 trains a global batch of 256).
  hires   1024x1024 images (mammography, histology tiles): a 64x64 grid of
          4,096 bottleneck tokens under block-sparse attention only (a 7x7
          window plus 4 global tokens), which Linformer's fixed seq_len
          would tie to one image size; bfloat16, 8 images per device.
  volumes_quick
          nnU-Net's 2d configuration on NIfTI volumes (nnunet_raw): the
          quick model on the slices of the synthetic raw dataset (CT + T2,
          two labels), fold 0 of 5 by case, validation on the held-out
          cases' slices; minutes on a 2-core CPU. Channels and classes come
          from dataset.json. Add --config.dataset.manual_dir=PATH for an
          nnU-Net raw folder (docs/training.md, "Training on volumes").
  patches the default model trained as nnU-Net trains, on the seed's
          dataset (brain_tumor_coco, 640x640) at native resolution: random
          256x256 crops (a third centred on tumour), validation on a grid
          of tiles, prediction with the sliding window (docs/training.md).
          Needs --config.dataset.manual_dir (or a prepared data_dir).

The accelerator recipes keep the seed's model, loss, optimizer and step
schedule; docs/training.md says what changes between CPU, GPU and TPU and
why. Combine with a dataset as usual, e.g.
  python train.py --config configs/lintunet.py:gpu --workdir gs://bkt/run \
      --config.dataset.name=brain_tumor_coco --config.dataset.manual_dir=...
"""

import ml_collections

from configs import default


def get_config(variant: str = ''):
  config = default.get_config()
  config.model.name = 'lintunet'
  if variant == 'seed':
    config.model.attention.kind = 'linformer'
  elif variant == 'quick':
    config.model.width = 16
    config.dataset.image_size = 64
    config.model.attention.seq_len = (64 // 16) ** 2
    config.model.attention.k = 8
    config.model.attention.block_size = 4
    config.model.attention.pattern = 'local_2d(radius=1)'
    # Training tuned for a 2-core CPU (~5 minutes, validation IoU > 0.6;
    # docs/training.md has the measured runs): the seed's loss, small
    # batches for more updates per image, a higher rate, cosine decay.
    # (--config.loss=bce_dice reaches a higher IoU in the same time.)
    config.batch_size = 8
    config.eval_batch_size = 32
    config.num_epochs = 5
    config.learning_rate = 2e-3
    config.schedule = 'cosine'
    config.warmup_epochs = 0.25
  elif variant == 'volumes_quick':
    quick = get_config('quick')
    config.model = quick.model
    for field in ('batch_size', 'eval_batch_size', 'learning_rate', 'schedule',
                  'warmup_epochs'):
      config[field] = quick[field]
    config.dataset.image_size = 64  # slices of 48x40 are padded, not resized
    config.num_epochs = 40  # 84 slices of 6 training cases: 10 steps an epoch
    volume_recipe(config)
  elif variant in ('gpu', 'tpu'):
    accelerator_recipe(config, variant)
  elif variant == 'hires':
    config.dataset.image_size = 1024
    attention = config.model.attention
    attention.kind = 'block_sparse'
    attention.seq_len = (1024 // 16) ** 2  # 4,096 tokens (read by Linformer kinds only)
    # A 7x7 window on the 64x64 grid (1.2% of the keys) plus 4 global tokens
    # that see and are seen by every position (BigBird): 7.4% of the 16x16
    # tiles are computed (block_layout(...).summary()).
    attention.pattern = 'local_2d(radius=3) | global_tokens(num=4)'
    attention.block_size = 16
    config.model.dtype = 'bfloat16'
    config.per_device_batch_size = 8
    config.per_device_eval_batch_size = 8
    config.warmup_epochs = 1.0
    config.dataset.num_workers = -1
  elif variant == 'patches':
    config.dataset.name = 'brain_tumor_coco'
    config.dataset.patch_size = 256  # 640x640 images: 9 tiles of 256 each
    config.model.attention.seq_len = (256 // 16) ** 2  # tokens of one patch
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '', 'seed', 'quick', "
                     "'volumes_quick', 'gpu', 'tpu', 'hires' or 'patches'")
  return config


def volume_recipe(config) -> None:
  """nnU-Net's 2d configuration on an nnunet_raw dataset.

  Channels, classes and normalisation are left unset: they come from the
  raw dataset's dataset.json when training starts
  (lintunet_jax/data/volume_config.py), as in nnU-Net; setting one that
  disagrees is an error. Slices keep their native resolution, padded to
  image_size (shrunk only if larger); CE + Dice as nnU-Net trains; fold 0
  of 5 by case, as nnU-Net's first fold.
  """
  placeholder = ml_collections.config_dict.placeholder
  config.dataset.name = 'nnunet_raw'
  config.dataset.resize = 'pad'
  config.dataset.channels = placeholder(int)
  config.dataset.normalization = placeholder(str)
  config.model.in_channels = placeholder(int)
  config.model.num_classes = placeholder(int)
  config.dataset.fold = 0
  config.dataset.num_folds = 5
  config.loss = 'bce_dice'


# Images per chip at 256x256 (width 64, bfloat16). A GPU's many SMs need
# large batches to fill; a TPU chip fills at smaller per-chip batches, and a
# v5e chip has 16 GB of HBM. benchmarks/accelerator_suite.py measures
# images/s and planned memory at batch 64 and 128 (results in
# benchmarks/results/model_<device>.json).
PER_DEVICE_BATCH = {'gpu': 64, 'tpu': 32}


def accelerator_recipe(config, accelerator: str) -> None:
  """Sizes the seed's recipe for GPUs or TPUs (shared with unet.py)."""
  config.model.dtype = 'bfloat16'  # parameters and softmax stay float32
  config.per_device_batch_size = PER_DEVICE_BATCH[accelerator]
  config.per_device_eval_batch_size = PER_DEVICE_BATCH[accelerator]
  # A global batch of 64-256 instead of the seed's 32: ramp the rate over
  # the first epoch, as large-batch Adam recipes do (Goyal et al. 2017).
  config.warmup_epochs = 1.0
  config.dataset.num_workers = -1  # sized to the host's cores
  config.dataset.prefetch = 4
  config.require_accelerator = True
