"""input_pipeline: batches, determinism, resumption, sharding, evaluation.

The fixture is a folder dataset whose images say who they are: example i is
a flat gray level 5 * (i + 1) with a bright square exactly where its mask
is, at 24x20 pixels (not a multiple of 16).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import default
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.data.datasets import transforms

NUM_TRAIN, NUM_VALIDATION = 20, 7
HEIGHT, WIDTH = 24, 20
REPO = Path(__file__).resolve().parents[2]


def _square(i):
  top, left = 2 + i % 9, 3 + (i * 5) % 11
  return slice(top, top + 8), slice(left, left + 6)


def _write_example(folder, i):
  image = np.full((HEIGHT, WIDTH), 5 * (i + 1), np.uint8)
  mask = np.zeros((HEIGHT, WIDTH), np.uint8)
  image[_square(i)] = 250
  mask[_square(i)] = 255
  Image.fromarray(image).save(folder / 'images' / f'{i:03d}.png')
  Image.fromarray(mask).save(folder / 'masks' / f'{i:03d}.png')


@pytest.fixture(scope='module')
def raw_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('raw')
  ranges = {'train': range(NUM_TRAIN),
            'val': range(NUM_TRAIN, NUM_TRAIN + NUM_VALIDATION)}
  for split, ids in ranges.items():
    for kind in ('images', 'masks'):
      (root / split / kind).mkdir(parents=True)
    for i in ids:
      _write_example(root / split, i)
  return root


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


@pytest.fixture
def config(raw_dir, data_dir):
  config = default.get_config()
  config.dataset.name = 'segmentation_folder'
  config.dataset.manual_dir = str(raw_dir)
  config.dataset.data_dir = str(data_dir)
  config.dataset.image_size = 32
  config.dataset.augment = False
  config.dataset.num_workers = 0
  config.batch_size = 4
  config.eval_batch_size = 6
  return config


def _ids_of(native_mask, raw_dir):
  """The file id whose written mask equals `native_mask`."""
  for path in sorted((raw_dir / 'val' / 'masks').iterdir()):
    if np.array_equal(np.asarray(Image.open(path)) > 0, native_mask > 0):
      return path.stem
  raise AssertionError('no written mask matches')


def _ids(batch):
  """Example ids from the flat gray level in the top-left corner."""
  level = np.rint(batch['image'][:, 0, 0, 0] * 255).astype(int)
  return (level // 5 - 1).tolist()


def _train(config, steps, **kwargs):
  iterator = input_pipeline.create_train_iterator(
      config, process_index=kwargs.pop('process_index', 0),
      process_count=kwargs.pop('process_count', 1), **kwargs)
  return iterator, [next(iterator) for _ in range(steps)]


def test_train_batches_are_each_example_once_per_epoch(config):
  _, batches = _train(config, 10)
  first = sum((_ids(b) for b in batches[:5]), [])
  second = sum((_ids(b) for b in batches[5:]), [])
  assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))
  assert first != second  # reshuffled every epoch
  batch = batches[0]
  assert batch['image'].dtype == np.float32 and batch['mask'].dtype == np.int32
  assert batch['image'].shape == (4, 32, 32, 1)
  for image, mask, i in zip(batch['image'], batch['mask'], _ids(batch)):
    expected = np.zeros((HEIGHT, WIDTH), np.uint8)
    expected[_square(i)] = 1
    np.testing.assert_array_equal(
        mask, transforms.fit_mask(expected, 32, 'resize'))
    assert image[mask == 1].min() > 0.5  # the bright square under the mask


def test_train_order_is_a_function_of_the_seed(config):
  _, batches = _train(config, 3)
  _, again = _train(config, 3)
  config.seed = 1
  _, other = _train(config, 3)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert [_ids(b) for b in batches] != [_ids(b) for b in other]


def test_resumed_iterator_sees_the_same_batches(config):
  config.dataset.augment = True
  iterator, _ = _train(config, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(6)]  # crosses an epoch boundary
  resumed = input_pipeline.create_train_iterator(config, process_index=0,
                                                 process_count=1)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['mask'], want['mask'])


def test_augmentation_moves_image_and_mask_together(config):
  _, plain = _train(config, 5)
  config.dataset.augment = True
  _, augmented = _train(config, 5)
  changed = 0
  for batch, reference in zip(augmented, plain):
    changed += not np.array_equal(batch['mask'], reference['mask'])
    for image, mask in zip(batch['image'][..., 0], batch['mask']):
      bright = image > image[mask == 0].max() + 0.05
      inside = mask == 1
      overlap = (bright & inside).sum() / max(1, (bright | inside).sum())
      assert overlap > 0.75
      assert set(np.unique(mask)) <= {0, 1}
  assert changed >= 4


def test_processes_read_disjoint_shards_of_local_batches(config):
  seen = []
  for process_index in range(2):
    _, batches = _train(config, 5, process_index=process_index,
                        process_count=2)
    assert batches[0]['image'].shape[0] == 2  # 4 global / 2 processes
    seen.append(set(sum((_ids(b) for b in batches), [])))
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == set(range(NUM_TRAIN))


def test_eval_covers_each_example_once_with_padding(config, raw_dir):
  per_process = []
  for process_index in range(2):
    batches = list(input_pipeline.create_eval_iterator(
        config, 'validation', process_index=process_index, process_count=2))
    per_process.append(batches)
    for batch in batches:
      assert batch['image'].shape == (3, 32, 32, 1)
      assert batch['valid'].dtype == np.float32
      assert batch['index'].dtype == np.int32
  assert [len(b) for b in per_process] == [2, 2]  # same count everywhere
  valid = [(index, image, mask) for batches in per_process
           for batch in batches
           for index, image, mask, ok in zip(batch['index'], batch['image'],
                                             batch['mask'], batch['valid'])
           if ok == 1]
  assert sorted(index for index, _, _ in valid) == list(range(NUM_VALIDATION))
  padding = [(batch['index'], batch['image']) for batches in per_process
             for batch in batches]
  pad_index = np.concatenate([p[0] for p in padding])[
      np.concatenate([b['valid'] for bs in per_process for b in bs]) == 0]
  assert pad_index.tolist() == [-1] * (2 * 2 * 3 - NUM_VALIDATION)
  # Eval images are exactly preprocess_image of the raw file: one code path.
  names = sorted((raw_dir / 'val' / 'images').iterdir())
  files = {_ids({'image': preprocess[None]})[0]: path for path in names
           for preprocess in [input_pipeline.preprocess_image(
               np.asarray(Image.open(path)), config)]}
  for _, image, mask in valid:
    raw = np.asarray(Image.open(files[_ids({'image': image[None]})[0]]))
    np.testing.assert_array_equal(
        image, input_pipeline.preprocess_image(raw, config))
    assert mask.sum() > 0


def test_num_examples_and_training_subset(config):
  assert input_pipeline.num_examples(config, 'train') == NUM_TRAIN
  assert input_pipeline.num_examples(config, 'validation') == NUM_VALIDATION
  config.dataset.num_train_examples = 8
  assert input_pipeline.num_examples(config, 'train') == 8
  _, batches = _train(config, 4)
  ids = sum((_ids(b) for b in batches), [])
  assert len(set(ids[:8])) == 8 and set(ids[8:]) == set(ids[:8])


def test_preprocess_and_restore_geometry(config):
  image = np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) % 251 + 1
  image = image.astype(np.uint8)
  config.dataset.resize = 'pad'
  model_input = input_pipeline.preprocess_image(image, config)
  assert model_input.shape == (32, 32, 1)
  np.testing.assert_array_equal(model_input[4:28, 6:26, 0],
                                image.astype(np.float32) / 255)
  assert not model_input[:4].any() and not model_input[:, :6].any()
  mask = (image > 128).astype(np.int32)
  fitted = transforms.fit_mask(mask, 32, 'pad')
  np.testing.assert_array_equal(
      input_pipeline.restore_mask_size(fitted, (24, 20), config), mask)
  # Larger than the canvas: shrunk to fit, aspect kept, then restored.
  big = np.zeros((565, 584), np.int32)
  big[100:300, 200:450] = 1
  fitted = transforms.fit_mask(big, 32, 'pad')
  assert fitted.shape == (32, 32) and fitted[0].sum() == 0  # padded rows
  restored = input_pipeline.restore_mask_size(fitted, (565, 584), config)
  assert restored.shape == (565, 584) and np.mean(restored == big) > 0.97

  config.dataset.resize = 'resize'
  config.dataset.channels = config.model.in_channels = 3
  config.dataset.normalization = 'standardize'
  model_input = input_pipeline.preprocess_image(image, config)
  assert model_input.shape == (32, 32, 3)
  np.testing.assert_array_equal(model_input[..., 0], model_input[..., 2])
  assert abs(model_input.mean()) < 1e-5 and abs(model_input.std() - 1) < 1e-4
  restored = input_pipeline.restore_mask_size(
      transforms.fit_mask(big, 32, 'resize'), (565, 584), config)
  assert np.mean(restored == big) > 0.97


def test_seed_normalization_is_the_notebooks(config):
  """ToTensor, Normalize(0.5, 0.5), clamp(0, 1): below mid-grey becomes 0."""
  image = np.random.default_rng().integers(0, 256, (32, 32), dtype=np.uint8)
  config.dataset.normalization = 'seed'
  model_input = input_pipeline.preprocess_image(image, config)[..., 0]
  expected = np.clip((image / 255.0 - 0.5) / 0.5, 0.0, 1.0)
  np.testing.assert_allclose(model_input, expected, rtol=0, atol=1e-6)
  assert (model_input[image < 128] == 0).all() and model_input.max() > 0.9


def test_config_errors_are_explained(config):
  config.dataset.image_size = 40
  with pytest.raises(ValueError, match='multiple of 16'):
    input_pipeline.preprocess_image(np.ones((4, 4), np.uint8), config)
  config.dataset.image_size = 32
  config.batch_size = 5
  with pytest.raises(ValueError, match='not divisible by the 2 processes'):
    input_pipeline.create_train_iterator(config, process_index=0,
                                         process_count=2)
  with pytest.raises(ValueError, match=r"no split 'testing'.*'train'"):
    input_pipeline.num_examples(config, 'testing')
  # RGB images for a one-channel model: refused before any image is read,
  # naming both fields (it used to reach the first convolution).
  config.dataset.channels = 3
  with pytest.raises(ValueError, match=r'config\.dataset\.channels=3 but '
                     r'config\.model\.in_channels=1'):
    input_pipeline.check_config(config)
  with pytest.raises(ValueError, match='model.in_channels'):
    input_pipeline.create_eval_iterator(config, 'validation', process_index=0,
                                        process_count=1)
  config.model.in_channels = 3
  input_pipeline.check_config(config)


def test_eval_batches_carry_native_masks_and_the_image_region(config, raw_dir):
  """For metrics at native size: the stored masks, and where the image lies
  on the canvas (padding and padded examples excluded)."""
  config.dataset.resize = 'pad'
  batches = list(input_pipeline.create_eval_iterator(
      config, 'validation', process_index=0, process_count=1, native_masks=True))
  assert sum(int(b['valid'].sum()) for b in batches) == NUM_VALIDATION
  for batch in batches:
    for valid, region, native in zip(batch['valid'], batch['region'],
                                     batch['native_mask']):
      if not valid:
        assert region.sum() == 0 and native.size == 0
        continue
      assert native.shape == (HEIGHT, WIDTH)
      _ids_of(native, raw_dir)  # one of the masks as written, not resized
      # 24x20 fits the 32 canvas: kept at native size, centred.
      rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
      assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (4, 28, 6, 26)
      assert region.sum() == HEIGHT * WIDTH


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(config):
  config.dataset.augment = True
  _, expected = _train(config, 3)
  config.dataset.num_workers = 1
  iterator, batches = _train(config, 2)
  state = json.loads(json.dumps(iterator.get_state()))
  for got, want in zip(batches, expected):
    np.testing.assert_array_equal(got['image'], want['image'])
  iterator.close()
  resumed = input_pipeline.create_train_iterator(config, process_index=0,
                                                 process_count=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['image'], expected[2]['image'])
  resumed.close()


def test_synthetic_default_by_name_and_no_tensorflow(tmp_path):
  config = default.get_config()
  config.dataset.name = 'synthetic_mri/small'
  config.dataset.data_dir = str(tmp_path)
  config.dataset.image_size = 64
  config.batch_size = 8
  config.dataset.num_workers = 0
  builder = input_pipeline.prepare_dataset(config)
  assert builder.info.splits['train'].num_examples == 256
  batch = next(input_pipeline.create_train_iterator(
      config, process_index=0, process_count=1))
  assert batch['image'].std() > 0.05 and batch['mask'].max() == 1
  assert 'tensorflow' not in sys.modules
  subprocess.run(
      [sys.executable, '-c', 'import lintunet_jax.data.pipeline, sys; '
       "assert 'tensorflow' not in sys.modules"], check=True, cwd=REPO, timeout=120)


def test_case_ids_name_the_stored_files(config):
  names = [f'{i:03d}.png' for i in range(NUM_TRAIN)]
  ids = input_pipeline.case_ids(config, 'train')
  assert sorted(ids) == names and ids != names  # split order is TFDS's hash order
  assert sorted(input_pipeline.case_ids(config, 'validation')) == [
      f'{i:03d}.png' for i in range(NUM_TRAIN, NUM_TRAIN + NUM_VALIDATION)]
  # Each id names its example: the image of example k is file ids[k].
  batch = next(input_pipeline.create_eval_iterator(
      config, 'train', batch_size=NUM_TRAIN, process_index=0, process_count=1))
  assert [f'{i:03d}.png' for i in _ids(batch)] == [ids[k] for k in batch['index']]
  config.dataset.num_train_examples = 8
  assert input_pipeline.case_ids(config, 'train') == ids[:8]


def test_fold_cases_are_all_that_is_read_with_subsets_and_processes(config):
  config.dataset.num_train_examples = 12
  ids = input_pipeline.case_ids(config, 'train')
  cases = ids[1:12:2]  # 6 of the 12
  config.dataset.fold = 0
  seen = []
  for process_index in range(2):
    _, batches = _train(config, 3, process_index=process_index, process_count=2,
                        cases=cases)  # 3 batches of 2: two epochs of a 3-case shard
    seen.append({f'{i:03d}.png' for b in batches for i in _ids(b)})
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(cases)
  batches = list(input_pipeline.create_eval_iterator(
      config, 'train', cases=cases[::-1], process_index=0, process_count=1))
  valid = [(int(k), f'{i:03d}.png') for b in batches
           for k, i, ok in zip(b['index'], _ids(b), b['valid']) if ok]
  assert sorted(valid) == sorted((ids.index(c), c) for c in cases)
  with pytest.raises(ValueError, match=r'fold=0: pass the fold'):
    _train(config, 1)
  with pytest.raises(ValueError, match=r"1 case ids are not in split 'train'.*'nope.png'"):
    _train(config, 1, cases=cases + ['nope.png'])
  with pytest.raises(ValueError, match='not in split'):  # another split's
    _train(config, 1, cases=input_pipeline.case_ids(config, 'validation'))
