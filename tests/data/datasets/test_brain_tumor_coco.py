"""brain_tumor_coco: masks pixel-exact, quirks handled as documented."""

import os
from pathlib import Path

import numpy as np
import pytest

from datasets_testlib import (prepare, read_split, reference_polygon_mask,
                              save, simple_coco_export, textured_image,
                              write_coco_split)
from lintunet_jax.data.datasets import base, rasterize


def test_clean_export_maps_splits_and_stores_exact_pixels(tmp_path):
  written = simple_coco_export(tmp_path / 'raw')
  builder = prepare('brain_tumor_coco', tmp_path / 'data', tmp_path / 'raw')
  assert sorted(builder.info.splits) == ['test', 'train', 'validation']
  for folder, split in [('train', 'train'), ('valid', 'validation'),
                        ('test', 'test')]:
    stored = read_split(builder, split)
    assert sorted(stored) == sorted(name for name, _, _ in written[folder])
    for name, image, mask in written[folder]:
      np.testing.assert_array_equal(stored[name]['image'][..., 0], image)
      np.testing.assert_array_equal(stored[name]['mask'], mask)
      assert stored[name]['mask'].sum() == 30  # the 6x5 box, exactly


def test_quirks_are_handled_counted_and_pixel_exact(tmp_path):
  """BOM, no-annotation image, box-only, RLE, clipped and degenerate
  polygons, float vertices, two categories merged: all in one split."""
  height, width = 20, 28
  raw = tmp_path / 'raw'
  names = [f'im{i}.png' for i in range(5)]
  for i, name in enumerate(names):
    save(raw / 'train' / name, textured_image(i, height, width, 3))
  save(raw / 'train' / 'not_listed.png', textured_image(9, height, width))
  # Fractional vertices chosen so no edge passes exactly through a pixel
  # centre (ties are covered in test_rasterize.py).
  concave = [2.25, 1.5, 20.6, 3.0, 11.0, 7.5, 19.5, 16.25, 3.5, 12.0]
  outside = [-5, -4, 10, -4, 10, 6, -5, 6]  # partly left of / above image
  rle_mask = np.zeros((height, width), np.uint8)
  rle_mask[4:9, 20:26] = 1
  annotations = [
      {'id': 1, 'image_id': 0, 'category_id': 1, 'segmentation': [concave]},
      {'id': 2, 'image_id': 0, 'category_id': 2,  # second category: merged
       'segmentation': [[22, 12, 27, 12, 27, 19, 22, 19], [0, 0, 4, 0]]},
      {'id': 3, 'image_id': 1, 'category_id': 1, 'segmentation': [],
       'bbox': [3.5, 2.5, 6.0, 4.0]},
      {'id': 4, 'image_id': 2, 'category_id': 1,
       'segmentation': {'size': [height, width],
                        'counts': _column_major_runs(rle_mask)}},
      {'id': 5, 'image_id': 3, 'category_id': 1, 'segmentation': [outside]},
      # image 4 has no annotation: a valid empty mask
  ]
  write_coco_split(raw / 'train', [
      {'id': i, 'file_name': name, 'height': height, 'width': width}
      for i, name in enumerate(names)], annotations, bom=True)

  builder = prepare('brain_tumor_coco', tmp_path / 'data', raw)
  stored = read_split(builder, 'train')

  expected = {
      'im0.png': reference_polygon_mask(concave, height, width)
                 | reference_polygon_mask([22, 12, 27, 12, 27, 19, 22, 19],
                                          height, width),
      'im1.png': reference_polygon_mask([3.5, 2.5, 9.5, 2.5, 9.5, 6.5, 3.5,
                                         6.5], height, width),
      'im2.png': rle_mask,
      'im3.png': reference_polygon_mask(outside, height, width),
      'im4.png': np.zeros((height, width), np.uint8),
  }
  assert sorted(stored) == sorted(expected)
  for name, mask in expected.items():
    np.testing.assert_array_equal(stored[name]['mask'], mask, err_msg=name)
  assert expected['im0.png'].sum() > 60 and expected['im3.png'].sum() == 60
  # Box x in [3.5, 9.5), y in [2.5, 6.5): centres on the left and top
  # edges are in, on the right and bottom edges out -> rows 2..5, cols 3..8.
  assert np.argwhere(expected['im1.png']).min(0).tolist() == [2, 3]
  assert np.argwhere(expected['im1.png']).max(0).tolist() == [5, 8]

  handled = base.load_report(builder).handled
  assert handled == {
      'annotation files starting with a UTF-8 byte-order mark': 1,
      'images with no annotation (empty mask)': 1,
      'annotations with a box but no segmentation (box filled)': 1,
      'RLE segmentations decoded': 1,
      'polygons reaching outside the image (clipped)': 1,
      'degenerate polygons (< 3 vertices or zero area, skipped)': 1,
      'image files not listed in the annotation file (ignored)': 1,
      'colour images stored as grayscale (luma)': 5,
  }
  report = base.load_report(builder)
  assert report.splits['train'].examples == 5
  assert report.splits['train'].empty_masks == 1


