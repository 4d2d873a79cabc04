"""Finding image/mask pairs in a folder dataset, and what mask values mean.

Accepted layouts (`images/` may also be `image/` or `imgs/`; `masks/` may be
`mask/`, `labels/` or `annotations/`):

  manual_dir/images, manual_dir/masks                  -> one split, 'train'
  manual_dir/<split>/images, manual_dir/<split>/masks
  manual_dir/images/<split>, manual_dir/masks/<split>

with <split> one of train | training, val | valid | validation,
test | testing (`coco.SPLIT_FOLDERS`). Other folders are not read; the
preparation report lists them. Files pair by
their path relative to images/ and masks/ without the extension, so
`images/p1/007.png` pairs with `masks/p1/007.tif`; a mask may also carry one
of the suffixes in MASK_SUFFIXES (`007_mask.png`). Everything is checked
(pairing, sizes from file headers) before any pixel is written.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np

from lintunet_jax.data import image_io
from lintunet_jax.data.datasets.coco import other_folders, split_folders
from lintunet_jax.data.datasets.report import DataError, PreparationReport, list_some

IMAGE_DIR_NAMES = ('images', 'image', 'imgs')
MASK_DIR_NAMES = ('masks', 'mask', 'labels', 'annotations')
MASK_SUFFIXES = ('_mask', '_masks', '_seg', '_label', '_labels', '_gt')


@dataclasses.dataclass(frozen=True)
class Pair:
  image: Path
  mask: Path
  key: str  # relative path without extension; unique within a split
  file_name: str  # the image's path relative to its images folder


def find_splits(root: Path, report: PreparationReport
                ) -> dict[str, tuple[Path, Path]]:
  """Split name -> (images folder, masks folder); the folders not read go
  to the report's ignored folders."""
  root = Path(root)
  found = _find_splits(root)
  read = {folder for pair in found.values() for folder in pair}
  on_the_way = {parent for folder in read for parent in folder.parents}
  ignored, todo = [], [root]
  while todo:  # every folder between root and the ones read
    for child in other_folders(todo.pop(), read):
      (todo if child in on_the_way else ignored).append(child)
  report.ignore_folders(root, ignored)
  return found


def _find_splits(root: Path) -> dict[str, tuple[Path, Path]]:
  images, masks = _child(root, IMAGE_DIR_NAMES), _child(root, MASK_DIR_NAMES)
  if images and masks:
    split_dirs = split_folders(images)
    if not split_dirs:
      return {'train': (images, masks)}
    strays = [p.name for p in images.iterdir() if not p.name.startswith('.')
              and p not in split_dirs.values()]
    if strays:
      raise DataError(images, 'mixes split folders with other entries '
                      f'({list_some(sorted(strays))}); move them into a split')
    found = {}
    for split, folder in split_dirs.items():
      mask_folder = masks / folder.name
      if not mask_folder.is_dir():
        raise DataError(mask_folder, f'missing: {folder} has no matching '
                        'masks folder')
      found[split] = (folder, mask_folder)
    return found
  split_dirs = split_folders(root)
  if not split_dirs:
    raise DataError(root, 'expected images/ and masks/ folders, optionally '
                    'inside split folders such as train/ (or training/), '
                    'val/ and test/ (or testing/); see docs/data.md')
  found = {}
  for split, folder in split_dirs.items():
    images, masks = (_child(folder, IMAGE_DIR_NAMES),
                     _child(folder, MASK_DIR_NAMES))
    if not (images and masks):
      raise DataError(folder, 'needs an images/ and a masks/ folder')
    found[split] = (images, masks)
  return found


