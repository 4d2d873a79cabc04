"""LinTUNet recipes.

  python train.py --config configs/lintunet.py --workdir DIR        # the seed's recipe, 256x256
  python train.py --config configs/lintunet.py:quick --workdir DIR  # CPU-sized, synthetic data
  python train.py --config configs/lintunet.py:seed --workdir DIR   # the seed's exact model

Variants (the part after the colon):
  (none)  LinTUNet with Linformer + block-sparse attention (the default).
  seed    exactly the seed's model: Linformer only, dim 512, seq_len 256,
          depth 1, heads 1, k 64 (34,220,097 parameters).
  quick   a small LinTUNet on the embedded synthetic dataset at 64x64 that
          trains on a 2-core CPU in minutes.
"""

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
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '', 'seed' or 'quick'")
  return config
