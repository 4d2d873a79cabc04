"""Per-volume Dice, IoU and voxel counts against nnU-Net v2's own evaluation.

The volumes go through files both ways, as in use: written with the writer
predict.py uses (volume_prediction.nifti_bytes, an oblique anisotropic
affine), read back by nnU-Net's SimpleITK reader for its `compute_metrics`
and `compute_metrics_on_folder`, and by our nibabel reader for ours. So a
wrong count, a different NaN convention, a mean taken over the wrong cases,
or a written volume that another reader sees differently (axes, spacing)
fails here. The surface metrics have MONAI as their reference
(test_case_metrics_3d.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
import nibabel as nib

from lintunet_jax.evaluation import case_metrics as cm
from lintunet_jax.evaluation import volume_prediction
from tests.optional_deps import require

SPACING = (0.7, 0.9, 3.0)  # mm per voxel along each array axis
SHAPE = (26, 22, 9)
CLASSES = 4  # background and 3 foreground classes
LABELS = [1, 2, 3]
# Rotated 20 degrees about the slicing axis, x flipped, moved: an oblique
# scan, so a reader that assumed an axis-aligned affine would show it.
_ANGLE = np.deg2rad(20.0)
_ROTATION = np.array([[np.cos(_ANGLE), -np.sin(_ANGLE), 0.0],
                      [np.sin(_ANGLE), np.cos(_ANGLE), 0.0],
                      [0.0, 0.0, 1.0]]) @ np.diag([-1.0, 1.0, 1.0])
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROTATION @ np.diag(SPACING)
AFFINE[:3, 3] = (12.5, -40.0, 7.25)
COUNTS_AND_OVERLAP = ('Dice', 'IoU', 'TP', 'FP', 'FN', 'TN', 'n_pred', 'n_ref')


@pytest.fixture(scope='module')
def nnunet():
  """nnU-Net's evaluation module and a SimpleITK reader of its own."""
  evaluation = require('nnunetv2.evaluation.evaluate_predictions')
  readers = require('nnunetv2.imageio.simpleitk_reader_writer')
  return evaluation, readers.SimpleITKIO()


def _blobs(rng):
  """Class ids 0..3 of smoothed noise: irregular, multi-part structures."""
  noise = ndimage.gaussian_filter(rng.normal(size=SHAPE), sigma=(2.5, 2.5, 1.0))
  cuts = np.quantile(noise, [0.6, 0.75, 0.9])
  return np.digitize(noise, cuts).astype(np.int64)


def _disturbed(rng, truth):
  """A prediction: class 1 grown by a voxel, 4% of voxels relabelled."""
  predicted = truth.copy()
  predicted[ndimage.binary_dilation(truth == 1) & (truth == 0)] = 1
  noisy = rng.random(SHAPE) < 0.04
  predicted[noisy] = rng.integers(0, CLASSES, SHAPE)[noisy]
  return predicted


def _write(path, labels):
  header = nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE).header
  path.write_bytes(volume_prediction.nifti_bytes(labels, AFFINE, header))
  return str(path)


def _read(path):
  """Our side reads the files back as predict.py's users would: nibabel."""
  image = nib.load(path)
  return np.asarray(image.dataobj).astype(np.int64), image.header.get_zooms()


def _ours(pred_file, ref_file):
  (predicted, spacing), (truth, _) = _read(pred_file), _read(ref_file)
  return cm.case_metrics(predicted, truth, num_classes=CLASSES, tolerance=2.0,
                         spacing=spacing)


def _assert_equal(ours, theirs, context):
  for label in LABELS:
    for metric in COUNTS_AND_OVERLAP:
      got, expected = ours[str(label)][metric], float(theirs[label][metric])
      where = f'{context}, class {label}, {metric}'
      if np.isnan(expected):
        assert np.isnan(got), f'{where}: {got} but nnU-Net NaN'
      elif metric in ('Dice', 'IoU'):
        assert got == pytest.approx(expected, abs=1e-6), where
      else:
        assert got == expected, where


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_volumes_equal_nnunets_compute_metrics(nnunet, tmp_path, seed):
  evaluation, reader = nnunet
  rng = np.random.default_rng(seed)
  truth = _blobs(rng)
  ref = _write(tmp_path / 'ref.nii.gz', truth)
  pred = _write(tmp_path / 'pred.nii.gz', _disturbed(rng, truth))
  theirs = evaluation.compute_metrics(ref, pred, reader, LABELS)['metrics']
  ours = _ours(pred, ref)
  _assert_equal(ours, theirs, f'seed {seed}')
  assert 0.3 < ours['1']['Dice'] < 0.99  # neither trivial nor hopeless
  # SimpleITK sees the written geometry as nibabel does (its axes reversed).
  _, properties = reader.read_seg(pred)
  np.testing.assert_allclose(properties['spacing'], SPACING[::-1], rtol=1e-6)