def pair_files(images_dir: Path, masks_dir: Path,
               report: PreparationReport) -> list[Pair]:
  """Pairs every image with exactly one mask, or explains which do not."""
  images = _index(images_dir, report)
  masks = _index(masks_dir, report)
  if not images:
    raise DataError(images_dir, 'holds no images (empty split)')
  pairs, unpaired, ambiguous, used = [], [], [], set()
  for key, image in sorted(images.items()):
    candidates = [k for k in (key,) + tuple(key + s for s in MASK_SUFFIXES)
                  if k in masks]
    if not candidates:
      unpaired.append(image.relative_to(images_dir).as_posix())
    elif len(candidates) > 1:
      ambiguous.append(f'{key} -> {", ".join(candidates)}')
    else:
      used.add(candidates[0])
      pairs.append(Pair(image, masks[candidates[0]], key,
                        image.relative_to(images_dir).as_posix()))
  orphans = [masks[k].relative_to(masks_dir).as_posix()
             for k in sorted(set(masks) - used)]
  problems = []
  if unpaired:
    problems.append(f'{len(unpaired)} image(s) without a mask in '
                    f'{masks_dir}: {list_some(unpaired)}')
  if ambiguous:
    problems.append(f'{len(ambiguous)} image(s) with several masks: '
                    f'{list_some(ambiguous)}')
  if orphans:
    problems.append(f'{len(orphans)} mask(s) without an image in '
                    f'{images_dir}: {list_some(orphans)}')
  if problems:
    raise DataError(images_dir.parent, '; '.join(problems))
  _check_sizes(pairs, masks_dir)
  return pairs


def mask_to_class_ids(values: np.ndarray, num_classes: int, path: Path,
                      report: PreparationReport) -> np.ndarray:
  """Stored label values to class ids.

  num_classes <= 2 (binary, sigmoid or 2-way softmax): 0/1 masks are used
  as they are; otherwise a pixel is foreground when >= 128, which reads 0/255
  masks and lossy (JPEG) masks alike. Values in 2..127 with nothing above
  are small class ids, not a binary mask, and stop preparation rather than
  be thresholded away. num_classes > 2: values are class ids and must be
  below num_classes.
  """
  top = int(values.max()) if values.size else 0
  if num_classes <= 2:
    if top <= 1:
      return values
    if top < 128:
      raise DataError(path, f'mask values go up to {top}: looks like class '
                      f'ids, but num_classes={num_classes} expects a binary '
                      'mask (0/1 or 0/255); set model.num_classes')
    report.count('binary masks stored as 0/255 or lossy (thresholded at 128)')
    return (values >= 128).astype(np.uint8)
  if top >= num_classes:
    bad = np.unique(values[values >= num_classes])
    raise DataError(path, f'mask values {list_some(bad.tolist())} are not '
                    f'class ids below num_classes={num_classes}')
  return values


def _child(folder: Path, names: tuple[str, ...]) -> Path | None:
  matches = [p for p in folder.iterdir()
             if p.is_dir() and p.name.lower() in names]
  if len(matches) > 1:
    raise DataError(folder, f'several candidate folders '
                    f'({", ".join(p.name for p in matches)}); keep one')
  return matches[0] if matches else None


def _index(folder: Path, report: PreparationReport) -> dict[str, Path]:
  """Relative key -> image file; skips hidden and non-image files."""
  index: dict[str, Path] = {}
  duplicates = collections.defaultdict(list)
  for path in sorted(folder.rglob('*')):
    relative = path.relative_to(folder)
    if any(part.startswith('.') for part in relative.parts) or \
        not path.is_file():
      continue
    if path.suffix.lower() not in image_io.IMAGE_SUFFIXES:
      report.count('non-image files ignored')
      continue
    key = relative.with_suffix('').as_posix()
    if key in index:
      duplicates[key].append(relative.as_posix())
    index[key] = path
  if duplicates:
    raise DataError(folder, 'several files share a name (apart from the '
                    f'extension): {list_some(sorted(duplicates))}')
  return index


def _check_sizes(pairs: list[Pair], masks_dir: Path) -> None:
  mismatched = []
  for pair in pairs:
    image_hw, mask_hw = (image_io.read_size(pair.image),
                         image_io.read_size(pair.mask))
    if image_hw != mask_hw:
      mismatched.append(f'{pair.mask.name} is {mask_hw[1]}x{mask_hw[0]} but '
                        f'{pair.image.name} is {image_hw[1]}x{image_hw[0]}')
  if mismatched:
    raise DataError(masks_dir, f'{len(mismatched)} mask(s) differ '
                    f'in size from their image: {list_some(mismatched)}')
