"""Reading COCO segmentation exports (as Roboflow writes them) into masks.

Everything that can be checked without decoding pixels is checked here,
before the builder writes anything: a broken export fails in seconds, not
after half an hour of writing.

Quirk policy (also in docs/data.md):
  handled and counted: UTF-8 byte-order mark; image listed with no
    annotation (empty mask); annotation with a box but no segmentation (box
    filled); polygon partly or wholly outside the image (clipped); degenerate
    polygon (< 3 vertices or zero area: skipped); flat polygon list; RLE;
    image files the annotation file does not list (ignored).
  errors: missing / unreadable / non-JSON annotation file, an empty split,
    duplicate image ids or file names, a listed image whose file is missing,
    an annotation whose image id is unknown, malformed coordinates.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from lintunet_jax.data import image_io
from lintunet_jax.data.datasets import rasterize
from lintunet_jax.data.datasets.report import DataError, PreparationReport, list_some

ANNOTATION_FILE = '_annotations.coco.json'
# Export folder name (any case) -> our split name.
SPLIT_FOLDERS = {'train': 'train', 'training': 'train',
                 'val': 'validation', 'valid': 'validation',
                 'validation': 'validation',
                 'test': 'test', 'testing': 'test'}
_UTF8_BOM = b'\xef\xbb\xbf'


@dataclasses.dataclass
class CocoImage:
  path: Path
  file_name: str
  height: int | None
  width: int | None
  annotations: list[dict[str, Any]]
  annotation_file: Path


def split_folders(folder: Path) -> dict[str, Path]:
  """Split name -> sub-folder of `folder` named like a split (`SPLIT_FOLDERS`).

  Two sub-folders that map to the same split (valid/ and val/) are an
  error rather than a silent pick.
  """
  found: dict[str, Path] = {}
  for child in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
    split = SPLIT_FOLDERS.get(child.name.lower())
    if split is None:
      continue
    if split in found:
      raise DataError(folder, f'both {found[split].name}/ and {child.name}/ '
                      f'would become split {split!r}; keep one')
    found[split] = child
  return found


def other_folders(folder: Path, used) -> list[Path]:
  """Sub-folders of `folder` not in `used` (hidden ones aside)."""
  used = {Path(p) for p in used}
  return sorted(p for p in Path(folder).iterdir() if p.is_dir()
                and not p.name.startswith('.') and p not in used)


def find_splits(root: Path, report: PreparationReport) -> dict[str, Path]:
  """Split name -> folder holding `_annotations.coco.json` and the images;
  other sub-folders of `root` go to the report's ignored folders."""
  root = Path(root)
  found = split_folders(root)
  if not found and (root / ANNOTATION_FILE).exists():
    found['train'] = root  # a flat export: one split
  if not found:
    raise DataError(root, 'no split folders (train/ or training/, valid/, '
                    f'val/ or validation/, test/ or testing/) and no '
                    f'{ANNOTATION_FILE}; see docs/data.md for the '
                    'expected layout')
  report.ignore_folders(root, other_folders(root, found.values()))
  return found


