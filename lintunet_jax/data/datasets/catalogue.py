"""Catalogue TFDS datasets with masks (e.g. `oxford_iiit_pet`), read by name.

Preparing a catalogue dataset runs the catalogue's own builder, which needs
TensorFlow (`pip install tensorflow`, see docs/data.md);
reading the prepared array_record files does not. This module only maps a
catalogue example onto our (image, mask-of-class-ids) convention.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Adapter:
  image_key: str
  mask_key: str
  # Stored mask values -> class ids, given the model's num_classes.
  to_class_ids: Callable[[np.ndarray, int], np.ndarray]


def _pet_trimap(mask: np.ndarray, num_classes: int) -> np.ndarray:
  # Stored trimap: 1 pet, 2 background, 3 outline (a band around the pet).
  if num_classes <= 2:
    return (mask != 2).astype(np.uint8)  # pet and its outline
  return (mask - 1).astype(np.uint8)  # 0 pet, 1 background, 2 outline


def _as_is(mask: np.ndarray, num_classes: int) -> np.ndarray:
  del num_classes
  return mask.astype(np.uint8)


KNOWN = {
    'oxford_iiit_pet': Adapter('image', 'segmentation_mask', _pet_trimap),
}
# Feature names tried, in order, for catalogue datasets not in KNOWN.
IMAGE_KEYS = ('image',)
MASK_KEYS = ('segmentation_mask', 'mask', 'label_image', 'segmentation')


def adapter_for(name: str, feature_keys) -> Adapter:
  """How to read (image, mask) from a catalogue dataset's examples."""
  catalogue_name = name.split('/')[0].split(':')[0]
  if catalogue_name in KNOWN:
    return KNOWN[catalogue_name]
  keys = set(feature_keys)
  image_key = next((k for k in IMAGE_KEYS if k in keys), None)
  mask_key = next((k for k in MASK_KEYS if k in keys), None)
  if image_key is None or mask_key is None:
    raise ValueError(
        f'dataset {name!r} has features {sorted(keys)}; expected an image '
        f'({" or ".join(IMAGE_KEYS)}) and a mask ({" or ".join(MASK_KEYS)}). '
        'Add an Adapter for it to lintunet_jax/data/datasets/catalogue.py.')
  return Adapter(image_key, mask_key, _as_is)


def read_example(adapter: Adapter, example: dict,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  mask = np.asarray(example[adapter.mask_key])
  if mask.ndim == 3:
    mask = mask[..., 0]
  return (np.asarray(example[adapter.image_key]),
          adapter.to_class_ids(mask, num_classes))
