"""Data parallelism: N devices x B images == 1 device x N*B images.

Runs in a subprocess with `--xla_force_host_platform_device_count=8`, since
the device count is fixed when JAX starts; meshes over the first 1, 4 and 8
of its devices train the same tiny LinTUNet for two steps on the same
global batch of synthetic MRI slices (gradients and loss averaged with
pmean, synchronised BatchNorm statistics) and the results are compared.

The step uses the configured gradient clipping with plain SGD: Adam divides
each gradient by its own magnitude, so a gradient that is 0 on one device
count and 1e-9 on another (float summation order) moves a parameter by 0 or
by a whole learning rate; SGD keeps parameter differences proportional to
gradient differences, so parameters can be compared tightly. The optimizer
runs after the pmean on identical, replicated values either way.
"""

from __future__ import annotations

import textwrap

import pytest

from tests import train_testutil as tu

CODE = textwrap.dedent('''
    import json, sys
    import chex, jax, numpy as np, optax
    from lintunet_jax.training import optim, parallel, loop as train_lib
    from lintunet_jax.training import state as tsl
    from lintunet_jax.data.datasets import synthetic_mri
    from tests import train_testutil as tu

    sizes = {sizes}
    assert jax.device_count() == max(sizes), jax.devices()
    config = tu.tiny_config('/unused', loss='bce_dice')
    images, masks = synthetic_mri.generate(8, 32, seed=(0, 0))
    batch = {{'image': images[..., None].astype(np.float32) / 255.0,
              'mask': (masks > 0).astype(np.int32)}}
    assert batch['mask'].sum() > 0 and batch['image'].std() > 0.05
    model = tsl.init_model(config.model, seed=0, bn_axis_name='data')
    model_def, variables = tsl.split_model(model)
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                     optax.sgd(0.1))
    host_state = jax.device_get(tsl.create_train_state(variables, tx, seed=0))
    results = {{}}
    for n in sizes:
      mesh = parallel.create_mesh(jax.devices()[:n])
      state = parallel.replicate(mesh, host_state)
      step = train_lib.make_train_step(model_def, tx, mesh, loss=config.loss)
      sharded = parallel.shard_batch(mesh, batch)
      assert len(sharded['image'].addressable_shards) == n
      compiled = step.lower(state, sharded).compile(compiler_options=tu.OPT0)
      losses, grad_norms = [], []
      for _ in range(2):
        state, out = compiled(state, sharded)
        losses.append(float(out['loss']))
        grad_norms.append(float(out['grad_norm']))
      eval_step, _ = train_lib.make_eval_step(model_def, config, mesh)
      ev = jax.device_get(eval_step(state.variables, sharded))
      results[n] = dict(loss=losses, grad_norm=grad_norms,
                        variables=jax.device_get(state.variables),
                        eval={{k: np.asarray(v).tolist() for k, v in ev.items()}})
    ref = results[1]
    report = {{}}
    for n in sizes[1:]:
      got = results[n]
      # Same parameters and BatchNorm statistics after two steps: every leaf
      # within 1e-6 absolute (chex names the leaf that differs; the failure
      # stops this process, and run_python shows its message).
      chex.assert_trees_all_close(got['variables'], ref['variables'], rtol=0, atol=1e-6,
                                  custom_message=f'{{n}} devices vs 1')
      report[n] = dict(loss=got['loss'], grad_norm=got['grad_norm'], eval=got['eval'])
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(variables['params']), jax.tree.leaves(ref['variables']['params'])))
    print(json.dumps(dict(ref_loss=ref['loss'], ref_grad_norm=ref['grad_norm'],
                          ref_eval=ref['eval'], moved=moved, report=report)))
''')


def _check(result, n):
  got = result['report'][str(n)]
  # Same loss (forward with synchronised BatchNorm) for both steps.
  assert got['loss'] == pytest.approx(result['ref_loss'], rel=1e-5, abs=1e-6)
  assert got['grad_norm'] == pytest.approx(result['ref_grad_norm'], rel=1e-4)
  # The parameters moved; that they (and the BatchNorm statistics) are those
  # of one device is asserted in the subprocess (chex.assert_trees_all_close).
  assert result['moved'] > 1e-3
  # Evaluation: the counts summed over devices are those of one device.
  for key, value in result['ref_eval'].items():
    if key in ('iou_image_sum', 'loss_sum'):
      assert got['eval'][key] == pytest.approx(value, rel=1e-5), key
    else:
      assert got['eval'][key] == value, key


@pytest.mark.slow
def test_steps_on_4_and_8_devices_match_one_device(tmp_path_factory):
  result = tu.run_python(CODE.format(sizes=[1, 4, 8]), devices=8,
                         cache=tu.cache_dir(tmp_path_factory), timeout=300)
  assert result['ref_eval']['num_images'] == 8
  assert result['ref_eval']['tp'][0] > 0
  assert result['ref_loss'][1] < result['ref_loss'][0]
  _check(result, 4)
  _check(result, 8)


def test_wrong_global_batch_size_says_which_sizes_work(tmp_path_factory):
  result = tu.run_python(textwrap.dedent('''
      import json
      from lintunet_jax.training import parallel
      mesh = parallel.create_mesh()
      try:
        parallel.check_batch_size(10, mesh=mesh)
      except parallel.BatchSizeError as e:
        print(json.dumps({'message': str(e), 'ok': parallel.check_batch_size(12, mesh=mesh)}))
  '''), devices=4)
  assert 'does not split evenly over 4 devices' in result['message']
  assert 'multiple of 4, e.g. 4, 8, 12, 16' in result['message']
  assert result['ok'] == 12
