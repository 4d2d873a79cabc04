"""Losses, schedules, the optimizer, and the train/eval steps on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from lintunet_jax.attention import xla as attention_kernels
from lintunet_jax.training import losses
from lintunet_jax import metrics as metrics_lib
from lintunet_jax.training import optim
from lintunet_jax.training import parallel
from lintunet_jax.training import loop as train_lib
from lintunet_jax.training import state as train_state_lib
from tests import train_testutil as tu


# ---------------------------------------------------------------- losses


def _logits_labels(seed=0, classes=1, batch=3, size=8):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, size, size, classes)).astype(np.float32) * 2
  labels = (rng.uniform(size=(batch, size, size)) < 0.3).astype(np.int32)
  if classes > 1:
    labels = rng.integers(0, classes, size=(batch, size, size)).astype(np.int32)
  return jnp.asarray(logits), jnp.asarray(labels)


def test_bce_matches_the_formula_per_image():
  logits, labels = _logits_labels()
  got = losses.per_example_loss('bce', logits, labels)
  x, y = np.asarray(logits[..., 0], np.float64), np.asarray(labels, np.float64)
  p = 1 / (1 + np.exp(-x))
  want = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=(1, 2))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got.shape == (3,) and np.all(np.diff(np.asarray(got)) != 0)


def test_dice_is_zero_for_a_perfect_prediction_and_one_for_disjoint():
  labels = np.zeros((2, 8, 8), np.int32)
  labels[0, 2:5, 2:5] = 1
  labels[1, 0:3, 0:3] = 1
  perfect = np.where(labels[..., None] > 0, 30.0, -30.0).astype(np.float32)
  np.testing.assert_allclose(losses.per_example_loss('dice', perfect, labels), 0, atol=1e-6)
  disjoint = np.where(labels[..., None] > 0, -30.0, 30.0).astype(np.float32)
  got = np.asarray(losses.per_example_loss('dice', disjoint, labels))
  # 1 - smooth / (|pred| + |true| + smooth), pred = the 55 or 55 other pixels
  np.testing.assert_allclose(got, [1 - 1 / (55 + 9 + 1), 1 - 1 / (55 + 9 + 1)], rtol=1e-5)
  both = losses.per_example_loss('bce_dice', disjoint, labels)
  np.testing.assert_allclose(
      both, losses.per_example_loss('bce', disjoint, labels) + got, rtol=1e-6)


def test_multiclass_losses_use_softmax():
  logits, labels = _logits_labels(classes=3)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=(1, 2))
  np.testing.assert_allclose(losses.per_example_loss('bce', logits, labels), want, rtol=1e-6)
  dice = np.asarray(losses.per_example_loss('dice', logits, labels))
  assert np.all((dice > 0) & (dice < 1))
  with pytest.raises(ValueError, match='loss must be one of'):
    losses.per_example_loss('focal', logits, labels)


# ---------------------------------------------------------------- schedules, optimizer


def _config(**kw):
  config = tu.tiny_config('/unused')
  for key, value in kw.items():
    config[key] = value
  return config


def test_step_schedule_is_the_seeds_steplr():
  config = _config(schedule='step', learning_rate=1e-3, step_every_epochs=10,
                   step_factor=0.1, warmup_epochs=0.0)
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=5, total_steps=200)
  got = [float(schedule(s)) for s in (0, 49, 50, 99, 100, 150)]
  np.testing.assert_allclose(got, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-6], rtol=1e-5)


def test_cosine_schedule_with_warmup():
  config = _config(schedule='cosine', learning_rate=2e-3, warmup_epochs=1.0)
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=10, total_steps=110)
  np.testing.assert_allclose(float(schedule(0)), 2e-4, rtol=1e-5)  # (0+1)/10
  np.testing.assert_allclose(float(schedule(9)), 2e-3, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(10)), 2e-3, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(60)), 1e-3, rtol=1e-4)  # half way
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-9)
  config.schedule = 'linear'
  with pytest.raises(ValueError, match='schedule must be one of'):
    optim.create_learning_rate_schedule(config, 10, 100)


def test_optimizer_clips_and_decays_only_kernels():
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 2)), 'bias': jnp.ones((2,))}}
  grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
  config = _config(optimizer='adamw', weight_decay=0.5, learning_rate=0.1,
                   grad_clip_norm=1.0)
  tx = optim.create_optimizer(config, lambda step: 0.1)
  zero = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = tx.update(zero, tx.init(params), params)
  # zero gradient: only the weight decay moves parameters, kernels only
  np.testing.assert_allclose(updates['conv']['kernel'], -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(updates['conv']['bias'], 0.0)
  adam = optim.create_optimizer(_config(optimizer='adam', grad_clip_norm=1.0), lambda s: 0.1)
  updates, _ = adam.update(grads, adam.init(params), params)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.1, rtol=1e-4)  # Adam's first step
  with pytest.raises(ValueError, match='needs optimizer=adamw'):
    optim.create_optimizer(_config(optimizer='adam', weight_decay=0.1), lambda s: 0.1)


# ---------------------------------------------------------------- batch sizes


def test_check_batch_size_names_the_sizes_that_work():
  assert parallel.check_batch_size(32, num_devices=4, num_processes=2) == 16
  with pytest.raises(parallel.BatchSizeError) as e:
    parallel.check_batch_size(30, num_devices=4, num_processes=1)
  message = str(e.value)
  assert 'batch_size=30' in message and '4 devices' in message
  assert 'multiple of 4' in message and '4, 8, 12, 16' in message


# ---------------------------------------------------------------- steps


@pytest.fixture(scope='module')
def setup(train_setup):
  """A tiny LinTUNet, its optimizer, a real batch and the compiled train
  step, on a 1-device mesh (conftest.py, shared with test_nonfinite)."""
  return train_setup


@pytest.mark.slow
def test_the_batch_is_real_data(setup):
  image, mask = setup['batch']['image'], setup['batch']['mask']
  assert image.shape == (8, 32, 32, 1) and mask.shape == (8, 32, 32)
  assert image.std() > 0.05 and 0 < mask.mean() < 0.5


def test_train_step_decreases_the_loss_on_a_fixed_batch(setup):
  state, compiled = setup['new_state'](), setup['step']
  batch = parallel.shard_batch(setup['mesh'], setup['batch'])
  before = jax.device_get(state.params)
  stats_before = jax.device_get(state.batch_stats)
  history = []
  for _ in range(8):
    state, out = compiled(state, batch)
    history.append(jax.device_get(out))
  loss = [float(h['loss']) for h in history]
  assert all(bool(h['finite']) for h in history)
  assert int(state.step) == 8
  assert all(b < a for a, b in zip(loss, loss[1:])), loss
  assert loss[-1] < 0.92 * loss[0], loss
  assert all(np.isfinite(h['grad_norm']) and h['grad_norm'] > 0 for h in history)
  # Parameters and BatchNorm running statistics both moved.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, jax.device_get(state.params))
  assert min(jax.tree.leaves(moved)) > 0
  mean_moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), stats_before,
                            jax.device_get(state.batch_stats))
  assert max(jax.tree.leaves(mean_moved)) > 1e-3


def test_eval_step_counts_match_metrics_and_ignore_padding(setup):
  config, mesh = setup['config'], setup['mesh']
  eval_step, variables = train_lib.make_eval_step(setup['model'], config, mesh)
  batch = dict(setup['batch'])
  # Reference: the model itself in eval mode, counted by metrics.batch_counts.
  model = nnx.clone(setup['model'])
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  logits = forward.lower(state, batch['image']).compile(compiler_options=tu.OPT0)(
      state, batch['image'])
  want = metrics_lib.batch_counts(logits, batch['mask'], np.ones(8, np.float32),
                                  threshold=config.threshold)
  want_loss = losses.per_example_loss(config.loss, logits, batch['mask'])
  # Same images, padded with 3 junk rows marked invalid.
  padded = train_lib.pad_local_batch(batch, 11)
  padded['image'][8:] = 5.0
  padded['mask'][8:] = 1
  assert padded['valid'].tolist() == [1] * 8 + [0] * 3
  assert train_lib.pad_local_batch(padded, 1)['image'].shape[0] == 11  # no-op
  sharded = parallel.shard_batch(mesh, padded)
  eval_step = eval_step.lower(variables, sharded).compile(compiler_options=tu.OPT0)
  out = jax.device_get(eval_step(variables, sharded))
  counts, (loss_sum, loss_count) = train_lib.split_eval_outputs(out)
  for key in metrics_lib.COUNT_KEYS:
    np.testing.assert_allclose(counts[key], want[key], rtol=1e-5, err_msg=key)
  assert int(counts['tp'][0]) + int(counts['fn'][0]) == int(batch['mask'].sum()) > 0
  assert loss_count == 8
  np.testing.assert_allclose(loss_sum, float(np.sum(want_loss)), rtol=1e-4)
  # evaluate() over a split: sums counts over batches, divides once.
  result = train_lib.evaluate(eval_step, variables, [padded, padded], mesh)
  assert result['num_images'] == 16
  accumulator = metrics_lib.MetricAccumulator()
  accumulator.add(want)
  accumulator.add(want)
  expected = accumulator.result()
  for key in ('iou', 'dice', 'precision', 'recall', 'accuracy'):
    assert result[key] == pytest.approx(expected[key], rel=1e-6), key
  assert result['loss'] == pytest.approx(float(np.mean(want_loss)), rel=1e-4)


def _pallas_step(config, image_size):
  """A data-parallel train step of a width-4 LinTUNet using the Pallas kernels."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.attention.kernel = 'pallas'
  mesh = parallel.create_mesh(jax.devices()[:1])
  model = train_state_lib.init_model(config.model, seed=0, bn_axis_name='data')
  model_def, variables = train_state_lib.split_model(model)
  tx = optim.create_optimizer(config, lambda s: config.learning_rate)
  state = parallel.replicate(mesh, jax.device_get(
      train_state_lib.create_train_state(variables, tx, seed=0)))
  rng = np.random.default_rng()
  batch = parallel.shard_batch(mesh, {
      'image': rng.random((8, image_size, image_size, 1), np.float32),
      'mask': rng.integers(0, 2, (8, image_size, image_size)).astype(np.int32)})
  return train_lib.make_train_step(model_def, tx, mesh, loss='bce_dice'), state, batch


