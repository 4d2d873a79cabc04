"""Data-parallel training and evaluation of LinTUNet / U-Net.

  train_and_evaluate(config, workdir)     # what train.py runs

Parallelism (pmap style, written with `jax.shard_map` under `jax.jit`, as
JAX's pmap migration guide prescribes; see docs/training.md): the steps are
per-device functions over a one-axis mesh `data` spanning every device of
every process. The train state is replicated (P()), batches are split along
their first axis (P('data')). Inside the step each device runs forward and
backward on its rows, gradients and the loss are averaged with
`lax.pmean(..., 'data')` and BatchNorm averages its batch statistics over
the same axis (`bn_axis_name='data'`), so N devices with B images each
compute exactly what one device computes with N*B images.

Public pieces other programs use:
  make_train_step(model_def, optimizer, mesh, loss=...) -> jitted (state, batch) -> (state, metrics)
  make_eval_step(model, config, mesh) -> (eval_step, variables)   # eval.py too
  split_eval_outputs(outputs) -> (counts, (loss_sum, loss_count))
  evaluate(eval_step, variables, batches, mesh) -> metrics dict
"""

from __future__ import annotations

import logging
import math
import signal
import time
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from lintunet_jax.training import checkpointing
from lintunet_jax.training import distributed
from lintunet_jax.data import folds as folds_lib
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.data import volume_config
from lintunet_jax.training import metric_logs as logging_utils
from lintunet_jax.training import losses
from lintunet_jax import metrics as metrics_lib
from lintunet_jax import models
from lintunet_jax import paths
from lintunet_jax.training import optim
from lintunet_jax.training import parallel
from lintunet_jax.training.state import (ModelDef, TrainState, create_train_state,
                                      init_model, split_model)

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """config.max_consecutive_nonfinite_steps steps in a row had a NaN or Inf
  loss (or gradient norm); training stopped."""


