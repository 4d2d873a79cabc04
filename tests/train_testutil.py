"""Shared helpers of the training tests: tiny configs, data, subprocesses.

Everything is tiny (LinTUNet width 4 on 32x32 images of the 64x64
`synthetic_mri/small` dataset) so the training tests run in minutes on a
2-core CPU. Subprocesses compile at XLA backend optimisation level 0 (XLA's
CPU compiler takes ~25 s at the default level for one train step; the
numbers are the same programs, just less optimised machine code) and share
a persistent compilation cache, so the three runs of the resume test
compile once.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[1]
# For in-process compiles: jitted(...).lower(...).compile(compiler_options=OPT0).
OPT0 = {'xla_backend_optimization_level': 0}
DATASET = 'synthetic_mri/small'


def data_dir(tmp_path_factory) -> str:
  """A session-wide data_dir with synthetic_mri/small prepared (~5 s, once)."""
  path = tmp_path_factory.getbasetemp() / 'train_tests_tfds'
  marker = path / 'READY'
  if not marker.exists():
    from lintunet_jax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top
    input_pipeline.prepare_dataset(tiny_config(str(path)))
    marker.write_text('ok')
  return str(path)


def cache_dir(tmp_path_factory) -> str:
  path = tmp_path_factory.getbasetemp() / 'train_tests_jax_cache'
  path.mkdir(exist_ok=True)
  return str(path)


TINY = {
    'model.width': 4,
    'dataset.image_size': 32,
    'model.attention.seq_len': 4,  # (32/16)^2 bottleneck tokens
    'model.attention.k': 4,
    'model.attention.block_size': 2,
    'dataset.num_workers': 0,
    'batch_size': 8,
    'eval_batch_size': 16,
    'num_train_steps': 6,
    'log_every_steps': 1,
    'eval_every_steps': 1000,
    'checkpoint_every_steps': 2,
    'warmup_epochs': 0.0,
    'learning_rate': 3e-3,
}


# TINY's bottleneck is 2x2 tokens, where every tile of the layout is FULL
# (dense attention in effect). These overrides give a 4x4 grid (64x64
# images) in tiles of 2 tokens under a 3x3 window: EMPTY, PARTIAL and FULL
# tiles, so the block-sparse kernels really skip work (test_sparse_tiles).
SPARSE = {'dataset__image_size': 64, 'model__attention__seq_len': 16,
          'model__attention__block_size': 2,
          'model__attention__pattern': 'local_2d(radius=1)'}


# The program of the resume test and the CLI test's main run (same compiled
# steps, so the persistent cache serves both): dropout on, to exercise RNG.
RESUME = {'num_train_steps': 10, 'model__attention__dropout': 0.1,
          'dataset__augment': True, 'loss': 'bce_dice'}


def _set(config, dotted: str, value) -> None:
  *path, last = dotted.split('.')
  for name in path:
    config = config[name]
  config[last] = value


def tiny_config(data_dir_path: str, model: str = 'lintunet',
                **overrides) -> ml_collections.ConfigDict:
  """configs/<model>.py:quick shrunk to TINY; overrides use '__' for '.'."""
  from configs import lintunet, unet  # pylint: disable=g-import-not-at-top
  config = (lintunet if model == 'lintunet' else unet).get_config('quick')
  config.dataset.name = DATASET
  config.dataset.data_dir = data_dir_path
  for key, value in TINY.items():
    _set(config, key, value)
  for key, value in overrides.items():
    _set(config, key.replace('__', '.'), value)
  return config


def tiny_flags(data_dir_path: str, model: str = 'lintunet', **overrides) -> list[str]:
  """train.py flags for the same config as `tiny_config`."""
  values = dict(TINY)
  values['dataset.name'] = DATASET
  values['dataset.data_dir'] = data_dir_path
  values.update({k.replace('__', '.'): v for k, v in overrides.items()})
  flags = [f'--config={ROOT / "configs" / (model + ".py")}:quick']
  flags += [f'--config.{k}={v}' for k, v in values.items()]
  return flags


def env(devices: int = 1, cache: str | None = None, **extra) -> dict[str, str]:
  """Environment for a subprocess: CPU devices, fast compiles, shared cache."""
  result = dict(os.environ)
  result['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={devices} '
                         '--xla_backend_optimization_level=0')
  result['JAX_PLATFORMS'] = 'cpu'
  result['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + [p for p in result.get('PYTHONPATH', '').split(os.pathsep) if p])
  result['PYTHONUNBUFFERED'] = '1'
  # No launcher of the machine running the tests (a SLURM job, a TPU VM's
  # worker list) may turn a test's process into one of a cluster.
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
               'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'TPU_PROCESS_ADDRESSES',
               'TPU_WORKER_HOSTNAMES'):
    result.pop(name, None)
  if cache:
    result['JAX_COMPILATION_CACHE_DIR'] = cache
    result['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    result['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  result.update({k: str(v) for k, v in extra.items()})
  return result


class Run:
  """A train.py subprocess started in the background (output to files).

  The CPU compiler is mostly single-threaded, so tests start independent
  runs together and then wait: on 2 cores that halves the wall time.
  """

  def __init__(self, workdir, flags: list[str], *, cache: str | None = None,
               devices: int = 1, extra_env: dict | None = None,
               log_name: str | None = None):
    """extra_env: more environment variables; log_name: the output files'
    name beside the workdir (default: the workdir's), for several
    processes of one run."""
    self.workdir = str(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    log = os.path.join(self.workdir, '..', log_name or os.path.basename(self.workdir))
    self._out = open(f'{log}.stdout', 'w+')
    self._err = open(f'{log}.stderr', 'w+')
    self.proc = subprocess.Popen(
        [sys.executable, str(ROOT / 'train.py'), f'--workdir={self.workdir}', *flags],
        env=env(devices, cache, **(extra_env or {})), cwd=str(ROOT),
        stdout=self._out, stderr=self._err, text=True)

  def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
      self.proc.wait(timeout=timeout)
    finally:
      self.kill()  # never leave a run behind
    self._out.seek(0)
    self._err.seek(0)
    return subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                       self._out.read(), self._err.read())

  def kill(self) -> None:
    """Kills the run if it is still running and reaps it (for cleanup: a
    run waited for already is left as it is)."""
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def run_train(workdir, flags: list[str], *, cache: str | None = None,
              devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs train.py to completion (kills it on timeout); returns the result."""
  return Run(workdir, flags, cache=cache, devices=devices).wait(timeout)


def run_python(code: str, *, devices: int = 1, cache: str | None = None,
               timeout: float = 240, **extra_env) -> dict:
  """Runs `code` in a fresh Python; its last stdout line must be JSON."""
  proc = subprocess.run([sys.executable, '-c', code], env=env(devices, cache, **extra_env),
                        cwd=str(ROOT), capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\n'
                         f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def train_losses(workdir) -> dict[int, float]:
  """{step: loss} of the 'train' records in DIR/metrics.jsonl."""
  from lintunet_jax.training import metric_logs as logging_utils  # pylint: disable=g-import-not-at-top
  return {r['step']: r['loss'] for r in logging_utils.read_metrics(str(workdir), 'train')}


def step_setup(data_dir_path: str, **overrides) -> dict:
  """A tiny LinTUNet and its train step's pieces on a 1-device mesh, with
  one real batch of the training split (numpy, [8, 32, 32, 1] images):
  config, mesh, model, model_def, variables, tx, batch, and `new_state()`,
  a fresh replicated train state (the step donates the one it is given)."""
  import jax  # pylint: disable=g-import-not-at-top
  from lintunet_jax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top
  from lintunet_jax.training import optim, parallel  # pylint: disable=g-import-not-at-top
  from lintunet_jax.training import state as train_state_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir_path, **overrides)
  mesh = parallel.create_mesh(jax.devices()[:1])
  model = train_state_lib.init_model(config.model, seed=0, bn_axis_name='data')
  model_def, variables = train_state_lib.split_model(model)
  tx = optim.create_optimizer(config, lambda s: config.learning_rate)
  local = next(input_pipeline.create_train_iterator(config, process_index=0,
                                                    process_count=1))
  return dict(config=config, mesh=mesh, model=model, model_def=model_def,
              variables=variables, tx=tx,
              batch={'image': local['image'], 'mask': local['mask']},
              new_state=lambda: parallel.replicate(mesh, jax.device_get(
                  train_state_lib.create_train_state(variables, tx, seed=0))))


def assert_trees_equal(a, b) -> None:
  """Same structure, every leaf bit-identical (device arrays fetched)."""
  import chex  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


def trees_equal(a, b) -> bool:
  try:
    assert_trees_equal(a, b)
  except AssertionError:
    return False
  return True


class FaultyIterator:
  """The real training iterator with `fault(count, batch)` applied to each
  batch it yields (count from 1): it returns the batch to train on, or
  raises. Checkpoints save and restore the real iterator's state."""

  def __init__(self, iterator, fault):
    self.iterator, self.fault, self.count = iterator, fault, 0

  def __next__(self):
    batch = dict(next(self.iterator))
    self.count += 1
    return self.fault(self.count, batch)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)

  def close(self):
    self.iterator.close()


def inject_train_faults(loop_module, fault):
  """Makes `loop_module`'s training iterators FaultyIterators with `fault`
  (for train_and_evaluate in a test's subprocess); returns the undo."""
  pipeline = loop_module.input_pipeline
  real = pipeline.create_train_iterator
  pipeline.create_train_iterator = lambda *a, **k: FaultyIterator(real(*a, **k), fault)
  return lambda: setattr(pipeline, 'create_train_iterator', real)
