"""Pictures of what a model does: overlays and training curves (PNG).

Uses matplotlib's object API with the Agg canvas directly (no pyplot, no
global backend switch), so it works headless and never changes the backend
of a program that imports it.

* `save_overlay` / `save_overlays`: one PNG per image with four panels:
  the image, the ground truth over it, the prediction over it, and an error
  map over the dimmed image (binary: true positive green, false positive
  red, false negative blue; multi-class: correct foreground green, wrong
  pixels red).
* `save_comparison`: several models' error maps on the same images, one
  row per image (benchmarks/seed_table.py's disagreements).
* `plot_training_curves`: loss and IoU against step, for train and
  validation, from the training log `DIR/metrics.jsonl` (read with
  `logging_utils.read_metrics`; its `type` field tells train from eval).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lintunet_jax import paths
from lintunet_jax.training import metric_logs as logging_utils

# Class colours (RGB 0..1) for masks; class 0 (background) is never drawn.
_CLASS_COLOURS = np.array([
    (0.0, 0.0, 0.0), (1.0, 0.85, 0.0), (0.0, 0.8, 1.0), (1.0, 0.3, 0.9),
    (0.3, 1.0, 0.3), (1.0, 0.5, 0.1), (0.6, 0.4, 1.0), (0.9, 0.9, 0.9),
])
_TP, _FP, _FN = (0.1, 0.85, 0.1), (0.95, 0.1, 0.1), (0.15, 0.35, 1.0)
_ALPHA = 0.45


def _display_image(image: np.ndarray) -> np.ndarray:
  """float RGB [H, W, 3] in 0..1 from any [H, W] / [H, W, C] image.

  A multi-channel float image (a normalised volume slice of C modalities,
  C not 1 or 3) shows its first channel, windowed to its 0.5..99.5
  percentiles so one bright voxel does not turn the rest black; other
  images their own min..max, as always.
  """
  image = np.asarray(image)
  volume_slice = (np.issubdtype(image.dtype, np.floating) and image.ndim == 3
                  and image.shape[-1] not in (1, 3))
  image = np.asarray(image, np.float64)
  if image.ndim == 3 and (image.shape[-1] == 1 or volume_slice):
    image = image[..., 0]
  if image.ndim == 3:
    image = image[..., :3]
  finite = np.isfinite(image)
  low = image[finite].min() if finite.any() else 0.0
  high = image[finite].max() if finite.any() else 1.0
  if volume_slice and finite.any():
    low, high = np.percentile(image[finite], (0.5, 99.5))
  scaled = (np.where(finite, image, low) - low) / (high - low) if high > low \
      else np.zeros_like(image)
  if scaled.ndim == 2:
    scaled = np.repeat(scaled[..., None], 3, axis=-1)
  return np.clip(scaled, 0.0, 1.0)


def _class_colours(num_classes: int) -> np.ndarray:
  if num_classes <= len(_CLASS_COLOURS):
    return _CLASS_COLOURS
  rng = np.random.default_rng(0)
  extra = rng.uniform(0.2, 1.0, (num_classes - len(_CLASS_COLOURS), 3))
  return np.concatenate([_CLASS_COLOURS, extra])


def blend_mask(rgb: np.ndarray, mask: np.ndarray, num_classes: int = 2,
               alpha: float = _ALPHA) -> np.ndarray:
  """`rgb` with every non-zero class of `mask` tinted in its colour."""
  mask = np.asarray(mask, np.int64)
  colours = _class_colours(max(num_classes, int(mask.max(initial=0)) + 1))
  out = rgb.copy()
  fg = mask > 0
  out[fg] = (1 - alpha) * rgb[fg] + alpha * colours[mask[fg]]
  return out


def error_map(label: np.ndarray, prediction: np.ndarray,
              num_classes: int = 2) -> np.ndarray:
  """RGB error map: binary TP/FP/FN colours; multi-class wrong pixels red."""
  label, prediction = np.asarray(label), np.asarray(prediction)
  out = np.zeros((*label.shape, 3))
  if num_classes <= 2:
    out[(label > 0) & (prediction > 0)] = _TP
    out[(label == 0) & (prediction > 0)] = _FP
    out[(label > 0) & (prediction == 0)] = _FN
  else:
    out[(label > 0) & (label == prediction)] = _TP
    out[label != prediction] = _FP
  return out


def image_iou(label: np.ndarray, prediction: np.ndarray) -> float | None:
  """Foreground IoU of one image (None when both masks are empty)."""
  t, p = np.asarray(label) > 0, np.asarray(prediction) > 0
  union = np.logical_or(t, p).sum()
  return float(np.logical_and(t, p).sum() / union) if union else None


def save_overlay(path: str | os.PathLike, image: np.ndarray,
                 label: np.ndarray | None, prediction: np.ndarray, *,
                 num_classes: int = 2, title: str | None = None) -> str:
  """Writes one overlay PNG (image | ground truth | prediction | errors).

  With `label=None` (new images, no ground truth) only the image and the
  prediction are drawn. Returns the path written.
  """
  rgb = _display_image(image)
  panels = [('image', rgb)]
  if label is not None:
    panels.append(('ground truth', blend_mask(rgb, label, num_classes)))
  panels.append(('prediction', blend_mask(rgb, prediction, num_classes)))
  if label is not None:
    iou = image_iou(label, prediction)
    name = 'errors' if num_classes > 2 else 'errors (TP green, FP red, FN blue)'
    errors = error_map(label, prediction, num_classes)
    # Coloured pixels over the dimmed image, so errors keep their anatomy.
    errors = np.where(errors.any(axis=-1, keepdims=True), errors, 0.3 * rgb)
    panels.append((f'{name}\nIoU {"n/a (both empty)" if iou is None else f"{iou:.3f}"}',
                   errors))
  fig = Figure(figsize=(3.0 * len(panels), 3.4), dpi=100)
  FigureCanvasAgg(fig)
  for i, (name, panel) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    ax.imshow(panel, interpolation='nearest')
    ax.set_title(name, fontsize=9)
    ax.axis('off')
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
  """Renders `fig` as PNG to `path` (local or gs://); returns the path."""
  path = os.fspath(path)
  paths.check(path, 'picture path').parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  paths.write_bytes(path, buffer.getvalue())
  return path


def save_comparison(path: str | os.PathLike,
                    cases: Sequence[tuple[str, np.ndarray, np.ndarray,
                                          dict[str, np.ndarray]]],
                    *, num_classes: int = 2, title: str | None = None) -> str:
  """One PNG comparing models on the same images, one row per case.

  `cases`: (row title, image, ground truth, {model name: prediction}), all
  at the image's size. Columns: the image, the ground truth over it, then
  each model's error map (as in `save_overlay`) with its IoU on the image.
  """
  names = list(cases[0][3]) if cases else []
  columns = 2 + len(names)
  fig = Figure(figsize=(2.6 * columns, 2.8 * max(len(cases), 1)), dpi=100)
  FigureCanvasAgg(fig)
  for r, (row_title, image, label, predictions) in enumerate(cases):
    rgb = _display_image(image)
    panels = [(row_title, rgb), ('ground truth', blend_mask(rgb, label, num_classes))]
    for name in names:
      errors = error_map(label, predictions[name], num_classes)
      errors = np.where(errors.any(axis=-1, keepdims=True), errors, 0.3 * rgb)
      iou = image_iou(label, predictions[name])
      panels.append((f'{name}\nIoU {"n/a" if iou is None else f"{iou:.3f}"}',
                     errors))
    for c, (name, panel) in enumerate(panels):
      ax = fig.add_subplot(len(cases), columns, r * columns + c + 1)
      ax.imshow(panel, interpolation='nearest')
      ax.set_title(name, fontsize=8)
      ax.axis('off')
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)


