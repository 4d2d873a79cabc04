"""Predictions written back as NIfTI volumes with the input's geometry.

The model is replaced by stand-in predict_fns passed to the prediction
stream: one that returns the label encoded in the input (so the output
must equal the label volume voxel for voxel, on every slicing axis, with
and without the sliding window's native geometry) and one that thresholds
the normalised intensity at 0 (so the output shows which statistics
normalised the volume)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from configs import lintunet
from lintunet_jax import export
from lintunet_jax import models
from lintunet_jax.data import volumes
from lintunet_jax.data.datasets import DataError
from lintunet_jax.evaluation import sliding_window as sw
from lintunet_jax.evaluation import volume_prediction
from lintunet_jax.training import checkpointing

SHAPE = (10, 9, 6)
SIZE = 16  # the model's input edge: every slice fits, padded


def _affine(spacing, degrees=7.0):
  a = np.deg2rad(degrees)
  rotation = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
  affine = np.eye(4)
  affine[:3, :3] = rotation @ np.diag(spacing)
  affine[:3, 3] = (12.5, -30.0, 4.0)
  return affine


def _save(path, array, affine):
  image = nib.Nifti1Image(array, affine)
  image.header.set_xyzt_units('mm')
  nib.save(image, str(path))


def _config(channels=1, num_classes=3):
  config = lintunet.get_config('volumes_quick')
  config.model.in_channels = config.dataset.channels = channels
  config.model.num_classes = num_classes
  config.dataset.normalization = 'stored'
  config.dataset.image_size = SIZE
  config.eval_batch_size = 4
  return config


IDENTITY_CT = [{'channel': 0, 'name': 'CT', 'scheme': 'ct', 'mean': 0.0, 'std': 1.0,
                'percentile_00_5': -1e9, 'percentile_99_5': 1e9}]


def _labels_from_input(images):
  """Logits whose argmax is the class id the input's channel 0 holds."""
  ids = jnp.round(images[..., 0]).astype(jnp.int32)
  return 10.0 * jnp.eye(3)[ids]


def _case(folder, case_id, channels):
  folder.mkdir(parents=True, exist_ok=True)
  for c, array in enumerate(channels):
    _save(folder / f'{case_id}_{c:04d}.nii.gz', array.astype(np.float32), _affine((0.7, 0.9, 3.0)))
  return volumes.prediction_cases([folder / f'{case_id}_0000.nii.gz'], len(channels))


@pytest.mark.parametrize('window', [False, True])
@pytest.mark.parametrize('axis', [0, 1, 2])
def test_output_has_the_input_geometry_and_the_label_voxel_for_voxel(tmp_path, axis, window):
  label = np.random.default_rng(axis).integers(0, 3, SHAPE).astype(np.uint8)
  cases = _case(tmp_path / 'in', 'case_007', [label])
  settings = sw.InferenceSettings(tile_size=SIZE, window=window, tile_batch_size=4)
  summary = volume_prediction.predict_cases(
      _labels_from_input, cases, _config(), settings,
      {'slicing_axis': axis, 'normalization': IDENTITY_CT}, tmp_path / 'out', progress=False)
  assert summary.slices == SHAPE[axis]
  written = nib.load(str(tmp_path / 'out' / 'case_007.nii.gz'))
  source = nib.load(str(tmp_path / 'in' / 'case_007_0000.nii.gz'))
  assert written.shape == source.shape == SHAPE
  np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
  np.testing.assert_allclose(written.header.get_zooms(), (0.7, 0.9, 3.0), rtol=1e-6)
  assert written.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(np.asarray(written.dataobj), label)
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['case_007.nii.gz']


