"""Reading image files into numpy arrays: the one place that decodes them.

Why one place: dataset preparation and `predict.py` must turn the same file
into the same pixels (same mode conversion, same bit-depth handling), or a
model would see one thing in training and another in prediction. It is also
the one place that turns PIL's many exceptions into a single error type that
names the file and says what is wrong with it.

Conventions (documented in docs/data.md):
  * Pixels are returned as stored; EXIF orientation is ignored, so an image
    and its mask (which has no EXIF) stay aligned.
  * Images: uint8 [H, W] for grayscale sources (including palette images,
    e.g. GIFs, whose colours are all gray), [H, W, 3] for colour ones.
    Alpha is dropped. 16-bit, 32-bit and float images are mapped linearly
    from their own [min, max] to [0, 255]: a fixed divisor would crush
    12-bit MR/CT data into a handful of grey levels.
  * Masks: uint8 [H, W] of the stored label values. Palette images give
    their palette indices (class ids, as in VOC-style label PNGs), unless
    every colour used is a gray level (a grayscale mask saved as GIF, whose
    index order is arbitrary): then the gray levels. Interpreting the values
    as classes is the caller's job (see datasets/folder_pairs.py).
  * Multi-frame files (animated GIFs, multi-page TIFF volumes) are refused:
    silently using the first slice would lose data.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from lintunet_jax import paths

PathLike = Union[str, os.PathLike]

# Suffixes the folder builder treats as images (lower case, with the dot).
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.gif', '.bmp')

_DROP_ALPHA = {'LA': 'L', 'La': 'L', 'PA': 'RGB', 'RGBA': 'RGB', 'RGBa': 'RGB',
               'RGBX': 'RGB'}
_COLOUR_MODES = ('CMYK', 'YCbCr', 'LAB', 'HSV')
_WIDE_MODES = ('I', 'F') + tuple(m for m in Image.MODES if m.startswith('I;'))


class ImageReadError(ValueError):
  """A file could not be read as an image; `str()` names file and problem."""

  def __init__(self, path: PathLike, problem: str):
    self.path = os.fspath(path)
    self.problem = problem
    super().__init__(f'{self.path}: {problem}')


def read_image(path: PathLike) -> np.ndarray:
  """Decodes an image file to uint8 [H, W] (grayscale) or [H, W, 3] (colour)."""
  with _open(path) as image:
    mode = image.mode
    if mode == '1':
      return np.asarray(image.convert('L'), dtype=np.uint8)
    if mode in _DROP_ALPHA:
      return np.asarray(image.convert(_DROP_ALPHA[mode]), dtype=np.uint8)
    if mode == 'P':  # gray palettes (GIF) stay gray, others become colour
      rgb = np.asarray(image.convert('RGB'), dtype=np.uint8)
      return np.ascontiguousarray(rgb[..., 0]) if _is_gray(rgb) else rgb
    if mode in _COLOUR_MODES:
      return np.asarray(image.convert('RGB'), dtype=np.uint8)
    if mode in ('L', 'RGB'):
      return np.asarray(image, dtype=np.uint8)
    if mode in _WIDE_MODES:
      return _rescale_to_uint8(np.asarray(image))
    raise ImageReadError(path, f'unsupported pixel mode {mode!r}')


def read_mask(path: PathLike) -> np.ndarray:
  """Decodes a label image to uint8 [H, W] holding the stored label values."""
  with _open(path) as image:
    mode = image.mode
    if mode in ('1', 'L'):
      return np.asarray(image, dtype=np.uint8)
    if mode in ('P', 'PA'):
      return _palette_labels(image)
    if mode in ('LA', 'La'):
      return np.asarray(image.getchannel(0), dtype=np.uint8)
    if mode in ('RGB', 'RGBA', 'RGBX', 'RGBa'):
      rgb = np.asarray(image.convert('RGB'))
      if not _is_gray(rgb):
        raise ImageReadError(
            path, 'colour mask (its R, G and B channels differ); save masks '
            'as single-channel images of class ids or 0/255')
      return np.ascontiguousarray(rgb[..., 0])
    if mode in _WIDE_MODES:
      values = np.asarray(image)
      if (not np.all(np.isfinite(values)) or values.min() < 0
          or values.max() > 255 or np.any(values != np.round(values))):
        raise ImageReadError(
            path, f'mask values must be integers in 0..255, found '
            f'{values.min()}..{values.max()}')
      return values.astype(np.uint8)
    raise ImageReadError(path, f'unsupported mask pixel mode {mode!r}')


def read_size(path: PathLike) -> tuple[int, int]:
  """(height, width) from the file header only: cheap, for validation passes."""
  try:
    with Image.open(path) as image:
      width, height = image.size
  except FileNotFoundError:
    raise ImageReadError(path, 'file not found') from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ImageReadError(path, f'not a readable image ({e})') from None
  return height, width


class _open:  # pylint: disable=invalid-name
  """Opens and fully decodes a file, translating every failure into one error.

  Decoding happens here (not lazily at `np.asarray`) so that a truncated file
  fails inside the `try`, with the file's name attached.
  """

  def __init__(self, path: PathLike):
    self._path = path
    self._image = None

  def __enter__(self) -> Image.Image:
    path = self._path
    if paths.is_url(path):  # gs://: read the object, decode from memory
      source = epath.Path(paths.check(path, 'image'))
      if source.is_dir():
        raise ImageReadError(path, 'is a directory, not an image file')
    elif os.path.isdir(path):
      raise ImageReadError(path, 'is a directory, not an image file')
    else:
      source = path
    try:
      image = Image.open(io.BytesIO(source.read_bytes()) if paths.is_url(path)
                         else source)
    except FileNotFoundError:
      raise ImageReadError(path, 'file not found') from None
    except UnidentifiedImageError:
      raise ImageReadError(
          path, 'not a readable image (unknown format or corrupt header)'
      ) from None
    except (OSError, SyntaxError, ValueError) as e:
      raise ImageReadError(path, f'not a readable image ({e})') from None
    self._image = image
    if getattr(image, 'n_frames', 1) > 1:
      raise ImageReadError(
          path, f'has {image.n_frames} frames; multi-frame (animated or '
          '3-D) files are not supported, save each slice as its own file')
    try:
      image.load()
    except Image.DecompressionBombError as e:
      raise ImageReadError(path, f'refused as too large ({e})') from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
      raise ImageReadError(
          path, f'corrupt or truncated image data ({e})') from None
    return image

  def __exit__(self, *exc_info) -> None:
    if self._image is not None:
      self._image.close()


def _is_gray(rgb: np.ndarray) -> bool:
  return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and
              np.array_equal(rgb[..., 0], rgb[..., 2]))


def _palette_labels(image: Image.Image) -> np.ndarray:
  indices = np.asarray(image.getchannel(0), dtype=np.uint8)
  palette = image.getpalette()
  if not palette:
    return indices
  colours = np.zeros((256, 3), np.uint8)
  entries = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
  colours[:len(entries)] = entries
  used = colours[np.unique(indices)]
  if np.all(used == used[:, :1]):  # only gray levels: keep what is shown
    return colours[indices, 0]
  return indices


def _rescale_to_uint8(values: np.ndarray) -> np.ndarray:
  values = values.astype(np.float64)
  if values.ndim == 3:  # e.g. 16-bit RGB via some TIFF plug-ins
    values = values[..., :3]
  finite = np.isfinite(values)
  if not finite.any():
    return np.zeros(values.shape, np.uint8)
  low, high = values[finite].min(), values[finite].max()
  if high <= low:
    return np.zeros(values.shape, np.uint8)
  scaled = (np.where(finite, values, low) - low) * (255.0 / (high - low))
  return np.round(scaled).astype(np.uint8)
