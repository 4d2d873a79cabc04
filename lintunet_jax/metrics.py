"""Segmentation metrics over a whole split, from exact pixel counts.

The seed averaged per-batch scores, which weights a batch of small tumours
like a batch of large ones and depends on the batch size. Here every batch
contributes integer counts (true/false positives/negatives per class, and
per-image IoU sums), computed on the device inside the jitted eval step and
summed across devices; the host adds them up in int64 and divides once.

Conventions (stated in every report via `CONVENTIONS`):
* binary models (num_classes=1): class 1 is "foreground = prob > threshold";
  `iou`, `dice`, `precision`, `recall` are for the foreground.
* multi-class models: a pixel's class is the argmax; per-class IoU and the
  mean over classes are reported, and the headline metrics are the
  foreground classes' (1..C-1) micro-averages.
* `iou` is dataset level: summed intersections / summed unions.
* `iou_per_image` is the mean of per-image IoUs over images whose ground
  truth or prediction is non-empty: an image with both empty is excluded
  (it has no IoU), and counted in `empty_images`.
* a ratio with a zero denominator (e.g. precision with no positive
  prediction) is 0.0, as scikit-learn's zero_division=0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

CONVENTIONS = (
    'iou = sum(intersection)/sum(union) over the split; iou_per_image = mean '
    'of per-image IoU over images where ground truth or prediction is '
    'non-empty (both empty: excluded, counted in empty_images); 0/0 ratios '
    'are 0.0; multi-class headline metrics micro-average the foreground '
    'classes 1..C-1.')

COUNT_KEYS = ('tp', 'fp', 'fn', 'tn', 'iou_image_sum', 'iou_image_count',
              'num_images')


def predict_classes(logits: jax.Array, threshold: float = 0.5) -> jax.Array:
  """int32 [B, H, W] class ids from logits [B, H, W, C] (C=1: sigmoid)."""
  if logits.shape[-1] == 1:
    return (jax.nn.sigmoid(logits[..., 0].astype(jnp.float32)) > threshold
            ).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def batch_counts(logits: jax.Array, labels: jax.Array, valid: jax.Array,
                 *, threshold: float = 0.5) -> dict[str, jax.Array]:
  """Per-class counts of one batch, padding examples (valid=0) ignored.

  logits: [B, H, W, C]; labels: int [B, H, W]; valid: [B] 0/1.
  Returns int32 [K] counts per reported class (K=1 for binary models: the
  foreground; K=C otherwise), float32 [K] per-image IoU sums, int32 [K]
  per-image IoU counts and an int32 scalar image count.
  """
  predicted = predict_classes(logits, threshold)
  classes = jnp.arange(1, 2) if logits.shape[-1] == 1 else jnp.arange(logits.shape[-1])
  pred_1h = predicted[..., None] == classes  # [B,H,W,K]
  true_1h = labels[..., None].astype(jnp.int32) == classes
  weight = (valid > 0)[:, None]  # [B,1]
  inter = jnp.sum(pred_1h & true_1h, axis=(1, 2), dtype=jnp.int32)  # [B,K]
  pred_sum = jnp.sum(pred_1h, axis=(1, 2), dtype=jnp.int32)
  true_sum = jnp.sum(true_1h, axis=(1, 2), dtype=jnp.int32)
  union = pred_sum + true_sum - inter
  pixels = labels.shape[1] * labels.shape[2]
  per_image = dict(tp=inter, fp=pred_sum - inter, fn=true_sum - inter,
                   tn=pixels - union)
  counts = {k: jnp.sum(jnp.where(weight, v, 0), axis=0) for k, v in per_image.items()}
  has_iou = weight & (union > 0)
  image_iou = inter / jnp.maximum(union, 1)
  counts['iou_image_sum'] = jnp.sum(jnp.where(has_iou, image_iou, 0.0), axis=0,
                                    dtype=jnp.float32)
  counts['iou_image_count'] = jnp.sum(has_iou, axis=0, dtype=jnp.int32)
  counts['num_images'] = jnp.sum(valid > 0, dtype=jnp.int32)
  return counts


def _ratio(num, den) -> float:
  return float(num / den) if den > 0 else 0.0


@dataclasses.dataclass
class MetricAccumulator:
  """Host-side int64/float64 running sums of `batch_counts` outputs."""

  totals: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def add(self, counts: dict[str, jax.Array]) -> None:
    for key in COUNT_KEYS:
      value = np.asarray(counts[key])
      value = value.astype(np.float64 if key == 'iou_image_sum' else np.int64)
      self.totals[key] = self.totals.get(key, 0) + value

  def result(self) -> dict[str, float | int | list[float]]:
    return compute_metrics(self.totals)


def compute_metrics(totals: dict[str, np.ndarray]) -> dict:
  """Metrics from summed counts; see the module docstring for conventions."""
  if not totals or int(totals['num_images']) == 0:
    raise ValueError('no images were evaluated (empty split?)')
  tp, fp, fn, tn = (np.asarray(totals[k], np.int64) for k in ('tp', 'fp', 'fn', 'tn'))
  iou_sum = np.asarray(totals['iou_image_sum'], np.float64)
  iou_count = np.asarray(totals['iou_image_count'], np.int64)
  num_images = int(totals['num_images'])
  multiclass = tp.size > 1
  fg = slice(1, None) if multiclass else slice(None)
  TP, FP, FN = tp[fg].sum(), fp[fg].sum(), fn[fg].sum()
  total_pixels = tp[0] + fp[0] + fn[0] + tn[0]
  correct = tp.sum() if multiclass else tp[0] + tn[0]
  result = {
      'iou': _ratio(TP, TP + FP + FN),
      'iou_per_image': _ratio(iou_sum[fg].sum(), iou_count[fg].sum()),
      'dice': _ratio(2 * TP, 2 * TP + FP + FN),
      'precision': _ratio(TP, TP + FP),
      'recall': _ratio(TP, TP + FN),
      'accuracy': _ratio(correct, total_pixels),
      'num_images': num_images,
      'empty_images': int(num_images - iou_count[fg].max(initial=0)) if not multiclass
                      else None,
  }
  if multiclass:
    per_class = [_ratio(tp[c], tp[c] + fp[c] + fn[c]) for c in range(tp.size)]
    result['iou_per_class'] = per_class
    result['mean_iou'] = float(np.mean(per_class))
    del result['empty_images']
  return result
