"""The workdir and checkpoint layout: the one place that knows it.

  DIR/config.json                 the resolved config of the latest run (JSON)
  DIR/metrics.jsonl               train/eval records (metric_logs)
  DIR/tensorboard/                TensorBoard event files
  DIR/checkpoints/<step>/         one orbax checkpoint per saved step:
      model/                      {'params', 'batch_stats'}: pure dicts (StandardSave)
      train/                      {'opt_state', 'step', 'rng'} (absent in weights-only
                                  checkpoints written by an importer)
      data_iterator/              process_<i>-of-<n>.json: each process's input
                                  pipeline position (`get_state()`)
      config/                     the config the checkpoint was trained with (JSON)
      metrics/                    validation metrics (orbax's; ranks 'best' by iou)

Checkpoints are written by orbax's `CheckpointManager`: asynchronously, into
a temporary directory renamed into place when complete, so a kill (even
kill -9 during a save) leaves only complete checkpoints; leftover temporary
directories are removed by the next run. The last `keep` checkpoints plus
the `keep_best` best by validation IoU are kept.

Public API (used by train_lib, eval.py, predict.py and the weight converter):
  save_config(workdir, config) / load_config(workdir) -> ConfigDict
  list_checkpoints(workdir) -> [steps]
  best_checkpoint(workdir) -> step | None;  checkpoint_metrics(workdir, step)
  restore_model(workdir, checkpoint='latest'|'best'|step, config=None)
      -> (config, model in eval mode, step)
  write_weights_checkpoint(workdir, config, model, step=0)
and, for training: create_manager, save_checkpoint, restore_checkpoint,
latest_resumable_step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp_lib

from lintunet_jax import models
from lintunet_jax import paths
from lintunet_jax.training import state as train_state_lib

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
MODEL_ITEM = 'model'
TRAIN_ITEM = 'train'
DATA_ITEM = 'data_iterator'
CONFIG_ITEM = 'config'
BEST_METRIC = 'iou'  # validation IoU, higher is better


class CheckpointError(ValueError):
  """A checkpoint is missing or does not fit the model it is loaded into."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """DIR/checkpoints: absolute for local workdirs (tensorstore wants that),
  the URL itself for gs://."""
  return os.fspath(epath.Path(paths.absolute(workdir)) / CHECKPOINT_DIR)


# ---------------------------------------------------------------- config


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved config to DIR/config.json (atomically); returns the path.

  Only process 0 writes in multi-process runs.
  """
  root = paths.check(workdir, 'workdir')
  path = root / CONFIG_FILE
  if jax.process_index() == 0:
    root.mkdir(parents=True, exist_ok=True)
    paths.write_text(path, config_to_json(config) + '\n')
  return os.fspath(path)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config saved in DIR/config.json."""
  root = paths.check(workdir, 'workdir')
  if not root.is_dir():
    raise FileNotFoundError(f'workdir {os.fspath(workdir)!r} does not exist')
  path = root / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'no {CONFIG_FILE} in {os.fspath(workdir)!r} (it holds: '
        f'{_listing(root)}); was it written by train.py or '
        'write_weights_checkpoint?')
  return config_from_json(path.read_text())


def _listing(path: epath.Path, limit: int = 12) -> str:
  try:
    names = sorted(p.name for p in path.iterdir())
  except OSError:
    return '(unreadable)'
  if not names:
    return 'nothing'
  more = f', ... ({len(names)} entries)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


# ---------------------------------------------------------------- data iterator item


class _ProcessJsonHandler(ocp.CheckpointHandler):
  """One JSON file per process: each host's input-pipeline position."""

  def save(self, directory: epath.Path, args: 'DataIteratorSave'):
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    (directory / name).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: 'DataIteratorRestore' = None):
    name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    path = epath.Path(directory) / name
    if not path.exists():
      found = sorted(p.name for p in epath.Path(directory).iterdir())
      logging.warning('no input pipeline state %s in %s (found %s): the '
                      'checkpoint was written by a different number of '
                      'processes', name, directory, found)
      return None
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path):
    return None


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  pass


# ---------------------------------------------------------------- manager


