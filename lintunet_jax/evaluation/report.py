"""Evaluate a trained model on a whole split: metrics, throughput, pictures.

The parts of what `eval.py` does (`whole_image_eval.run` puts them
together): `restore` the checkpoint and the config saved with it
(`checkpointing.restore_model`), `evaluate` with the shared eval step of training
(`train_lib`) over every example of the split once (padded batches, padding
ignored), adds its exact counts in a `metrics.MetricAccumulator`, times the
jit-compiled forward pass (`throughput.inference_throughput`), draws overlays
and the training curves (`visualize`), and writes a JSON report.
`docs/evaluation.md` documents every field of the report.

`format_table(reports)` prints one or more reports side by side, as the
seed's U-Net vs LinTUNet table (F1, IoU, precision, ...) but with numbers
from the whole split and timings that wait for the device.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from lintunet_jax import paths
from lintunet_jax.training import checkpointing
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.training import metric_logs as logging_utils
from lintunet_jax import metrics as metrics_lib
from lintunet_jax import models
from lintunet_jax.training import parallel
from lintunet_jax.evaluation import case_metrics
from lintunet_jax.evaluation import settings as eval_settings
from lintunet_jax.evaluation import prediction
from lintunet_jax.evaluation import throughput as throughput_lib
from lintunet_jax.training import loop as train_lib
from lintunet_jax.evaluation import visualize

SCHEMA_VERSION = 2  # 2: metrics at native resolution by default, `resolution`
CHECKPOINT_ALIASES = ('best', 'latest')

# Where pixels are counted (`run(resolution=...)`, eval.py --resolution).
RESOLUTIONS = {
    'native': ("pixels counted at each image's own size: the prediction is "
               "brought back as predict.py does (resize or padding undone, "
               "nearest neighbour) and compared with the stored mask"),
    'model': ("pixels counted on the model's image_size x image_size canvas "
              "(the mask resized as for training); with resize='pad' the "
              "padding is not counted"),
}
# What the report's `conventions` say for each EvalOutput.resolution: the
# eval.py choices above, and volume workdirs' per-volume evaluation.
COUNTED_AT = {**RESOLUTIONS, 'volume': (
    'per volume in 3-D: the slices of each case predicted and stacked back '
    'across the training slicing axis, voxels counted over the whole volume '
    '(num_images counts volumes); NSD tolerance and HD95 in mm from the '
    'voxel spacing')}


class EvaluationError(RuntimeError):
  """A user-facing problem (bad split, bad checkpoint selector, ...)."""


# What the CLIs report as "error: <message>" (exit 2) instead of a traceback:
# each names what is missing and what exists.
USER_ERRORS = (EvaluationError, FileNotFoundError, checkpointing.CheckpointError,
               paths.UnsupportedPathError)


def parse_checkpoint(selector: str | int) -> str | int:
  """'best' | 'latest' | a step number (int or digits) -> value for restore."""
  if isinstance(selector, int):
    return selector
  text = str(selector).strip().lower()
  if text in CHECKPOINT_ALIASES:
    return text
  if text.isdigit():
    return int(text)
  raise EvaluationError(
      f"--checkpoint must be 'best', 'latest' or a step number, got {selector!r}")


# ----------------------------------------------------------------------------
# Evaluation over a split.


@dataclasses.dataclass
class EvalOutput:
  metrics: dict[str, Any]
  loss: float | None
  seconds: float
  batch_size: int
  resolution: str = 'native'  # a key of RESOLUTIONS
  # Up to `num_samples` examples for overlays: image [n,S,S,C] float32,
  # mask [n,S,S] int32, prediction [n,S,S] int32, index [n] int32.
  samples: dict[str, np.ndarray] | None = None
  # resolution='native' only: every image's own counts, for paired
  # comparisons between models (`evaluate_native`'s `per_image`).
  per_image: dict[str, np.ndarray] | None = None
  # resolution='native' only: per-case metrics, `case_metrics.summarize`'s
  # layout (nnU-Net's summary.json), every process's cases.
  per_case: dict[str, Any] | None = None
  notes: list[str] = dataclasses.field(default_factory=list)


def check_split(config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples of `split`; a clear error if it does not exist."""
  try:
    count = input_pipeline.num_examples(config, split)
  except Exception as e:  # the pipeline says what exists; keep its words
    raise EvaluationError(
        f'cannot evaluate split {split!r} of dataset '
        f'{config.dataset.name!r}: {e}') from e
  if not count:
    raise EvaluationError(
        f'split {split!r} of dataset {config.dataset.name!r} has no examples')
  return int(count)


