"""eval.py on a workdir trained on volume slices: metrics per volume, in 3-D.

Each case of the split is predicted slice by slice through the one
prediction loop (`stream.predict_native`, with the window, flips and
ensembles of `predict_fn`), its slices stacked back across the axis
training sliced, and compared with its stacked label volume:

  * per case (`case_metrics`, nnU-Net's summary.json layout): Dice and IoU
    over the whole volume per class (NaN where a class is absent from
    both), NSD at a tolerance in mm and HD95 in mm on 3-D surfaces, from
    the case's voxel spacing;
  * split level: the voxel counts of every volume added up
    (`report.NativeCounts`; its per-"image" rows are per volume).

With several processes, whole cases are handed out (sorted case ids,
every process_count-th), never slices, so each case's metrics are
computed in one place; the counts and cases are then gathered.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from lintunet_jax.data import sources
from lintunet_jax.data import volume_config
from lintunet_jax.evaluation import case_metrics
from lintunet_jax.evaluation import report as evaluation
from lintunet_jax.evaluation import sliding_window as sw
from lintunet_jax.evaluation import stream


def evaluate(predict_fn: Callable[[jax.Array], jax.Array],
             config: ml_collections.ConfigDict, split: str,
             settings: sw.InferenceSettings, *, images_per_call: int | None = None,
             tolerance: float = case_metrics.DEFAULT_TOLERANCE,
             progress: bool = False, process_index: int | None = None,
             process_count: int | None = None) -> evaluation.EvalOutput:
  """`report.EvalOutput` of `predict_fn` over the volumes of `split`
  (resolution 'volume': `per_image` rows and `per_case` entries are cases;
  each case entry carries its `spacing`)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  evaluation.check_split(config, split)
  axis, cases = volume_config.split_cases(config, split)
  names = sorted(cases)
  per_call = stream.images_per_call(images_per_call, config, settings)
  source = sources.source(config, split)
  counter = evaluation.NativeCounts(config.model.num_classes)
  entries = []
  import tqdm  # pylint: disable=import-outside-toplevel
  mine = list(enumerate(names))[process_index::process_count]
  start = time.perf_counter()
  for index, case in tqdm.tqdm(mine, desc=f'eval {split}', unit='volume', leave=False,
                               disable=not (progress and process_index == 0)):
    spacing, positions = cases[case]
    planes = ((z, *source[position]) for z, position in enumerate(positions))
    predicted, truth = [None] * len(positions), [None] * len(positions)
    for p in stream.predict_native(predict_fn, planes, config, settings,
                                   images_per_call=per_call):
      predicted[p.key], truth[p.key] = p.predicted, np.asarray(p.extra)
    predicted, truth = np.stack(predicted, axis=axis), np.stack(truth, axis=axis)
    # Counts do not depend on the layout: flattened to the [H, W] they take.
    counter.add(index, predicted.reshape(predicted.shape[0], -1),
                truth.reshape(truth.shape[0], -1))
    entries.append({'case': case, 'index': index, 'spacing': spacing,
                    'metrics': case_metrics.case_metrics(
                        predicted, truth, num_classes=config.model.num_classes,
                        tolerance=tolerance, spacing=spacing)})
  counter.pad(math.ceil(len(names) / process_count) - len(counter))
  try:
    result = counter.result()
  except ValueError as e:
    raise evaluation.EvaluationError(f'split {split!r} produced no volumes') from e
  per_image = result.pop('per_image')
  gathered = sorted(case_metrics.gather_json(entries), key=lambda e: e['index'])
  per_case = case_metrics.summarize(gathered, num_classes=config.model.num_classes,
                                    tolerance=tolerance)
  per_case['spacing'] = 'per case, in mm (metric_per_case[i].spacing)'
  per_case['tolerance_unit'] = 'mm'
  return evaluation.EvalOutput(
      metrics=result, loss=None, seconds=time.perf_counter() - start,
      batch_size=per_call, resolution='volume', per_image=per_image,
      per_case=per_case, notes=[f'{len(names)} volume(s) of split {split!r}, '
                                f'{sum(len(p) for _, p in cases.values())} slices'])
