"""Per-case metrics (`lintunet_jax.evaluation.case_metrics`) against an
independent reference and against cases worked out by hand.

The reference shares no code with the module: boundary pixels come from an
explicit loop over each pixel's four neighbours (off the image = outside),
distances from brute-force pairwise Euclidean distances between the
boundary points, the 95th percentile from the linear-interpolation rule
written out, and the counts from scikit-learn's confusion matrix. The
module instead erodes with scipy and reads a distance transform over a
crop, so a wrong structuring element, border value, crop or sampling order
shows up as a mismatch on random masks.

The report's cases file is checked in test_native_resolution.py (against
independently resized masks, inside the eval run that file already makes)
and the CLI flag in test_eval_cli.py.
"""

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from lintunet_jax.evaluation import case_metrics as cm

NAN = float('nan')


# ----------------------------------------------------------------------------
# The independent reference.


def ref_boundary(mask):
  """[n, 2] (y, x) of mask pixels with a 4-neighbour outside mask or image."""
  h, w = mask.shape
  points = []
  for y in range(h):
    for x in range(w):
      if not mask[y, x]:
        continue
      for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = y + dy, x + dx
        if not (0 <= ny < h and 0 <= nx < w) or not mask[ny, nx]:
          points.append((y, x))
          break
  return np.array(points, np.float64).reshape(-1, 2)


def ref_directed(a, b, spacing):
  """Distance from each point of `a` to the nearest point of `b`."""
  diff = (a[:, None, :] - b[None, :, :]) * np.asarray(spacing, np.float64)
  return np.sqrt(np.sum(diff ** 2, axis=-1)).min(axis=1)


def ref_percentile(values, q):
  """Linear interpolation between order statistics at rank q/100 * (n - 1)."""
  v = np.sort(values)
  rank = q / 100 * (len(v) - 1)
  lo = int(math.floor(rank))
  hi = min(lo + 1, len(v) - 1)
  return v[lo] + (rank - lo) * (v[hi] - v[lo])


def reference(predicted, truth, tolerance, spacing=(1.0, 1.0)):
  """One class (bool masks): counts, Dice, IoU, NSD, HD95."""
  c = skm.confusion_matrix(truth.ravel(), predicted.ravel(), labels=[False, True])
  tn, fp, fn, tp = int(c[0, 0]), int(c[0, 1]), int(c[1, 0]), int(c[1, 1])
  out = {'TP': tp, 'FP': fp, 'FN': fn, 'TN': tn, 'n_pred': tp + fp, 'n_ref': tp + fn,
         'Dice': skm.f1_score(truth.ravel(), predicted.ravel(), zero_division=0),
         'IoU': skm.jaccard_score(truth.ravel(), predicted.ravel(), zero_division=0)}
  bp, bt = ref_boundary(predicted), ref_boundary(truth)
  d_pt, d_tp = ref_directed(bp, bt, spacing), ref_directed(bt, bp, spacing)
  out['NSD'] = (np.sum(d_pt <= tolerance) + np.sum(d_tp <= tolerance)) / (len(bp) + len(bt))
  out['HD95'] = max(ref_percentile(d_pt, 95), ref_percentile(d_tp, 95))
  return out


