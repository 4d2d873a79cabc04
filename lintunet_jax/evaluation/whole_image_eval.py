"""Evaluation through `sliding_window.make_predict_fn`: windows, TTA, ensembles.

  report = whole_image_eval.run(['runs/fold0', 'runs/fold1'],
                                EvalSettings(inference=InferenceChoice(tta='flips')))
  output = whole_image_eval.evaluate(predict_fn, config, split, settings)

`run` is what eval.py does, for one or several workdirs (an ensemble,
`ensemble.restore_members`) with config.inference and the command line's
window / TTA settings (`settings.EvalSettings`); the report gets an
`inference` field. With none of window, TTA or ensemble it evaluates with
training's eval step (`report.evaluate`); otherwise the split goes through
`evaluate` below. Throughput always times the first model's plain forward
pass (one model, model-size input), as a single-model report does.

`evaluate` runs any `make_predict_fn` predictor (an ensemble's mean
logits, flips TTA, the sliding window) over the split's stored examples
through `stream.predict_native` and counts each image at its own size
against its stored mask, as `report.evaluate_native` does for training's
eval step, with the same metric keys; the loss is not computed (blended
logits are not training's loss's input). `on_image(index, predicted,
truth)` is called for every image at native size (per-case metrics).
Processes evaluate strided shares of the split; counts are summed and
per-image rows gathered across them.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from lintunet_jax import paths
from lintunet_jax.data import volume_config
from lintunet_jax.data import whole_images
from lintunet_jax.evaluation import case_metrics
from lintunet_jax.evaluation import ensemble
from lintunet_jax.evaluation import settings as eval_settings
from lintunet_jax.evaluation import report as evaluation
from lintunet_jax.evaluation import sliding_window as sw
from lintunet_jax.evaluation import stream
from lintunet_jax.evaluation import volume_eval
from lintunet_jax.training import parallel

ImageHook = Callable[[int, np.ndarray, np.ndarray], None]

# Why the report has no loss in this mode (EvalOutput.notes).
NO_LOSS_NOTE = ('loss not computed: predictions come from make_predict_fn '
                '(sliding window / TTA / ensemble), whose blended logits '
                "are not the training loss's input")


def evaluate(predict_fn: Callable[[jax.Array], jax.Array],
             config: ml_collections.ConfigDict, split: str,
             settings: sw.InferenceSettings, *,
             images_per_call: int | None = None, num_samples: int = 0,
             progress: bool = False, on_image: ImageHook | None = None,
             process_index: int | None = None,
             process_count: int | None = None) -> evaluation.EvalOutput:
  """Metrics of `predict_fn` over every example of `split` at native size.

  `predict_fn`: images [B, H, W, C] float32 -> logits [B, H, W, K], from
  `make_predict_fn(models, settings)`; `settings` must be the ones it was
  built with (they say whether images are tiled at their own size or
  resized). Returns `report.EvalOutput` with `metrics` (as
  `metrics.compute_metrics`), `per_image` (index int64 [n], tp/fp/fn/tn
  int64 [n, K]) and up to `num_samples` overlays (lists: stored image,
  mask and prediction at native size).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  total = evaluation.check_split(config, split)
  images_per_call = stream.images_per_call(images_per_call, config, settings)
  if images_per_call < 1:
    raise evaluation.EvaluationError(
        f'images per call must be >= 1, got {images_per_call}')

  counter = evaluation.NativeCounts(config.model.num_classes)
  samples: dict[str, list] = {'image': [], 'mask': [], 'prediction': [], 'index': []}
  import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm.tqdm(total=len(whole_images.process_share(total, process_index, process_count)),
                  desc=f'eval {split}', unit='img', leave=False,
                  disable=not (progress and process_index == 0))
  start = time.perf_counter()
  examples = whole_images.iterate_split(
      config, split, prepare=lambda image: image,
      process_index=process_index, process_count=process_count)
  # key: (index, kept as an overlay): the first num_samples of the share.
  keyed = (((index, position < num_samples), raw, truth)
           for position, (raw, truth, index) in enumerate(examples))
  try:
    for p in stream.predict_native(predict_fn, keyed, config, settings,
                                   images_per_call=images_per_call):
      (index, sample), raw, truth, predicted = p.key, p.image, p.extra, p.predicted
      if predicted.shape != truth.shape[:2]:
        raise evaluation.EvaluationError(
            f'example {index} of split {split!r}: image {raw.shape[:2]} and '
            f'mask {truth.shape} differ in size')
      counter.add(index, predicted, truth)
      if on_image is not None:
        on_image(index, predicted, truth)
      if sample:
        for key, value in (('image', raw), ('mask', truth),
                           ('prediction', predicted), ('index', index)):
          samples[key].append(value)
      bar.update(1)
  finally:
    bar.close()
  # Every process contributes the same number of per-image rows (padding
  # rows have index -1), so they stack across processes.
  counter.pad(-(-total // process_count) - len(counter))
  try:
    result = counter.result()
  except ValueError as e:
    raise evaluation.EvaluationError(f'split {split!r} produced no images') from e
  per_image = result.pop('per_image')
  seconds = time.perf_counter() - start
  notes = [NO_LOSS_NOTE]
  if result['num_images'] != total:
    notes.append(f"evaluated {result['num_images']} images but split "
                 f'{split!r} has {total}')
  if samples['index']:  # split order, as the other mode keeps them
    order = np.argsort(samples['index'])
    samples = {k: [v[i] for i in order] for k, v in samples.items()}
    samples['index'] = np.asarray(samples['index'], np.int32)
  else:
    samples = None
  return evaluation.EvalOutput(
      metrics=result, loss=None, seconds=seconds, batch_size=images_per_call,
      resolution='native', samples=samples, per_image=per_image, notes=notes)


def run(workdirs: str | Sequence[str], settings: eval_settings.EvalSettings, *,
        config: ml_collections.ConfigDict | None = None,
        overrides: Mapping[str, Any] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        case_names: Sequence[str] | None = None,
        on_image: ImageHook | None = None) -> dict[str, Any]:
  """Restores, evaluates, times, draws and writes the report; returns it.

  `workdirs`: one, or several (their logits averaged; checked by
  `ensemble.restore_members`; the first's config, threshold and step name
  the report, written by default to
  `report.default_report_path(first, split, step, N)`). `config`
  (optional) replaces the config saved in each workdir; `overrides`
  ({'a.b': value}, from `--config.a.b=value`) change fields of it
  (`report.restore`). At native resolution the per-case metrics (NSD at
  `settings.nsd_tolerance` pixels, cases named by `case_names[index]` or
  the stored file names) go next to the report. `on_image` is called per
  image in the window / TTA / ensemble mode, after the per-case metrics.
  The report gets `inference`: the settings, `evaluated_by` and every
  member's workdir and step. Only process 0 writes files.
  """
  report_path, split = settings.report_path, settings.split
  if report_path:  # a bad URL fails before minutes of evaluation
    paths.check(report_path, '--report')
  workdirs = ([os.fspath(workdirs)] if isinstance(workdirs, (str, os.PathLike))
              else [os.fspath(w) for w in workdirs])
  source = evaluation.config_source(config, overrides)
  members = ensemble.restore_members(workdirs, settings.checkpoint, config, overrides)
  first = members[0]
  config = first.config
  try:
    inference_settings = settings.inference.resolve(config)
  except ValueError as e:
    raise evaluation.EvaluationError(str(e)) from None
  split = split or config.dataset.test_split
  mesh = mesh if mesh is not None else parallel.create_mesh()
  volume = volume_config.is_volume_dataset(config)
  whole = (inference_settings.window or inference_settings.tta != 'none'
           or len(members) > 1)
  if (volume or whole) and settings.resolution != 'native':
    raise evaluation.EvaluationError(f'resolution={settings.resolution!r}' + (
        ': a workdir trained on volume slices is evaluated per volume' if volume
        else " needs the model's own eval step; the sliding window, TTA and "
        'ensembles count') + ' at native size only')
  if volume or whole:
    # Each process predicts its own images (cases): the model calls are
    # split over this process's devices only.
    local_mesh = (mesh if jax.process_count() == 1
                  else parallel.create_mesh(jax.local_devices()))
    predict_fn = sw.make_predict_fn(
        [m.model for m in members], inference_settings, mesh=local_mesh)
  if volume:  # per case in 3-D, whatever the inference settings
    output = volume_eval.evaluate(
        predict_fn, config, split, inference_settings,
        images_per_call=settings.batch_size, tolerance=settings.nsd_tolerance,
        progress=settings.progress)
  elif whole:
    if case_names is None:
      case_names = evaluation.default_case_names(config, split)
    cases = case_metrics.CaseCollector(num_classes=config.model.num_classes,
                                       tolerance=settings.nsd_tolerance,
                                       case_names=case_names)

    def per_image(index, predicted, truth):
      cases.add(index, predicted, truth)
      if on_image is not None:
        on_image(index, predicted, truth)

    output = evaluate(predict_fn, config, split, inference_settings,
                      images_per_call=settings.batch_size,
                      num_samples=settings.num_overlays,
                      progress=settings.progress, on_image=per_image)
    output.per_case = cases.summary()
    if settings.throughput.measure:
      output.notes.append(
          "throughput: the first model's plain forward pass at model size "
          '(not the window, TTA or ensemble)')
  else:
    output = evaluation.evaluate(first.model, config, split, mesh=mesh,
                                 batch_size=settings.batch_size,
                                 num_samples=settings.num_overlays,
                                 progress=settings.progress,
                                 resolution=settings.resolution,
                                 nsd_tolerance=settings.nsd_tolerance,
                                 case_names=case_names)
  inference = {**inference_settings.describe(),
               'evaluated_by': ('volume_eval (make_predict_fn, per volume)' if volume
                                else 'whole_image_eval (make_predict_fn)' if whole
                                else 'eval step (one model, no TTA)'),
               'members': [m.describe() for m in members]}
  return evaluation.finish(
      first, split=split, output=output, settings=settings,
      report_path=report_path or evaluation.default_report_path(
          first.workdir, split, first.step, len(members)),
      mesh=mesh, config_source=source, extra={'inference': inference})
