"""`brain_tumor_coco`: a Roboflow COCO-segmentation export, as the seed used.

Manual directory layout (the export unzipped as is):

  manual_dir/
    train/  (or training/)  _annotations.coco.json  *.jpg
    valid/  (or val/, validation/)  ...   -> split 'validation'
    test/   (or testing/)  ...

Other folders are not read; the preparation report lists them.

Every annotation, whatever its category, becomes tumour (1); an image with
no annotation gets an empty mask. Any COCO segmentation export works, not
only brain tumours. Configs: 'gray' (default; MRI is grayscale, and the
seed's RGB JPEGs have three equal channels) and 'rgb'.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

from lintunet_jax.data import image_io
from lintunet_jax.data.datasets import base, coco


@dataclasses.dataclass
class BrainTumorCocoConfig(tfds.core.BuilderConfig):
  channels: int = 1  # stored image channels: 1 gray, 3 RGB


class BrainTumorCoco(base.SegmentationBuilder):
  """Binary tumour masks rasterised from COCO polygons, boxes or RLE."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      BrainTumorCocoConfig(name='gray', channels=1,
                           description='Images stored as 1-channel gray.'),
      BrainTumorCocoConfig(name='rgb', channels=3,
                           description='Images stored as 3-channel RGB.'),
  ]
  DEFAULT_CONFIG_NAME = 'gray'
  DESCRIPTION = ('Binary tumour masks from a COCO segmentation export '
                 '(e.g. Roboflow "TumorSegmentation", CC BY 4.0).')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Unzip the Roboflow "COCO Segmentation" export into manual_dir so it '
      'holds train/, valid/ (or val/) and test/, each with its images and '
      '_annotations.coco.json; pass it as config.dataset.manual_dir.')

  def _source_description(self, dl_manager) -> str:
    return str(Path(dl_manager.manual_dir).resolve())

  def _split_generators(self, dl_manager):
    folders = coco.find_splits(Path(dl_manager.manual_dir), self.report)
    # Index (and so validate) every split before anything is written.
    indexed = {split: coco.index_split(folder, self.report)
               for split, folder in folders.items()}
    return {split: self._generate_examples(split, images)
            for split, images in indexed.items()}

  def _generate_examples(self, split, images):
    for image in images:
      pixels = image_io.read_image(image.path)
      mask = coco.rasterize_image(image, *pixels.shape[:2], self.report)
      yield image.file_name, self.example(
          split, self.stored_image(pixels), mask, image.file_name)
