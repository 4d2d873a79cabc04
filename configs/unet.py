"""The U-Net baseline, on exactly LinTUNet's recipe (so they compare fairly).

  python train.py --config configs/unet.py --workdir DIR
  python train.py --config configs/unet.py:quick --workdir DIR

Variants: (none) the seed's recipe at 256x256 (31,036,481 parameters);
quick: the CPU-sized recipe of `lintunet.py:quick`, without attention;
gpu, tpu: the accelerator recipes of `lintunet.py:gpu` / `:tpu`; patches:
`lintunet.py:patches` (native-resolution 256x256 patches of brain_tumor_coco);
volumes_quick: `lintunet.py:volumes_quick` (slices of NIfTI volumes).
"""

from configs import lintunet


def get_config(variant: str = ''):
  config = lintunet.get_config(variant)
  config.model.name = 'unet'
  return config