def load_annotation_file(path: Path, report: PreparationReport) -> dict:
  if not path.exists():
    raise DataError(path, 'annotation file is missing (every split folder '
                    f'needs its {ANNOTATION_FILE})')
  raw = path.read_bytes()
  if raw.startswith(_UTF8_BOM):
    report.count('annotation files starting with a UTF-8 byte-order mark')
    raw = raw[len(_UTF8_BOM):]
  try:
    data = json.loads(raw.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise DataError(path, f'not UTF-8 text ({e})') from None
  except json.JSONDecodeError as e:
    raise DataError(path, f'not valid JSON: {e.msg} at line {e.lineno} '
                    f'column {e.colno}') from None
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise DataError(path, 'not a COCO annotation file (no "images" list)')
  if not isinstance(data.get('annotations', []), list):
    raise DataError(path, '"annotations" is not a list')
  return data


def index_split(folder: Path, report: PreparationReport) -> list[CocoImage]:
  """Validates one split's annotation file against its folder."""
  path = folder / ANNOTATION_FILE
  data = load_annotation_file(path, report)
  if not data['images']:
    raise DataError(path, 'lists no images (empty split); remove the folder '
                    'or add images')
  images: dict[Any, CocoImage] = {}
  seen_names: set[str] = set()
  missing: list[str] = []
  for entry in data['images']:
    if not isinstance(entry, dict) or 'id' not in entry or \
        'file_name' not in entry:
      raise DataError(path, f'image entry without "id" or "file_name": '
                      f'{str(entry)[:200]}')
    if entry['id'] in images:
      raise DataError(path, f'image id {entry["id"]} appears twice')
    name = str(entry['file_name'])
    if name in seen_names:
      raise DataError(path, f'file_name {name!r} appears twice')
    seen_names.add(name)
    file_path = folder / name
    if not file_path.is_file():
      missing.append(name)
    images[entry['id']] = CocoImage(
        path=file_path, file_name=name, height=entry.get('height'),
        width=entry.get('width'), annotations=[], annotation_file=path)
  if missing:
    raise DataError(path, f'{len(missing)} listed image(s) missing from '
                    f'{folder}: {list_some(missing)}')
  for annotation in data.get('annotations', []):
    image = images.get(annotation.get('image_id'))
    if image is None:
      raise DataError(path, f'annotation {annotation.get("id")} refers to '
                      f'image id {annotation.get("image_id")!r}, which is not '
                      'in "images"')
    image.annotations.append(annotation)
  report.count('images with no annotation (empty mask)',
               sum(1 for image in images.values() if not image.annotations))
  unlisted = [p.name for p in folder.iterdir()
              if p.suffix.lower() in image_io.IMAGE_SUFFIXES
              and p.name not in seen_names]
  report.count('image files not listed in the annotation file (ignored)',
               len(unlisted))
  return list(images.values())


def rasterize_image(image: CocoImage, height: int, width: int,
                    report: PreparationReport) -> np.ndarray:
  """Union of all of an image's annotations (all categories merged)."""
  if (image.height, image.width) not in ((None, None), (height, width)):
    raise DataError(image.path, f'annotation file {image.annotation_file} '
                    f'says {image.width}x{image.height}, the file is '
                    f'{width}x{height}')
  mask = np.zeros((height, width), np.uint8)
  for annotation in image.annotations:
    _draw_annotation(mask, annotation, image, report)
  return mask


def _draw_annotation(mask, annotation, image, report) -> None:
  segmentation = annotation.get('segmentation')
  where = f'annotation {annotation.get("id")} of {image.file_name}'
  if isinstance(segmentation, dict):
    try:
      mask |= rasterize.decode_rle(segmentation, *mask.shape)
    except ValueError as e:
      raise DataError(image.annotation_file, f'{where}: bad RLE ({e})') \
          from None
    report.count('RLE segmentations decoded')
    return
  if not segmentation:
    box = annotation.get('bbox')
    if box and len(box) == 4 and box[2] > 0 and box[3] > 0:
      rasterize.fill_box(mask, box)
      report.count('annotations with a box but no segmentation (box filled)')
    else:
      report.count('annotations with neither segmentation nor box (skipped)')
    return
  if not isinstance(segmentation, list):
    raise DataError(image.annotation_file, f'{where}: segmentation is neither '
                    'a list of polygons nor an RLE dict')
  if all(isinstance(v, (int, float)) for v in segmentation):
    report.count('flat polygon lists read as one polygon')
    segmentation = [segmentation]
  for polygon in segmentation:
    _draw_polygon(mask, polygon, where, image, report)


def _draw_polygon(mask, polygon, where, image, report) -> None:
  try:
    xy = np.asarray(polygon, dtype=np.float64)
  except (TypeError, ValueError):
    raise DataError(image.annotation_file, f'{where}: polygon coordinates '
                    'are not numbers') from None
  if xy.ndim != 1 or xy.size % 2 or not np.all(np.isfinite(xy)):
    raise DataError(image.annotation_file, f'{where}: a polygon must be a '
                    'flat list of an even number of finite coordinates')
  xy = xy.reshape(-1, 2)
  if len(xy) < 3 or rasterize.polygon_area(xy) == 0:
    report.count('degenerate polygons (< 3 vertices or zero area, skipped)')
    return
  height, width = mask.shape
  inside = ((xy[:, 0] >= 0) & (xy[:, 0] <= width) &
            (xy[:, 1] >= 0) & (xy[:, 1] <= height))
  if not inside.all():
    report.count('polygons reaching outside the image (clipped)')
  rasterize.fill_polygon(mask, xy)