def test_probabilities_sum_to_one_and_agree_with_the_mask(tmp_path):
  label = np.random.default_rng(3).integers(0, 3, SHAPE).astype(np.uint8)
  cases = _case(tmp_path / 'in', 'case_001', [label])
  settings = sw.InferenceSettings(tile_size=SIZE, window=False, tile_batch_size=4)
  volume_prediction.predict_cases(
      _labels_from_input, cases, _config(), settings,
      {'slicing_axis': 2, 'normalization': IDENTITY_CT}, tmp_path / 'out',
      save_probabilities=True, progress=False)
  probabilities = np.load(tmp_path / 'out' / 'case_001.npz')['probabilities']
  assert probabilities.shape == (3, *SHAPE)
  np.testing.assert_allclose(probabilities.sum(0), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(probabilities.argmax(0), label)


def test_normalisation_uses_the_training_statistics(tmp_path):
  # A test volume brighter than the training data: its own z-score would
  # split it at its own mean (~120); the stored CT statistics at 100.
  values = np.random.default_rng(5).uniform(95.0, 145.0, SHAPE)
  cases = _case(tmp_path / 'in', 'bright', [values])
  stored = [{'channel': 0, 'name': 'CT', 'scheme': 'ct', 'mean': 100.0, 'std': 10.0,
             'percentile_00_5': 0.0, 'percentile_99_5': 140.0}]

  def positive(images):  # class 1 where the normalised input is > 0
    x = images[..., 0]
    return jnp.stack([jnp.zeros_like(x), x], axis=-1)

  settings = sw.InferenceSettings(tile_size=SIZE, window=True, tile_batch_size=4)
  volume_prediction.predict_cases(positive, cases, _config(num_classes=2), settings,
                                  {'slicing_axis': 2, 'normalization': stored},
                                  tmp_path / 'out', progress=False)
  got = np.asarray(nib.load(str(tmp_path / 'out' / 'bright.nii.gz')).dataobj)
  np.testing.assert_array_equal(got, (values.astype(np.float32) > 100.0).astype(np.uint8))
  assert (got != (values > values.mean())).any()  # not the volume's own statistics


def _fails(tmp_path, cases_or_inputs, pattern, channels=1):
  settings = sw.InferenceSettings(tile_size=SIZE, window=False, tile_batch_size=4)
  with pytest.raises((DataError, ValueError), match=pattern):
    cases = volumes.prediction_cases(cases_or_inputs, channels)
    volume_prediction.predict_cases(
        _labels_from_input, cases, _config(channels=channels), settings,
        {'slicing_axis': 2, 'normalization': IDENTITY_CT * channels}, tmp_path / 'out',
        progress=False)
  out = tmp_path / 'out'
  assert not out.exists() or not any(out.iterdir())  # no partial file


def test_a_case_with_more_channels_than_the_model(tmp_path):
  label = np.zeros(SHAPE)
  _case(tmp_path / 'in', 'two', [label, label])
  _fails(tmp_path, [tmp_path / 'in'], r'two_0001\.nii\.gz: case .two. has channel 1 but '
         r'the model reads 1 channel')


def test_a_missing_channel_file(tmp_path):
  _case(tmp_path / 'in', 'one', [np.zeros(SHAPE)])
  _fails(tmp_path, [tmp_path / 'in' / 'one_0000.nii.gz'],
         r'one_0001\.nii\.gz: missing: the model reads 2 channel', channels=2)


def test_nan_voxels(tmp_path):
  values = np.zeros(SHAPE)
  values[1, 2, 3] = np.nan
  _case(tmp_path / 'in', 'nan', [values])
  _fails(tmp_path, [tmp_path / 'in'], r'nan_0000\.nii\.gz: 1 voxel\(s\) are NaN')


def test_a_4d_file(tmp_path):
  (tmp_path / 'in').mkdir()
  _save(tmp_path / 'in' / 'four_0000.nii.gz', np.zeros((*SHAPE, 2), np.float32),
        _affine((1, 1, 1)))
  _fails(tmp_path, [tmp_path / 'in'], r'four_0000\.nii\.gz: a 4-D image')


def test_a_file_not_in_nnunet_naming(tmp_path):
  (tmp_path / 'in').mkdir()
  _save(tmp_path / 'in' / 'scan.nii.gz', np.zeros(SHAPE, np.float32), _affine((1, 1, 1)))
  _fails(tmp_path, [tmp_path / 'in'], r'scan\.nii\.gz: not named CASE_XXXX\.nii\.gz')


def test_the_export_refuses_a_volume_workdir(tmp_path):
  config = _config(channels=2)
  config.dataset.data_dir = str(tmp_path / 'data')
  checkpointing.write_weights_checkpoint(
      tmp_path / 'run', config, models.create_model(config.model, seed=0), step=1)
  with pytest.raises(export.ExportError, match='slices of NIfTI volumes'):
    export.restore_members([str(tmp_path / 'run')], 'latest')
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['dataset']['name'] == 'nnunet_raw'
