"""`nnunet_raw`: the 2-D slices of an nnU-Net v2 raw dataset of NIfTI volumes.

    --config.dataset.name=nnunet_raw --config.dataset.manual_dir=.../Dataset004_Hippocampus

LinTUNet is a 2-D network, so volumes are used the way nnU-Net's `2d`
configuration uses them: sliced across the out-of-plane axis (the array
axis with the largest median spacing, `volumes.slicing_axis`), every slice
of every case stored. Each stored slice keeps what later steps need to put
predictions back into the volume: the case id, the slice index, the case's
affine and spacing (and the axis, in the metadata).

Slices are stored normalised (float32 [H, W, C], `volumes.normalize`),
because normalisation needs the whole volume (a per-case z-score) or the
whole training set (CT's foreground statistics), which a slice reader does
not have; the statistics are kept in the dataset's metadata
(`info.metadata['volumes']`) so inference on new volumes applies the
training ones. Preparation reads every case twice: a first pass checks
every file and collects the spacings and CT foreground voxels, the second
writes the slices. A bad file stops it in the first pass, before any slice
is written, with a DataError naming the file.

Splits: imagesTr/labelsTr -> `train`; imagesTs with labelsTs -> `test`.
imagesTs without labels is not a split (those cases are for prediction).
The builder config is made per raw dataset (`config_for`): its channels and
classes are read from dataset.json, not from the model config.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lintunet_jax.data import volumes
from lintunet_jax.data.datasets import base
from lintunet_jax.data.datasets.report import DataError

METADATA_KEY = 'volumes'


@dataclasses.dataclass
class NnunetRawConfig(tfds.core.BuilderConfig):
  folder: str = ''  # the raw dataset (local), the source of the slices
  channels: int = 1
  num_classes: int = 2


def config_for(folder: str | os.PathLike) -> NnunetRawConfig:
  """The builder config of one raw dataset, read from its dataset.json.

  Named after the dataset folder, so two raw datasets prepared into the
  same data_dir get different folders (and the provenance check of
  `preparation.prepare` catches two folders of the same name).
  """
  dataset = volumes.read_dataset_json(folder)
  name = re.sub(r'[^A-Za-z0-9_]', '_', dataset.folder.name).lower()
  return NnunetRawConfig(
      name=name, folder=str(dataset.folder), channels=dataset.num_channels,
      num_classes=dataset.num_classes,
      description=f'{dataset.name}: {dataset.num_channels} channel(s) '
      f'({", ".join(dataset.channel_names)}), labels {dict(dataset.labels)}.')


def volume_features(channels: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(None, None, channels),
                                    dtype=np.float32, encoding='bytes'),
      'mask': tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                   encoding='zlib'),
      'file_name': tfds.features.Text(),
      'case_id': tfds.features.Text(),
      'slice_index': tfds.features.Scalar(dtype=np.int32),
      'affine': tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
      'spacing': tfds.features.Tensor(shape=(3,), dtype=np.float64),
  })


class NnunetRaw(base.SegmentationBuilder):
  """2-D slices of an nnU-Net v2 raw dataset, normalised as nnU-Net does."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = []  # one per raw dataset: config_for(folder)
  DESCRIPTION = __doc__
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Point config.dataset.manual_dir at an nnU-Net v2 raw dataset folder '
      '(DatasetXXX_Name with dataset.json, imagesTr/, labelsTr/). '
      'See docs/data.md.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=volume_features(self.builder_config.channels),
        metadata=tfds.core.MetadataDict())

  def _source_description(self, dl_manager) -> str:
    return str(Path(dl_manager.manual_dir).resolve())

  def _split_generators(self, dl_manager):
    dataset = volumes.read_dataset_json(dl_manager.manual_dir)
    config = self.builder_config
    if (dataset.num_channels, dataset.num_classes) != (config.channels,
                                                       config.num_classes):
      raise DataError(dataset.folder / volumes.DATASET_JSON,
                      f'declares {dataset.num_channels} channel(s) and '
                      f'{dataset.num_classes} classes, but this builder config '
                      f'was made for {config.channels} and {config.num_classes}')
    splits = {'train': volumes.find_cases(dataset, *volumes.TRAIN_FOLDERS)}
    if not splits['train']:
      raise DataError(dataset.folder / volumes.TRAIN_FOLDERS[0],
                      f'no training cases (files named CASE_0000{dataset.file_ending})')
    test_cases = (volumes.find_cases(dataset, *volumes.TEST_FOLDERS)
                  if (dataset.folder / volumes.TEST_FOLDERS[1]).is_dir() else [])
    if test_cases:
      splits['test'] = test_cases
    elif (dataset.folder / volumes.TEST_FOLDERS[0]).is_dir():
      self.report.count('imagesTs without labelsTs: not a split (for prediction)')

    # First pass: every file is read and checked before a slice is written.
    needs_ct = volumes.CT in dataset.schemes
    foreground = volumes.ForegroundIntensities(dataset.num_channels)
    spacings = {}
    for split, cases in splits.items():
      for case in cases:
        volume = volumes.read_case(dataset, case)
        spacings[case.case_id] = volume.spacing
        if split == 'train' and needs_ct:
          foreground.add(volume)
    axis = volumes.slicing_axis(spacings[c.case_id] for c in splits['train'])
    try:
      plan = volumes.normalization_plan(dataset, foreground if needs_ct else None)
    except ValueError as e:
      raise DataError(dataset.folder / volumes.TRAIN_FOLDERS[1], str(e)) from None
    self.info.metadata[METADATA_KEY] = {
        'dataset': dataset.name,
        'channel_names': list(dataset.channel_names),
        'labels': dict(dataset.labels),
        'file_ending': dataset.file_ending,
        'slicing_axis': axis,
        'normalization': plan,
        'cases': {split: [c.case_id for c in cases] for split, cases in splits.items()},
        'spacing': {case_id: s.tolist() for case_id, s in spacings.items()},
    }
    return {split: self._generate_examples(split, dataset, cases, axis, plan)
            for split, cases in splits.items()}

  def _generate_examples(self, split, dataset, cases, axis, plan):
    for case in cases:
      volume = volumes.read_case(dataset, case)
      image = volumes.normalize(volume.image, plan)
      for index, (pixels, mask) in enumerate(zip(volumes.slices(image, axis),
                                                 volumes.slices(volume.label, axis))):
        name = f'{case.case_id}_slice{index:04d}'
        example: dict[str, Any] = self.example(split, pixels, mask, name)
        example.update(case_id=case.case_id, slice_index=index,
                       affine=volume.affine, spacing=volume.spacing)
        yield name, example


def stored_volumes(builder) -> dict[str, Any] | None:
  """What preparation recorded: axis, normalisation statistics, cases."""
  metadata = builder.info.metadata
  if metadata is None or METADATA_KEY not in metadata:
    return None
  return metadata[METADATA_KEY]
