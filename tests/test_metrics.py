"""`lintunet_jax.metrics` against scikit-learn, on random masks.

Independent check of the one metrics implementation: pixel-level IoU, Dice
(= F1), precision, recall and accuracy equal scikit-learn's to 1e-6; padded
examples are ignored; images whose ground truth and prediction are both
empty are excluded from `iou_per_image` and counted in `empty_images`; the
result does not depend on how the split is cut into batches.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from lintunet_jax import metrics

TOL = 1e-6


def _binary_case(seed, n=7, size=16, empty=(2,)):
  """Random logits and masks; images in `empty` have empty GT and prediction."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, size, size, 1)).astype(np.float32)
  labels = (rng.random((n, size, size)) < rng.uniform(0.1, 0.6, (n, 1, 1))
            ).astype(np.int32)
  for i in empty:
    logits[i] = -5.0
    labels[i] = 0
  return logits, labels


def _accumulate(logits, labels, valid, batch_size, threshold=0.5):
  acc = metrics.MetricAccumulator()
  for start in range(0, len(labels), batch_size):
    sl = slice(start, start + batch_size)
    acc.add(metrics.batch_counts(jnp.asarray(logits[sl]), jnp.asarray(labels[sl]),
                                 jnp.asarray(valid[sl]), threshold=threshold))
  return acc.result()


def _sk_binary(y_true, y_pred):
  t, p = y_true.ravel(), y_pred.ravel()
  kw = dict(zero_division=0)
  return {
      'iou': skm.jaccard_score(t, p, **kw),
      'dice': skm.f1_score(t, p, **kw),
      'precision': skm.precision_score(t, p, **kw),
      'recall': skm.recall_score(t, p, **kw),
      'accuracy': skm.accuracy_score(t, p),
  }


@pytest.mark.parametrize('threshold', [0.5, 0.3])
@pytest.mark.parametrize('batch_size', [1, 3, 7])
def test_binary_matches_sklearn(threshold, batch_size):
  logits, labels = _binary_case(seed=batch_size)
  valid = np.ones(len(labels), np.float32)
  result = _accumulate(logits, labels, valid, batch_size, threshold)
  probs = 1 / (1 + np.exp(-logits[..., 0].astype(np.float64)))
  pred = (probs > threshold).astype(np.int32)
  expected = _sk_binary(labels, pred)
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, abs=TOL), key
  # Per-image IoU: images with both masks empty have no IoU and are excluded.
  per_image = [skm.jaccard_score(labels[i].ravel(), pred[i].ravel(), zero_division=0)
               for i in range(len(labels)) if labels[i].any() or pred[i].any()]
  assert result['iou_per_image'] == pytest.approx(np.mean(per_image), abs=TOL)
  assert result['num_images'] == len(labels)
  assert result['empty_images'] == len(labels) - len(per_image) >= 1


def test_padding_is_ignored():
  logits, labels = _binary_case(seed=11, n=8)
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 0], np.float32)
  # Padding examples carry garbage that would change every metric.
  labels[valid == 0] = 1
  logits[valid == 0] = 4.0
  padded = _accumulate(logits, labels, valid, batch_size=4)
  keep = valid > 0
  alone = _accumulate(logits[keep], labels[keep], valid[keep], batch_size=5)
  assert padded == pytest.approx(alone, abs=TOL)
  assert padded['num_images'] == int(keep.sum())
  expected = _sk_binary(labels[keep], (logits[keep, ..., 0] > 0).astype(np.int32))
  for key, value in expected.items():
    assert padded[key] == pytest.approx(value, abs=TOL), key


def test_empty_mask_convention():
  # Image 0: both empty (excluded); image 1: GT empty, prediction not (IoU 0);
  # image 2: perfect prediction (IoU 1).
  labels = np.zeros((3, 8, 8), np.int32)
  logits = np.full((3, 8, 8, 1), -3.0, np.float32)
  logits[1, :2, :2] = 3.0
  labels[2, 4:, 4:] = 1
  logits[2, 4:, 4:] = 3.0
  result = _accumulate(logits, labels, np.ones(3, np.float32), batch_size=3)
  assert result['iou_per_image'] == pytest.approx(0.5)
  assert result['empty_images'] == 1
  assert result['iou'] == pytest.approx(16 / 20)


def test_all_empty_split_gives_zero_not_nan():
  labels = np.zeros((2, 8, 8), np.int32)
  logits = np.full((2, 8, 8, 1), -3.0, np.float32)
  result = _accumulate(logits, labels, np.ones(2, np.float32), batch_size=2)
  assert result['iou'] == 0.0 and result['iou_per_image'] == 0.0
  assert result['accuracy'] == 1.0 and result['empty_images'] == 2


def test_no_valid_images_raises():
  logits, labels = _binary_case(seed=3, n=2, empty=())
  with pytest.raises(ValueError, match='no images'):
    _accumulate(logits, labels, np.zeros(2, np.float32), batch_size=2)


@pytest.mark.parametrize('num_classes', [3, 4])
def test_multiclass_matches_sklearn(num_classes):
  rng = np.random.default_rng(num_classes)
  n, size = 6, 12
  logits = rng.normal(size=(n, size, size, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(n, size, size)).astype(np.int32)
  valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
  result = _accumulate(logits, labels, valid, batch_size=4)
  keep = valid > 0
  t = labels[keep].ravel()
  p = np.argmax(logits[keep], axis=-1).ravel()
  all_classes = list(range(num_classes))
  fg = all_classes[1:]
  per_class = skm.jaccard_score(t, p, labels=all_classes, average=None, zero_division=0)
  np.testing.assert_allclose(result['iou_per_class'], per_class, atol=TOL)
  assert result['mean_iou'] == pytest.approx(per_class.mean(), abs=TOL)
  kw = dict(labels=fg, average='micro', zero_division=0)
  assert result['iou'] == pytest.approx(skm.jaccard_score(t, p, **kw), abs=TOL)
  assert result['dice'] == pytest.approx(skm.f1_score(t, p, **kw), abs=TOL)
  assert result['precision'] == pytest.approx(skm.precision_score(t, p, **kw), abs=TOL)
  assert result['recall'] == pytest.approx(skm.recall_score(t, p, **kw), abs=TOL)
  assert result['accuracy'] == pytest.approx(skm.accuracy_score(t, p), abs=TOL)
  assert result['num_images'] == int(keep.sum())


def test_binary_two_class_softmax_equals_sigmoid_view():
  """A 2-class softmax model's foreground metrics equal the binary ones."""
  logits, labels = _binary_case(seed=5, n=5, empty=())
  valid = np.ones(len(labels), np.float32)
  binary = _accumulate(logits, labels, valid, batch_size=5)
  two = np.concatenate([np.zeros_like(logits), logits], axis=-1)  # argmax = l > 0
  multi = _accumulate(two, labels, valid, batch_size=5)
  for key in ('iou', 'dice', 'precision', 'recall', 'accuracy', 'iou_per_image'):
    assert multi[key] == pytest.approx(binary[key], abs=TOL), key
  assert multi['iou_per_class'][1] == pytest.approx(binary['iou'], abs=TOL)
