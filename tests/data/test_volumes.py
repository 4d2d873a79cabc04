"""volumes: the slicing axis, the dataset.json checks and the normalisation
rules, on their own (the builder's round trip is in
tests/data/datasets/test_nnunet_raw.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lintunet_jax.data import volumes
from lintunet_jax.data.datasets import DataError


def test_slicing_axis_is_the_largest_median_spacing():
  # The median, not the mean: one odd case (axis 0 at 9 mm) must not win.
  spacings = [(0.8, 0.8, 2.5), (0.7, 0.7, 3.0), (9.0, 0.8, 2.0)]
  assert volumes.slicing_axis(spacings) == 2
  assert volumes.slicing_axis([(5.0, 1.0, 1.0), (4.0, 1.0, 1.0)]) == 0
  assert volumes.slicing_axis([(1.0, 2.0, 1.0)]) == 1


def test_isotropic_spacing_slices_the_last_axis():
  assert volumes.slicing_axis([(1.0, 1.0, 1.0), (1.0, 1.0, 1.0)]) == 2
  assert volumes.slicing_axis([(2.0, 2.0, 1.0)]) == 1


def _dataset_json(tmp_path, **meta):
  base = {'channel_names': {'0': 'CT'}, 'labels': {'background': 0, 'a': 1},
          'numTraining': 1, 'file_ending': '.nii.gz'}
  base.update(meta)
  (tmp_path / 'dataset.json').write_text(json.dumps(base))
  return tmp_path


def test_dataset_json_is_read_with_channels_in_index_order(tmp_path):
  folder = _dataset_json(tmp_path, channel_names={'1': 'ADC', '0': 'ct'},
                         labels={'background': 0, 'b': 2, 'a': 1})
  dataset = volumes.read_dataset_json(folder)
  assert dataset.channel_names == ('ct', 'ADC')
  assert dataset.schemes == ('ct', 'zscore')  # 'CT' in any case
  assert dataset.num_classes == 3 and dataset.num_channels == 2


@pytest.mark.parametrize('meta, pattern', [
    ({'labels': {'background': 0, 'a': 2}}, r'label values must be 0, 1, \.\.\., N'),
    ({'labels': {'background': 0, 'whole': [1, 2]}}, r'region-based labels'),
    ({'channel_names': {'0': 'CT', '2': 'T1'}}, r'channel_names keys must be 0\.\.1'),
    ({'file_ending': '.mha'}, r"file_ending '\.mha'"),
])
def test_dataset_json_errors_name_the_file(tmp_path, meta, pattern):
  folder = _dataset_json(tmp_path, **meta)
  with pytest.raises(DataError, match=pattern) as error:
    volumes.read_dataset_json(folder)
  assert str(folder / 'dataset.json') in str(error.value)


def test_a_missing_dataset_json(tmp_path):
  with pytest.raises(DataError, match=r'dataset\.json: missing'):
    volumes.read_dataset_json(tmp_path)


def test_zscore_and_ct_rules_on_fresh_random_volumes():
  rng = np.random.default_rng(7)
  image = np.stack([rng.uniform(-1000, 2000, (6, 5, 4)),
                    rng.gamma(2.0, 100.0, (6, 5, 4))], axis=-1).astype(np.float32)
  stats = {'mean': 40.0, 'std': 250.0, 'percentile_00_5': -200.0,
           'percentile_99_5': 900.0}
  plan = [dict(channel=0, name='CT', scheme='ct', **stats),
          dict(channel=1, name='T2', scheme='zscore')]
  out = volumes.normalize(image, plan)
  ct = (np.clip(image[..., 0].astype(np.float64), -200, 900) - 40) / 250
  mr = image[..., 1].astype(np.float64)
  np.testing.assert_allclose(out[..., 0], ct, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out[..., 1], (mr - mr.mean()) / mr.std(), rtol=1e-5, atol=1e-5)
