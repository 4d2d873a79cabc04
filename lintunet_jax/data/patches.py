"""Patches of native-resolution images: training crops and validation tiles.

With `config.dataset.patch_size = P` (docs/training.md, "Patch training at
native resolution") nothing is resized: the model sees P x P windows of
each image at its own size, as nnU-Net trains.

Training (`train_example`: `random_origin` + `crop`): one random window per example. A
`foreground_fraction` share of the windows is centred on a foreground pixel
drawn uniformly among the mask's non-zero pixels (small lesions would
otherwise be rare in random windows), then moved the least needed to lie
inside the image; the rest are uniform over all windows inside the image.
An image smaller than P along an axis is zero-padded there: the window then
starts anywhere from `size - P` to 0, so the image lands anywhere in it.

Validation (`tile_origins`, `TileReader`): the cheaper proxy for the sliding window, a
grid of non-overlapping P x P tiles from the top-left corner, the last row
and column padded past the bottom/right edges; every native pixel lies in
exactly one tile.

Padding is 0 in the model's input, i.e. after normalisation, as the
sliding window pads at inference (and nnU-Net pads): black for 'unit' and
'seed', the image's mean for 'standardize' (training crops the uint8 image
before normalising, so there the fill is the mean's nearest uint8 value,
within 0.5/255 of it). Masks are padded with class 0 (background).
"""

from __future__ import annotations

import functools

import numpy as np

from lintunet_jax.data.datasets import transforms


def crop(array: np.ndarray, top: int, left: int, size: int,
         fill=0) -> np.ndarray:
  """The size x size window of `array` [H, W, ...] at (top, left).

  The window may reach past any edge (negative or large offsets): those
  pixels are `fill`. Returns a new array of `array`'s dtype, [size, size, ...].
  """
  height, width = array.shape[:2]
  out = np.full((size, size) + array.shape[2:], fill, array.dtype)
  rows = slice(max(top, 0), min(top + size, height))
  cols = slice(max(left, 0), min(left + size, width))
  if rows.start < rows.stop and cols.start < cols.stop:
    out[rows.start - top:rows.stop - top,
        cols.start - left:cols.stop - left] = array[rows, cols]
  return out


def origin_range(length: int, size: int) -> tuple[int, int]:
  """Inclusive range of window starts along an axis of `length` pixels for
  a window of `size`: inside the image when it fits, else every placement
  that keeps the whole image inside the window."""
  return min(0, length - size), max(0, length - size)


def random_origin(mask: np.ndarray, size: int, foreground_fraction: float,
                  rng: np.random.Generator) -> tuple[int, int]:
  """(top, left) of a training window over a [H, W] class-id mask.

  With probability `foreground_fraction` (and a foreground pixel to aim
  at) the window is centred on a uniformly drawn pixel with mask > 0, then
  clamped into `origin_range`; otherwise uniform over `origin_range`. All
  draws come from `rng` (grain's per-example generator), so a run and its
  resumption crop the same windows.
  """
  height, width = mask.shape[:2]
  (top_lo, top_hi), (left_lo, left_hi) = (origin_range(height, size),
                                          origin_range(width, size))
  if rng.random() < foreground_fraction:
    foreground = np.flatnonzero(mask)
    if foreground.size:
      row, col = divmod(int(foreground[rng.integers(foreground.size)]), width)
      return (int(np.clip(row - size // 2, top_lo, top_hi)),
              int(np.clip(col - size // 2, left_lo, left_hi)))
  return (int(rng.integers(top_lo, top_hi + 1)),
          int(rng.integers(left_lo, left_hi + 1)))


def tile_origins(height: int, width: int, size: int) -> list[tuple[int, int]]:
  """(top, left) of the non-overlapping size x size tiles covering an
  [height, width] image, row by row: ceil(H/size) * ceil(W/size) tiles."""
  return [(top, left) for top in range(0, height, size)
          for left in range(0, width, size)]


def region(height: int, width: int, top: int, left: int,
           size: int) -> np.ndarray:
  """uint8 [size, size]: 1 where the tile at (top, left) covers a pixel of
  the [height, width] image, 0 on padding."""
  return crop(np.ones((height, width), np.uint8), top, left, size)


def train_example(image: np.ndarray, mask: np.ndarray, *, size: int,
                  channels: int, normalization: str, foreground_fraction: float,
                  augment: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A stored (uint8 image [H, W(, C)], class-id mask [H, W]) -> a random
  training patch: 'image' float32 [size, size, channels], 'mask' int32
  [size, size].

  The crop is taken from the uint8 image and then augmented (when
  `augment`) exactly as a resized image is. 'standardize' uses the WHOLE
  image's mean and std, not the patch's: the sliding window at inference
  standardises each whole image once, so training must see patches
  normalised the same way ('unit' and 'seed' are per pixel anyway).
  """
  image = transforms.to_channels(np.asarray(image), channels)
  mask = np.asarray(mask)
  stats, fill = None, 0
  if normalization == 'standardize':
    stats = transforms.image_stats(transforms.to_unit_float(image))
    fill = int(np.clip(np.rint(stats[0] * 255.0), 0, 255))  # normalises to ~0
  top, left = random_origin(mask, size, foreground_fraction, rng)
  image = crop(image, top, left, size, fill)
  mask = crop(mask, top, left, size)
  if augment:
    image, mask = transforms.augment(image, mask, rng)
  else:
    image = transforms.to_unit_float(image)
  return {'image': transforms.normalize(image, normalization, stats),
          'mask': mask.astype(np.int32)}


class TileReader:
  """(split index, top, left) -> one validation tile of the native image:
  'image' float32 [size, size, C], 'mask' int32 and 'region' uint8
  [size, size], 'valid', 'index' (the image's).

  The whole image is normalised once (with its own statistics, as the
  sliding window does), zero-padded after normalisation (as the window
  pads) to
  whole tiles at the bottom and right, and cut; `region` is 1 on the
  image's own pixels only. The last few padded images are cached, since a
  process reads one image's tiles one after another.
  """

  def __init__(self, examples, *, size: int, channels: int,
               normalization: str):
    self._examples, self._size = examples, size
    self._channels, self._normalization = channels, normalization
    self._padded = functools.lru_cache(maxsize=4)(self._read_padded)

  def _read_padded(self, index: int):
    image, mask = self._examples[index]
    image = transforms.to_channels(np.asarray(image), self._channels)
    height, width = np.shape(mask)[:2]
    extra = (-height % self._size, -width % self._size)
    stats = None
    if self._normalization == 'standardize':
      stats = transforms.image_stats(transforms.to_unit_float(image))
    image = transforms.normalize(transforms.to_unit_float(image),
                                 self._normalization, stats)
    image = np.pad(image, ((0, extra[0]), (0, extra[1]), (0, 0)))
    mask = np.pad(np.asarray(mask), ((0, extra[0]), (0, extra[1])))
    return image, mask, (height, width)

  def __call__(self, item) -> dict[str, np.ndarray]:
    index, top, left = (int(v) for v in item)
    image, mask, (height, width) = self._padded(index)
    window = (slice(top, top + self._size), slice(left, left + self._size))
    return {'image': image[window], 'mask': mask[window].astype(np.int32),
            'region': region(height, width, top, left, self._size),
            'valid': np.float32(1.0), 'index': np.int32(index)}
