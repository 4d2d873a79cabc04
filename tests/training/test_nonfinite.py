"""Non-finite steps are skipped, counted, and stop the run when they persist.

The train step itself (one device, in process): a batch whose image is NaN
leaves parameters, optimizer state and BatchNorm statistics bit-identical,
and the next good batch trains on. The loop (train_and_evaluate in a
subprocess, NaN batches injected into the real input iterator): one bad
batch is skipped and counted in the `train` records, the run finishes;
`max_consecutive_nonfinite_steps` bad batches in a row stop it with the
latest checkpoint holding the last applied update.
"""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest

from lintunet_jax.training import parallel
from tests import train_testutil as tu


@pytest.mark.slow
def test_a_nan_batch_is_skipped_by_the_train_step(train_setup):
  setup, mesh = train_setup, train_setup['mesh']
  good = parallel.shard_batch(mesh, setup['batch'])
  image = np.array(setup['batch']['image'])
  image[3, 5, 7, 0] = np.nan  # one pixel of one image is enough
  bad = parallel.shard_batch(mesh, {'image': image, 'mask': setup['batch']['mask']})
  step, state = setup['step'], setup['new_state']()

  state, out = step(state, good)  # a real update first: Adam's moments non-zero
  assert bool(out['finite'])
  before = jax.device_get(state)
  state, out = step(state, bad)
  assert not bool(out['finite']) and not np.isfinite(float(out['loss']))
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) + 1 == 2  # the batch was consumed
  for name in ('params', 'opt_state', 'batch_stats'):
    tu.assert_trees_equal(getattr(before, name), getattr(after, name))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after.params))
  # Training goes on: the next good batch is applied.
  state, out = step(state, good)
  assert bool(out['finite']) and np.isfinite(float(out['loss']))
  assert not tu.trees_equal(after.params, state.params)
  assert not tu.trees_equal(after.opt_state, state.opt_state)


CODE = textwrap.dedent('''
    import json
    import jax
    import numpy as np
    from lintunet_jax.training import checkpointing, loop, metric_logs
    from lintunet_jax.training import state as tsl
    from tests import train_testutil as tu

    def nan_at(bad):
      """NaN images at the given batches of the real training iterator."""
      def fault(count, batch):
        if count in bad:
          batch['image'] = np.full_like(batch['image'], np.nan)
        return batch
      return fault

    def run(workdir, bad):
      undo = tu.inject_train_faults(loop, nan_at(bad))
      config = tu.tiny_config({data_dir!r}, num_train_steps=6,
                              checkpoint_every_steps=1, keep_checkpoints=10,
                              max_consecutive_nonfinite_steps=2)
      try:
        loop.train_and_evaluate(config, workdir)
        error = None
      except loop.NonFiniteLossError as e:
        error = str(e)
      finally:
        undo()
      params = {{}}
      for step in checkpointing.list_checkpoints(workdir):
        _, model, _ = checkpointing.restore_model(workdir, step)
        params[step] = jax.device_get(tsl.model_variables(model))
      return {{
          'error': error,
          'train': metric_logs.read_metrics(workdir, 'train'),
          'steps': sorted(params),
          'finite': all(np.isfinite(x).all() for x in jax.tree.leaves(params)),
          'equal': {{f'{{a}}-{{b}}': tu.trees_equal(params[a], params[b])
                    for a, b in zip(sorted(params), sorted(params)[1:])}},
      }}

    print(json.dumps({{'one': run({root!r} + '/one', {{3}}),
                      'streak': run({root!r} + '/streak', {{3, 4}})}}))
''')


@pytest.mark.slow
def test_the_loop_skips_counts_and_stops_on_a_streak(data_dir, tmp_path,
                                                      tmp_path_factory):
  result = tu.run_python(CODE.format(data_dir=data_dir, root=str(tmp_path)),
                         cache=tu.cache_dir(tmp_path_factory), timeout=400)
  one, streak = result['one'], result['streak']
  # One NaN batch (step 3): skipped, counted, the run finishes.
  assert one['error'] is None
  skipped = {r['step']: r['skipped_steps'] for r in one['train']}
  assert skipped == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0}
  losses = {r['step']: r['loss'] for r in one['train']}
  assert losses[3] == 'nan'  # no step of that record was applied
  assert all(np.isfinite(losses[s]) for s in (1, 2, 4, 5, 6))
  assert one['steps'] == [1, 2, 3, 4, 5, 6] and one['finite']
  assert one['equal']['2-3']  # step 3 changed nothing ...
  assert not one['equal']['3-4'] and not one['equal']['1-2']  # ... others did
  # Two in a row (steps 3 and 4) with max_consecutive_nonfinite_steps=2: stop
  # before saving step 4; the last checkpoint holds step 2's update.
  message = streak['error']
  assert message and message.startswith('non-finite loss nan'), message
  assert 'at 2 steps in a row, steps 3-4' in message
  assert 'Last checkpoint: 3 ' in message
  assert streak['steps'] == [1, 2, 3] and streak['finite']
  assert streak['equal']['2-3']
  assert [r['step'] for r in streak['train']] == [1, 2, 3]
