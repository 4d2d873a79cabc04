"""Every bad input stops with the file and the problem named, leaves nothing
half-written, and a fixed input then prepares normally."""

import json

import numpy as np
import pytest

from datasets_testlib import (leftovers, prepare, save, simple_coco_export,
                              textured_image, write_coco_split)
from lintunet_jax.data.datasets import DataError
from lintunet_jax.data.image_io import ImageReadError


def _coco(tmp_path):
  raw = tmp_path / 'raw'
  simple_coco_export(raw, per_split=3)
  return raw


def _expect_failure_then_fix(tmp_path, raw, name, error, pattern, fix):
  data = tmp_path / 'data'
  with pytest.raises(error, match=pattern):
    prepare(name, data, raw)
  assert leftovers(data) == []
  fix()
  builder = prepare(name, data, raw)
  assert builder.info.splits['train'].num_examples > 0


def test_corrupt_image_names_the_file(tmp_path):
  raw = _coco(tmp_path)
  image = raw / 'valid' / 'valid_1.png'
  good = image.read_bytes()
  image.write_bytes(b'this is not a png')
  _expect_failure_then_fix(tmp_path, raw, 'brain_tumor_coco', ImageReadError,
                           r'valid_1\.png: not a readable image',
                           lambda: image.write_bytes(good))