def test_rgb_config_keeps_colour(tmp_path):
  raw = tmp_path / 'raw'
  image = textured_image(3, 16, 16, 3)
  save(raw / 'train' / 'a.png', image)
  write_coco_split(raw / 'train', [{'id': 7, 'file_name': 'a.png',
                                    'height': 16, 'width': 16}], [])
  builder = prepare('brain_tumor_coco', tmp_path / 'data', raw,
                    config='rgb')
  np.testing.assert_array_equal(read_split(builder, 'train')['a.png']['image'],
                                image)


def test_prepared_dataset_is_reused_and_tied_to_its_source(tmp_path):
  simple_coco_export(tmp_path / 'a')
  simple_coco_export(tmp_path / 'b')
  builder = prepare('brain_tumor_coco', tmp_path / 'data', tmp_path / 'a')
  stamps = _modification_times(builder.data_path)
  again = prepare('brain_tumor_coco', tmp_path / 'data', tmp_path / 'a')
  assert _modification_times(again.data_path) == stamps
  with pytest.raises(ValueError, match='prepared from .*a.*not from'):
    prepare('brain_tumor_coco', tmp_path / 'data', tmp_path / 'b')


def test_flat_export_without_split_folders_is_one_train_split(tmp_path):
  raw = tmp_path / 'raw'
  save(raw / 'x.png', textured_image(1, 10, 12))
  write_coco_split(raw, [{'id': 1, 'file_name': 'x.png', 'height': 10,
                          'width': 12}],
                   [{'id': 1, 'image_id': 1, 'segmentation': [[0, 0, 4, 0,
                                                               4, 4]]}])
  builder = prepare('brain_tumor_coco', tmp_path / 'data', raw)
  mask = read_split(builder, 'train')['x.png']['mask']
  np.testing.assert_array_equal(
      mask, reference_polygon_mask([0, 0, 4, 0, 4, 4], 10, 12))


def _modification_times(folder):
  return {p.name: os.stat(p).st_mtime_ns for p in Path(folder).iterdir()}


def _column_major_runs(mask):
  """Uncompressed COCO RLE, written independently of the decoder."""
  flat = mask.T.reshape(-1)
  runs, current, length = [], 0, 0
  for value in flat:
    if value == current:
      length += 1
    else:
      runs.append(length)
      current, length = value, 1
  runs.append(length)
  return runs


def test_reference_and_scanline_agree_on_the_fixture_polygon():
  polygon = np.array([2.25, 1.5, 20.6, 3.0, 11.0, 7.5, 19.5, 16.25, 3.5,
                      12.0]).reshape(-1, 2)
  mask = np.zeros((20, 28), np.uint8)
  rasterize.fill_polygon(mask, polygon)
  np.testing.assert_array_equal(mask,
                                reference_polygon_mask(polygon, 20, 28))


def test_training_testing_folders_and_the_folders_left_out(tmp_path):
  raw = tmp_path / 'raw'
  written = simple_coco_export(raw, splits=('training', 'Valid', 'testing'))
  (raw / 'README.dataset').mkdir()
  (raw / '.git').mkdir()
  builder = prepare('brain_tumor_coco', tmp_path / 'data', raw)
  for folder, split in [('training', 'train'), ('Valid', 'validation'),
                        ('testing', 'test')]:
    stored = read_split(builder, split)
    assert sorted(stored) == sorted(name for name, _, _ in written[folder])
  report = base.load_report(builder)
  assert report.ignored_folders == ['README.dataset/']
  assert 'folders ignored (not a split, images or masks folder): ' \
      'README.dataset/' in report.format()
  # A report stored before the field existed still loads.
  old = report.to_json()
  del old['ignored_folders']
  assert type(report).from_json(old).ignored_folders == []