def test_empty_classes_follow_nnunets_conventions(nnunet, tmp_path):
  evaluation, reader = nnunet
  rng = np.random.default_rng(7)
  truth = _blobs(rng)
  predicted = _disturbed(rng, truth)
  predicted[predicted == 1] = 0  # class 1: the prediction is empty
  truth[truth == 2] = 0          # class 2: the reference is empty
  truth[truth == 3] = 0          # class 3: both are empty
  predicted[predicted == 3] = 0
  ref = _write(tmp_path / 'ref.nii.gz', truth)
  pred = _write(tmp_path / 'pred.nii.gz', predicted)
  theirs = evaluation.compute_metrics(ref, pred, reader, LABELS)['metrics']
  ours = _ours(pred, ref)
  _assert_equal(ours, theirs, 'empty classes')
  assert (ours['1']['Dice'], ours['2']['Dice']) == (0.0, 0.0)
  assert np.isnan(ours['3']['Dice']) and np.isnan(ours['3']['IoU'])
  # The surface metrics (nnU-Net has none): stated in CONVENTIONS.
  for one_empty in (ours['1'], ours['2']):
    assert one_empty['NSD'] == 0.0 and np.isnan(one_empty['HD95'])
  assert np.isnan(ours['3']['NSD']) and np.isnan(ours['3']['HD95'])


def test_summary_means_equal_nnunets_folder_summary(nnunet, tmp_path):
  """Means over volumes skip NaN cases per class (np.nanmean); the
  foreground mean is a plain mean over classes, as in nnU-Net's summary."""
  evaluation, reader = nnunet
  (tmp_path / 'ref').mkdir()
  (tmp_path / 'pred').mkdir()
  cases = []
  for i in range(4):
    rng = np.random.default_rng(100 + i)
    truth = _blobs(rng)
    predicted = _disturbed(rng, truth)
    if i == 1:  # class 3 absent from both: NaN, skipped in its mean
      truth[truth == 3], predicted[predicted == 3] = 0, 0
    if i == 2:  # class 2 missed entirely: Dice 0, counted
      predicted[predicted == 2] = 0
    name = f'case_{i:03d}.nii.gz'
    ref = _write(tmp_path / 'ref' / name, truth)
    pred = _write(tmp_path / 'pred' / name, predicted)
    cases.append({'case': f'case_{i:03d}', 'metrics': _ours(pred, ref)})
  theirs = evaluation.compute_metrics_on_folder(
      str(tmp_path / 'ref'), str(tmp_path / 'pred'), str(tmp_path / 'summary.json'),
      reader, '.nii.gz', LABELS, num_processes=1)
  ours = cm.summarize(cases, num_classes=CLASSES, tolerance=2.0, spacing=SPACING)
  assert [c['prediction_file'].rsplit('/', 1)[-1] for c in theirs['metric_per_case']] == [
      f'{c["case"]}.nii.gz' for c in cases]
  for label in LABELS:
    for metric in COUNTS_AND_OVERLAP:
      assert ours['mean'][str(label)][metric] == pytest.approx(
          theirs['mean'][label][metric], rel=1e-9, abs=1e-9), (label, metric)
  for metric in COUNTS_AND_OVERLAP:
    assert ours['foreground_mean'][metric] == pytest.approx(
        theirs['foreground_mean'][metric], rel=1e-9, abs=1e-9), metric
  # The NaN case was skipped, not counted as 0: class 3's mean is over 3.
  dice3 = [c['metrics']['3']['Dice'] for c in cases]
  assert np.isnan(dice3[1])
  assert ours['mean']['3']['Dice'] == pytest.approx(np.mean([dice3[0], *dice3[2:]]))
