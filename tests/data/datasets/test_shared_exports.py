"""The real Roboflow exports in ../shared/data, prepared as published.

Skipped when the folder is absent. The seed's full preparation takes about
20-30 s on the 2-core machine.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from datasets_testlib import prepare, read_split, reference_polygon_mask
from lintunet_jax.data.datasets import base

SHARED = Path(__file__).resolve().parents[3] / '..' / 'shared' / 'data'
SEED = SHARED / 'brain_tumor_seed'
POLYGONS = SHARED / 'brain_tumor_polygons'


@pytest.mark.slow
@pytest.mark.skipif(not SEED.is_dir(), reason=f'{SEED} not present')
def test_seed_export_split_sizes_and_every_image_has_a_mask(tmp_path):
  builder = prepare('brain_tumor_coco', tmp_path, SEED)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {'train': 1502, 'validation': 429, 'test': 215}

  report = base.load_report(builder)
  # The export's quirks, as found: BOMs, one image without annotation.
  assert report.handled == {
      'annotation files starting with a UTF-8 byte-order mark': 3,
      'images with no annotation (empty mask)': 1,
  }
  assert report.splits['train'].empty_masks == 1
  assert report.splits['validation'].empty_masks == 0

  source = builder.as_data_source('test')
  for i in range(len(source)):
    example = source[i]
    assert example['image'].shape == (640, 640, 1)
    assert example['mask'].shape == (640, 640)
    assert example['mask'].any()  # every test image has a tumour

  # One stored mask against the annotation, rasterised independently
  # (on a crop around the box to keep the pure-Python reference quick).
  annotations = json.loads(
      (SEED / 'test' / '_annotations.coco.json').read_text('utf-8-sig'))
  image = annotations['images'][0]
  polygon = np.asarray(next(
      a['segmentation'][0] for a in annotations['annotations']
      if a['image_id'] == image['id'])).reshape(-1, 2)
  top, left = (np.floor(polygon.min(0))[::-1] - 2).astype(int)
  crop = polygon - [left, top]
  height, width = (np.ceil(crop.max(0))[::-1] + 3).astype(int)
  stored = read_split(builder, 'test')[image['file_name']]['mask']
  np.testing.assert_array_equal(
      stored[top:top + height, left:left + width],
      reference_polygon_mask(crop, height, width))
  assert stored.sum() == reference_polygon_mask(crop, height, width).sum()


@pytest.mark.skipif(not POLYGONS.is_dir(), reason=f'{POLYGONS} not present')
def test_polygon_export_with_val_folder(tmp_path):
  builder = prepare('brain_tumor_coco', tmp_path, POLYGONS)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {'train': 154, 'validation': 20, 'test': 4}
  report = base.load_report(builder)
  assert sum(s.empty_masks for s in report.splits.values()) == 0
  # 20 of its JPEGs are not pure gray: converted, and said so.
  assert report.handled == {'colour images stored as grayscale (luma)': 20}
