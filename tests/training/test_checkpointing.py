"""The workdir layout: configs, weights checkpoints, restore errors, retention."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lintunet_jax.training import checkpointing
from lintunet_jax.training import state as train_state_lib
from tests import train_testutil as tu


@pytest.fixture(scope='module')
def config():
  return tu.tiny_config('/unused-data-dir')


@pytest.fixture(scope='module')
def model(config):
  return train_state_lib.init_model(config.model, seed=3)


def _leaves(model):
  variables = train_state_lib.model_variables(model)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


def test_config_round_trip(tmp_path, config):
  path = checkpointing.save_config(tmp_path, config)
  assert path == str(tmp_path / 'config.json')
  loaded = checkpointing.load_config(tmp_path)
  assert loaded.to_dict() == json.loads(config.to_json_best_effort())
  assert loaded.model.attention.k == 4 and loaded.dataset.name == tu.DATASET
  with pytest.raises(FileNotFoundError, match='no config.json'):
    checkpointing.load_config(_empty(tmp_path))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpointing.load_config(tmp_path / 'nope')


def _empty(tmp_path):
  path = tmp_path / 'empty'
  path.mkdir(exist_ok=True)
  return path


def test_weights_checkpoint_round_trip(tmp_path, config, model):
  path = checkpointing.write_weights_checkpoint(tmp_path, config, model)
  assert path == os.path.join(tmp_path, 'checkpoints', '0')
  assert checkpointing.list_checkpoints(tmp_path) == [0]
  assert checkpointing.describe(tmp_path) == [
      {'step': 0, 'weights_only': True, 'metrics': None}]
  assert checkpointing.load_config(tmp_path).model.width == 4
  loaded_config, restored, step = checkpointing.restore_model(tmp_path)
  assert step == 0 and loaded_config.model.width == 4
  want, got = _leaves(model), _leaves(restored)
  assert want.keys() == got.keys() and len(want) > 50
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert any(np.abs(v).max() > 0.1 for v in got.values())
  # Eval mode: BatchNorm uses running statistics.
  norms = [m for _, m in nnx.iter_graph(restored) if isinstance(m, nnx.BatchNorm)]
  assert norms and all(n.use_running_average for n in norms)
  # The same step again is refused, nothing overwritten.
  with pytest.raises(FileExistsError):
    checkpointing.write_weights_checkpoint(tmp_path, config, model)


def test_restore_errors_are_clear(tmp_path, config, model):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpointing.restore_model(tmp_path / 'missing')
  (tmp_path / 'w').mkdir()
  checkpointing.save_config(tmp_path / 'w', config)
  with pytest.raises(FileNotFoundError, match='no checkpoints in .*config.json'):
    checkpointing.restore_model(tmp_path / 'w')
  checkpointing.write_weights_checkpoint(tmp_path / 'w', config, model, step=5)
  with pytest.raises(checkpointing.CheckpointError, match=r'step 7 .*available steps: \[5\]'):
    checkpointing.restore_model(tmp_path / 'w', 7)
  with pytest.raises(checkpointing.CheckpointError, match='no best one; available steps: \\[5\\]'):
    checkpointing.restore_model(tmp_path / 'w', 'best')
  with pytest.raises(ValueError, match="'latest', 'best' or a step"):
    checkpointing.restore_model(tmp_path / 'w', 'newest')
  wider = tu.tiny_config('/unused', model__width=8)
  with pytest.raises(checkpointing.CheckpointError) as e:
    checkpointing.restore_model(tmp_path / 'w', config=wider)
  message = str(e.value)
  assert 'shape differs' in message
  assert 'batch_stats/dec1/double_conv/norm/mean (4,) vs (8,)' in message
  unet = tu.tiny_config('/unused', model='unet')
  with pytest.raises(checkpointing.CheckpointError) as e:
    checkpointing.restore_model(tmp_path / 'w', config=unet)
  assert 'in the checkpoint but not the model' in str(e.value)
  assert 'params/attention/layers/0/attn/proj_k' in str(e.value)
  assert 'shape differs' not in str(e.value)


def test_weights_checkpoint_is_atomic(tmp_path, config, model, monkeypatch):
  def failing_save(self, step, *args, **kwargs):
    (tmp_path / 'checkpoints' / f'{step}.orbax-checkpoint-tmp').mkdir(parents=True)
    raise OSError('disk full')

  monkeypatch.setattr(ocp.CheckpointManager, 'save', failing_save)
  with pytest.raises(OSError, match='disk full'):
    checkpointing.write_weights_checkpoint(tmp_path, config, model)
  assert not (tmp_path / 'config.json').exists()
  assert os.listdir(tmp_path / 'checkpoints') == []
  assert checkpointing.list_checkpoints(tmp_path) == []
  # A mismatching model is refused before anything is written.
  monkeypatch.undo()
  with pytest.raises(checkpointing.CheckpointError, match='shape differs'):
    checkpointing.write_weights_checkpoint(tmp_path / 'x', tu.tiny_config('/u', model__width=8), model)
  assert not (tmp_path / 'x').exists()


def test_keeps_the_last_k_plus_the_best(tmp_path):
  variables = {'params': {'w': jnp.arange(6.0).reshape(2, 3)}, 'batch_stats': {}}
  manager = checkpointing.create_manager(tmp_path, keep=2, keep_best=1)
  for step, iou in [(1, 0.5), (2, 0.9), (3, None), (4, 0.3), (5, 0.4)]:
    metrics = None if iou is None else {'iou': iou, 'dice': 0.1, 'split': 'validation'}
    train = {'step': jnp.int32(step), 'rng': jnp.zeros(2, jnp.uint32)}
    checkpointing.save_checkpoint(manager, step, variables=variables, train=train,
                                  data_state={'position': step}, metrics=metrics)
  manager.wait_until_finished()
  manager.close()
  assert checkpointing.list_checkpoints(tmp_path) == [2, 4, 5]
  assert checkpointing.best_checkpoint(tmp_path) == 2
  assert checkpointing.checkpoint_metrics(tmp_path, 2)['iou'] == 0.9
  assert checkpointing.resolve_step(tmp_path, 'best') == 2
  assert checkpointing.resolve_step(tmp_path, 'latest') == 5
  # Reopened (as a resumed run does): retention still knows the best one.
  (tmp_path / 'checkpoints' / '9.orbax-checkpoint-tmp').mkdir()  # a killed save
  assert checkpointing.list_checkpoints(tmp_path) == [2, 4, 5]
  manager = checkpointing.create_manager(tmp_path, keep=2, keep_best=1)
  assert checkpointing.latest_resumable_step(manager) == (5, True)
  target = {'step': jnp.int32(0), 'rng': jnp.ones(2, jnp.uint32)}
  restored = checkpointing.restore_checkpoint(
      manager, 4, variables=jax.tree.map(jnp.zeros_like, variables), train=target,
      data=True)
  np.testing.assert_array_equal(restored['model']['params']['w'], variables['params']['w'])
  assert int(restored['train']['step']) == 4
  assert restored['data_iterator'] == {'position': 4}
  for step in (6, 7):
    checkpointing.save_checkpoint(manager, step, variables=variables, train=target,
                                  metrics=None)
  manager.wait_until_finished()
  manager.close()
  assert checkpointing.list_checkpoints(tmp_path) == [2, 6, 7]
  # The killed save's leftovers were removed (orbax cleans up before saving).
  assert not (tmp_path / 'checkpoints' / '9.orbax-checkpoint-tmp').exists()
