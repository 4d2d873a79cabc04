"""Patch training at native resolution: crops, foreground sampling, tiles.

References are brute force over the native image (which window of it a
patch is, NumPy's own mean/std) and pixel counts of the stored files, never
our own crop code.
"""

import numpy as np
import pytest
from PIL import Image

from configs import default
from lintunet_jax.data import patches
from lintunet_jax.data import pipeline as input_pipeline

SIZES = [(20, 30), (40, 50), (64, 48), (33, 17), (70, 35)]  # (H, W), none a multiple of 32
PATCH = 32


def _example(rng, height, width, lesion=3):
  image = rng.integers(1, 256, (height, width), dtype=np.uint8)
  mask = np.zeros((height, width), np.uint8)
  top, left = rng.integers(0, height - lesion + 1), rng.integers(0, width - lesion + 1)
  mask[top:top + lesion, left:left + lesion] = 1
  return image, mask


def _windows(array, size):
  """Every size x size window of `array` padded by `size` zeros on each
  side: {(top, left): window} with top, left possibly negative."""
  padded = np.pad(array, ((size, size), (size, size)))
  height, width = array.shape
  return {(top, left): padded[top + size:top + 2 * size, left + size:left + 2 * size]
          for top in range(-size, height + 1) for left in range(-size, width + 1)}


def _where(patch, image, size):
  """The offsets at which `patch` is a window of `image` (brute force)."""
  return [offset for offset, window in _windows(image, size).items()
          if np.array_equal(window, patch)]


def _train(image, mask, rng, **kwargs):
  settings = dict(size=PATCH, channels=1, normalization='unit',
                  foreground_fraction=0.0, augment=False)
  settings.update(kwargs)
  return patches.train_example(image, mask, rng=rng, **settings)


@pytest.mark.parametrize('height,width', [(50, 70), (20, 30), (40, 25)])
def test_without_augmentation_a_patch_is_a_window_of_the_native_image(height, width):
  data_rng = np.random.default_rng()
  for seed in range(6):
    image, mask = _example(data_rng, height, width)
    out = _train(image, mask, np.random.default_rng(seed),
                 foreground_fraction=0.5)
    assert out['image'].shape == (PATCH, PATCH, 1) and out['image'].dtype == np.float32
    assert out['mask'].shape == (PATCH, PATCH) and out['mask'].dtype == np.int32
    raw = np.rint(out['image'][..., 0] * 255).astype(np.uint8)
    offsets = _where(raw, image, PATCH)
    assert len(offsets) == 1  # random pixels: one window matches
    (top, left), = offsets
    np.testing.assert_array_equal(out['mask'], _windows(mask, PATCH)[(top, left)])
    # Inside the image where it fits; the whole image inside where it does not.
    for start, length in ((top, height), (left, width)):
      if length >= PATCH:
        assert 0 <= start <= length - PATCH
      else:
        assert length - PATCH <= start <= 0


def test_a_small_image_is_zero_padded_and_its_mask_padding_is_background():
  rng = np.random.default_rng()
  image, _ = _example(rng, 20, 30)
  mask = np.ones((20, 30), np.uint8)  # all foreground: padding must still be 0
  for seed in range(5):
    out = _train(image, mask, np.random.default_rng(seed))
    raw = np.rint(out['image'][..., 0] * 255).astype(np.uint8)
    assert out['mask'].sum() == 20 * 30  # the whole image, once
    assert (raw > 0).sum() == 20 * 30  # pixels are 1..255: the rest is padding
    np.testing.assert_array_equal(out['mask'] == 1, raw > 0)


def test_padding_is_zero_after_standardize_as_the_sliding_window_pads():
  # The sliding window pads normalised images with 0; training and the
  # validation tiles must put (about) the same value there, not the
  # (0 - mean) / std that padding the raw image with 0 would give.
  rng = np.random.default_rng()
  image = rng.integers(100, 228, (20, 30), dtype=np.uint8)  # mean far from 0
  mask = np.ones((20, 30), np.uint8)  # marks the image inside the patch
  std = (image / 255).std()
  out = _train(image, mask, np.random.default_rng(0), normalization='standardize')
  padding = out['image'][..., 0][out['mask'] == 0]
  assert padding.size == PATCH * PATCH - 20 * 30
  assert np.abs(padding).max() <= 0.5 / 255 / std + 1e-6
  reader = patches.TileReader([(image, mask)], size=PATCH, channels=1,
                              normalization='standardize')
  tile = reader((0, 0, 0))
  assert (tile['region'] == 0).sum() == PATCH * PATCH - 20 * 30
  np.testing.assert_array_equal(tile['image'][..., 0][tile['region'] == 0], 0.0)


def test_foreground_fraction_one_centres_every_patch_on_a_lesion():
  rng = np.random.default_rng()
  hits = {0.0: 0, 1.0: 0}
  draws = 150
  for i in range(draws):
    image, mask = _example(rng, 128, 128, lesion=3)
    for fraction in hits:
      out = _train(image, mask, np.random.default_rng(i), foreground_fraction=fraction)
      hits[fraction] += out['mask'].any()
      if fraction == 1.0:
        assert out['mask'].any()
  # A random 32 window holds a 3x3 lesion in about (32+2)^2 / 97^2 = 12% of
  # draws (fewer near the edges).
  assert hits[1.0] == draws and hits[0.0] < 0.3 * draws


