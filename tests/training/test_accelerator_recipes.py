"""The :gpu and :tpu recipes train on 8 devices: a CPU dry run of each.

train.py on 8 host-platform CPU devices (--xla_force_host_platform_device_count=8)
with the recipes as written (bfloat16, per-chip batches, warm-up, auto
workers) except a tiny width and image size, per-chip batches of 4 and 2
(the recipes' 64 or 32 per chip, times 8, would be more than the tiny
dataset's 256 training images: one step per epoch, nothing to warm up
over), a few steps, and require_accelerator off (the recipes refuse a
CPU). The per-chip batches must become global batches of 8 x per-chip, and
the run must warm up, train, evaluate and checkpoint. LinTUNet's :gpu and
the U-Net's :tpu cover both recipe files and both accelerators; the
recipes' own per-chip sizes are checked without training.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import lintunet, unet
from lintunet_jax.training import checkpointing
from lintunet_jax.training import metric_logs
from tests import train_testutil as tu

DEVICES = 8
STEPS = 3
PER_CHIP, PER_CHIP_EVAL = 4, 2
TINY_MODEL = {
    'model.width': 4, 'dataset.image_size': 32, 'model.attention.seq_len': 4,
    'model.attention.k': 4, 'model.attention.block_size': 2,
}


def _flags(model: str, accelerator: str, data_dir: str) -> list[str]:
  values = dict(TINY_MODEL)
  values.update({
      'dataset.name': tu.DATASET, 'dataset.data_dir': data_dir,
      'num_train_steps': STEPS, 'log_every_steps': 1, 'eval_every_steps': 1000,
      'checkpoint_every_steps': 1000, 'require_accelerator': False,
      'progress_bar': False, 'per_device_batch_size': PER_CHIP,
      'per_device_eval_batch_size': PER_CHIP_EVAL})
  return ([f'--config={tu.ROOT / "configs" / (model + ".py")}:{accelerator}']
          + [f'--config.{k}={v}' for k, v in values.items()])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  data_dir, cache = tu.data_dir(tmp_path_factory), tu.cache_dir(tmp_path_factory)
  root = tmp_path_factory.mktemp('recipes')
  started = {(model, accelerator): tu.Run(root / f'{model}-{accelerator}',
                                          _flags(model, accelerator, data_dir),
                                          cache=cache, devices=DEVICES)
             for model, accelerator in (('lintunet', 'gpu'), ('unet', 'tpu'))}
  try:
    return {key: (run.workdir, run.wait(timeout=600)) for key, run in started.items()}
  finally:
    for run in started.values():
      run.kill()


@pytest.mark.slow
@pytest.mark.parametrize('model, accelerator', [('lintunet', 'gpu'), ('unet', 'tpu')])
def test_recipe_trains_on_8_devices_with_its_per_chip_batch(runs, model, accelerator):
  workdir, result = runs[(model, accelerator)]
  assert result.returncode == 0, result.stderr[-5000:]
  assert f'{DEVICES} x cpu' in result.stderr and 'in 1 process(es)' in result.stderr
  with open(f'{workdir}/config.json') as f:
    config = json.load(f)
  assert config['model']['name'] == model
  assert config['model']['dtype'] == 'bfloat16'
  assert config['batch_size'] == PER_CHIP * DEVICES
  assert config['eval_batch_size'] == PER_CHIP_EVAL * DEVICES
  assert config['per_device_batch_size'] is None  # resolved, saved as global
  assert config['warmup_epochs'] == 1.0 and config['dataset']['num_workers'] == -1
  train = metric_logs.read_metrics(workdir, 'train')
  assert [r['step'] for r in train] == list(range(1, STEPS + 1))
  assert all(np.isfinite(r['loss']) for r in train)
  # Warm-up over the first epoch (256 // 32 = 8 steps): step s at s/8 of the rate.
  np.testing.assert_allclose([r['lr'] for r in train],
                             [config['learning_rate'] * s / 8 for s in range(1, STEPS + 1)],
                             rtol=1e-6)
  [evaluation] = metric_logs.read_metrics(workdir, 'eval')
  assert evaluation['step'] == STEPS and evaluation['num_images'] == 64
  assert checkpointing.list_checkpoints(workdir) == [STEPS]


@pytest.mark.parametrize('recipes', [lintunet, unet])
@pytest.mark.parametrize('accelerator, devices, batch', [
    ('gpu', 1, 64), ('gpu', 8, 512), ('tpu', 8, 256), ('tpu', 32, 1024)])
def test_recipe_batches_are_per_chip(recipes, accelerator, devices, batch):
  from lintunet_jax.training import parallel  # pylint: disable=import-outside-toplevel
  config = parallel.resolve_batch_sizes(recipes.get_config(accelerator), num_devices=devices)
  assert config.batch_size == config.eval_batch_size == batch
  assert config.model.dtype == 'bfloat16' and config.require_accelerator
