"""Per-case metrics of 3-D volumes in millimetres, against MONAI's own
surface Dice, HD95, Dice and IoU on fresh random volumes with anisotropic
spacing and several classes; the empty-mask conventions by hand. The 2-D
metrics keep their own tests (test_case_metrics.py), unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lintunet_jax.evaluation import case_metrics as cm
from tests.optional_deps import require

torch = require('torch')
monai_metrics = require('monai.metrics')

SPACING = (0.7, 0.9, 3.0)  # mm per voxel along each array axis
SHAPE = (24, 20, 9)
CLASSES = 3


def _blobs(rng, shift=0):
  """Class ids 0..2 of smoothed noise: irregular, multi-part structures."""
  noise = ndimage.gaussian_filter(rng.normal(size=SHAPE), sigma=(2.5, 2.5, 1.0))
  noise = np.roll(noise, shift, axis=0)
  low, high = np.quantile(noise, [0.7, 0.9])
  return np.where(noise > high, 2, np.where(noise > low, 1, 0)).astype(np.int64)


def _onehot(mask):
  return torch.from_numpy(np.eye(CLASSES, dtype=np.float32)[mask]).permute(3, 0, 1, 2)[None]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_3d_metrics_equal_monais(seed):
  rng = np.random.default_rng(seed)
  truth = _blobs(rng)
  predicted = truth.copy()
  predicted[ndimage.binary_dilation(truth == 1, iterations=1) & (truth == 0)] = 1
  predicted = np.where(rng.random(SHAPE) < 0.03, rng.integers(0, CLASSES, SHAPE), predicted)
  tolerance = 2.0  # mm
  ours = cm.case_metrics(predicted, truth, num_classes=CLASSES, tolerance=tolerance,
                         spacing=SPACING)
  y_pred, y = _onehot(predicted), _onehot(truth)
  nsd = monai_metrics.compute_surface_dice(
      y_pred, y, class_thresholds=[tolerance] * (CLASSES - 1), include_background=False,
      spacing=list(SPACING)).numpy()[0]
  hd95 = monai_metrics.compute_hausdorff_distance(
      y_pred, y, include_background=False, percentile=95, spacing=list(SPACING)).numpy()[0]
  dice = monai_metrics.compute_dice(y_pred, y, include_background=False).numpy()[0]
  iou = monai_metrics.compute_iou(y_pred, y, include_background=False).numpy()[0]
  for k, c in enumerate(('1', '2')):
    assert ours[c]['Dice'] == pytest.approx(float(dice[k]), abs=1e-6)
    assert ours[c]['IoU'] == pytest.approx(float(iou[k]), abs=1e-6)
    assert ours[c]['NSD'] == pytest.approx(float(nsd[k]), rel=1e-4)
    assert ours[c]['HD95'] == pytest.approx(float(hd95[k]), rel=1e-4)
    t, p = truth == int(c), predicted == int(c)
    assert (ours[c]['TP'], ours[c]['FP'], ours[c]['FN']) == (
        int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum()))
  # Millimetres, not voxels: the same masks in voxel units differ.
  in_voxels = cm.case_metrics(predicted, truth, num_classes=CLASSES, tolerance=tolerance)
  assert in_voxels['1']['HD95'] != pytest.approx(ours['1']['HD95'], rel=1e-3)


def test_empty_masks_follow_the_stated_convention():
  truth = np.zeros(SHAPE, np.int64)
  truth[5:9, 4:8, 2:5] = 1
  empty = np.zeros_like(truth)
  missed = cm.case_metrics(empty, truth, num_classes=2, tolerance=1.0, spacing=SPACING)['1']
  invented = cm.case_metrics(truth, empty, num_classes=2, tolerance=1.0, spacing=SPACING)['1']
  neither = cm.case_metrics(empty, empty, num_classes=2, tolerance=1.0, spacing=SPACING)['1']
  for one_empty in (missed, invented):  # Dice 0, NSD 0, HD95 NaN (MONAI: inf/nan)
    assert (one_empty['Dice'], one_empty['IoU'], one_empty['NSD']) == (0.0, 0.0, 0.0)
    assert np.isnan(one_empty['HD95'])
  assert all(np.isnan(neither[k]) for k in ('Dice', 'IoU', 'NSD', 'HD95'))


def test_a_shifted_cube_by_hand():
  # A cube moved by one voxel along the 3 mm axis: no boundary voxel is
  # farther than 3 mm from the other surface and some are exactly 3 mm
  # away, so HD95 is 3 mm and NSD at a 3 mm tolerance is 1.
  truth = np.zeros(SHAPE, np.int64)
  truth[6:14, 5:13, 2:6] = 1
  predicted = np.roll(truth, 1, axis=2)
  m = cm.case_metrics(predicted, truth, num_classes=2, tolerance=3.0, spacing=SPACING)['1']
  assert m['HD95'] == pytest.approx(3.0)
  assert m['NSD'] == pytest.approx(1.0)
  assert m['Dice'] == pytest.approx(2 * 8 * 8 * 3 / (2 * 8 * 8 * 4))


def test_spacing_must_match_the_dimensions():
  volume = np.zeros(SHAPE, np.int64)
  with pytest.raises(ValueError, match=r'spacing must be 3 positive numbers'):
    cm.case_metrics(volume, volume, num_classes=2, tolerance=1.0, spacing=(1.0, 1.0))
