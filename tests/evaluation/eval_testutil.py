"""Shared set-up of the evaluation and prediction tests: one tiny recipe
and the environment their CLI subprocesses run in."""

import json
import os
import pathlib
import shutil

from configs import lintunet

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(data_dir, name='lintunet'):
  """The quick recipe shrunk to width 4 at 32x32 on `synthetic_mri/small`."""
  config = lintunet.get_config('quick')
  config.model.name = name
  config.model.width = 4
  config.model.attention.seq_len = 4
  config.model.attention.k = 4
  config.model.attention.block_size = 2
  config.dataset.name = 'synthetic_mri/small'
  config.dataset.data_dir = str(data_dir)
  config.dataset.image_size = 32
  config.dataset.num_workers = 0
  config.eval_batch_size = 24
  return config


def cli_env(base: pathlib.Path) -> dict:
  """CPU only, the repository importable, compilations cached under `base`."""
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(base / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
  return env


def as_trained_with_pallas(workdir: pathlib.Path, copy: pathlib.Path) -> pathlib.Path:
  """A copy of `workdir` whose saved configs say model.attention.kernel=
  'pallas', as a run trained on a GPU with the fused kernels leaves them
  (the parameters are the same with either kernel)."""
  shutil.copytree(workdir, copy)
  edited = 0
  for path in [copy / 'config.json', *(copy / 'checkpoints').glob('*/config/*')]:
    try:
      saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
      continue  # orbax's own files (commit_success.txt, ...)
    if not isinstance(saved, dict) or 'model' not in saved:
      continue
    assert saved['model']['attention']['kernel'] == 'auto'  # the default
    saved['model']['attention']['kernel'] = 'pallas'
    path.write_text(json.dumps(saved))
    edited += 1
  assert edited >= 2, 'no checkpoint config found to edit'
  return copy


_THROUGHPUT = {'measure_throughput': 'measure', 'throughput_batch_sizes': 'batch_sizes',
               'throughput_runs': 'runs', 'throughput_warmup': 'warmup',
               'peak_flops': 'peak_flops', 'measure_train_step': 'train_step'}
_INFERENCE = ('sliding_window', 'overlap', 'tta', 'tile_batch_size')
_RUN = ('config', 'overrides', 'mesh', 'case_names', 'on_image')


def run_eval(workdirs, **kwargs):
  """whole_image_eval.run (eval.py's entry) with the settings given as
  keywords, under the names of eval.py's flags (`throughput_runs=2`,
  `tta='flips'`, `resolution='model'`...), so tests read as a command line."""
  from lintunet_jax.evaluation import settings  # pylint: disable=g-import-not-at-top
  from lintunet_jax.evaluation import whole_image_eval  # pylint: disable=g-import-not-at-top
  run = {k: kwargs.pop(k) for k in _RUN if k in kwargs}
  timing = {_THROUGHPUT[k]: kwargs.pop(k) for k in list(kwargs) if k in _THROUGHPUT}
  choice = {k: kwargs.pop(k) for k in _INFERENCE if k in kwargs}
  return whole_image_eval.run(workdirs, settings.EvalSettings(
      **kwargs, inference=settings.InferenceChoice(**choice),
      throughput=settings.ThroughputSettings(**timing)), **run)