def _tap(batches: Iterable[Mapping[str, Any]], samples: dict[str, list],
         num_samples: int, bar) -> Iterator[Mapping[str, Any]]:
  """Passes batches through, keeping the first valid examples and counting."""
  kept = 0
  for batch in batches:
    valid = np.asarray(batch['valid']) > 0 if 'valid' in batch else (
        np.ones(len(batch['image']), bool))
    if kept < num_samples:
      take = np.flatnonzero(valid)[: num_samples - kept]
      for key in samples:
        if key == 'index' and key not in batch:
          samples[key].append(np.arange(kept, kept + len(take), dtype=np.int32))
        else:
          samples[key].append(np.asarray(batch[key])[take])
      kept += len(take)
    if bar is not None:
      bar.update(int(valid.sum()))
    yield batch


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded along the batch axis."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _sum_over_processes(totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  if jax.process_count() == 1:
    return totals
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  gathered = multihost_utils.process_allgather(totals)
  return {k: np.sum(np.asarray(v), axis=0) for k, v in gathered.items()}


PER_IMAGE_KEYS = ('tp', 'fp', 'fn', 'tn')


def _gather_per_image(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's per-image rows, padding (index -1) dropped, sorted by
  index. Each process holds the same number of rows (whole padded batches),
  so they stack."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    gathered = multihost_utils.process_allgather(rows)
    rows = {k: np.concatenate(list(np.asarray(v))) for k, v in gathered.items()}
  order = np.argsort(rows['index'], kind='stable')
  keep = order[rows['index'][order] >= 0]
  return {k: np.asarray(v)[keep] for k, v in rows.items()}


class NativeCounts:
  """Each image's counts at its own size: the split's totals and the
  per-image rows (`evaluate_native` and `whole_image_eval` count alike).

  `add` counts one image (`metrics.class_counts`); `pad` adds placeholder
  rows (index -1) so that every process holds as many rows and they stack;
  `result` sums over processes and returns `metrics.compute_metrics` with
  `per_image` (see `evaluate_native`).
  """

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self._accumulator = metrics_lib.MetricAccumulator()
    self._rows: dict[str, list] = {k: [] for k in ('index', *PER_IMAGE_KEYS)}

  def __len__(self) -> int:
    return len(self._rows['index'])

  def add(self, index: int, predicted: np.ndarray, truth: np.ndarray) -> None:
    counts = metrics_lib.class_counts(
        predicted[None], truth[None], np.ones(1, np.float32),
        num_classes=self.num_classes, xp=np)
    self._accumulator.add(counts)
    self._rows['index'].append(int(index))
    for key in PER_IMAGE_KEYS:
      self._rows[key].append(np.asarray(counts[key], np.int64))

  def pad(self, count: int = 1) -> None:
    width = 1 if self.num_classes == 1 else self.num_classes
    for _ in range(count):
      self._rows['index'].append(-1)
      for key in PER_IMAGE_KEYS:
        self._rows[key].append(np.zeros(width, np.int64))

  def result(self) -> dict[str, Any]:
    """A collective on several processes: every process calls it."""
    result = metrics_lib.compute_metrics(_sum_over_processes(self._accumulator.totals))
    result['per_image'] = _gather_per_image({
        'index': np.asarray(self._rows['index'], np.int64),
        **{k: np.stack(self._rows[k]).astype(np.int64) for k in PER_IMAGE_KEYS}})
    return result


def evaluate_native(eval_step, variables, batches: Iterable[Mapping[str, Any]],
                    mesh: jax.sharding.Mesh,
                    config: ml_collections.ConfigDict,
                    cases: case_metrics.CaseCollector | None = None) -> dict[str, Any]:
  """`train_lib.evaluate`, but counting each image at its own size.

  `eval_step` is `make_eval_step(..., predictions=True)`; batches come from
  `create_eval_iterator(..., native_masks=True)`. Each predicted mask is
  brought back with `restore_mask_size` (predict.py's path) and counted
  against the stored mask with `metrics.class_counts`, on the host; the
  loss stays the model-resolution one of the eval step.

  The result also holds `per_image`: each image's own counts, which paired
  comparisons between models need (the totals cannot give a per-image
  difference): `index` int64 [n] (position in the split, ascending) and
  `tp`, `fp`, `fn`, `tn` int64 [n, K] (K as in `class_counts`).
  `cases`, when given, gets every image's predicted and true mask at native
  size (`CaseCollector.add`: per-case Dice, NSD, HD95, on the host); the
  caller gathers them (`cases.summary()`, on every process).
  """
  counter = NativeCounts(config.model.num_classes)
  loss_sum, loss_count = 0.0, 0.0
  pending = []

  def drain(item):
    nonlocal loss_sum, loss_count
    (outputs, classes), native, valid, index = item
    _, (ls, lc) = train_lib.split_eval_outputs(parallel.to_host(outputs))
    loss_sum, loss_count = loss_sum + float(ls), loss_count + float(lc)
    classes = _local_rows(classes)
    for i in range(len(valid)):
      if not valid[i]:  # padding: a placeholder row, so processes stack
        counter.pad()
        continue
      truth = native[i]
      predicted = input_pipeline.restore_mask_size(classes[i], truth.shape[:2],
                                                   config)
      counter.add(int(index[i]), predicted, truth)
      if cases is not None:
        cases.add(int(index[i]), predicted, truth)

  for local_batch in batches:
    local_batch = dict(local_batch)
    native = local_batch.pop('native_mask')
    valid = np.asarray(local_batch['valid']) > 0
    index = np.asarray(local_batch['index'])
    local_batch = train_lib.pad_local_batch(local_batch, jax.local_device_count())
    pending.append((eval_step(variables, parallel.shard_batch(mesh, local_batch)),
                    native, valid, index))
    if len(pending) > 2:  # bound the device queue, keep it busy
      drain(pending.pop(0))
  for item in pending:
    drain(item)
  result = counter.result()
  result['loss'] = loss_sum / max(loss_count, 1.0)
  return result


def default_case_names(config: ml_collections.ConfigDict, split: str) -> list[str] | None:
  """The split's file names (as splits.json names cases), or None (cases
  named by index) when the dataset stores none or repeats one."""
  try:
    return input_pipeline.case_ids(config, split)
  except ValueError:
    return None


def evaluate(model: nnx.Module, config: ml_collections.ConfigDict, split: str,
             *, mesh: jax.sharding.Mesh | None = None,
             batch_size: int | None = None, num_samples: int = 0,
             progress: bool = False, resolution: str = 'native',
             nsd_tolerance: float = case_metrics.DEFAULT_TOLERANCE,
             case_names: Sequence[str] | Mapping[int, str] | None = None
             ) -> EvalOutput:
  """Metrics of `model` over every example of `split`, each counted once.

  resolution='model' runs `train_lib.evaluate` with
  `train_lib.make_eval_step`: the loop and step of training validation, so
  its numbers are the training log's. 'native' (the default) runs the same
  step and counts each image at its own size (`evaluate_native`), and also
  returns each image's counts (`EvalOutput.per_image`) and per-case
  metrics (`EvalOutput.per_case`: NSD at `nsd_tolerance` pixels, HD95;
  cases named by `case_names[index]`, else by their index). The first
  `num_samples` examples (in split order) are kept with their predictions
  for overlays.
  """
  if resolution not in RESOLUTIONS:
    raise EvaluationError(f'resolution must be one of {tuple(RESOLUTIONS)}, '
                          f'got {resolution!r}')
  native = resolution == 'native'
  mesh = mesh if mesh is not None else parallel.create_mesh()
  batch_size = int(batch_size or config.eval_batch_size)
  try:
    local_batch_size = parallel.check_batch_size(batch_size, mesh=mesh,
                                                 name='eval_batch_size')
  except ValueError as e:
    raise EvaluationError(str(e).replace('(set --config.eval_batch_size=N)',
                                         '(set --batch_size=N)')) from e
  total = check_split(config, split)
  eval_step, variables = train_lib.make_eval_step(model, config, mesh,
                                                  predictions=native)
  batches = input_pipeline.create_eval_iterator(
      config, split, batch_size=local_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      native_masks=native)
  bar = None
  if progress and jax.process_index() == 0:
    import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm.tqdm(total=total // max(jax.process_count(), 1),
                    desc=f'eval {split}', unit='img', leave=False)
  samples: dict[str, list[np.ndarray]] = {'image': [], 'mask': [], 'index': []}
  if native and case_names is None:
    case_names = default_case_names(config, split)
  cases = (case_metrics.CaseCollector(num_classes=config.model.num_classes,
                                      tolerance=nsd_tolerance, case_names=case_names)
           if native else None)
  start = time.perf_counter()
  try:
    tapped = _tap(batches, samples, num_samples, bar)
    result = (evaluate_native(eval_step, variables, tapped, mesh, config, cases)
              if native else
              train_lib.evaluate(eval_step, variables, tapped, mesh))
  except ValueError as e:
    if 'no images were evaluated' in str(e):
      raise EvaluationError(f'split {split!r} produced no images') from e
    raise
  finally:
    if bar is not None:
      bar.close()
  per_case = cases.summary() if cases is not None else None
  seconds = time.perf_counter() - start
  loss = result.pop('loss', None)
  per_image = result.pop('per_image', None)
  notes = []
  if result['num_images'] != total:
    notes.append(f"evaluated {result['num_images']} images but split "
                 f'{split!r} has {total}')
  sample_arrays = None
  if samples['image'] and sum(len(x) for x in samples['image']):
    sample_arrays = {k: np.concatenate(v) for k, v in samples.items()}
    logits = prediction.make_forward(model)(jnp.asarray(sample_arrays['image']))
    sample_arrays['prediction'] = np.asarray(
        metrics_lib.predict_classes(logits, config.threshold))
  return EvalOutput(metrics=result, loss=loss, seconds=seconds,
                    batch_size=batch_size, resolution=resolution,
                    samples=sample_arrays, per_image=per_image,
                    per_case=per_case, notes=notes)


# ----------------------------------------------------------------------------
# The report.


def default_report_path(workdir: str, split: str, step: int,
                        num_members: int = 1) -> str:
  """DIR/eval/<split>-<step>.json; an ensemble of N workdirs writes
  <split>-ensemble<N>-<step>.json under the first, never a member's name."""
  name = f'{split}-{step}' if num_members == 1 else f'{split}-ensemble{num_members}-{step}'
  return os.fspath(epath.Path(workdir) / 'eval' / f'{name}.json')


def cases_path(report_path: str) -> str:
  """Per-case metrics file of a report: its path with '.cases.json' for
  '.json' (DIR/eval/test-1250.cases.json)."""
  root, ext = os.path.splitext(report_path)
  return (root if ext == '.json' else report_path) + '.cases.json'


def artifacts_dir(report_path: str) -> str:
  """Folder for a report's pictures: the report's path without '.json'."""
  root, ext = os.path.splitext(report_path)
  return root if ext else report_path + '-files'


def model_summary(model: nnx.Module, config: ml_collections.ConfigDict) -> dict:
  attention = None
  if config.model.name == 'lintunet':
    attention = config.model.attention.to_dict()
  return {
      'name': config.model.name,
      'num_parameters': models.count_parameters(model),
      'width': config.model.width,
      'in_channels': config.model.in_channels,
      'num_classes': config.model.num_classes,
      'dtype': config.model.dtype,
      'attention': attention,
  }


def build_report(member, split: str, output: EvalOutput, *,
                 throughput: dict | None, train_throughput: dict | None,
                 artifacts: dict, config_source: str) -> dict[str, Any]:
  """The report of `member` (an `ensemble.Member`: the first of an
  ensemble names it) evaluated on `split`."""
  workdir, config = member.workdir, member.config
  checkpoint, step = member.selector, member.step
  model_info = model_summary(member.model, config)
  metrics = dict(output.metrics)
  metrics['f1'] = metrics['dice']
  metrics['loss'] = output.loss
  return {
      'schema_version': SCHEMA_VERSION,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'workdir': paths.absolute(workdir),
      'checkpoint': {'requested': str(checkpoint), 'step': int(step)},
      'config_source': config_source,
      'model': model_info,
      'data': {
          'dataset': config.dataset.name,
          'split': split,
          'num_images': metrics['num_images'],
          'image_size': input_pipeline.model_input_size(config),
          'resize': config.dataset.resize,
          'channels': config.dataset.channels,
          'batch_size': output.batch_size,
      },
      'threshold': float(config.threshold),
      'resolution': output.resolution,
      'conventions': (f'{COUNTED_AT[output.resolution]}; loss at model '
                      f'resolution; {metrics_lib.CONVENTIONS}'),
      'metrics': metrics,
      'eval_seconds': output.seconds,
      'throughput': throughput,
      'train_throughput': train_throughput,
      'artifacts': artifacts,
      'notes': list(output.notes),
      'config': json.loads(config.to_json_best_effort()),
  }


def write_json(path: str, data: dict) -> str:
  """Writes `data` whole (local or gs://); returns the path."""
  paths.check(path, 'report path').parent.mkdir(parents=True, exist_ok=True)
  paths.write_text(path, json.dumps(data, indent=2, sort_keys=False) + '\n')
  return path


def save_pictures(workdir: str, out_dir: str, output: EvalOutput,
                  config: ml_collections.ConfigDict, split: str) -> dict:
  """Overlays of the kept samples and the training curves; their paths."""
  artifacts: dict[str, Any] = {'overlays': [], 'training_curves': None}
  if output.samples is not None:
    s = output.samples
    names = [f'{split}-{int(i):05d}' for i in s['index']]
    artifacts['overlays'] = visualize.save_overlays(
        out_dir, s['image'], s['mask'], s['prediction'], names=names,
        num_classes=max(config.model.num_classes, 2))
  log = epath.Path(workdir) / logging_utils.METRICS_FILE
  if log.exists():
    try:
      artifacts['training_curves'] = visualize.plot_training_curves(
          workdir, os.fspath(epath.Path(out_dir) / 'training_curves.png'),
          title=f'{config.model.name}: {epath.Path(paths.absolute(workdir)).name}')
    except ValueError as e:
      output.notes.append(f'no training curves: {e}')
  else:
    output.notes.append(f'no training curves: no training log at {log}')
  return artifacts


def default_checkpoint(workdir: str) -> str:
  """'best' when some checkpoint has validation metrics, else 'latest'."""
  return 'best' if checkpointing.best_checkpoint(workdir) is not None else 'latest'


def restore(workdir: str, checkpoint: str | int | None,
            config: ml_collections.ConfigDict | None = None,
            overrides: Mapping[str, Any] | None = None):
  """checkpointing.restore_model with the errors a user can act on.

  `overrides` ({'model.attention.kernel': 'xla', ...}) are applied on top
  of the config (the saved one unless `config` is given) before the model
  is built: fields that do not change the parameters (kernel, dtype, data
  location, threshold, ...) are safe; the checkpoint must still fit the
  model. Returns (config, model, step, selector used). A saved config that
  cannot be parsed or does not describe a model, or a config the data
  cannot feed, becomes an EvaluationError; missing workdirs/checkpoints and
  mismatching checkpoints keep checkpointing's own messages (which list
  what exists).
  """
  if not paths.check(workdir, 'workdir').is_dir():
    raise EvaluationError(f'workdir {workdir!r} does not exist')
  selector = (parse_checkpoint(checkpoint) if checkpoint not in (None, '')
              else default_checkpoint(workdir))

  def prepare(loaded: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    loaded = ml_collections.ConfigDict(loaded.to_dict())
    for key, value in (overrides or {}).items():
      try:
        loaded.update_from_flattened_dict({key: value})
      except (KeyError, AttributeError, TypeError) as e:
        raise EvaluationError(
            f'cannot apply --config.{key}={value!r} to the config of '
            f'{workdir!r}: {e}') from None
    try:
      models.check_backend(loaded.model)  # first: a config without a model says so
      input_pipeline.check_config(loaded)
    except ValueError as e:
      raise EvaluationError(str(e)) from None
    return loaded

  try:
    config, model, step = checkpointing.restore_model(workdir, selector,
                                                      config=config,
                                                      prepare=prepare)
  except json.JSONDecodeError as e:
    raise EvaluationError(
        f'the config saved in {workdir!r} cannot be read ({e}); pass the '
        'config it was trained with as --config') from e
  except (KeyError, AttributeError, TypeError) as e:
    raise EvaluationError(
        f'cannot build a model from the config of {workdir!r}: missing or '
        f'invalid field {e}; pass the config it was trained with as --config'
    ) from e
  return config, model, step, selector


def config_source(config: ml_collections.ConfigDict | None,
                  overrides: Mapping[str, Any] | None) -> str:
  """The report's `config_source`: which config, with which overrides."""
  source = ('override (--config)' if config is not None else
            'saved (with the checkpoint, else DIR/config.json)')
  if overrides:
    source += ' with ' + ', '.join(f'{k}={v!r}' for k, v in overrides.items())
  return source


def finish(member, *, split: str, output: EvalOutput,
           settings: eval_settings.EvalSettings, report_path: str,
           mesh: jax.sharding.Mesh, config_source: str,  # pylint: disable=redefined-outer-name
           extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """What eval.py does after the evaluation of `member` (an
  `ensemble.Member`, the first of an ensemble): times its model, draws,
  builds the report (with `extra` fields added) and writes it (process 0
  only)."""
  config, model, timing = member.config, member.model, settings.throughput
  out_dir = artifacts_dir(report_path)
  throughput = None
  if timing.measure:
    throughput = throughput_lib.inference_throughput(
        model, config, batch_sizes=timing.batch_sizes, warmup=timing.warmup,
        runs=timing.runs, mesh=mesh, peak_flops=timing.peak_flops)
  train_throughput = None
  if timing.train_step:
    train_throughput = throughput_lib.train_step_throughput(
        config, mesh=mesh, warmup=min(timing.warmup, 2),
        runs=max(1, timing.runs // 2), peak_flops=timing.peak_flops)
  writer = jax.process_index() == 0
  artifacts = (save_pictures(member.workdir, out_dir, output, config, split) if writer
               else {'overlays': [], 'training_curves': None})
  artifacts['folder'] = paths.absolute(out_dir)
  report = build_report(member, split, output, throughput=throughput,
                        train_throughput=train_throughput, artifacts=artifacts,
                        config_source=config_source)
  report['per_case'] = None
  if output.per_case is not None:
    path = cases_path(report_path)
    if writer:
      case_metrics.write_summary(path, output.per_case)
    report['per_case'] = {
        'path': paths.absolute(path),
        'num_cases': output.per_case['num_cases'],
        'tolerance': output.per_case['tolerance'],
        'foreground_mean': output.per_case['foreground_mean'],
        'empty_cases': output.per_case['empty_cases'],
    }
  report.update(extra or {})
  report['report_path'] = paths.absolute(report_path)
  if writer:
    write_json(report_path, report)
  return report


def attach_comparison(report: dict, other: dict) -> dict:
  """Adds `comparison` (the other report's path and the table) and rewrites."""
  report = dict(report)
  report['comparison'] = {
      'workdir': other['workdir'],
      'report_path': other['report_path'],
      'model': other['model']['name'],
      'step': other['checkpoint']['step'],
      'table': format_table([report, other]),
  }
  if jax.process_index() == 0:
    write_json(report['report_path'], report)
  return report


# ----------------------------------------------------------------------------
# Tables.


def _fmt(value, spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)


def _resolution_label(report: dict) -> str:
  if report.get('resolution', 'model') == 'native':
    return 'native size'
  if report.get('resolution') == 'volume':
    return 'per volume (3-D, mm)'
  size = report['data']['image_size']
  return f'model {size}x{size}'


def inference_label(inference: dict) -> str:
  """'window 32px overlap 0.5, tta flips, 5 models' (report['inference'])."""
  if inference['window']:
    parts = [f"window {inference['tile_size']}px overlap {inference['overlap']:g}"]
  else:
    parts = [f"whole image at {inference['tile_size']}px"]
  parts.append(f"tta {inference['tta']}")
  count = len(inference.get('members', [])) or 1
  parts.append(f"{count} model{'s' if count > 1 else ''}")
  return ', '.join(parts)


def table_rows(report: dict) -> list[tuple[str, str]]:
  """(label, value) rows of one report, in the seed's table order."""
  m = report['metrics']
  ckpt = report['checkpoint']
  per = 'volume' if report.get('resolution') == 'volume' else 'image'
  rows = [
      ('Checkpoint', f'{ckpt["requested"]} (step {ckpt["step"]})'),
      ('Counted at', _resolution_label(report)),
      *([('Inference', inference_label(report['inference']))]
        if report.get('inference') else []),
      ('F1 (Dice)', _fmt(m['dice'], '.4f')),
      ('IoU (dataset)', _fmt(m['iou'], '.4f')),
      (f'IoU (per {per})', _fmt(m['iou_per_image'], '.4f')),
      *case_rows(report),
      ('Precision', _fmt(m['precision'], '.4f')),
      ('Recall', _fmt(m['recall'], '.4f')),
      ('Accuracy', _fmt(m['accuracy'], '.4f')),
  ]
  if 'mean_iou' in m:
    rows.append(('Mean IoU (all classes)', _fmt(m['mean_iou'], '.4f')))
    for c, v in enumerate(m['iou_per_class']):
      rows.append((f'  IoU class {c}', _fmt(v, '.4f')))
  rows.append(('Loss', _fmt(m.get('loss'), '.4f')))
  rows.append((f'{per.capitalize()}s', str(m['num_images'])))
  t = report.get('throughput')
  if t:
    for b in t['batches']:
      lat = b['latency_s']
      rows.append((f'Images/s (batch {b["batch_size"]})',
                   _fmt(b['images_per_s']['median'], ',.1f')))
      rows.append((f'  latency ms (batch {b["batch_size"]})',
                   f'{lat["median"] * 1e3:.2f} [{lat["p10"] * 1e3:.2f}-{lat["p90"] * 1e3:.2f}]'))
    head = throughput_lib.headline(t)
    flops = head['flops_per_image']
    rows.append(('GFLOPs/image', _fmt(flops / 1e9 if flops else None, '.4g')))
    achieved = head['achieved_flops_per_s']
    rows.append((f'TFLOP/s (batch {head["batch_size"]})',
                 _fmt(achieved / 1e12 if achieved else None, '.4g')))
    if head.get('fraction_of_peak') is not None:
      rows.append(('  % of device peak', f'{100 * head["fraction_of_peak"]:.1f}'))
  train = report.get('train_throughput')
  if train:
    b = train['batches'][0]
    rows.append((f'Train images/s (batch {b["batch_size"]})',
                 _fmt(b['images_per_s']['median'], ',.1f')))
  rows.append(('Parameters', f'{report["model"]["num_parameters"]:,}'))
  return rows


def case_rows(report: dict) -> list[tuple[str, str]]:
  """The per-case foreground means (nnU-Net's headline Dice, NSD, HD95);
  none when the report has no per-case metrics (model resolution)."""
  cases = report.get('per_case')
  if not cases:
    return []
  mean = cases['foreground_mean']
  unit = 'mm' if report.get('resolution') == 'volume' else 'px'
  return [('Dice (case mean)', _fmt(mean['Dice'], '.4f')),
          (f'NSD @ {cases["tolerance"]:g} {unit} (case mean)', _fmt(mean['NSD'], '.4f')),
          (f'HD95 {unit} (case mean)', _fmt(mean['HD95'], '.2f'))]


def format_table(reports: Sequence[dict], names: Sequence[str] | None = None) -> str:
  """Reports side by side (the seed's U-Net vs LinTUNet table)."""
  if not names:
    names = [r['model']['name'] for r in reports]
    if len(set(names)) < len(names):  # e.g. two LinTUNet runs: add the workdir
      names = [f'{n} ({os.path.basename(r["workdir"].rstrip(os.sep))})'
               for n, r in zip(names, reports)]
  names = list(names)
  per = [dict(table_rows(r)) for r in reports]
  labels: list[str] = []
  for r in reports:
    for label, _ in table_rows(r):
      if label not in labels:
        labels.append(label)
  width0 = max(len(l) for l in labels + ['Metric'])
  widths = [max([len(n)] + [len(p.get(l, '')) for l in labels])
            for n, p in zip(names, per)]
  first = reports[0]
  header = (f'{first["data"]["dataset"]} / {first["data"]["split"]}, '
            f'threshold {first["threshold"]}')
  t = first.get('throughput')
  if t:
    header += (f'; timed on {t["device_kind"]} x{t["device_count"]} '
               f'({t["platform"]}), input {"x".join(map(str, t["input_shape"]))}, '
               f'{t["dtype"]}')
  line = '  '.join(['-' * width0] + ['-' * w for w in widths])
  out = [header]
  setups = {(r['data']['dataset'], r['data']['split'], r['data']['image_size'],
             r['data']['num_images'], r.get('resolution', 'model'))
            for r in reports}
  if len(setups) > 1:
    out.append('WARNING: the reports evaluate different data '
               '(dataset, split, image size, images, counted at): ' + '; '.join(
                   f'{n}: {r["data"]["dataset"]}/{r["data"]["split"]} '
                   f'{r["data"]["image_size"]}px {r["data"]["num_images"]} images '
                   f'{_resolution_label(r)}'
                   for n, r in zip(names, reports)))
  out += [f'{"Metric":<{width0}}  ' + '  '.join(
      f'{n:>{w}}' for n, w in zip(names, widths)), line]
  for label in labels:
    out.append(f'{label:<{width0}}  ' + '  '.join(
        f'{p.get(label, "-"):>{w}}' for p, w in zip(per, widths)))
  return '\n'.join(out)