def test_foreground_patches_are_centred_on_a_foreground_pixel():
  rng = np.random.default_rng()
  for seed in range(20):
    mask = np.zeros((100, 90), np.uint8)
    rows, cols = rng.integers(20, 70, 4), rng.integers(20, 60, 4)
    mask[rows, cols] = 1  # isolated pixels, far from the edges
    top, left = patches.random_origin(mask, PATCH, 1.0, np.random.default_rng(seed))
    assert mask[top + PATCH // 2, left + PATCH // 2] == 1
  # No foreground: a random window inside the image even at fraction 1.
  top, left = patches.random_origin(np.zeros((50, 40), np.uint8), PATCH, 1.0, rng)
  assert 0 <= top <= 18 and 0 <= left <= 8


def test_standardize_uses_the_whole_images_statistics():
  rng = np.random.default_rng()
  image, mask = _example(rng, 64, 80)
  image[:, 40:] //= 4  # a dark half: a patch's own statistics differ
  out = _train(image, mask, np.random.default_rng(3), normalization='standardize')
  whole = image.astype(np.float64) / 255
  raw = out['image'][..., 0] * whole.std() + whole.mean()
  (top, left), = _where(np.rint(raw * 255).astype(np.uint8), image, PATCH)
  expected = (_windows(image, PATCH)[(top, left)] / 255 - whole.mean()) / whole.std()
  np.testing.assert_allclose(out['image'][..., 0], expected, rtol=1e-4, atol=1e-5)


def test_tile_origins_cover_every_pixel_once():
  for height, width in SIZES + [(64, 64), (1, 1)]:
    count = np.zeros((height, width), int)
    for top, left in patches.tile_origins(height, width, PATCH):
      region = patches.region(height, width, top, left, PATCH)
      rows, cols = slice(top, top + PATCH), slice(left, left + PATCH)
      count[rows, cols] += region[:min(PATCH, height - top), :min(PATCH, width - left)]
      assert region.sum() == min(PATCH, height - top) * min(PATCH, width - left)
    np.testing.assert_array_equal(count, 1)


# --- Through the input pipeline: a folder dataset of images of five sizes.


@pytest.fixture(scope='module')
def raw_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('raw')
  rng = np.random.default_rng(0)
  for split, count in (('train', 6), ('val', 5)):
    for kind in ('images', 'masks'):
      (root / split / kind).mkdir(parents=True)
    for i in range(count):
      height, width = SIZES[i % len(SIZES)]
      image, mask = _example(rng, height, width, lesion=4)
      Image.fromarray(image).save(root / split / 'images' / f'{split}{i}.png')
      Image.fromarray(mask * 255).save(root / split / 'masks' / f'{split}{i}.png')
  return root


@pytest.fixture
def config(raw_dir, tmp_path_factory):
  config = default.get_config()
  config.dataset.name = 'segmentation_folder'
  config.dataset.manual_dir = str(raw_dir)
  config.dataset.data_dir = str(tmp_path_factory.getbasetemp() / 'patch_data')
  config.dataset.patch_size = PATCH
  config.dataset.augment = True
  config.dataset.num_workers = 0
  config.batch_size = 3
  config.eval_batch_size = 4
  return config


def test_train_batches_are_patches_and_resume_exactly(config):
  iterator = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  first = [next(iterator) for _ in range(2)]
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  assert first[0]['image'].shape == (3, PATCH, PATCH, 1)
  assert first[0]['mask'].shape == (3, PATCH, PATCH)
  resumed = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['mask'], want['mask'])


def test_validation_tiles_count_every_native_pixel_once(config, raw_dir):
  names = sorted((raw_dir / 'val' / 'masks').iterdir())
  stored = [np.asarray(Image.open(p)) > 0 for p in names]
  ids = input_pipeline.case_ids(config, 'validation')
  assert sorted(ids) == [p.name for p in names]
  native = {i: stored[[p.name for p in names].index(case)] for i, case in enumerate(ids)}
  per_process = []
  for process_index in range(2):
    batches = list(input_pipeline.create_eval_iterator(
        config, 'validation', process_index=process_index, process_count=2))
    per_process.append(batches)
    for batch in batches:
      assert batch['image'].shape == (2, PATCH, PATCH, 1)  # 4 over 2 processes
      assert batch['region'].shape == (2, PATCH, PATCH)
  assert len(per_process[0]) == len(per_process[1])  # collectives never wait
  region, foreground, tiles = {}, {}, {}
  for batch in sum(per_process, []):
    for index, valid, r, m in zip(batch['index'], batch['valid'], batch['region'],
                                  batch['mask']):
      if not valid:
        assert index == -1 and r.sum() == 0
        continue
      region[int(index)] = region.get(int(index), 0) + int(r.sum())
      foreground[int(index)] = foreground.get(int(index), 0) + int(m[r > 0].sum())
      tiles[int(index)] = tiles.get(int(index), 0) + 1
      assert not m[r == 0].any()  # padding is background
  for index, mask in native.items():
    height, width = mask.shape
    assert region[index] == height * width
    assert foreground[index] == mask.sum() > 0
    assert tiles[index] == -(-height // PATCH) * -(-width // PATCH)


def test_patch_settings_are_checked(config):
  with pytest.raises(ValueError, match='native_masks'):
    input_pipeline.create_eval_iterator(config, 'validation', process_index=0,
                                        process_count=1, native_masks=True)
  config.dataset.image_size = 40  # not read in patch mode
  config.dataset.resize = 'unused'
  input_pipeline.check_config(config)
  for bad in (40, 0, -16):
    config.dataset.patch_size = bad
    with pytest.raises(ValueError, match='patch_size.*multiple of 16'):
      input_pipeline.check_config(config)
  config.dataset.patch_size = 32
  config.dataset.foreground_fraction = 1.5
  with pytest.raises(ValueError, match=r'foreground_fraction=1.5 must be in \[0, 1\]'):
    input_pipeline.check_config(config)
