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
                 *, threshold: float = 0.5,
                 region: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-class counts of one batch, padding examples (valid=0) ignored.

  logits: [B, H, W, C]; labels: int [B, H, W]; valid: [B] 0/1; region:
  optional 0/1 [B, H, W], the pixels that show the image (0 on the canvas
  that `resize='pad'` adds, which is never counted). Returns the
  `class_counts` of the thresholded logits.
  """
  return class_counts(predict_classes(logits, threshold), labels, valid,
                      num_classes=logits.shape[-1], region=region)


def class_counts(predicted, labels, valid, *, num_classes: int, region=None,
                 xp=jnp) -> dict:
  """Per-class counts from class-id masks: the one counting rule.

  predicted, labels: int [B, H, W]; valid: [B] 0/1; region: optional 0/1
  [B, H, W] of the pixels to count (None: all). `num_classes` is the
  model's (1: binary, whose reported class is the foreground 1). `xp` is
  the array module: jax.numpy inside the jitted eval step, numpy on the
  host for masks brought back to each image's own size (whose sizes
  differ, so they are counted one image at a time).

  Returns int32 [K] counts per reported class (K=1 for binary models: the
  foreground; K=C otherwise), float32 [K] per-image IoU sums, int32 [K]
  per-image IoU counts and an int32 scalar image count.
  """
  classes = xp.arange(1, 2) if num_classes == 1 else xp.arange(num_classes)
  pred_1h = predicted[..., None] == classes  # [B,H,W,K]
  true_1h = labels[..., None].astype(xp.int32) == classes
  if region is None:
    pixels = labels.shape[1] * labels.shape[2]
  else:
    inside = (region > 0)[..., None]
    pred_1h, true_1h = pred_1h & inside, true_1h & inside
    pixels = xp.sum(region > 0, axis=(1, 2), dtype=xp.int32)[:, None]
  weight = (valid > 0)[:, None]  # [B,1]
  inter = xp.sum(pred_1h & true_1h, axis=(1, 2), dtype=xp.int32)  # [B,K]
  pred_sum = xp.sum(pred_1h, axis=(1, 2), dtype=xp.int32)
  true_sum = xp.sum(true_1h, axis=(1, 2), dtype=xp.int32)
  union = pred_sum + true_sum - inter
  per_image = dict(tp=inter, fp=pred_sum - inter, fn=true_sum - inter,
                   tn=pixels - union)
  counts = {k: xp.sum(xp.where(weight, v, 0), axis=0, dtype=xp.int32)
            for k, v in per_image.items()}
  has_iou = weight & (union > 0)
  image_iou = inter / xp.maximum(union, 1)
  counts['iou_image_sum'] = xp.sum(xp.where(has_iou, image_iou, 0.0), axis=0,
                                   dtype=xp.float32)
  counts['iou_image_count'] = xp.sum(has_iou, axis=0, dtype=xp.int32)
  counts['num_images'] = xp.sum(valid > 0, dtype=xp.int32)
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