def random_mask(rng, shape):
  """Blobs (ellipses, some cut by the image edge) plus scattered pixels and
  thin lines: many small components and boundaries at the edges."""
  h, w = shape
  yy, xx = np.mgrid[:h, :w]
  mask = rng.random(shape) < 0.03
  for _ in range(rng.integers(1, 4)):
    cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
    ry, rx = rng.uniform(2, h / 2), rng.uniform(2, w / 2)
    mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
  row = rng.integers(h)
  mask[row, rng.integers(w // 2):] = True  # a one-pixel-thin line
  return mask


def _check(got, expected, context):
  for key, value in expected.items():
    if key in cm.COUNTS:
      assert got[key] == value and isinstance(got[key], int), (key, context)
    else:
      assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, context)


# ----------------------------------------------------------------------------
# Random masks against the reference.


@pytest.mark.parametrize('trial', range(4))
def test_binary_random_masks_match_the_brute_force_reference(trial):
  seed = np.random.SeedSequence().entropy
  rng = np.random.default_rng(seed)
  shape = tuple(rng.integers(17, 41, size=2))
  truth = random_mask(rng, shape)
  predicted = random_mask(rng, shape) if trial % 2 else np.roll(truth, rng.integers(1, 4), axis=1)
  for tolerance in (0.0, 1.0, 2.0, 3.5):
    got = cm.case_metrics(predicted.astype(np.int32), truth.astype(np.uint8),
                          num_classes=1, tolerance=tolerance)
    assert list(got) == ['1'] and list(got['1']) == list(cm.METRICS)
    _check(got['1'], reference(predicted, truth, tolerance),
           f'seed {seed}, tolerance {tolerance}')
  expected = reference(predicted, truth, 0.0)
  assert 0 < expected['NSD'] < 1 and expected['HD95'] > 0, seed  # not a degenerate draw


@pytest.mark.parametrize('trial', range(2))
def test_anisotropic_spacing_matches_the_reference(trial):
  seed = np.random.SeedSequence().entropy
  rng = np.random.default_rng(seed)
  truth, predicted = random_mask(rng, (29, 23)), random_mask(rng, (29, 23))
  spacing = (0.5, 1.3)  # (dy, dx): rows closer together than columns
  got = cm.case_metrics(predicted.astype(int), truth.astype(int), num_classes=1,
                        tolerance=1.7, spacing=spacing)['1']
  _check(got, reference(predicted, truth, 1.7, spacing), f'seed {seed}')
  # Swapping the spacing's axes changes the answer (it is not ignored).
  swapped = cm.case_metrics(predicted.astype(int), truth.astype(int), num_classes=1,
                            tolerance=1.7, spacing=spacing[::-1])['1']
  assert swapped['HD95'] == pytest.approx(
      reference(predicted, truth, 1.7, spacing[::-1])['HD95'], rel=1e-6)


def test_multiclass_each_foreground_class_against_the_reference():
  seed = np.random.SeedSequence().entropy
  rng = np.random.default_rng(seed)
  shape = (31, 26)
  truth, predicted = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  for c in (1, 2, 3):  # later classes paint over earlier ones
    truth[random_mask(rng, shape)] = c
    predicted[random_mask(rng, shape)] = c
  got = cm.case_metrics(predicted, truth, num_classes=4, tolerance=2.0)
  assert list(got) == ['1', '2', '3']  # background 0 excluded
  for c in (1, 2, 3):
    _check(got[str(c)], reference(predicted == c, truth == c, 2.0), f'seed {seed}, class {c}')


# ----------------------------------------------------------------------------
# Cases worked out by hand.


def test_identical_masks():
  mask = np.zeros((20, 24), np.int32)
  mask[3:11, 5:17] = 1
  mask[15, 2:20] = 1  # a thin line too
  got = cm.case_metrics(mask, mask.copy(), num_classes=1, tolerance=0.0)['1']
  assert (got['Dice'], got['IoU'], got['NSD'], got['HD95']) == (1.0, 1.0, 1.0, 0.0)
  assert got['FP'] == got['FN'] == 0 and got['TP'] == 8 * 12 + 18


def test_square_shifted_by_three_pixels():
  # A 12x12 square and the same square 3 pixels to the right. Both
  # boundaries have 4 * 11 = 44 pixels; by symmetry both directions have the
  # same distances. From the shifted-away square's boundary to the other's:
  #   top and bottom rows: 3, 2, 1 on the columns left of the overlap, 0 on
  #   the other 9;  left column (rows 1..10): 3 each;  right column (rows
  #   1..10, inside the other square): min(3, row, 11 - row) = 1,2,3,3,3,3,
  #   3,3,2,1.  So 18 zeros, 4 ones, 4 twos and 18 threes.
  truth = np.zeros((30, 30), np.int32)
  truth[5:17, 5:17] = 1
  predicted = np.roll(truth, 3, axis=1)
  for tolerance, nsd in ((0.0, 18 / 44), (1.0, 22 / 44), (2.0, 26 / 44),
                         (2.99, 26 / 44), (3.0, 1.0), (10.0, 1.0)):
    got = cm.case_metrics(predicted, truth, num_classes=1, tolerance=tolerance)['1']
    assert got['NSD'] == pytest.approx(nsd, rel=1e-12), tolerance
  # The 95th percentile of 44 sorted values sits at rank 40.85: both
  # neighbours are threes (ranks 26..43), so HD95 = the shift.
  assert got['HD95'] == 3.0
  assert got['TP'] == 12 * 9 and got['FP'] == got['FN'] == 12 * 3
  assert got['Dice'] == pytest.approx(2 * 108 / (2 * 108 + 72), rel=1e-12)


def test_the_image_edge_counts_as_outside():
  # The whole 5x6 image against its first five columns: the boundaries are
  # the images' outer rings (18 and 16 pixels), there only because the edge
  # counts as outside. Predicted -> truth: the 5 pixels of column 5 are 1
  # away, 13 lie on the truth's ring. Truth -> predicted: column 4's rows
  # 1..3 are 1 away, 13 lie on the predicted ring.
  predicted = np.ones((5, 6), np.int32)
  truth = predicted.copy()
  truth[:, 5] = 0
  got = cm.case_metrics(predicted, truth, num_classes=1, tolerance=0.0)['1']
  assert got['NSD'] == pytest.approx(26 / 34, rel=1e-12)
  assert got['HD95'] == 1.0  # ranks 16.15 of 18 and 14.25 of 16 fall on ones
  assert cm.case_metrics(predicted, truth, num_classes=1, tolerance=1.0)['1']['NSD'] == 1.0
  assert got['Dice'] == pytest.approx(50 / 55, rel=1e-12) and got['TN'] == 0


def test_both_empty_and_one_empty():
  empty = np.zeros((9, 11), np.int32)
  blob = empty.copy()
  blob[2:5, 3:8] = 1
  both = cm.case_metrics(empty, empty, num_classes=1, tolerance=2.0)['1']
  assert all(math.isnan(both[k]) for k in ('Dice', 'IoU', 'NSD', 'HD95'))
  assert both['TN'] == 99 and both['n_pred'] == both['n_ref'] == 0
  missed = cm.case_metrics(empty, blob, num_classes=1, tolerance=2.0)['1']
  assert (missed['Dice'], missed['IoU'], missed['NSD']) == (0.0, 0.0, 0.0)
  assert math.isnan(missed['HD95']) and missed['FN'] == missed['n_ref'] == 15
  extra = cm.case_metrics(blob, empty, num_classes=1, tolerance=2.0)['1']
  assert (extra['Dice'], extra['NSD']) == (0.0, 0.0) and math.isnan(extra['HD95'])
  assert extra['FP'] == 15


def test_bad_masks_are_refused():
  mask = np.zeros((8, 8), np.int32)
  with pytest.raises(ValueError, match=r'differ in shape'):
    cm.case_metrics(mask, np.zeros((8, 9), np.int32), num_classes=1, tolerance=1)
  with pytest.raises(ValueError, match=r'truth holds class ids 0\.\.3, outside 0\.\.2'):
    cm.case_metrics(mask, np.where(np.eye(8) > 0, 3, 0), num_classes=3, tolerance=1)
  with pytest.raises(ValueError, match=r'outside 0\.\.1 \(num_classes=1\)'):  # 0/255 masks
    cm.case_metrics(np.eye(8, dtype=np.uint8) * 255, mask, num_classes=1, tolerance=1)
  with pytest.raises(ValueError, match=r'predicted must be a \[H, W\]'):
    cm.case_metrics(mask[None, None], mask[None, None], num_classes=1, tolerance=1)
  with pytest.raises(ValueError, match=r'integer class ids'):
    cm.case_metrics(mask.astype(float), mask, num_classes=1, tolerance=1)


# ----------------------------------------------------------------------------
# The summary.


def _hand_cases():
  """Three 1x6 cases of a 3-class model. In one-row images every mask pixel
  is a boundary pixel, so distances are column differences."""
  rows = {  # case: (predicted, truth)
      'a': ([1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]),  # class 1 exact, class 2 both empty
      'b': ([1, 1, 0, 0, 0, 0], [1, 0, 2, 2, 0, 0]),  # class 1 one extra pixel; class 2 missed
      'c': ([0, 0, 0, 2, 2, 2], [0, 0, 0, 2, 2, 2]),  # class 1 both empty, class 2 exact
  }
  return [{'case': name, 'index': i,
           'metrics': cm.case_metrics(np.array([p]), np.array([t]), num_classes=3,
                                      tolerance=0.5)}
          for i, (name, (p, t)) in enumerate(rows.items())]


def test_summary_nanmean_and_foreground_mean_by_hand(tmp_path):
  cases = _hand_cases()
  # Case b, class 1: predicted {0, 1}, truth {0}: TP 1, FP 1, Dice 2/3, IoU
  # 1/2; distances predicted->truth [0, 1], truth->predicted [0]: NSD at 0.5
  # = (1 + 1) / 3, HD95 = max(0.95, 0) (rank 0.95 between 0 and 1).
  b1 = cases[1]['metrics']['1']
  assert b1['Dice'] == pytest.approx(2 / 3) and b1['NSD'] == pytest.approx(2 / 3)
  assert b1['HD95'] == pytest.approx(0.95)
  summary = cm.summarize(cases, num_classes=3, tolerance=0.5)
  mean = summary['mean']
  assert list(mean) == ['1', '2']
  # Class 1: cases a, b (c both empty: NaN, left out).
  assert mean['1']['Dice'] == pytest.approx((1 + 2 / 3) / 2)
  assert mean['1']['IoU'] == pytest.approx((1 + 1 / 2) / 2)
  assert mean['1']['NSD'] == pytest.approx((1 + 2 / 3) / 2)
  assert mean['1']['HD95'] == pytest.approx((0 + 0.95) / 2)
  assert mean['1']['TP'] == pytest.approx((2 + 1 + 0) / 3)  # counts: all cases
  assert mean['1']['TN'] == pytest.approx((4 + 4 + 6) / 3)
  # Class 2: a both empty (NaN); b missed (Dice 0, NSD 0, HD95 NaN); c exact.
  assert mean['2']['Dice'] == pytest.approx(0.5) and mean['2']['NSD'] == pytest.approx(0.5)
  assert mean['2']['HD95'] == 0.0  # only c has one
  fg = summary['foreground_mean']
  assert fg['Dice'] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
  assert fg['NSD'] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
  assert fg['HD95'] == pytest.approx(0.95 / 4)
  assert summary['empty_cases'] == {
      '1': {'both_empty': 1, 'reference_empty': 0, 'prediction_empty': 0},
      '2': {'both_empty': 1, 'reference_empty': 0, 'prediction_empty': 1}}
  assert summary['num_cases'] == 3 and summary['tolerance'] == 0.5
  assert summary['spacing'] == [1.0, 1.0] and 'nanmean' in summary['conventions']
  per_case = summary['metric_per_case']
  assert [e['case'] for e in per_case] == ['a', 'b', 'c']
  assert per_case[2]['metrics']['1']['Dice'] is None  # NaN -> null
  assert per_case[1]['metrics']['2']['HD95'] is None and per_case[1]['metrics']['2']['NSD'] == 0
  # Written as strict JSON: no NaN token, read back equal.
  path = cm.write_summary(str(tmp_path / 'sub' / 'cases.json'), summary)
  text = open(path).read()
  # parse_constant sees each NaN / Infinity token, which strict JSON lacks.
  assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == summary


def test_foreground_mean_is_nan_when_a_class_never_appears():
  # nnU-Net averages the class means with np.mean: a class absent from
  # every prediction and reference makes the foreground Dice NaN (null).
  case = {'case': 0, 'metrics': cm.case_metrics(
      np.array([[1, 0]]), np.array([[1, 0]]), num_classes=3, tolerance=1)}
  summary = cm.summarize([case], num_classes=3, tolerance=1)
  assert summary['mean']['1']['Dice'] == 1.0 and summary['mean']['2']['Dice'] is None
  assert summary['foreground_mean']['Dice'] is None
  assert summary['foreground_mean']['TP'] == 0.5
  with pytest.raises(ValueError, match='no metrics for classes'):
    cm.summarize([case], num_classes=4, tolerance=1)
  with pytest.raises(ValueError, match='no cases'):
    cm.summarize([], num_classes=3, tolerance=1)


def test_collector_gathers_every_process_sorted_by_index():
  # Two processes, simulated: this one holds cases 0 and 3, the other 1, 2
  # and 4, with a longer JSON text, so this process's bytes are padded.
  rng = np.random.default_rng(np.random.SeedSequence().entropy)
  masks = [(random_mask(rng, (12, 14)).astype(int), random_mask(rng, (12, 14)).astype(int))
           for _ in range(5)]
  names = [f'scan{i}.png' for i in range(5)]
  mine = cm.CaseCollector(num_classes=1, tolerance=2.0, case_names=names)
  other = cm.CaseCollector(num_classes=1, tolerance=2.0, case_names=names)
  for i, (p, t) in enumerate(masks):
    (mine if i in (0, 3) else other).add(i, p, t)
  other_bytes = np.frombuffer(json.dumps(other._entries).encode(), np.uint8)  # pylint: disable=protected-access
  calls = []

  def allgather(x):  # process_allgather: a new leading process axis
    calls.append(x.dtype)
    if x.dtype == np.int32:
      return np.stack([x, np.array([other_bytes.size], np.int32)])
    theirs = np.zeros_like(x)
    theirs[:other_bytes.size] = other_bytes
    return np.stack([x, theirs])

  gathered = mine.gathered(allgather)
  assert calls == [np.int32, np.uint8]
  assert [e['index'] for e in gathered] == [0, 1, 2, 3, 4]
  assert [e['case'] for e in gathered] == names
  for e, (p, t) in zip(gathered, masks):
    expected = cm.case_metrics(p, t, num_classes=1, tolerance=2.0)['1']
    for key, value in expected.items():
      assert e['metrics']['1'][key] == value or (math.isnan(value) and math.isnan(
          e['metrics']['1'][key])), key
  summary = mine.summary(allgather)
  assert summary['num_cases'] == 5
  # One process: no collective, the cases as added.
  assert [e['index'] for e in mine.gathered()] == [0, 3]
