"""Fitting a config to an nnunet_raw dataset, and recording its statistics.

As in nnU-Net, where no flag is needed, the model's input channels and
classes come from the raw dataset's `dataset.json`: `model.in_channels`
and `dataset.channels` are the number of `channel_names`, and
`model.num_classes` the number of `labels`, background included (softmax).
A value set explicitly that disagrees stops training with both numbers
named; `configs/lintunet.py:volumes*` leave them unset (placeholders).

The normalisation statistics of the prepared dataset (CT's foreground
percentiles, mean and std; the slicing axis) are copied into the workdir
when training starts (`STATISTICS_FILE`), so prediction applies the
training statistics even where the prepared dataset is not at hand.
"""

from __future__ import annotations

import copy
import json

import ml_collections

from lintunet_jax import paths
from lintunet_jax.data import sources
from lintunet_jax.data import volumes
from lintunet_jax.data.datasets import nnunet_raw
from lintunet_jax.data.datasets import preparation

STATISTICS_FILE = 'volume_statistics.json'
STORED = 'stored'  # config.dataset.normalization of volume slices


def is_volume_dataset(config) -> bool:
  return preparation.base_name(config.dataset.name) == 'nnunet_raw'


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with channels, classes and normalisation from dataset.json.

  Other datasets: `config` unchanged. Raises ValueError naming the field,
  its value and what dataset.json declares when they disagree.
  """
  if not is_volume_dataset(config):
    return config
  folder = preparation.raw_dataset_folder(config.dataset)
  dataset = volumes.read_dataset_json(folder)
  where = dataset.folder / volumes.DATASET_JSON
  config = copy.deepcopy(config)
  channels = (f'{dataset.num_channels} channel(s) '
              f'({", ".join(dataset.channel_names)})')
  classes = (f'{dataset.num_classes} labels, background included '
             f'({", ".join(dataset.labels)})')
  with config.unlocked():
    for group, field, want, declared in (
        ('model', 'in_channels', dataset.num_channels, channels),
        ('dataset', 'channels', dataset.num_channels, channels),
        ('model', 'num_classes', dataset.num_classes, classes)):
      value = config[group].get(field)
      if value is None:
        config[group][field] = want
      elif value != want:
        raise ValueError(
            f'config.{group}.{field}={value} but {where} declares {declared}: '
            f'leave it unset (configs/lintunet.py:volumes_quick does) or set '
            f'--config.{group}.{field}={want}')
    normalization = config.dataset.get('normalization')
    if normalization is None:
      config.dataset.normalization = STORED
    elif normalization != STORED:
      raise ValueError(
          f'config.dataset.normalization={normalization!r}: nnunet_raw stores '
          "its slices normalised as nnU-Net does (docs/data.md), so it must be "
          f"{STORED!r}, the images as stored")
  if config.dataset.get('patch_size'):
    raise ValueError(
        'config.dataset.patch_size: training on native-resolution patches of '
        'volume slices is not available yet; unset it (slices are padded or '
        'resized to config.dataset.image_size)')
  return config


def _prepared_volumes(config):
  """(builder, its recorded volume statistics) of the prepared dataset;
  ValueError naming it when it was prepared without them."""
  builder = preparation.make_builder(config.dataset, config.model.num_classes)
  recorded = nnunet_raw.stored_volumes(builder)
  if recorded is None:
    raise ValueError(f'{builder.data_path}: prepared without volume statistics; '
                     'delete it and prepare again')
  return builder, recorded


def write_statistics(config, workdir: str) -> str | None:
  """Copies the prepared dataset's normalisation statistics to the workdir
  (process 0, after preparation); returns the path, None for other data."""
  if not is_volume_dataset(config):
    return None
  _, recorded = _prepared_volumes(config)
  folder = paths.check(workdir, 'workdir')
  folder.mkdir(parents=True, exist_ok=True)
  path = str(folder / STATISTICS_FILE)
  paths.write_text(path, json.dumps(recorded, indent=2) + '\n')
  return path


def read_statistics(workdir: str) -> dict | None:
  """What `write_statistics` recorded, None for a workdir of other data."""
  path = paths.check(workdir, 'workdir') / STATISTICS_FILE
  return json.loads(path.read_text()) if path.exists() else None


def split_cases(config, split: str) -> tuple[int, dict[str, tuple[list[float], list[int]]]]:
  """(slicing axis, {case id: (spacing in mm, positions of its slices in
  `split`, in slice order)}) of a prepared nnunet_raw split: what stacking
  a case's slices back into its volume needs."""
  builder, recorded = _prepared_volumes(config)
  source = sources.fields_only(builder, split, ('case_id', 'slice_index'))
  slices: dict[str, list[tuple[int, int]]] = {}
  for position in range(len(source)):
    example = source[position]
    case = example['case_id']
    case = case.decode() if isinstance(case, bytes) else str(case)
    slices.setdefault(case, []).append((int(example['slice_index']), position))
  return int(recorded['slicing_axis']), {
      case: ([float(v) for v in recorded['spacing'][case]],
             [position for _, position in sorted(found)])
      for case, found in slices.items()}
