"""Training input from volume slices (nnunet_raw): case-level folds, float
multi-channel images through the training and validation input untouched
by uint8 arithmetic, and the config fitted to dataset.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import lintunet
from lintunet_jax.data import folds
from lintunet_jax.data import pipeline
from lintunet_jax.data import volume_config
from lintunet_jax.data.datasets import transforms

sys.path.insert(0, str(Path(__file__).parent / 'datasets'))
from test_nnunet_raw import SHAPE, write_raw  # noqa: E402  pylint: disable=g-import-not-at-top

CHANNELS = ('T1', 'T2', 'FLAIR')  # three z-scored channels: values < 0 and > 1


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  folder, written = write_raw(tmp_path_factory.mktemp('raw'), train=6, test=0,
                              channel_names=CHANNELS, seed=4)
  return folder, written


def _config(raw_folder, data_dir, **dataset):
  config = lintunet.get_config('volumes_quick')
  config.dataset.manual_dir = str(raw_folder)
  config.dataset.data_dir = str(data_dir)
  config.dataset.image_size = 16  # slices of 10x9, padded
  config.dataset.num_workers = 0
  config.batch_size = 4
  config.eval_batch_size = 5
  for key, value in dataset.items():
    config.dataset[key] = value
  config = volume_config.resolve(config)
  pipeline.check_config(config)
  return config


def test_resolve_takes_channels_and_classes_from_dataset_json(raw, tmp_path):
  config = _config(raw[0], tmp_path)
  assert (config.model.in_channels, config.dataset.channels) == (3, 3)
  assert config.model.num_classes == 3  # background, organ, lesion
  assert config.dataset.normalization == 'stored'


@pytest.mark.parametrize('field, value, pattern', [
    ('model.in_channels', 1, r'config\.model\.in_channels=1 but .*dataset\.json declares 3 '
     r'channel\(s\) \(T1, T2, FLAIR\)'),
    ('model.num_classes', 2, r'config\.model\.num_classes=2 but .*declares 3 labels'),
    ('dataset.normalization', 'unit', r"normalization='unit': nnunet_raw stores"),
])
def test_an_explicit_value_that_disagrees_names_both(raw, tmp_path, field, value, pattern):
  config = lintunet.get_config('volumes_quick')
  config.dataset.manual_dir = str(raw[0])
  config.dataset.data_dir = str(tmp_path)
  group, name = field.split('.')
  config[group][name] = value
  with pytest.raises(ValueError, match=pattern):
    volume_config.resolve(config)


def test_uint8_normalisations_are_refused_for_volumes_and_stored_for_images():
  config = lintunet.get_config('quick')
  config.dataset.normalization = 'stored'
  with pytest.raises(ValueError, match=r"normalization='stored' with config\.dataset\.name="):
    pipeline.check_config(config)


def test_folds_are_by_case_and_every_slice_follows_its_case(raw, tmp_path):
  config = _config(raw[0], tmp_path)
  pipeline.prepare_dataset(config)
  per_slice = pipeline.case_ids(config, 'train')
  cases = pipeline.unique_case_ids(config, 'train')
  assert sorted(cases) == [f'case_{i:03d}' for i in range(6)]
  assert len(per_slice) == 6 * SHAPE[2]
  made = folds.make_folds(cases, 3)
  seen_in_val = []
  for fold in made:
    assert not set(fold['train']) & set(fold['val'])
    assert set(fold['train']) | set(fold['val']) == set(cases)
    seen_in_val += fold['val']
    train = pipeline.case_indices(config, 'train', fold['train'])
    val = pipeline.case_indices(config, 'train', fold['val'])
    assert not set(train.tolist()) & set(val.tolist())
    assert len(train) + len(val) == len(per_slice)
    assert {per_slice[i] for i in train} == set(fold['train'])
    assert {per_slice[i] for i in val} == set(fold['val'])
    # every slice of a validation case is in validation
    for case in fold['val']:
      assert sum(1 for i in val if per_slice[i] == case) == SHAPE[2]
  assert sorted(seen_in_val) == sorted(cases)  # each case validated once


def _stored_slices(written, axis=2):
  slices = {}
  for case, w in written.items():
    channels = [(c - c.mean()) / c.std() for c in
                (np.asarray(ch, np.float64) for ch in w['channels'])]
    volume = np.stack(channels, axis=-1)
    for z in range(volume.shape[axis]):
      slices[(case, z)] = (np.take(volume, z, axis=axis), np.take(w['label'], z, axis=axis))
  return slices


def _match(image, slices):
  """The stored slice that a padded 16x16 model input shows."""
  top, left = (16 - SHAPE[0]) // 2, (16 - SHAPE[1]) // 2
  window = image[top:top + SHAPE[0], left:left + SHAPE[1]]
  for key, (want, _) in slices.items():
    if np.allclose(window, want, rtol=1e-5, atol=1e-5):
      return key, window
  raise AssertionError('no stored slice matches the batch image')


def test_float_slices_reach_validation_batches_intact(raw, tmp_path):
  config = _config(raw[0], tmp_path)
  slices = _stored_slices(raw[1])
  seen = 0
  for batch in pipeline.create_eval_iterator(config, 'train', process_index=0,
                                             process_count=1):
    assert batch['image'].dtype == np.float32 and batch['image'].shape[1:] == (16, 16, 3)
    for image, mask, valid in zip(batch['image'], batch['mask'], batch['valid']):
      if not valid:
        continue
      key, _ = _match(image, slices)
      top, left = (16 - SHAPE[0]) // 2, (16 - SHAPE[1]) // 2
      np.testing.assert_array_equal(mask[top:top + SHAPE[0], left:left + SHAPE[1]],
                                    slices[key][1])
      assert (image[:top] == 0).all()  # padding is 0 after normalisation
      seen += 1
  assert seen == 6 * SHAPE[2]
  values = np.concatenate([v[0].ravel() for v in slices.values()])
  assert values.min() < -1.0 and values.max() > 1.5  # what uint8 would have lost


def test_float_slices_reach_training_batches_intact(raw, tmp_path):
  config = _config(raw[0], tmp_path, augment=False)
  slices = _stored_slices(raw[1])
  iterator = pipeline.create_train_iterator(config, process_index=0, process_count=1,
                                            cases=['case_000', 'case_001', 'case_002'])
  for _ in range(3):
    batch = next(iterator)
    for image in batch['image']:
      (case, _), _ = _match(image, slices)
      assert case in ('case_000', 'case_001', 'case_002')


def test_augmented_float_slices_keep_their_range_and_precision(raw, tmp_path):
  config = _config(raw[0], tmp_path, augment=True)
  iterator = pipeline.create_train_iterator(config, process_index=0, process_count=1,
                                            cases=['case_000', 'case_001'])
  images = np.concatenate([next(iterator)['image'] for _ in range(4)])
  assert images.dtype == np.float32 and np.isfinite(images).all()
  assert images.min() < -1.0 and images.max() > 1.5  # not clipped to [0, 1]
  assert not np.allclose(images, np.round(images * 255) / 255)  # not quantised


def test_augment_moves_float_and_uint8_images_alike():
  """The same rng draws give the same geometry to a float image and to its
  uint8 twin; the float one is scaled and shifted, not clipped."""
  rng_values = np.random.default_rng(11)
  pixels = rng_values.integers(0, 256, (24, 24, 1)).astype(np.uint8)
  mask = (rng_values.random((24, 24)) > 0.5).astype(np.uint8)
  as_float = pixels.astype(np.float32) / 255.0 * 6.0 - 3.0  # z-score-like
  u_image, u_mask = transforms.augment(pixels, mask, np.random.default_rng(5))
  f_image, f_mask = transforms.augment(as_float, mask, np.random.default_rng(5))
  np.testing.assert_array_equal(u_mask, f_mask)
  assert f_image.min() < -1.0 and f_image.max() > 1.0
  assert u_image.min() >= 0.0 and u_image.max() <= 1.0


def test_statistics_file_is_what_preparation_recorded(raw, tmp_path):
  config = _config(raw[0], tmp_path / 'data')
  pipeline.prepare_dataset(config)
  path = volume_config.write_statistics(config, str(tmp_path / 'run'))
  recorded = json.loads(Path(path).read_text())
  assert recorded == volume_config.read_statistics(str(tmp_path / 'run'))
  assert recorded['slicing_axis'] == 2
  assert [e['scheme'] for e in recorded['normalization']] == ['zscore'] * 3
  assert volume_config.write_statistics(lintunet.get_config('quick'), str(tmp_path)) is None
