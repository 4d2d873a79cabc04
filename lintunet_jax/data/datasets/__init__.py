"""TFDS builders for segmentation data; importing this package registers them.

  brain_tumor_coco     a COCO segmentation export (the seed's dataset)
  segmentation_folder  any folder of image/mask pairs
  nnunet_raw           the 2-D slices of an nnU-Net v2 raw dataset (NIfTI)
  synthetic_mri        generated MRI-like slices (the embedded default)

After `import lintunet_jax.data.datasets`, `tfds.builder('synthetic_mri', ...)`
finds them like catalogue datasets. See docs/data.md.
"""

from lintunet_jax.data.datasets.brain_tumor_coco import BrainTumorCoco
from lintunet_jax.data.datasets.nnunet_raw import NnunetRaw
from lintunet_jax.data.datasets.report import DataError, PreparationReport
from lintunet_jax.data.datasets.segmentation_folder import SegmentationFolder
from lintunet_jax.data.datasets.synthetic_mri import SyntheticMri

__all__ = ['BrainTumorCoco', 'DataError', 'NnunetRaw', 'PreparationReport',
           'SegmentationFolder', 'SyntheticMri']
