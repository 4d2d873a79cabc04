"""Whole images at their own size: the normalisation written out in numpy,
and a split shared by processes read back from the stored TFDS data."""

import numpy as np
import pytest

from lintunet_jax.data import whole_images
from lintunet_jax.data.datasets import preparation
from tests.evaluation import eval_testutil


def test_native_input_keeps_the_size_and_normalises_as_written():
  rng = np.random.default_rng()
  config = eval_testutil.tiny_config('/unused')
  gray = rng.integers(0, 256, (37, 53), dtype=np.uint8)
  config.dataset.normalization = 'seed'  # Normalize(0.5, 0.5), clamp to [0, 1]
  out = whole_images.native_input(gray, config)
  assert out.shape == (37, 53, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], np.clip(2 * (gray / 255.0) - 1, 0, 1),
                             rtol=1e-6, atol=1e-7)
  # An RGB image for an RGB model, z-scored over the whole image.
  config.dataset.channels = config.model.in_channels = 3
  config.dataset.normalization = 'standardize'
  rgb = rng.integers(0, 256, (41, 29, 3), dtype=np.uint8)
  x = rgb / 255.0
  np.testing.assert_allclose(whole_images.native_input(rgb, config),
                             (x - x.mean()) / x.std(), rtol=1e-4, atol=1e-5)
  config.dataset.normalization = 'zscore'
  with pytest.raises(ValueError, match='config.dataset.normalization'):
    whole_images.native_input(rgb, config)


def test_process_shares_cover_the_split_once(tmp_path_factory):
  config = eval_testutil.tiny_config(tmp_path_factory.getbasetemp() / 'tfds')
  shares = [list(whole_images.iterate_split(config, 'test', process_index=p,
                                            process_count=3)) for p in range(3)]
  stored = preparation.make_builder(config.dataset, 1).as_data_source('test')
  indices = sorted(index for share in shares for _, _, index in share)
  assert indices == list(range(len(stored)))
  for p, share in enumerate(shares):
    assert [index for _, _, index in share] == list(range(p, len(stored), 3))
    for image, mask, index in share[:3]:
      example = stored[index]
      np.testing.assert_array_equal(mask, example['mask'])
      np.testing.assert_allclose(image, example['image'] / np.float32(255.0),
                                 rtol=1e-6)  # 'unit', native 64x64
      assert image.shape == (64, 64, 1)
  assert np.unique(whole_images.process_share(10, 1, 4)).tolist() == [1, 5, 9]
  with pytest.raises(ValueError, match='process_index'):
    whole_images.process_share(10, 4, 4)
