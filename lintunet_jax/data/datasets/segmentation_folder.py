"""`segmentation_folder`: any folder of image/mask pairs.

Layouts and pairing rules: see `folder_pairs`. Formats: png, jpg, tif, gif,
bmp (anything `image_io` reads). Masks are binary (model.num_classes 1 or 2)
or class ids (num_classes > 2); `config_for` picks the builder config, so a
dataset prepared for one class count is never read as another.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

from lintunet_jax.data import image_io
from lintunet_jax.data.datasets import base, folder_pairs


@dataclasses.dataclass
class SegmentationFolderConfig(tfds.core.BuilderConfig):
  channels: int = 1  # stored image channels: 1 gray, 3 RGB
  num_classes: int = 2  # <= 2: binary masks; > 2: class ids 0..num_classes-1


def config_for(channels: int, num_classes: int) -> SegmentationFolderConfig:
  """The builder config for a model's channels and classes."""
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')
  if num_classes <= 2:  # sigmoid or 2-way softmax: the same 0/1 masks
    return next(config for config in SegmentationFolder.BUILDER_CONFIGS
                if config.channels == channels)
  colour = 'gray' if channels == 1 else 'rgb'
  return SegmentationFolderConfig(
      name=f'{colour}_classes{num_classes}', channels=channels,
      num_classes=num_classes,
      description=f'{colour} images, masks of {num_classes} class ids.')


class SegmentationFolder(base.SegmentationBuilder):
  """Image/mask pairs from a folder, split by optional sub-folders."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SegmentationFolderConfig(name='gray_binary', channels=1, num_classes=2,
                               description='gray images, binary masks.'),
      SegmentationFolderConfig(name='rgb_binary', channels=3, num_classes=2,
                               description='RGB images, binary masks.'),
  ]
  DEFAULT_CONFIG_NAME = 'gray_binary'
  DESCRIPTION = 'Segmentation masks paired with images by file name.'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put images/ and masks/ folders (optionally inside split folders: '
      'train/ or training/, val/, valid/ or validation/, test/ or testing/) '
      'in manual_dir and pass it as config.dataset.manual_dir. '
      'See docs/data.md.')

  def _source_description(self, dl_manager) -> str:
    return str(Path(dl_manager.manual_dir).resolve())

  def _split_generators(self, dl_manager):
    folders = folder_pairs.find_splits(Path(dl_manager.manual_dir),
                                       self.report)
    paired = {split: folder_pairs.pair_files(images, masks, self.report)
              for split, (images, masks) in folders.items()}
    return {split: self._generate_examples(split, pairs)
            for split, pairs in paired.items()}

  def _generate_examples(self, split, pairs):
    num_classes = self.builder_config.num_classes
    for pair in pairs:
      pixels = image_io.read_image(pair.image)
      mask = folder_pairs.mask_to_class_ids(
          image_io.read_mask(pair.mask), num_classes, pair.mask, self.report)
      yield pair.key, self.example(
          split, self.stored_image(pixels), mask, pair.file_name)