def test_pallas_attention_kernel_lowers_inside_the_data_parallel_step_for_gpus(setup):
  """The whole train step (shard_map, pmean, custom VJP, donation) with the
  fused kernels lowers to Triton calls for CUDA; GPU tiles need >= 16 tokens
  a side, hence 256x256 images (lowered, never run)."""
  config = ml_collections.ConfigDict(setup['config'].to_dict())
  config.model.attention.update(block_size=16, seq_len=256, k=16)
  step, state, batch = _pallas_step(config, 256)
  with attention_kernels.schedule(pallas_interpret=False):
    lowered = step.trace(state, batch).lower(lowering_platforms=('cuda',))
  assert lowered.as_text().count('xla.gpu.triton') >= 3  # forward, dQ, dK/dV


def test_pallas_attention_kernel_off_gpu_is_a_clear_error(setup):
  """Off GPU the step never falls back to the interpreter: the Pallas kernel
  is refused naming the override; interpreting it explicitly inside
  shard_map is refused too (JAX's interpreter cannot run there)."""
  if jax.default_backend() == 'gpu':
    pytest.skip('compiled on GPUs')
  step, state, batch = _pallas_step(setup['config'], 32)
  with pytest.raises(attention_kernels.KernelUnavailableError,
                     match='--config.model.attention.kernel=xla'):
    step.trace(state, batch)
  with attention_kernels.schedule(pallas_interpret=True):
    with pytest.raises(NotImplementedError, match="model.attention.kernel='xla'"):
      step.trace(state, batch)
