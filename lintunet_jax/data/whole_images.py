"""Whole images at their own size, for sliding-window prediction and evaluation.

The training and eval pipelines (`pipeline`) bring every image to the
model's size. A model trained on patches at native resolution must instead
see the whole image at its own size, tiled by the sliding window
(`evaluation/sliding_window.py`), so that nothing is rescaled:

  image = whole_images.native_input(raw_uint8, config)   # float32 [H, W, C]
  for image, mask, index in whole_images.iterate_split(config, 'test'):
    ...

`native_input` is `pipeline.preprocess_image` without the resize: the same
channel conversion, scaling to [0, 1] and normalisation (a per-image
z-score for 'standardize' is then taken over the whole image, as nnU-Net
normalises a whole case), so a tile of it is what a training patch was.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from lintunet_jax.data import pipeline
from lintunet_jax.data import sources
from lintunet_jax.data.datasets import transforms


def native_input(image: np.ndarray, config) -> np.ndarray:
  """Raw uint8 [H, W] or [H, W, C] image, or a float32 volume slice
  (already normalised), -> float32 model input [H, W, C]
  (C = config.dataset.channels) at the image's own size."""
  ds = config.dataset
  if ds.normalization not in transforms.NORMALIZATIONS:
    raise ValueError(f'config.dataset.normalization must be one of '
                     f'{transforms.NORMALIZATIONS}, got {ds.normalization!r}')
  return transforms.to_model_input(
      transforms.to_channels(np.asarray(image), ds.channels), ds.normalization)


def process_share(num_examples: int, process_index: int,
                  process_count: int) -> np.ndarray:
  """int64 indices of the examples process `process_index` evaluates: every
  `process_count`-th from `process_index` (as the eval pipeline strides)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return np.arange(process_index, num_examples, process_count, dtype=np.int64)


def iterate_split(config, split: str, *,
                  prepare: Callable[[np.ndarray], np.ndarray] | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """This process's share of `split`, one example at a time, finite.

  Yields (image, mask, index): `prepare(stored uint8 image)` (default
  `native_input`: float32 [H, W, C] at the image's own size), the stored
  uint8 mask [H, W] of class ids at that size, and the example's position
  in the split. Together the processes see every example exactly once.
  Images come one by one (no batching) because their sizes differ.
  """
  process_index, process_count = pipeline._process(process_index, process_count)  # pylint: disable=protected-access
  source = sources.source(config, split)
  if prepare is None:
    prepare = lambda image: native_input(image, config)  # pylint: disable=unnecessary-lambda-assignment
  for index in process_share(len(source), process_index, process_count):
    image, mask = source[int(index)]
    yield prepare(np.asarray(image)), np.asarray(mask), int(index)

