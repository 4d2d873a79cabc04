"""train.py end to end on a tiny config: outputs, errors, fine-tuning."""

from __future__ import annotations

import glob
import os
import pathlib

import jax
import numpy as np
import pytest

from lintunet_jax.training import checkpointing
from lintunet_jax.training import metric_logs as logging_utils
from lintunet_jax.training import state as train_state_lib
from tests import train_testutil as tu


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """All the train.py runs of this module, started together (see tu.Run)."""
  data_dir = tu.data_dir(tmp_path_factory)
  root = tmp_path_factory.mktemp('cli')
  started = {
      # The program of test_train_resume (tu.RESUME): it reuses the compiled
      # steps from the persistent cache.
      'full': tu.Run(root / 'full', tu.tiny_flags(
          data_dir, **tu.RESUME, eval_every_steps=4, checkpoint_every_steps=2,
          keep_checkpoints=2), cache=tu.cache_dir(tmp_path_factory)),
      # Step 1 blows the parameters up to ~1e30; every later loss is
      # non-finite, so steps 2 and 3 are skipped and the run stops.
      'nan': tu.Run(root / 'nan', tu.tiny_flags(
          data_dir, num_train_steps=6, checkpoint_every_steps=1, learning_rate=1e30,
          grad_clip_norm=0.0, max_consecutive_nonfinite_steps=2, model='unet')),
      'batch': tu.Run(root / 'batch', tu.tiny_flags(data_dir, batch_size=6), devices=4),
  }
  # Fine-tuning: a weights-only checkpoint (as an importer writes), seed 123.
  config = tu.tiny_config(data_dir, model='unet')
  imported = train_state_lib.init_model(config.model, seed=123)
  checkpointing.write_weights_checkpoint(root / 'finetune', config, imported)
  # learning_rate 0: parameters stay the imported ones (a fresh init with
  # seed 0 would differ), BatchNorm statistics keep training. Input worker
  # processes: see test_input_workers_leave_no_shared_memory_behind.
  started['finetune'] = tu.Run(root / 'finetune', tu.tiny_flags(
      data_dir, num_train_steps=2, learning_rate=0.0, model='unet',
      dataset__num_workers=2))
  yield {'data_dir': data_dir, 'imported': imported,
         'cache': tu.cache_dir(tmp_path_factory), **started}
  for run in started.values():
    run.kill()


@pytest.mark.slow
def test_train_writes_config_logs_and_checkpoints(runs):
  result = runs['full'].wait()
  tmp_path, data_dir = runs['full'].workdir, runs['data_dir']
  assert result.returncode == 0, result.stderr[-5000:]
  # Progress bar (tqdm, on stderr) with loss and images/s.
  assert '10/10' in result.stderr and 'img_s=' in result.stderr and 'loss=' in result.stderr
  config = checkpointing.load_config(tmp_path)
  assert config.model.width == 4 and config.loss == 'bce_dice'
  assert config.dataset.data_dir == data_dir
  records = logging_utils.read_metrics(str(tmp_path))
  train = [r for r in records if r['type'] == 'train']
  evals = [r for r in records if r['type'] == 'eval']
  assert [r['step'] for r in train] == list(range(1, 11))
  for r in train:
    assert set(r) >= {'step', 'epoch', 'loss', 'grad_norm', 'lr', 'images_per_sec', 'time'}
    assert np.isfinite(r['loss']) and r['loss'] > 0 and r['images_per_sec'] > 0
  assert train[0]['epoch'] == pytest.approx(1 / 32)  # 256 examples / batch 8
  assert [r['step'] for r in evals] == [4, 8, 10]
  for r in evals:
    assert r['split'] == 'validation' and r['num_images'] == 64
    for key in ('loss', 'iou', 'dice', 'precision', 'recall', 'accuracy'):
      assert 0 <= r[key] <= (1 if key != 'loss' else 10), key
    assert 0 < r['accuracy'] < 1
  assert glob.glob(os.path.join(tmp_path, 'tensorboard', 'events.out.tfevents.*'))
  # Last 2 checkpoints plus the best by validation IoU.
  steps = checkpointing.list_checkpoints(tmp_path)
  best = max(evals, key=lambda r: (r['iou'], r['step']))['step']
  assert steps == sorted({8, 10, best})
  assert checkpointing.best_checkpoint(tmp_path) == best
  assert checkpointing.checkpoint_metrics(tmp_path, 10)['iou'] == evals[-1]['iou']
  config, model, step = checkpointing.restore_model(tmp_path, 'latest')
  assert step == 10 and config.model.name == 'lintunet'
  # Re-running a finished run does nothing (and changes nothing).
  again = tu.run_train(tmp_path, tu.tiny_flags(
      data_dir, **tu.RESUME, eval_every_steps=4, checkpoint_every_steps=2,
      keep_checkpoints=2), cache=runs['cache'])
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'nothing to do' in again.stderr
  assert logging_utils.read_metrics(str(tmp_path)) == records


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_error(runs):
  result = runs['nan'].wait()
  tmp_path = runs['nan'].workdir
  assert result.returncode == 1, result.stderr[-5000:]
  assert 'Traceback' not in result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith('error: non-finite loss'), message
  assert 'at 2 steps in a row, steps 2-3 ' in message, message
  assert 'Skipped steps are never applied' in message
  # Saved after step 1 and after the skipped step 2; the limit is checked
  # before the save of step 3.
  steps = checkpointing.list_checkpoints(tmp_path)
  assert steps == [1, 2]
  assert 'Last checkpoint: 2 in ' in message
  assert not [n for n in os.listdir(os.path.join(tmp_path, 'checkpoints')) if 'tmp' in n]
  _, model, _ = checkpointing.restore_model(tmp_path, 'latest')
  leaves = train_state_lib.model_variables(model)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(leaves))