def create_manager(workdir: str | os.PathLike, *, keep: int = 3,
                   keep_best: int = 1, async_save: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax CheckpointManager on DIR/checkpoints.

  Keeps the `keep` most recent checkpoints plus the `keep_best` with the
  highest validation IoU (among checkpoints saved with metrics).
  """
  policies = [pp_lib.LatestN(n=max(1, keep))]
  if keep_best > 0:
    policies.append(pp_lib.BestN(
        get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=keep_best,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      best_fn=lambda m: m[BEST_METRIC], best_mode='max',
      preservation_policy=pp_lib.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only, read_only=read_only,
      create=not read_only)
  handlers = {MODEL_ITEM: ocp.StandardCheckpointHandler(),
              TRAIN_ITEM: ocp.StandardCheckpointHandler(),
              DATA_ITEM: _ProcessJsonHandler(),
              CONFIG_ITEM: ocp.JsonCheckpointHandler()}
  paths.check(workdir, 'workdir')  # before orbax creates anything
  return ocp.CheckpointManager(checkpoint_dir(workdir),
                               options=options, item_handlers=handlers)


def _step_items(manager_or_workdir, step: int) -> set[str]:
  if isinstance(manager_or_workdir, ocp.CheckpointManager):
    root = epath.Path(manager_or_workdir.directory)
  else:
    root = epath.Path(checkpoint_dir(manager_or_workdir))
  path = root / str(step)
  return {p.name for p in path.iterdir()} if path.is_dir() else set()


def has_train_state(manager_or_workdir, step: int) -> bool:
  """Whether the checkpoint holds optimizer state (not weights-only)."""
  return TRAIN_ITEM in _step_items(manager_or_workdir, step)


def latest_resumable_step(manager: ocp.CheckpointManager) -> tuple[int | None, bool]:
  """(step to start from, whether it has a full train state).

  The latest checkpoint with optimizer state if any (resume); otherwise the
  latest weights-only checkpoint (fine-tune from it); (None, False) if none.
  """
  steps = sorted(manager.all_steps())
  full = [s for s in steps if has_train_state(manager, s)]
  if full:
    return full[-1], True
  if steps:
    return steps[-1], False
  return None, False


def _jsonable_metrics(metrics: Mapping[str, Any] | None):
  if metrics is None:
    return None
  out = {}
  for key, value in metrics.items():
    if isinstance(value, (np.generic, np.ndarray)):
      value = value.tolist()
    if isinstance(value, (int, float, str, list, type(None))):
      out[key] = value
  return out


def save_checkpoint(manager: ocp.CheckpointManager, step: int, *,
                    variables: Mapping[str, Any], train: Mapping[str, Any] | None,
                    data_state: Any = None, config=None,
                    metrics: Mapping[str, Any] | None = None) -> bool:
  """Starts an (async) save; all processes must call it.

  variables: {'params', 'batch_stats'}; train: {'opt_state', 'step', 'rng'}
  or None (weights-only); data_state: this process's iterator state (JSON);
  metrics: validation metrics incl. 'iou' (for 'best') or None.
  """
  items = {MODEL_ITEM: ocp.args.StandardSave(dict(variables))}
  if train is not None:
    items[TRAIN_ITEM] = ocp.args.StandardSave(dict(train))
  if data_state is not None:
    items[DATA_ITEM] = DataIteratorSave(data_state)
  if config is not None:
    items[CONFIG_ITEM] = ocp.args.JsonSave(json.loads(config_to_json(config)))
  return manager.save(step, args=ocp.args.Composite(**items),
                      metrics=_jsonable_metrics(metrics))


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """ShapeDtypeStructs to restore into (each leaf's own sharding by default)."""

  def to_struct(x):
    s = sharding if sharding is not None else getattr(x, 'sharding', None)
    if not hasattr(x, 'dtype'):
      x = np.asarray(x)
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s)

  return jax.tree.map(to_struct, tree)


def _flat(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """'a/b/c' -> (shape, dtype) for arrays, ShapeDtypeStructs or orbax metadata."""
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))[0]
  for path, leaf in leaves:
    key = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                   for k in path)
    out[key] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
  return out


