"""Pixel operations shared by preparation, the input pipeline and prediction.

Each operation has exactly one implementation here, so a training batch, an
evaluation batch and a `predict.py` input go through the same arithmetic.
Images are uint8 until normalisation, except volume slices (nnunet_raw),
which are stored normalised as float32 [H, W, C] for any C and move through
the same geometry as float (PIL's 32-bit float mode), never rounded or
clipped to 0..255 (normalisation 'stored' leaves them as they are). Masks
are integer class ids and only ever move by nearest neighbour
(interpolating ids would invent classes).

Geometry modes (`config.dataset.resize`):
  'resize': stretch to size x size (aspect ratio not kept).
  'pad':    keep the aspect ratio; shrink only if a side exceeds `size`, then
            zero-pad to size x size, centred. Native resolution is kept
            whenever the image fits (e.g. 565x584 in a 592 canvas).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

RESIZE_MODES = ('resize', 'pad')
# For uint8 images; 'stored' reads volume slices as they were stored.
IMAGE_NORMALIZATIONS = ('unit', 'standardize', 'seed')
NORMALIZATIONS = IMAGE_NORMALIZATIONS + ('stored',)

# Augmentation strengths: small enough that a tumour stays a tumour.
MAX_ROTATION_DEGREES = 15.0
SCALE_RANGE = (0.9, 1.1)
MAX_SHIFT_FRACTION = 0.05
CONTRAST_RANGE = (0.8, 1.2)
MAX_BRIGHTNESS_SHIFT = 0.1
MAX_LOG_GAMMA = 0.2
# Float (already normalised) images: a scale and a shift in z-score units,
# with no clipping (there is no fixed range to clip to).
FLOAT_SCALE_RANGE = (0.8, 1.2)
MAX_FLOAT_SHIFT = 0.2


def is_float_image(image: np.ndarray) -> bool:
  """Volume slices, stored normalised; images of files are uint8."""
  return np.issubdtype(np.asarray(image).dtype, np.floating)


def channels_equal(image: np.ndarray) -> bool:
  """True for grayscale stored as RGB (as in the seed's JPEGs)."""
  if image.ndim == 2 or image.shape[-1] == 1:
    return True
  return bool(np.array_equal(image[..., 0], image[..., 1]) and
              np.array_equal(image[..., 0], image[..., 2]))


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [H, W] or [H, W, 1|2|3|4] to [H, W, channels] (1 or 3).

  Colour to gray uses ITU-R 601 luma (as PIL's 'L'), except that equal
  channels are copied exactly; alpha is dropped. Float images (volume
  slices: C channels of C modalities) are never converted: C must equal
  `channels`.
  """
  if is_float_image(image):
    if image.ndim == 2:
      image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] != channels:
      raise ValueError(
          f'a float image of shape {image.shape} cannot feed {channels} '
          'channel(s): volume slices keep the channels (modalities) they '
          'were stored with')
    return np.ascontiguousarray(image, dtype=np.float32)
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f'expected an [H, W] or [H, W, C] image, got shape '
                     f'{image.shape}')
  if image.shape[-1] == 2:  # gray + alpha
    image = image[..., :1]
  elif image.shape[-1] == 4:  # colour + alpha
    image = image[..., :3]
  if image.shape[-1] == channels:
    return np.ascontiguousarray(image, dtype=np.uint8)
  if channels == 3:
    return np.repeat(image, 3, axis=-1).astype(np.uint8)
  if channels_equal(image):
    return np.ascontiguousarray(image[..., :1], dtype=np.uint8)
  weighted = image.astype(np.uint32) @ np.array([299, 587, 114], np.uint32)
  return ((weighted + 500) // 1000).astype(np.uint8)[..., None]


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where an [H, W] image lands in the size x size model input."""
  height: int  # after scaling
  width: int
  top: int
  left: int


def placement(original_hw: tuple[int, int], size: int, mode: str) -> Placement:
  height, width = (int(v) for v in original_hw)
  if mode == 'resize':
    return Placement(size, size, 0, 0)
  if mode != 'pad':
    raise ValueError(f'config.dataset.resize must be one of {RESIZE_MODES}, '
                     f'got {mode!r}')
  scale = min(1.0, size / max(height, width))
  new_h = max(1, min(size, round(height * scale)))
  new_w = max(1, min(size, round(width * scale)))
  return Placement(new_h, new_w, (size - new_h) // 2, (size - new_w) // 2)


def fit_image(image: np.ndarray, size: int, mode: str) -> np.ndarray:
  """uint8 or float32 [H, W, C] to [size, size, C]: bilinear (antialiased)
  + zero padding, in the image's own dtype."""
  where = placement(image.shape[:2], size, mode)
  if image.shape[:2] != (where.height, where.width):
    image = np.stack([
        np.asarray(Image.fromarray(image[..., c]).resize(
            (where.width, where.height), Image.BILINEAR))
        for c in range(image.shape[-1])], axis=-1)
  return _pad(image, size, where)


def fit_mask(mask: np.ndarray, size: int, mode: str) -> np.ndarray:
  """Class-id mask [H, W] to [size, size] by nearest neighbour + padding."""
  where = placement(mask.shape[:2], size, mode)
  return _pad(resize_nearest(mask, (where.height, where.width)), size, where)


def restore_mask(mask: np.ndarray, original_hw: tuple[int, int], size: int,
                 mode: str) -> np.ndarray:
  """Inverse of `fit_mask`: model-size mask back to the original [H, W]."""
  if mask.shape[:2] != (size, size):
    raise ValueError(f'expected a {size}x{size} mask, got {mask.shape}')
  where = placement(original_hw, size, mode)
  crop = mask[where.top:where.top + where.height,
              where.left:where.left + where.width]
  return resize_nearest(crop, tuple(int(v) for v in original_hw))


def resize_nearest(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Nearest neighbour on pixel centres; keeps dtype and trailing axes."""
  in_h, in_w = array.shape[:2]
  out_h, out_w = hw
  if (in_h, in_w) == (out_h, out_w):
    return array
  rows = np.minimum(((np.arange(out_h) + 0.5) * in_h / out_h).astype(int),
                    in_h - 1)
  cols = np.minimum(((np.arange(out_w) + 0.5) * in_w / out_w).astype(int),
                    in_w - 1)
  return array[rows[:, None], cols[None, :]]


def _pad(array: np.ndarray, size: int, where: Placement) -> np.ndarray:
  if array.shape[:2] == (size, size):
    return array
  out = np.zeros((size, size) + array.shape[2:], array.dtype)
  out[where.top:where.top + where.height,
      where.left:where.left + where.width] = array
  return out


def to_unit_float(image: np.ndarray) -> np.ndarray:
  return image.astype(np.float32) / np.float32(255.0)


def to_model_input(image: np.ndarray, mode: str) -> np.ndarray:
  """A model-size image (after `fit_image`) -> float32 model input.

  uint8: to [0, 1], then `normalize`. float (volume slices): as stored,
  which only normalisation 'stored' accepts; a mix-up of the two is an
  error rather than a silently rescaled input.
  """
  if is_float_image(image):
    if mode != 'stored':
      raise ValueError(f'normalization {mode!r} is for uint8 images; float '
                       "images (volume slices) are stored normalised: use 'stored'")
    return np.asarray(image, np.float32)
  if mode == 'stored':
    raise ValueError("normalization 'stored' is for volume slices (nnunet_raw); "
                     'this dataset stores uint8 images: use unit, standardize or seed')
  return normalize(to_unit_float(image), mode)


def image_stats(image: np.ndarray) -> tuple[float, float]:
  """(mean, std) of a float image for 'standardize' (std floored at 1e-6
  so a constant image does not divide by zero)."""
  return float(image.mean()), max(float(image.std()), 1e-6)


def normalize(image: np.ndarray, mode: str,
              stats: tuple[float, float] | None = None) -> np.ndarray:
  """float32 image in [0, 1] to model input.

  'unit' keeps [0, 1]; 'standardize' is a per-image z-score; 'seed' is what
  the seed's notebook fed its models (Normalize(0.5, 0.5) then clamp to
  [0, 1], so every pixel below mid-grey becomes 0), for converted models;
  'stored' keeps the image as it is (volume slices, normalised when they
  were prepared).
  `stats` (mean, std) replaces the z-score's own statistics: a patch is
  standardised with its whole image's (`image_stats`), as the sliding
  window standardises the whole image once.
  """
  if mode in ('unit', 'stored'):
    return image
  if mode == 'seed':
    return np.clip(2.0 * image - 1.0, 0.0, 1.0).astype(np.float32)
  if mode == 'standardize':
    mean, std = image_stats(image) if stats is None else stats
    return ((image - np.float32(mean)) / np.float32(std)).astype(np.float32)
  raise ValueError(f'config.dataset.normalization must be one of '
                   f'{NORMALIZATIONS}, got {mode!r}')


def augment(image: np.ndarray, mask: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Random flips, 90-degree turns, small affine and intensity jitter.

  Args:
    image: uint8 [S, S, C] model-size image, or float32 (volume slices).
    mask: uint8 [S, S] class ids, moved exactly like the image.
    rng: the generator grain hands to this element (keeps runs reproducible).

  Returns:
    float32 [S, S, C] image (uint8 input: in [0, 1], jittered in gamma,
    contrast and brightness; float input: scaled and shifted in z-score
    units, unclipped) and the transformed mask.
  """
  if rng.random() < 0.5:
    image, mask = image[:, ::-1], mask[:, ::-1]
  if rng.random() < 0.5:
    image, mask = image[::-1], mask[::-1]
  turns = int(rng.integers(4))
  image, mask = np.rot90(image, turns), np.rot90(mask, turns)
  image, mask = _random_affine(np.ascontiguousarray(image),
                               np.ascontiguousarray(mask), rng)
  if is_float_image(image):
    return _jitter_normalized(image, rng), mask
  return _jitter_intensity(to_unit_float(image), rng), mask


def _random_affine(image, mask, rng):
  size = image.shape[0]
  angle = math.radians(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
  scale = rng.uniform(*SCALE_RANGE)
  shift_x, shift_y = rng.uniform(-MAX_SHIFT_FRACTION, MAX_SHIFT_FRACTION,
                                 2) * size
  # PIL wants the inverse map (output pixel -> input pixel) about the centre.
  cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
  centre = size / 2.0
  tx, ty = centre + shift_x, centre + shift_y
  inverse = (cos, sin, centre - cos * tx - sin * ty,
             -sin, cos, centre + sin * tx - cos * ty)

  def warp(plane, resample):
    return np.asarray(Image.fromarray(plane).transform(
        (size, size), Image.AFFINE, inverse, resample=resample, fillcolor=0))

  image = np.stack([warp(image[..., c], Image.BILINEAR)
                    for c in range(image.shape[-1])], axis=-1)
  return image, warp(mask, Image.NEAREST)


def _jitter_normalized(image, rng):
  scale = rng.uniform(*FLOAT_SCALE_RANGE)
  shift = rng.uniform(-MAX_FLOAT_SHIFT, MAX_FLOAT_SHIFT)
  return (image * np.float32(scale) + np.float32(shift)).astype(np.float32)


def _jitter_intensity(image, rng):
  gamma = math.exp(rng.uniform(-MAX_LOG_GAMMA, MAX_LOG_GAMMA))
  contrast = rng.uniform(*CONTRAST_RANGE)
  brightness = rng.uniform(-MAX_BRIGHTNESS_SHIFT, MAX_BRIGHTNESS_SHIFT)
  image = np.power(image, np.float32(gamma)) * np.float32(contrast)
  return np.clip(image + np.float32(brightness), 0.0, 1.0, dtype=np.float32)