@pytest.mark.slow
def test_input_workers_leave_no_shared_memory_behind(runs):
  """grain's worker processes hand batches over in shared memory; a block
  still referenced at exit is reported by Python's resource tracker."""
  result = runs['finetune'].wait()
  assert result.returncode == 0, result.stderr[-5000:]
  assert 'leaked shared_memory' not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_wrong_batch_size_stops_with_the_sizes_that_work(runs):
  proc = runs['batch'].wait()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert ('error: batch_size=6 (the global batch, over all devices) does not split '
          'evenly over 4 devices: use a multiple of 4, e.g. 4, 8, 12') in proc.stderr


@pytest.mark.slow
def test_fine_tunes_from_a_weights_only_checkpoint(runs):
  result = runs['finetune'].wait()
  tmp_path, model = runs['finetune'].workdir, runs['imported']
  assert result.returncode == 0, result.stderr[-5000:]
  assert checkpointing.list_checkpoints(tmp_path) == [0, 2]
  assert checkpointing.describe(tmp_path)[1]['weights_only'] is False
  assert [r['step'] for r in logging_utils.read_metrics(str(tmp_path), 'train')] == [1, 2]
  _, trained, step = checkpointing.restore_model(tmp_path, 2)
  want = train_state_lib.model_variables(model)
  got = train_state_lib.model_variables(trained)
  tu.assert_trees_equal(want['params'], got['params'])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       want['batch_stats'], got['batch_stats'])
  assert max(jax.tree.leaves(moved)) > 1e-4


@pytest.mark.slow
def test_config_errors_stop_before_anything_is_written(runs, tmp_path):
  """A Pallas kernel off GPU, or RGB images for a one-channel model: one
  line naming the field(s) and the fix, exit 1, nothing written."""
  cases = {
      'pallas': (dict(model__attention__kernel='pallas'),
                 ("kernel='pallas' needs a GPU", '--config.model.attention.kernel=xla')),
      'channels': (dict(dataset__channels=3),
                   ('config.dataset.channels=3 but config.model.in_channels=1',)),
  }
  for name, (overrides, needles) in cases.items():
    workdir = tmp_path / name
    result = tu.run_train(workdir, tu.tiny_flags(runs['data_dir'], **overrides))
    assert result.returncode == 1, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    for needle in needles:
      assert needle in result.stderr, (needle, result.stderr[-3000:])
    assert not (workdir / 'checkpoints').exists()
    assert not (workdir / 'config.json').exists()


@pytest.mark.slow
def test_resume_with_the_xla_kernel_of_a_run_trained_with_pallas(runs, tmp_path):
  """A run trained on a GPU with the Pallas kernel resumes off GPU with
  --config.model.attention.kernel=xla (same parameters, same maths); its
  original command stops with a clear error there."""
  from tests.evaluation.eval_testutil import as_trained_with_pallas  # pylint: disable=g-import-not-at-top
  assert runs['full'].wait().returncode == 0
  workdir = as_trained_with_pallas(pathlib.Path(runs['full'].workdir), tmp_path / 'pallas')
  before = checkpointing.list_checkpoints(workdir)
  common = dict(tu.RESUME, num_train_steps=12, eval_every_steps=4,
                checkpoint_every_steps=2, keep_checkpoints=2)
  refused = tu.run_train(workdir, tu.tiny_flags(
      runs['data_dir'], **common, model__attention__kernel='pallas'), cache=runs['cache'])
  assert refused.returncode == 1, refused.stderr[-3000:]
  assert '--config.model.attention.kernel=xla' in refused.stderr
  assert checkpointing.list_checkpoints(workdir) == before
  resumed = tu.run_train(workdir, tu.tiny_flags(
      runs['data_dir'], **common, model__attention__kernel='xla'), cache=runs['cache'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  records = logging_utils.read_metrics(str(workdir))
  assert {'type': 'resume', 'step': 10} in [
      {'type': r['type'], 'step': r['step']} for r in records if r['type'] == 'resume']
  assert [r['step'] for r in records if r['type'] == 'train'][-2:] == [11, 12]
  assert max(checkpointing.list_checkpoints(workdir)) == 12
  assert checkpointing.load_config(workdir).model.attention.kernel == 'xla'