def check_model_tree(stored: Any, expected: Any, *, where: str = '') -> None:
  """Raises CheckpointError listing missing/unexpected keys and shape changes."""
  have, want = _flat(stored), _flat(expected)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  shapes = sorted(k for k in set(have) & set(want) if have[k][0] != want[k][0])
  if not (missing or unexpected or shapes):
    return
  lines = [f'checkpoint {where} does not match the configured model '
           f'({len(have)} arrays stored, {len(want)} expected):']

  def show(title, keys, fmt):
    if keys:
      lines.append(f'  {title} ({len(keys)}): ' + ', '.join(fmt(k) for k in keys[:10])
                   + (' ...' if len(keys) > 10 else ''))

  show('missing from the checkpoint', missing, lambda k: f'{k} {want[k][0]}')
  show('in the checkpoint but not the model', unexpected,
       lambda k: f'{k} {have[k][0]}')
  show('shape differs (checkpoint vs model)', shapes,
       lambda k: f'{k} {have[k][0]} vs {want[k][0]}')
  lines.append('  (check config.model: name, width, attention settings, '
               'num_classes, in_channels, image size / attention.seq_len)')
  raise CheckpointError('\n'.join(lines))


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, *,
                       variables: Any, train: Any = None,
                       data: bool = False) -> dict[str, Any]:
  """Restores a checkpoint's items into the given targets.

  variables/train: pytrees of arrays or ShapeDtypeStructs (shape, dtype and
  sharding to restore into); train=None skips the optimizer state. data:
  also read this process's iterator state. Returns a dict with 'model',
  and 'train' / 'data_iterator' (None when absent) as requested.
  """
  items_on_disk = _step_items(manager, step)
  where = os.fspath(epath.Path(manager.directory) / str(step))
  stored = manager.item_metadata(step)
  model_meta = stored[MODEL_ITEM] if MODEL_ITEM in stored.keys() else None
  if model_meta is None or MODEL_ITEM not in items_on_disk:
    raise CheckpointError(f'checkpoint {where} has no {MODEL_ITEM!r} item '
                          f'(it holds: {sorted(items_on_disk)})')
  model_meta = getattr(model_meta, 'tree', model_meta)
  check_model_tree(model_meta, variables, where=where)
  args = {MODEL_ITEM: ocp.args.StandardRestore(abstract_like(variables))}
  if train is not None:
    if TRAIN_ITEM not in items_on_disk:
      raise CheckpointError(f'checkpoint {where} is weights-only (no optimizer '
                            'state)')
    args[TRAIN_ITEM] = ocp.args.StandardRestore(abstract_like(train))
  if data and DATA_ITEM in items_on_disk:
    args[DATA_ITEM] = DataIteratorRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return {MODEL_ITEM: restored[MODEL_ITEM],
          TRAIN_ITEM: restored[TRAIN_ITEM] if train is not None else None,
          DATA_ITEM: restored[DATA_ITEM] if DATA_ITEM in args else None}


# ---------------------------------------------------------------- reading checkpoints


def list_checkpoints(workdir: str | os.PathLike) -> list[int]:
  """Steps of the complete checkpoints in DIR/checkpoints, ascending.

  Complete as orbax decides (on gs://, where a checkpoint is written in
  place, only those with their commit marker), so a save cut short by a
  kill is never listed.
  """
  root = epath.Path(checkpoint_dir(workdir))
  if not root.is_dir():
    return []
  return sorted(ocp.path.step.checkpoint_steps(root))


def checkpoint_metrics(workdir: str | os.PathLike, step: int) -> dict | None:
  """The validation metrics saved with a checkpoint, or None."""
  path = epath.Path(checkpoint_dir(workdir)) / str(step) / 'metrics' / 'metrics'
  if not path.exists():
    return None
  return json.loads(path.read_text())


def best_checkpoint(workdir: str | os.PathLike) -> int | None:
  """The step with the highest validation IoU (ties: the later), or None."""
  scored = [(m[BEST_METRIC], s) for s in list_checkpoints(workdir)
            if (m := checkpoint_metrics(workdir, s)) and BEST_METRIC in m]
  return max(scored)[1] if scored else None


def resolve_step(workdir: str | os.PathLike, checkpoint: str | int = 'latest') -> int:
  """'latest' | 'best' | a step number -> an existing step (clear errors)."""
  root = paths.check(workdir, 'workdir')
  if not root.is_dir():
    raise FileNotFoundError(f'workdir {os.fspath(workdir)!r} does not exist')
  steps = list_checkpoints(workdir)
  if not steps:
    raise FileNotFoundError(
        f'no checkpoints in {checkpoint_dir(workdir)!r} (the workdir holds: '
        f'{_listing(root)})')
  if checkpoint == 'latest':
    return steps[-1]
  if checkpoint == 'best':
    step = best_checkpoint(workdir)
    if step is None:
      raise CheckpointError(
          f'no checkpoint in {checkpoint_dir(workdir)!r} has validation '
          f'metrics, so there is no best one; available steps: {steps} '
          "(use checkpoint='latest' or a step)")
    return step
  try:
    step = int(checkpoint)
  except (TypeError, ValueError):
    raise ValueError(f"checkpoint must be 'latest', 'best' or a step number, "
                     f'got {checkpoint!r}') from None
  if step not in steps:
    raise CheckpointError(f'no checkpoint for step {step} in '
                          f'{checkpoint_dir(workdir)!r}; available steps: {steps}')
  return step


def _checkpoint_config(workdir: str, step: int) -> ml_collections.ConfigDict | None:
  path = epath.Path(checkpoint_dir(workdir)) / str(step) / CONFIG_ITEM
  if not path.is_dir():
    return None
  for item in path.iterdir():
    if item.name.startswith('_'):
      continue
    try:
      return ml_collections.ConfigDict(json.loads(item.read_text()))
    except (OSError, json.JSONDecodeError):
      continue
  return None


