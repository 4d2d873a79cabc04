"""Multi-host for real: 2 processes on localhost train together.

Two Python processes, 2 CPU devices each, join with
`jax.distributed.initialize` (a local coordinator; CPU collectives over
gloo) into one 4-device mesh. Each feeds only its half of a fixed global
batch (`parallel.shard_batch`); together they train two steps, evaluate,
and write and read back a checkpoint (orbax across processes; each
process's own input-pipeline state). A single-process run on the same
global batch must give the same losses and evaluation counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import portpicker
import pytest

from tests import train_testutil as tu

CODE = textwrap.dedent('''
    import json, sys
    num_processes, process_id, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from lintunet_jax.training import distributed, parallel
    from tests import train_testutil as tu
    config = tu.tiny_config('/unused', loss='bce_dice')
    if num_processes > 1:
      config.distributed = True
      config.coordinator_address = f'localhost:{port}'
      config.num_processes, config.process_id = num_processes, process_id
    distributed.maybe_initialize_distributed(config)

    import chex, jax, numpy as np
    from lintunet_jax.training import checkpointing, optim, loop as train_lib
    from lintunet_jax.training import state as tsl
    from lintunet_jax.data.datasets import synthetic_mri
    assert jax.process_count() == num_processes and jax.process_index() == process_id
    images, masks = synthetic_mri.generate(8, 32, seed=(0, 0))
    rows = slice(process_id * 8 // num_processes, (process_id + 1) * 8 // num_processes)
    local = {'image': images[rows, ..., None].astype(np.float32) / 255.0,
             'mask': (masks[rows] > 0).astype(np.int32)}
    mesh = parallel.create_mesh()
    local_batch = parallel.check_batch_size(8, mesh=mesh)
    assert local['image'].shape[0] == local_batch
    model = tsl.init_model(config.model, seed=0, bn_axis_name='data')
    model_def, variables = tsl.split_model(model)
    tx = optim.create_optimizer(config, lambda s: config.learning_rate)
    state = parallel.replicate(mesh, jax.device_get(tsl.create_train_state(variables, tx, seed=0)))
    batch = parallel.shard_batch(mesh, local)
    assert batch['image'].shape[0] == 8 and not (num_processes > 1 and batch['image'].is_fully_addressable)
    step = train_lib.make_train_step(model_def, tx, mesh, loss=config.loss)
    step = step.lower(state, batch).compile(compiler_options=tu.OPT0)
    losses = []
    for _ in range(2):
      state, out = step(state, batch)
      losses.append(float(parallel.to_host(out['loss'])))
    eval_step, _ = train_lib.make_eval_step(model_def, config, mesh)
    local_eval = dict(local, valid=np.ones(local_batch, np.float32))
    metrics = train_lib.evaluate(eval_step, state.variables, [local_eval], mesh)

    # Checkpoint across processes, then read it back.
    manager = checkpointing.create_manager(workdir, keep=2)
    train_item = {'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng}
    checkpointing.save_checkpoint(manager, 2, variables=state.variables, train=train_item,
                                  data_state={'process': process_id, 'position': 17},
                                  config=config, metrics=metrics)
    manager.wait_until_finished()
    restored = checkpointing.restore_checkpoint(manager, 2, variables=state.variables,
                                                train=train_item, data=True)
    manager.close()
    # Read back exactly as written: same tree, every leaf equal (chex names
    # the leaf that differs; the failure stops this process).
    chex.assert_trees_all_equal(parallel.to_host(restored['model']),
                                parallel.to_host(state.variables))
    print(json.dumps(dict(losses=losses, iou=metrics['iou'], dice=metrics['dice'],
                          num_images=metrics['num_images'], loss=metrics['loss'],
                          step=int(parallel.to_host(restored['train']['step'])),
                          data=restored['data_iterator'],
                          devices=jax.device_count(), local=jax.local_device_count())))
''')


def _start(args, devices, cache):
  return subprocess.Popen([sys.executable, '-c', CODE, *map(str, args)],
                          env=tu.env(devices, cache), cwd=str(tu.ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=300):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f'process timed out:\n{err[-4000:]}')
  assert proc.returncode == 0, f'{out[-2000:]}\n{err[-6000:]}'
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_train_together_like_one(tmp_path, tmp_path_factory):
  cache = tu.cache_dir(tmp_path_factory)
  port = portpicker.pick_unused_port()
  workers = [_start([2, i, port, tmp_path / 'multi'], 2, cache) for i in range(2)]
  single = _start([1, 0, 0, tmp_path / 'single'], 1, cache)
  try:
    results = [_result(p) for p in workers]
    reference = _result(single)
  finally:
    for p in workers + [single]:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert reference['devices'] == 1
  for i, got in enumerate(results):
    assert got['devices'] == 4 and got['local'] == 2
    np.testing.assert_allclose(got['losses'], reference['losses'], rtol=1e-5)
    assert got['losses'][1] != got['losses'][0]
    assert got['num_images'] == 8
    for key in ('iou', 'dice', 'loss'):
      assert got[key] == pytest.approx(reference[key], rel=1e-5), key
    assert got['step'] == 2  # the restored variables are checked in the process
    assert got['data'] == {'process': i, 'position': 17}
  files = sorted(p.name for p in (tmp_path / 'multi' / 'checkpoints' / '2' / 'data_iterator').iterdir())
  assert [f for f in files if f.endswith('.json')] == ['process_0-of-2.json', 'process_1-of-2.json']