def save_overlays(out_dir: str | os.PathLike, images: np.ndarray,
                  labels: np.ndarray | None, predictions: np.ndarray, *,
                  names: Sequence[str] | None = None, num_classes: int = 2,
                  prefix: str = 'overlay') -> list[str]:
  """One overlay PNG per image in `out_dir`; returns the paths written."""
  paths = []
  for i in range(len(predictions)):
    name = names[i] if names is not None else f'{i:04d}'
    path = epath.Path(out_dir) / f'{prefix}-{name}.png'
    paths.append(save_overlay(path, images[i],
                              None if labels is None else labels[i],
                              predictions[i], num_classes=num_classes,
                              title=f'{prefix} {name}'))
  return paths


# ----------------------------------------------------------------------------
# Training curves from DIR/metrics.jsonl.

# The training log's record types (metric_logs, docs/training.md) that hold
# a curve: 'train' records the training loss, 'eval' records the validation
# metrics of config.dataset.eval_split, whatever that split is called
# ('validation', 'test', 'train[90%:]', ...). Other types ('compile',
# 'resume') hold no curve.
_CURVES = {'train': 'train', 'eval': 'validation'}


def _number(value) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def training_series(records: Iterable[dict[str, Any]],
                    metrics: Sequence[str] = ('loss', 'iou')
                    ) -> dict[str, dict[str, list[tuple[float, float]]]]:
  """{metric: {'train'|'validation': [(step, value), ...]}} from the records
  of DIR/metrics.jsonl (`metric_logs.read_metrics`).

  A record's `type` says which curve it belongs to (`_CURVES`); its `split`
  is only the name of the evaluated split. Non-finite values (written as
  strings) are left out.
  """
  series: dict[str, dict[str, list[tuple[float, float]]]] = {
      m: {'train': [], 'validation': []} for m in metrics}
  for record in records:
    curve = _CURVES.get(record.get('type'))
    step = _number(record.get('step'))
    if curve is None or step is None:
      continue
    for metric in metrics:
      value = _number(record.get(metric))
      if value is not None:
        series[metric][curve].append((step, value))
  for per_phase in series.values():
    for phase in per_phase:
      per_phase[phase].sort()
  return series