class ConfigError(ValueError):
  """The config cannot run here (data that cannot feed the model, a kernel
  this backend cannot compile); raised before anything is built."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field(s) and the fix."""
  try:
    input_pipeline.check_config(config)
    models.check_backend(config.model)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _fit_to_volumes(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """nnunet_raw: channels, classes and normalisation from dataset.json
  (volume_config.resolve); other datasets unchanged."""
  try:
    return volume_config.resolve(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


class TrainingInterrupted(RuntimeError):
  """Preempted (SIGTERM): a checkpoint of `step` was saved, then training stopped."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


# ---------------------------------------------------------------- steps


def make_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, *, loss: str = 'bce'):
  """The jitted data-parallel training step.

  Returns `train_step(state, batch) -> (new_state, metrics)`: `state` a
  replicated `TrainState` (donated: its buffers are reused for the new
  state), `batch` {'image': f32 [B,S,S,C], 'mask': int [B,S,S]} sharded
  along 'data' (`parallel.shard_batch`). metrics: replicated scalars
  'loss' (global batch mean, before the update), 'grad_norm' (global norm
  of the averaged gradient, before clipping) and 'finite' (both finite).

  A step whose loss or gradient is not finite is skipped: parameters,
  optimizer state and BatchNorm statistics stay as they were (one NaN
  batch would otherwise poison Adam's moments for good); only `step`
  advances, as it counts the batches consumed.
  """
  axis = mesh.axis_names[0]
  reseed = model_def.has_dropout_rngs

  def per_device(state: TrainState, batch):
    # Per-device dropout keys from (run rng, step, device index).
    key = jax.random.wrap_key_data(state.rng)
    key = jax.random.fold_in(jax.random.fold_in(key, state.step),
                             lax.axis_index(axis))

    def loss_fn(params):
      model = model_def.merge(params, state.batch_stats,
                              dropout_key=key if reseed else None)
      model.train()
      logits = model(batch['image'])
      per_example = losses.per_example_loss(loss, logits, batch['mask'])
      new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return jnp.mean(per_example), new_stats

    # pmap semantics: mark the (replicated) parameters as varying over the
    # axis so each device gets the gradient of its own loss, then average.
    params = lax.pcast(state.params, axis, to='varying')
    (loss_value, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = lax.pmean(grads, axis)
    loss_value = lax.pmean(loss_value, axis)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        params=keep_if_bad(optax.apply_updates(state.params, updates), state.params),
        batch_stats=keep_if_bad(new_stats, state.batch_stats),
        opt_state=keep_if_bad(opt_state, state.opt_state), step=state.step + 1)
    return new_state, {'loss': loss_value, 'grad_norm': grad_norm,
                       'finite': finite}

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis)),
                       out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0)


def make_eval_step(model: nnx.Module | ModelDef, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, *, threshold: float | None = None,
                   predictions: bool = False):
  """The evaluation step shared by training validation and eval.py.

  model: an NNX model (e.g. from `checkpointing.restore_model`) or a
  `ModelDef`. Returns `(eval_step, variables)`: `variables` the model's
  {'params', 'batch_stats'} replicated over `mesh` (None for a ModelDef),
  and `eval_step(variables, batch) -> outputs`, jitted, where `batch` is
  sharded along 'data' with 'image', 'mask' and optionally 'valid' (1 for
  real examples, 0 for padding) and 'region' (1 where the image lies: the
  canvas of `resize='pad'` is never counted). The model runs in eval mode
  (running BatchNorm statistics). `outputs` are replicated device arrays:
  the `metrics.batch_counts` of the global batch summed over devices (int32
  counts at model resolution, float32 'iou_image_sum'), plus 'loss_sum'
  (sum of the valid examples' losses, `config.loss`) and 'loss_count'
  (number of valid examples). Feed `split_eval_outputs(outputs)[0]` to a
  `metrics.MetricAccumulator`. With `predictions`, the step returns
  `(outputs, classes)`: also the predicted class ids uint8 [B, S, S],
  sharded like the batch (for metrics at each image's own size).
  """
  threshold = config.threshold if threshold is None else threshold
  if isinstance(model, ModelDef):
    model_def, variables = model, None
  else:
    model_def, variables = split_model(model)
    variables = parallel.replicate(mesh, variables)
  axis = mesh.axis_names[0]
  loss_name = config.loss

  def per_device(variables, batch):
    module = model_def.merge(variables['params'], variables['batch_stats'])
    module.eval()
    logits = module(batch['image'])
    valid = batch.get('valid')
    if valid is None:
      valid = jnp.ones(logits.shape[:1], jnp.float32)
    counts = metrics_lib.batch_counts(logits, batch['mask'], valid,
                                      threshold=threshold,
                                      region=batch.get('region'))
    per_example = losses.per_example_loss(loss_name, logits, batch['mask'])
    weight = (valid > 0).astype(jnp.float32)
    outputs = dict(counts)
    outputs['loss_sum'] = jnp.sum(per_example * weight)
    outputs['loss_count'] = jnp.sum(weight)
    if predictions:
      classes = metrics_lib.predict_classes(logits, threshold).astype(jnp.uint8)
      return lax.psum(outputs, axis), classes
    return lax.psum(outputs, axis)

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis)),
                       out_specs=(P(), P(axis)) if predictions else P())
  return jax.jit(step), variables


def split_eval_outputs(outputs: Mapping[str, Any]):
  """eval_step outputs -> (batch_counts dict, (loss_sum, loss_count))."""
  counts = {k: outputs[k] for k in metrics_lib.COUNT_KEYS}
  loss_parts = None
  if 'loss_sum' in outputs:
    loss_parts = (outputs['loss_sum'], outputs['loss_count'])
  return counts, loss_parts


def pad_local_batch(batch: Mapping[str, Any], multiple: int) -> dict[str, np.ndarray]:
  """Pads a host batch with invalid rows (valid=0) to a multiple of `multiple`."""
  batch = {k: np.asarray(v) for k, v in batch.items()}
  size = len(batch['image'])
  if 'valid' not in batch:
    batch['valid'] = np.ones(size, np.float32)
  extra = (-size) % multiple
  if extra:
    batch = {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)])
             for k, v in batch.items()}
  return batch


def evaluate(eval_step, variables: PyTree, batches: Iterable[Mapping[str, Any]],
             mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Metrics over a whole split: counts summed on device, divided once.

  batches: host-local batches (every process the same number); rows are
  padded to split over the local devices. Returns `metrics.compute_metrics`
  (iou, dice, precision, recall, accuracy, ...) plus 'loss'.
  """
  accumulator = metrics_lib.MetricAccumulator()
  loss_sum, loss_count = 0.0, 0.0
  pending = []
  for local_batch in batches:
    local_batch = pad_local_batch(local_batch, jax.local_device_count())
    pending.append(eval_step(variables, parallel.shard_batch(mesh, local_batch)))
    if len(pending) > 2:  # bound the device queue, keep it busy
      outputs = parallel.to_host(pending.pop(0))
      counts, (ls, lc) = split_eval_outputs(outputs)
      accumulator.add(counts)
      loss_sum, loss_count = loss_sum + float(ls), loss_count + float(lc)
  for outputs in pending:
    counts, (ls, lc) = split_eval_outputs(parallel.to_host(outputs))
    accumulator.add(counts)
    loss_sum, loss_count = loss_sum + float(ls), loss_count + float(lc)
  result = accumulator.result()
  result['loss'] = loss_sum / max(loss_count, 1.0)
  return result


# ---------------------------------------------------------------- the loop


def _schedule_lengths(config, num_train: int) -> tuple[int, int]:
  steps_per_epoch = max(1, num_train // config.batch_size)
  if config.num_train_steps and config.num_train_steps > 0:
    total = int(config.num_train_steps)
  else:
    total = int(math.ceil(config.num_epochs * steps_per_epoch))
  return steps_per_epoch, total


def _interval(value: int, steps_per_epoch: int) -> int:
  return steps_per_epoch if value is None or value <= 0 else int(value)


class _Preemption:
  """Has this run been asked to stop? Asked once per step, on every process.

  One process: a SIGTERM handler sets a flag; the loop saves the step it is
  at and stops. Several processes: the SIGTERM may reach only some of them,
  in the middle of different steps, so each cannot just stop where it is.
  `jax.distributed.initialize()` installed JAX's preemption notifier (it
  catches SIGTERM on any host and tells the others), and orbax's
  `CheckpointManager.reached_preemption(step)` becomes True on every host at
  the same step (the largest step any host had reached, plus one), which all
  then save. No Python handler is installed there: it would replace JAX's.
  """

  def __init__(self, manager):
    self._manager = manager
    self.received = False
    self._previous = None
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread
        pass

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop; call it at every step, in order."""
    # Called on every process (orbax agrees on the step only if all do).
    agreed = self._manager.reached_preemption(step)
    return self.received or agreed

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _restore_or_start(manager, state: TrainState, train_iter):
  """Resumes from the latest full checkpoint (state, step, RNG, data
  position), or fine-tunes from a weights-only one (fresh optimizer, step
  0), or keeps the fresh state. Returns (state, step resumed from or None)."""
  start_step, resumable = checkpointing.latest_resumable_step(manager)
  if start_step is None:
    return state, None
  train_item = None
  if resumable:
    train_item = {'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng}
  restored = checkpointing.restore_checkpoint(
      manager, start_step, variables=state.variables, train=train_item,
      data=resumable)
  state = state.replace(**restored[checkpointing.MODEL_ITEM])
  if not resumable:
    logging.info('fine-tuning from weights-only checkpoint %s/%d with a fresh '
                 'optimizer', manager.directory, start_step)
    return state, None
  state = state.replace(**restored[checkpointing.TRAIN_ITEM])
  data_state = restored[checkpointing.DATA_ITEM]
  if data_state is not None:
    try:
      train_iter.set_state(data_state)
    except (KeyError, ValueError, TypeError) as e:
      raise checkpointing.CheckpointError(
          f'the input pipeline position saved in checkpoint {start_step} does '
          f'not fit this input pipeline ({type(e).__name__}: {e}); was '
          'dataset.num_workers or another dataset setting changed? Resume '
          'with the settings of the interrupted run.') from e
  logging.info('resumed from %s/%d', manager.directory, start_step)
  return state, start_step


def _fold_cases(config, workdir: str, *, write: bool):
  """With config.dataset.fold = K: fold K's {"train": [case ids], "val":
  [case ids]} of the train split (cases, not examples: all slices of a
  volume are on its side) (DIR/splits.json written by process 0,
  or read back on resume; folds_lib.resolve). None without a fold."""
  ds = config.dataset
  if ds.get('fold') is None:
    return None
  return folds_lib.resolve(
      workdir, input_pipeline.unique_case_ids(config, ds.train_split),
      fold=int(ds.fold), num_folds=int(ds.num_folds),
      splits_file=ds.get('splits_file'), write=write)


def _close(iterator) -> None:
  if hasattr(iterator, 'close'):
    iterator.close()  # stops input worker processes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from DIR/checkpoints if any) and evaluates; returns the
  last validation metrics. Idempotent: re-running after a kill continues the
  same run from the last complete checkpoint. `workdir` and
  `config.dataset.data_dir` may be gs:// URLs (docs/training.md)."""
  # Before anything runs or is written: a URL nothing can write to fails now.
  paths.check(workdir, 'workdir')
  if config.dataset.get('data_dir'):
    paths.check(config.dataset.data_dir, 'config.dataset.data_dir')
  if config.dataset.get('splits_file'):
    paths.check(config.dataset.splits_file, 'config.dataset.splits_file')
  distributed.maybe_initialize_distributed(config)
  parallel.check_accelerator(config)
  config = _fit_to_volumes(config)
  check_config(config)
  distributed.check_shared_workdir(workdir)
  config = parallel.resolve_batch_sizes(config)
  is_main = jax.process_index() == 0
  mesh = parallel.create_mesh()
  local_batch = parallel.check_batch_size(config.batch_size, mesh=mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh=mesh, name='eval_batch_size')
  logging.info('%d devices (%s) in %d processes; global batch %d, %d per process',
               jax.device_count(), jax.devices()[0].device_kind,
               jax.process_count(), config.batch_size, local_batch)

  # Once per shared data_dir: process 0 prepares, the others then reuse it
  # (or, with a host-local data_dir, prepare their own copy).
  distributed.main_process_first(lambda: input_pipeline.prepare_dataset(config),
                                 'prepare the dataset')
  if is_main:
    volume_config.write_statistics(config, workdir)
  fold = _fold_cases(config, workdir, write=is_main)
  if fold is None:
    num_train = input_pipeline.num_examples(config, config.dataset.train_split)
    eval_split, eval_cases = config.dataset.eval_split, None
  else:  # validation on the fold's "val" cases of the train split
    num_train = len(input_pipeline.case_indices(  # examples, not cases
        config, config.dataset.train_split, fold['train']))
    eval_split, eval_cases = config.dataset.train_split, fold['val']
  steps_per_epoch, total_steps = _schedule_lengths(config, num_train)
  eval_every = _interval(config.eval_every_steps, steps_per_epoch)
  ckpt_every = _interval(config.checkpoint_every_steps, steps_per_epoch)
  log_every = max(1, int(config.log_every_steps))
  max_skipped = max(1, int(config.get('max_consecutive_nonfinite_steps', 5)))

  # Model, optimizer and a fresh (replicated) train state.
  config = checkpointing.keep_trained_decoder_concat(workdir, config)
  model = init_model(config.model, seed=config.seed,
                     bn_axis_name=parallel.DATA_AXIS)
  model_def, variables = split_model(model)
  logging.info('%s: %s parameters', config.model.name,
               f'{models.count_parameters(model):,}')
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch, total_steps)
  optimizer = optim.create_optimizer(config, schedule)
  state = parallel.replicate(mesh, jax.device_get(
      create_train_state(variables, optimizer, seed=config.seed)))
  train_step = make_train_step(model_def, optimizer, mesh, loss=config.loss)
  eval_step, _ = make_eval_step(model_def, config, mesh)

  # Resume (or fine-tune from weights-only checkpoints), then the data.
  manager = checkpointing.create_manager(
      workdir, keep=config.keep_checkpoints,
      keep_best=config.get('keep_best_checkpoints', 1),
      async_save=config.get('async_checkpointing', True))
  train_iter = input_pipeline.create_train_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count(),
      cases=None if fold is None else fold['train'])
  state, resumed_from = _restore_or_start(manager, state, train_iter)
  step = int(parallel.to_host(state.step))
  if step >= total_steps:
    logging.info('nothing to do: the run in %s finished (step %d of %d)',
                 workdir, step, total_steps)
    manager.close()
    _close(train_iter)
    return checkpointing.checkpoint_metrics(workdir, step) or {}
  if is_main:
    checkpointing.save_config(workdir, config)
  # Records past `step` come from a run that was killed: dropped.
  writer = logging_utils.MetricWriter(workdir, enabled=is_main, start_step=step)
  if resumed_from is not None:
    writer.write('resume', step, {'epoch': step / steps_per_epoch})

  last_eval: dict[str, Any] = {}
  pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet read
  interval_start, interval_steps = time.time(), 0
  input_wait = 0.0  # seconds blocked on the input iterator this interval
  bar = logging_utils.progress_bar(total_steps, step,
                                   enabled=is_main and config.get('progress_bar', True))
  preemption = _Preemption(manager)
  preempted = False
  skipped_in_a_row = 0  # non-finite steps since the last applied one

  def flush_pending() -> None:
    """Reads the queued step metrics; raises after `max_skipped` non-finite
    steps in a row (each was skipped by the train step)."""
    nonlocal pending, interval_start, interval_steps, input_wait, skipped_in_a_row
    if not pending:
      return
    values = [(s, parallel.to_host(m)) for s, m in pending]
    pending = []
    for s, m in values:
      skipped_in_a_row = 0 if bool(m['finite']) else skipped_in_a_row + 1
      if skipped_in_a_row >= max_skipped:
        manager.wait_until_finished()  # the last checkpoint is complete
        good = checkpointing.list_checkpoints(workdir)
        raise NonFiniteLossError(
            f'non-finite loss {float(m["loss"])} (gradient norm '
            f'{float(m["grad_norm"])}) at {skipped_in_a_row} steps in a row, '
            f'steps {s - skipped_in_a_row + 1}-{s} (max_consecutive_nonfinite_steps'
            f'={max_skipped}); training stopped. Skipped steps are never '
            f'applied, so the checkpoints hold no NaN. Last checkpoint: '
            f'{good[-1] if good else "none"} in {checkpointing.checkpoint_dir(workdir)}. '
            'Try a lower learning_rate or grad_clip_norm, or float32 compute.')
    applied = [m for _, m in values if bool(m['finite'])]
    now = time.time()
    elapsed = max(now - interval_start, 1e-9)
    rate = interval_steps * config.batch_size / elapsed
    wait_fraction = min(1.0, input_wait / elapsed)
    interval_start, interval_steps, input_wait = now, 0, 0.0
    record = {'epoch': values[-1][0] / steps_per_epoch,
              # Means over the applied steps (NaN if all were skipped).
              'loss': float(np.mean([float(m['loss']) for m in applied] or np.nan)),
              'grad_norm': float(np.mean([float(m['grad_norm']) for m in applied] or np.nan)),
              'skipped_steps': len(values) - len(applied),  # non-finite
              'lr': float(schedule(values[-1][0] - 1)),
              'images_per_sec': round(rate, 2),
              # Share of the interval spent waiting for the next batch:
              # near 0 when the device is the bottleneck, near 1 when the
              # input pipeline is (add workers, or prepare smaller images).
              'input_wait_fraction': round(wait_fraction, 4)}
    writer.write('train', values[-1][0], record)
    bar.set_postfix(loss=f'{record["loss"]:.4f}', img_s=f'{rate:.1f}', refresh=False)

  try:
    first_step = True
    while step < total_steps:
      wait_start = time.time()
      local = next(train_iter)
      input_wait += time.time() - wait_start
      batch = parallel.shard_batch(mesh, {'image': local['image'],
                                          'mask': local['mask']})
      if first_step:  # compilation happens here: time it, keep it out of images/s
        first_step = False
        compile_start = time.time()
        state, step_metrics = jax.block_until_ready(train_step(state, batch))
        writer.write('compile', step + 1, {
            'first_step_s': round(time.time() - compile_start, 3)})
        interval_start, input_wait = time.time(), 0.0
      else:
        state, step_metrics = train_step(state, batch)
      step += 1
      interval_steps += 1
      pending.append((step, step_metrics))
      bar.update(1)
      is_last = step == total_steps
      if step % log_every == 0 or is_last:
        flush_pending()  # one 'train' record per log interval
      do_eval = step % eval_every == 0 or is_last
      if do_eval:
        flush_pending()
        batches = input_pipeline.create_eval_iterator(  # eval_batch_size / processes each
            config, eval_split, cases=eval_cases,
            process_index=jax.process_index(), process_count=jax.process_count())
        last_eval = evaluate(eval_step, state.variables, batches, mesh)
        last_eval['split'] = eval_split
        if fold is not None:
          last_eval['fold'] = int(config.dataset.fold)
        # Validation counts pixels on the model's canvas (pad excluded), or
        # with patch_size every native pixel once in a grid of tiles;
        # eval.py defaults to each image's own size (docs/evaluation.md).
        last_eval['resolution'] = ('native_tiles' if config.dataset.get('patch_size')
                                   else 'model')
        writer.write('eval', step, {'epoch': step / steps_per_epoch,
                                    **last_eval})
        summary = (f'step {step}: validation loss {last_eval["loss"]:.4f} '
                   f'iou {last_eval["iou"]:.4f} dice {last_eval["dice"]:.4f}')
        if bar.disable:
          logging.info(summary)
        else:
          bar.write(summary)
      stop = preemption.reached(step) and not is_last
      preempted = preempted or stop
      if step % ckpt_every == 0 or do_eval or is_last or stop:
        flush_pending()  # stop before saving if the skipped steps hit the limit
        writer.flush()  # the log holds every record up to the saved step
        checkpointing.save_checkpoint(
            manager, step, variables=state.variables,
            train={'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng},
            data_state=train_iter.get_state(), config=config,
            metrics=last_eval if do_eval else None)
        interval_start = time.time()  # keep evaluation and saving out of images/s
      if stop:
        break
    flush_pending()
  finally:
    manager.wait_until_finished()
    manager.close()
    bar.close()
    writer.close()
    preemption.restore()
    _close(train_iter)
  if preempted:
    raise TrainingInterrupted(
        f'preempted (SIGTERM): saved a checkpoint of step {step} (process '
        f'{jax.process_index()} of {jax.process_count()}) and stopped; run the '
        'same command again to resume', step)
  return last_eval