def keep_trained_decoder_concat(workdir: str | os.PathLike,
                                config: ml_collections.ConfigDict
                                ) -> ml_collections.ConfigDict:
  """`config`, its `model.decoder_concat` set to that of DIR's checkpoints.

  Resuming or fine-tuning must go on with the network the checkpoints were
  trained as: the two concat orders have the same parameter shapes, so a
  mismatch would load without error and compute something else. Workdirs
  trained before the field existed (issue 16) keep their (skip, upsampled)
  order this way. A DIR without checkpoints leaves `config` as it is.
  """
  workdir = os.fspath(workdir)
  steps = list_checkpoints(workdir)
  if not steps:
    return config
  saved = _checkpoint_config(workdir, steps[-1])
  if saved is None and os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    saved = load_config(workdir)
  if saved is None or 'model' not in saved:
    return config
  trained = models.decoder_concat(saved.model)
  if trained != config.model.get('decoder_concat'):
    logging.warning('%s: its checkpoints were trained with '
                    "model.decoder_concat='%s'; keeping it", workdir, trained)
    config = copy.deepcopy(config)
    with config.unlocked():
      config.model.decoder_concat = trained
  return config


def restore_model(workdir: str | os.PathLike, checkpoint: str | int = 'latest',
                  config: ml_collections.ConfigDict | None = None, *,
                  prepare: Callable[[ml_collections.ConfigDict],
                                    ml_collections.ConfigDict] | None = None):
  """Loads a trained model: -> (config, model in eval mode, step).

  The model is rebuilt from `config` if given, else from the config saved
  with the checkpoint (else DIR/config.json), passed through `prepare` when
  given (e.g. command-line overrides and checks), then its parameters and
  BatchNorm statistics are loaded (on the first local device). Raises
  FileNotFoundError (no workdir / no checkpoints), CheckpointError (unknown
  step, listing the available ones; 'best' without metrics; a parameter
  tree that does not match the config's model, naming keys and shapes).
  """
  step = resolve_step(workdir, checkpoint)
  if config is None:
    config = _checkpoint_config(workdir, step)
  if config is None:
    config = load_config(workdir)
  if prepare is not None:
    config = prepare(config)
  model_def, variables = train_state_lib.split_model(
      train_state_lib.abstract_model(config.model))
  manager = create_manager(workdir, read_only=True, async_save=False)
  try:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = restore_checkpoint(manager, step, variables=abstract_like(
        variables, sharding=device))
  finally:
    manager.close()
  model = model_def.merge(restored[MODEL_ITEM]['params'],
                          restored[MODEL_ITEM]['batch_stats'])
  model.eval()
  return config, model, step


def write_weights_checkpoint(workdir: str | os.PathLike,
                             config: ml_collections.ConfigDict, model,
                             step: int = 0) -> str:
  """Writes a model-only checkpoint (params + BatchNorm stats) and the config.

  For importers of external weights: `restore_model` reads it like any
  checkpoint, and train.py on this workdir fine-tunes from it with a fresh
  optimizer (from step 0). Atomic: on failure nothing is left behind (the
  checkpoint is renamed into place only when complete, and a config.json
  this call created is removed). Returns the checkpoint's directory.
  """
  root = paths.check(workdir, 'workdir')
  if step in list_checkpoints(workdir):
    raise FileExistsError(f'{checkpoint_dir(workdir)}/{step} already exists')
  variables = train_state_lib.model_variables(model)
  expected = train_state_lib.model_variables(
      train_state_lib.abstract_model(config.model))
  check_model_tree(abstract_like(variables), expected, where='being written')
  config_path = root / CONFIG_FILE
  had_config = config_path.exists()
  old_config = config_path.read_text() if had_config else None
  manager = None
  try:
    save_config(workdir, config)
    manager = create_manager(workdir, async_save=False)
    save_checkpoint(manager, step, variables=jax.device_get(variables),
                    train=None, config=config)
    manager.wait_until_finished()
  except BaseException:
    if jax.process_index() == 0:
      if had_config:
        paths.write_text(config_path, old_config)
      elif config_path.exists():
        config_path.unlink()
      ckpt_root = epath.Path(checkpoint_dir(workdir))
      # Local saves are renamed into place when complete (leftover:
      # '<step>.orbax-checkpoint-tmp*'); gs:// saves are written in place
      # and lack their commit marker until complete (leftover: '<step>').
      for item in ckpt_root.iterdir() if ckpt_root.is_dir() else []:
        if ((item.name.startswith(f'{step}.') and 'tmp' in item.name)
            or (item.name == str(step) and paths.is_url(workdir))):
          item.rmtree(missing_ok=True)
    raise
  finally:
    if manager is not None:
      manager.close()
  return os.fspath(epath.Path(checkpoint_dir(workdir)) / str(step))


def describe(workdir: str | os.PathLike) -> list[dict]:
  """[{'step', 'weights_only', 'metrics'}] for each checkpoint (for CLIs)."""
  return [dict(step=s, weights_only=not has_train_state(workdir, s),
               metrics=checkpoint_metrics(workdir, s))
          for s in list_checkpoints(workdir)]
