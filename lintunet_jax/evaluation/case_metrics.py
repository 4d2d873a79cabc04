"""Per-case metrics in nnU-Net's `summary.json` layout, with boundary metrics.

The split-level numbers of the report (`lintunet_jax.metrics`) add pixels
over the whole split; medical-imaging users compare models per case
(image), as nnU-Net's `summary.json` does, and for thin structures they
look at the boundary: normalized surface Dice (NSD) and the 95th
percentile Hausdorff distance (HD95). This module computes them on the
host with NumPy and `scipy.ndimage`, one image at a time at its own size:

  case_metrics(predicted, truth, num_classes=, tolerance=)  one image
  summarize(cases, num_classes=, tolerance=)   nnU-Net's summary layout
  write_summary(path, summary)                 valid JSON (NaN -> null)
  CaseCollector                                collects cases during an
                                               evaluation, gathers them
                                               from every process

Conventions (also in every summary's `conventions`, docs/evaluation.md):

* Classes: 1 for binary models (num_classes == 1, masks 0/1), else
  1..num_classes-1; the background 0 is not evaluated (nnU-Net's
  foreground labels).
* Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN): NaN when the
  prediction and the reference are both empty (nnU-Net), so `mean`
  (a nanmean over cases) leaves such cases out.
* Boundary of a mask: its pixels with at least one 4-connected neighbour
  outside the mask (in 3-D volumes: voxels with a 6-connected one);
  pixels beyond the image's edge count as outside (a mask touching the
  edge has a boundary there). This is MONAI's `get_mask_edges` (binary
  erosion with scipy's default cross).
* Distances: Euclidean, from each boundary pixel of one mask to the
  nearest boundary pixel of the other (`distance_transform_edt`), in
  pixels or in the units of `spacing` (one size per axis: (dy, dx) for
  images, the voxel size in mm for volumes, so NSD's tolerance and HD95
  are then in mm). 3-D volumes are checked against MONAI's
  `compute_surface_dice` and `compute_hausdorff_distance`
  (tests/evaluation/test_case_metrics_3d.py).
* NSD at `tolerance` (Nikolov et al. 2018): the share of both boundaries'
  pixels that lie within `tolerance` (<=) of the other boundary,
  (|{d_pr <= tol}| + |{d_rp <= tol}|) / (|B_pred| + |B_ref|). Boundary
  pixels are counted, as MONAI's `compute_surface_dice` does (DeepMind's
  surface-distance weighs surface elements by their length instead).
* HD95: max of the two directed 95th percentiles (MONAI's
  `compute_hausdorff_distance(percentile=95)`; numpy's linear
  interpolation between ranks).
* Empty masks: both empty -> Dice, IoU, NSD and HD95 NaN. Exactly one empty
  -> Dice 0, IoU 0, NSD 0, HD95 NaN (there is no distance to nothing;
  MONAI writes inf). A NaN HD95 is left out of the mean, which would hide
  missed or hallucinated structures, so the summary counts such cases per
  class in `empty_cases`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from lintunet_jax import paths

# Per class, in nnU-Net's order, then the boundary metrics.
METRICS = ('Dice', 'IoU', 'FP', 'TP', 'FN', 'TN', 'n_pred', 'n_ref', 'NSD', 'HD95')
COUNTS = ('FP', 'TP', 'FN', 'TN', 'n_pred', 'n_ref')
HD_PERCENTILE = 95.0
# eval.py's NSD tolerance, in pixels. One pixel of disagreement is the
# floor of any two delineations (a boundary drawn by hand, a mask resized
# back to native size by nearest neighbour); two pixels tolerate that and
# no more, so for thin structures (a few pixels wide) a boundary off by
# the structure's own width still counts as wrong. Report the tolerance
# with the number: NSD at different tolerances does not compare.
DEFAULT_TOLERANCE = 2.0
CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity (2-D images)


def _cross(ndim: int) -> np.ndarray:
  """Face connectivity: 4 neighbours in 2-D, 6 in 3-D (MONAI's erosion)."""
  return CROSS if ndim == 2 else ndimage.generate_binary_structure(ndim, 1)

CONVENTIONS = (
    'per case (image) at its own size; classes 1..C-1 (binary models: 1), '
    'background excluded; Dice and IoU NaN when prediction and reference are '
    'both empty; boundary = mask pixels with a 4-connected neighbour outside '
    'the mask (beyond the image edge counts as outside); distances Euclidean '
    'between boundary pixels (edt), in pixels unless spacing says otherwise; '
    'NSD = share of both boundaries within tolerance (<=) of the other '
    '(boundary pixels counted, as MONAI); HD95 = max of the two directed '
    '95th percentiles (as MONAI); both empty: NSD and HD95 NaN; exactly one '
    'empty: Dice, IoU and NSD 0, HD95 NaN, counted in empty_cases; mean = '
    'nanmean over cases; foreground_mean = mean over classes of mean (NaN if '
    'a class mean is NaN, as nnU-Net); NaN is written as null.')


def foreground_classes(num_classes: int) -> list[int]:
  """The class ids evaluated: [1] for binary models, else 1..C-1."""
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  return [1] if num_classes == 1 else list(range(1, num_classes))


def boundary(mask: np.ndarray) -> np.ndarray:
  """bool [H, W] (or [X, Y, Z]): pixels (voxels) of `mask` with a face
  neighbour outside it (or outside the image: erosion's border_value=0)."""
  mask = np.asarray(mask, bool)
  return mask & ~ndimage.binary_erosion(mask, structure=_cross(mask.ndim),
                                        border_value=0)


def _check_masks(predicted, truth, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  predicted, truth = np.asarray(predicted), np.asarray(truth)
  for name, mask in (('predicted', predicted), ('truth', truth)):
    if mask.ndim not in (2, 3):
      raise ValueError(f'{name} must be a [H, W] or [X, Y, Z] class-id mask, '
                       f'got shape {mask.shape}')
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
      raise ValueError(f'{name} must hold integer class ids, got dtype {mask.dtype}')
    limit = max(num_classes, 2)
    if mask.size and (mask.min() < 0 or mask.max() >= limit):
      raise ValueError(
          f'{name} holds class ids {int(mask.min())}..{int(mask.max())}, '
          f'outside 0..{limit - 1} (num_classes={num_classes})')
  if predicted.shape != truth.shape:
    raise ValueError(f'predicted {predicted.shape} and truth {truth.shape} '
                     'differ in shape: compare them at the same (native) size')
  return predicted, truth


def _crop(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both masks cut to their joint bounding box, so that small structures
  in large images cost little. Exact: a mask pixel on the box's border has
  a neighbour outside the box, hence outside the mask, so it is a boundary
  pixel with or without the crop; and every boundary pixel (every zero of
  the distance transform's input) lies in the box."""
  both = a | b
  window = []
  for axis in range(both.ndim):
    other = tuple(i for i in range(both.ndim) if i != axis)
    kept = np.flatnonzero(both.any(axis=other))
    window.append(slice(kept[0], kept[-1] + 1))
  return a[tuple(window)], b[tuple(window)]


def surface_distances(a: np.ndarray, b: np.ndarray,
                      spacing: Sequence[float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(d_ab, d_ba): float64 [|B_a|], [|B_b|] distances from each boundary
  pixel of non-empty bool mask `a` to the nearest boundary pixel of `b`,
  and back."""
  a, b = _crop(np.asarray(a, bool), np.asarray(b, bool))
  edge_a, edge_b = boundary(a), boundary(b)
  sampling = None if spacing is None else tuple(float(s) for s in spacing)
  d_ab = ndimage.distance_transform_edt(~edge_b, sampling=sampling)[edge_a]
  d_ba = ndimage.distance_transform_edt(~edge_a, sampling=sampling)[edge_b]
  return d_ab, d_ba


def _class_metrics(p: np.ndarray, t: np.ndarray, tolerance: float,
                   spacing) -> dict[str, float | int]:
  tp = int(np.count_nonzero(p & t))
  n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(t))
  fp, fn = n_pred - tp, n_ref - tp
  tn = int(p.size) - tp - fp - fn
  nan = float('nan')
  dice = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
  iou = tp / (tp + fp + fn) if tp + fp + fn else nan
  if not n_pred and not n_ref:
    nsd = hd95 = nan
  elif not n_pred or not n_ref:
    nsd, hd95 = 0.0, nan
  else:
    d_pr, d_rp = surface_distances(p, t, spacing)
    within = np.count_nonzero(d_pr <= tolerance) + np.count_nonzero(d_rp <= tolerance)
    nsd = within / (d_pr.size + d_rp.size)
    hd95 = max(float(np.percentile(d_pr, HD_PERCENTILE)),
               float(np.percentile(d_rp, HD_PERCENTILE)))
  return {'Dice': float(dice), 'IoU': float(iou), 'FP': fp, 'TP': tp, 'FN': fn,
          'TN': tn, 'n_pred': n_pred, 'n_ref': n_ref, 'NSD': float(nsd),
          'HD95': float(hd95)}


def case_metrics(predicted, truth, *, num_classes: int, tolerance: float,
                 spacing: Sequence[float] | None = None
                 ) -> dict[str, dict[str, float | int]]:
  """One case's metrics per evaluated class: {'1': {'Dice': ..., ...}, ...}.

  predicted, truth: int class-id masks [H, W] at the image's own size, or
  [X, Y, Z] volumes (0/1 for binary models). `tolerance`: NSD's, in pixels
  (or in the units of `spacing`, the pixel or voxel size per axis, e.g.
  mm, when given). Counts are ints,
  the rest floats (NaN as the module docstring says). Raises ValueError
  on masks of different shapes or with class ids outside 0..C-1.
  """
  predicted, truth = _check_masks(predicted, truth, num_classes)
  if not tolerance >= 0:
    raise ValueError(f'tolerance must be >= 0, got {tolerance}')
  ndim = predicted.ndim
  if spacing is not None and (len(spacing) != ndim or not all(s > 0 for s in spacing)):
    raise ValueError(f'spacing must be {ndim} positive numbers (one per axis), '
                     f'got {spacing}')
  return {str(c): _class_metrics(predicted == c, truth == c, float(tolerance), spacing)
          for c in foreground_classes(num_classes)}


# ----------------------------------------------------------------------------
# The summary.


def _json_value(x):
  """NaN and infinities -> None (JSON has neither); numpy scalars -> Python."""
  if isinstance(x, (float, np.floating)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def _nan(x) -> float:
  """Back from JSON: None -> NaN."""
  return float('nan') if x is None else float(x)


def _nanmean(values: Sequence[float]) -> float:
  kept = [v for v in values if not math.isnan(v)]
  return float(np.mean(kept)) if kept else float('nan')


def summarize(cases: Sequence[Mapping[str, Any]], *, num_classes: int,
              tolerance: float, spacing: Sequence[float] | None = None
              ) -> dict[str, Any]:
  """nnU-Net's summary.json layout (plus documented keys of our own).

  `cases`: [{'case': id, 'metrics': case_metrics(...)}, ...], optionally
  with 'index' (the image's position in the split), in the order to write.
  Returns, JSON-ready (every NaN already None):

    metric_per_case  the cases as given
    mean             {class: {metric: nanmean over cases}}
    foreground_mean  {metric: mean over classes of `mean`}
    empty_cases      {class: {both_empty, reference_empty, prediction_empty}}
    num_cases, tolerance, spacing, conventions
  """
  if not cases:
    raise ValueError('no cases to summarize')
  labels = [str(c) for c in foreground_classes(num_classes)]
  for entry in cases:
    missing = [l for l in labels if l not in entry['metrics']]
    if missing:
      raise ValueError(f'case {entry.get("case")!r} has no metrics for classes '
                       f'{missing} (num_classes={num_classes})')
  mean = {l: {m: _nanmean([_nan(e['metrics'][l][m]) for e in cases]) for m in METRICS}
          for l in labels}
  foreground_mean = {m: float(np.mean([mean[l][m] for l in labels])) for m in METRICS}
  empty_cases = {}
  for l in labels:
    n_pred = np.array([e['metrics'][l]['n_pred'] for e in cases])
    n_ref = np.array([e['metrics'][l]['n_ref'] for e in cases])
    empty_cases[l] = {
        'both_empty': int(np.sum((n_pred == 0) & (n_ref == 0))),
        'reference_empty': int(np.sum((n_pred > 0) & (n_ref == 0))),
        'prediction_empty': int(np.sum((n_pred == 0) & (n_ref > 0))),
    }
  per_case = [{**{k: v for k, v in e.items() if k != 'metrics'},
               'metrics': {l: {m: _json_value(e['metrics'][l][m]) for m in METRICS}
                           for l in labels}}
              for e in cases]
  return {
      'metric_per_case': per_case,
      'mean': {l: {m: _json_value(v) for m, v in d.items()} for l, d in mean.items()},
      'foreground_mean': {m: _json_value(v) for m, v in foreground_mean.items()},
      'empty_cases': empty_cases,
      'num_cases': len(cases),
      'tolerance': float(tolerance),
      'spacing': [1.0, 1.0] if spacing is None else [float(s) for s in spacing],
      'conventions': CONVENTIONS,
  }


def write_summary(path: str, summary: Mapping[str, Any]) -> str:
  """Writes `summary` whole as strict JSON (local or gs://); returns path.

  Raises ValueError if a NaN or infinity is left (summarize writes None)."""
  text = json.dumps(summary, indent=2, allow_nan=False) + '\n'
  paths.check(path, 'per-case summary path').parent.mkdir(parents=True, exist_ok=True)
  paths.write_text(path, text)
  return path


# ----------------------------------------------------------------------------
# Collecting cases during an evaluation.


def gather_json(items: list, allgather: Callable | None = None) -> list:
  """Every process's `items` (JSON-serialisable lists, NaN allowed), in
  process order. Ragged per-case dicts cannot be stacked as arrays, so
  each process sends its items as UTF-8 JSON bytes padded to the longest.
  `allgather` (tests) stands for multihost_utils.process_allgather, which
  stacks each process's array along a new first axis; a collective: every
  process must call this."""
  if allgather is None:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
      return list(items)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    allgather = multihost_utils.process_allgather
  data = np.frombuffer(json.dumps(items).encode('utf-8'), np.uint8)
  lengths = np.asarray(allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(allgather(padded)).reshape(len(lengths), -1)
  out = []
  for row, n in zip(rows, lengths):
    out += json.loads(row[:int(n)].tobytes().decode('utf-8'))
  return out


class CaseCollector:
  """Per-case metrics of one evaluation, from any path that ends with a
  predicted mask and the truth per image at native size (the whole-image
  evaluation of report.py, a sliding window, an ensemble).

    cases = CaseCollector(num_classes=C, tolerance=2.0)
    cases.add(index, predicted, truth)   # each image, on its process
    summary = cases.summary()            # every process calls it

  `case_names` (a sequence indexed by `index`, or a mapping) names the
  cases (e.g. file names); without it a case is named by its index.
  """

  def __init__(self, *, num_classes: int, tolerance: float,
               spacing: Sequence[float] | None = None,
               case_names: Sequence[str] | Mapping[int, str] | None = None):
    foreground_classes(num_classes)  # checks it
    self.num_classes, self.tolerance, self.spacing = num_classes, float(tolerance), spacing
    self.case_names = case_names
    self._entries: list[dict[str, Any]] = []

  def add(self, index: int, predicted, truth) -> dict[str, dict[str, float | int]]:
    """Computes and keeps one case; returns its metrics."""
    index = int(index)
    metrics = case_metrics(predicted, truth, num_classes=self.num_classes,
                           tolerance=self.tolerance, spacing=self.spacing)
    case = index if self.case_names is None else self.case_names[index]
    self._entries.append({'case': case, 'index': index, 'metrics': metrics})
    return metrics

  def __len__(self) -> int:
    return len(self._entries)

  def gathered(self, allgather: Callable | None = None) -> list[dict[str, Any]]:
    """Every process's cases, sorted by index (a collective)."""
    return sorted(gather_json(self._entries, allgather), key=lambda e: e['index'])

  def summary(self, allgather: Callable | None = None) -> dict[str, Any]:
    """`summarize` of the gathered cases (a collective)."""
    return summarize(self.gathered(allgather), num_classes=self.num_classes,
                     tolerance=self.tolerance, spacing=self.spacing)
