"""Builds small datasets on disk for the tests, and an independent rasteriser.

The reference rasteriser is deliberately the naive one (every pixel centre,
every edge, PNPOLY's crossing test) so it shares no code or vectorisation
trick with lintunet_jax.data.datasets.rasterize.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from lintunet_jax.data.datasets import preparation  # also registers the builders


def reference_polygon_mask(xy, height, width) -> np.ndarray:
  """Pixels whose centre is inside the polygon (even-odd), pure Python."""
  points = [(float(x), float(y)) for x, y in np.asarray(xy).reshape(-1, 2)]
  mask = np.zeros((height, width), np.uint8)
  for row in range(height):
    py = row + 0.5
    for col in range(width):
      px, inside = col + 0.5, False
      for i in range(len(points)):
        (x1, y1), (x2, y2) = points[i], points[i - 1]
        if (y1 > py) != (y2 > py):
          if px < x1 + (py - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
      mask[row, col] = inside
  return mask


def textured_image(seed: int, height: int, width: int, channels: int = 0):
  """Random uint8 pixels (never all zero), [H, W] or [H, W, C]."""
  rng = np.random.default_rng(seed)
  shape = (height, width) + ((channels,) if channels else ())
  return rng.integers(1, 256, shape, dtype=np.uint8)


def save(path: Path, array: np.ndarray) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)
  return path


def write_coco_split(folder: Path, images: list[dict], annotations: list[dict],
                     bom: bool = False) -> Path:
  """Writes `_annotations.coco.json` the way Roboflow does (optionally with
  its byte-order mark). `images`: dicts with id, file_name, height, width."""
  folder.mkdir(parents=True, exist_ok=True)
  data = {
      'info': {'description': 'test export'},
      'categories': [{'id': 0, 'name': 'Tumor', 'supercategory': 'none'},
                     {'id': 1, 'name': '0', 'supercategory': 'Tumor'},
                     {'id': 2, 'name': '1', 'supercategory': 'Tumor'}],
      'images': images,
      'annotations': annotations,
  }
  raw = json.dumps(data, indent=2).encode('utf-8')
  path = folder / '_annotations.coco.json'
  path.write_bytes((b'\xef\xbb\xbf' if bom else b'') + raw)
  return path


def simple_coco_export(root: Path, splits=('train', 'valid', 'test'),
                       per_split: int = 2, size=(24, 32)) -> dict:
  """A clean export: gray PNGs, one integer-vertex box per image.

  Returns {split folder: [(file_name, image, expected_mask)]}.
  """
  height, width = size
  written = {}
  for s, split in enumerate(splits):
    images, annotations, expected = [], [], []
    for i in range(per_split):
      name = f'{split}_{i}.png'
      image = textured_image(100 * s + i, height, width)
      save(root / split / name, image)
      x0, y0 = 2 + i, 3 + s
      box = [x0, y0, x0 + 6, y0, x0 + 6, y0 + 5, x0, y0 + 5]
      images.append({'id': i, 'file_name': name, 'height': height,
                     'width': width})
      annotations.append({'id': i, 'image_id': i, 'category_id': 1,
                          'segmentation': [box], 'bbox': [x0, y0, 6, 5]})
      mask = np.zeros((height, width), np.uint8)
      mask[y0:y0 + 5, x0:x0 + 6] = 1
      expected.append((name, image, mask))
    write_coco_split(root / split, images, annotations)
    written[split] = expected
  return written


def config_for(name: str, data_dir: Path, manual_dir: Path | None = None,
               **dataset_overrides):
  config = default.get_config()
  config.dataset.name = name
  config.dataset.data_dir = str(data_dir)
  config.dataset.manual_dir = str(manual_dir) if manual_dir else None
  config.dataset.num_workers = 0
  for key, value in dataset_overrides.items():
    setattr(config.dataset, key, value)
  return config


def read_split(builder, split: str) -> dict[str, dict]:
  """file_name -> stored example, for order-independent comparisons."""
  source = builder.as_data_source(split)
  examples = {}
  for i in range(len(source)):
    example = source[i]
    name = example['file_name']
    examples[name.decode() if isinstance(name, bytes) else name] = example
  return examples


def leftovers(data_dir: Path) -> list[str]:
  """Anything a failed preparation could have left: dataset or temp dirs."""
  data_dir = Path(data_dir)
  if not data_dir.exists():
    return []
  return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob('*')
                if p.name.startswith('incomplete') or
                (p.is_dir() and p.name == '1.0.0'))


def prepare(name, data_dir, manual_dir, config=None):
  """Prepares the way prepare_dataset does; `config` picks a builder config
  (name or BuilderConfig) instead of deriving it from a model config."""
  if config is None:
    builder = preparation.make_builder(
        config_for(name, data_dir, manual_dir).dataset, num_classes=1)
  else:
    builder = tfds.builder(name, data_dir=str(data_dir), config=config)
  preparation.prepare(builder, str(manual_dir) if manual_dir else None)
  return builder