def _eval_splits(records: Iterable[dict[str, Any]]) -> list[str]:
  """Names of the splits the 'eval' records evaluated, in order of appearance."""
  names: list[str] = []
  for record in records:
    split = record.get('split')
    if record.get('type') == 'eval' and split is not None and split not in names:
      names.append(str(split))
  return names


def plot_training_curves(workdir: str | os.PathLike, out_path: str | os.PathLike,
                         metrics: Sequence[str] = ('loss', 'iou'),
                         title: str | None = None) -> str:
  """PNG of loss and IoU vs step, train and validation, from DIR/metrics.jsonl.

  Raises FileNotFoundError if the log is missing and ValueError if it holds
  no train or validation values of the requested metrics.
  """
  log_path = epath.Path(workdir) / logging_utils.METRICS_FILE
  if not log_path.exists():
    raise FileNotFoundError(f'no training log at {log_path}')
  records = logging_utils.read_metrics(os.fspath(workdir))
  series = training_series(records, metrics)
  splits = _eval_splits(records)
  labels = {'train': 'train',
            'validation': ('validation' if splits in ([], ['validation'])
                           else f'validation ({", ".join(splits)})')}
  if not any(points for per in series.values() for points in per.values()):
    raise ValueError(f'{log_path} has no train or validation values of '
                     f'{", ".join(metrics)}')
  fig = Figure(figsize=(5.0 * len(metrics), 3.8), dpi=100)
  FigureCanvasAgg(fig)
  styles = {'train': dict(color='tab:blue', marker=None, linewidth=1.2),
            'validation': dict(color='tab:orange', marker='o', markersize=3,
                               linewidth=1.5)}
  for i, metric in enumerate(metrics):
    ax = fig.add_subplot(1, len(metrics), i + 1)
    for phase, points in series[metric].items():
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=labels[phase], **styles[phase])
    ax.set_xlabel('step')
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(True, alpha=0.3)
    if any(series[metric].values()):
      ax.legend()
    else:
      ax.text(0.5, 0.5, 'not logged', ha='center', va='center',
              transform=ax.transAxes)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return save_figure(fig, out_path)