def test_truncated_image_names_the_file(tmp_path):
  raw = _coco(tmp_path)
  image = raw / 'train' / 'train_2.png'
  good = image.read_bytes()
  image.write_bytes(good[:len(good) // 2])
  _expect_failure_then_fix(tmp_path, raw, 'brain_tumor_coco', ImageReadError,
                           r'train_2\.png: corrupt or truncated',
                           lambda: image.write_bytes(good))


def test_missing_annotation_file(tmp_path):
  raw = _coco(tmp_path)
  annotations = raw / 'test' / '_annotations.coco.json'
  text = annotations.read_bytes()
  annotations.unlink()
  _expect_failure_then_fix(tmp_path, raw, 'brain_tumor_coco', DataError,
                           r'test/_annotations\.coco\.json: annotation file '
                           'is missing', lambda: annotations.write_bytes(text))


def test_annotation_file_that_is_not_json(tmp_path):
  raw = _coco(tmp_path)
  annotations = raw / 'train' / '_annotations.coco.json'
  text = annotations.read_bytes()
  annotations.write_text('{"images": [ oops')
  _expect_failure_then_fix(tmp_path, raw, 'brain_tumor_coco', DataError,
                           r'_annotations\.coco\.json: not valid JSON: .* '
                           'line 1', lambda: annotations.write_bytes(text))


def test_listed_image_whose_file_is_missing(tmp_path):
  raw = _coco(tmp_path)
  image = raw / 'train' / 'train_0.png'
  content = image.read_bytes()
  image.unlink()
  _expect_failure_then_fix(tmp_path, raw, 'brain_tumor_coco', DataError,
                           r'1 listed image\(s\) missing .*train_0\.png',
                           lambda: image.write_bytes(content))


def test_annotation_for_an_unknown_image_id(tmp_path):
  raw = _coco(tmp_path)
  path = raw / 'train' / '_annotations.coco.json'
  original = path.read_text()
  data = json.loads(original)
  data['annotations'].append({'id': 99, 'image_id': 42,
                              'segmentation': [[0, 0, 3, 0, 3, 3]]})
  path.write_text(json.dumps(data))
  _expect_failure_then_fix(tmp_path, raw, 'brain_tumor_coco', DataError,
                           'annotation 99 refers to image id 42',
                           lambda: path.write_text(original))


def test_malformed_polygon_coordinates(tmp_path):
  raw = _coco(tmp_path)
  path = raw / 'train' / '_annotations.coco.json'
  original = path.read_text()
  data = json.loads(original)
  data['annotations'][0]['segmentation'] = [[1, 2, 3, 4, 5, 6, 7]]
  path.write_text(json.dumps(data))
  _expect_failure_then_fix(tmp_path, raw, 'brain_tumor_coco', DataError,
                           'annotation 0 of train_0.png: a polygon must be a '
                           'flat list of an even number',
                           lambda: path.write_text(original))


def test_empty_coco_split(tmp_path):
  raw = _coco(tmp_path)
  path = raw / 'test' / '_annotations.coco.json'
  original = path.read_text()
  write_coco_split(raw / 'test', [], [])
  _expect_failure_then_fix(tmp_path, raw, 'brain_tumor_coco', DataError,
                           r'lists no images \(empty split\)',
                           lambda: path.write_text(original))


def _folder(tmp_path, count=3):
  raw = tmp_path / 'raw'
  for i in range(count):
    save(raw / 'train' / 'images' / f'{i}.png', textured_image(i, 12, 10))
    save(raw / 'train' / 'masks' / f'{i}.png',
         (textured_image(i, 12, 10) > 128).astype(np.uint8))
  return raw


def test_folder_image_without_mask_and_mask_without_image(tmp_path):
  raw = _folder(tmp_path)
  mask = raw / 'train' / 'masks' / '1.png'
  content = mask.read_bytes()
  mask.rename(raw / 'train' / 'masks' / 'stray.png')

  def fix():
    (raw / 'train' / 'masks' / 'stray.png').unlink()
    mask.write_bytes(content)

  _expect_failure_then_fix(
      tmp_path, raw, 'segmentation_folder', DataError,
      r'1 image\(s\) without a mask .*: 1\.png; 1 mask\(s\) without an image '
      r'.*: stray\.png', fix)


def test_folder_mask_of_another_size(tmp_path):
  raw = _folder(tmp_path)
  mask = raw / 'train' / 'masks' / '2.png'
  content = mask.read_bytes()
  save(mask, np.ones((12, 11), np.uint8))
  _expect_failure_then_fix(
      tmp_path, raw, 'segmentation_folder', DataError,
      r'2\.png is 11x12 but 2\.png is 10x12', lambda: mask.write_bytes(content))


def test_folder_empty_split(tmp_path):
  raw = _folder(tmp_path)
  (raw / 'test' / 'images').mkdir(parents=True)
  (raw / 'test' / 'masks').mkdir(parents=True)
  _expect_failure_then_fix(
      tmp_path, raw, 'segmentation_folder', DataError,
      r'test/images: holds no images \(empty split\)',
      lambda: [save(raw / 'test' / kind / 'a.png', textured_image(5, 4, 4))
               for kind in ('images', 'masks')])


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
  raw = _coco(tmp_path)
  data = tmp_path / 'data'
  stale = data / 'brain_tumor_coco' / 'gray' / 'incomplete.ABC123_1.0.0'
  stale.mkdir(parents=True)
  (stale / 'brain_tumor_coco-train.array_record-00000-of-00001').write_bytes(
      b'half')
  builder = prepare('brain_tumor_coco', data, raw)
  assert not stale.exists()
  assert builder.info.splits['validation'].num_examples == 3


def test_missing_manual_dir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='manual_dir does not exist'):
    prepare('brain_tumor_coco', tmp_path / 'data', tmp_path / 'nowhere')
  with pytest.raises(DataError, match='no split folders'):
    (tmp_path / 'empty').mkdir()
    save(tmp_path / 'empty' / 'x.png', textured_image(0, 4, 4))
    prepare('brain_tumor_coco', tmp_path / 'data', tmp_path / 'empty')


def test_split_too_large_for_memory_without_tensorflow(tmp_path, monkeypatch):
  """TFDS spills big splits through TensorFlow; without it we fail clearly
  (and cleanly) instead of with TFDS's ModuleNotFoundError."""
  from lintunet_jax.data.datasets import preparation  # pylint: disable=g-import-not-at-top
  if preparation._has_tensorflow():  # pylint: disable=protected-access
    pytest.skip('TensorFlow installed: TFDS can spill to disk')
  monkeypatch.setattr(preparation.tfds_shuffle, 'MAX_MEM_BUFFER_SIZE', 100)
  monkeypatch.setattr(preparation.psutil, 'virtual_memory',
                      lambda: type('Memory', (), {'available': 0})())
  with pytest.raises(MemoryError, match='larger than 0.0 GiB in memory'):
    prepare('brain_tumor_coco', tmp_path / 'data', _coco(tmp_path))
  assert leftovers(tmp_path / 'data') == []
