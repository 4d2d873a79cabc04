"""Training, evaluation and resume with a layout that skips tiles.

The other end-to-end tests use TINY's 2x2-token bottleneck, whose layout
is all FULL tiles, so they run dense attention in effect. Here the tiny
model sees 64x64 images (a 4x4 token grid) with `tu.SPARSE`: tiles of 2
tokens under `local_2d(radius=1)` are EMPTY, PARTIAL or FULL. In a
subprocess with 2 CPU devices, `train_and_evaluate` runs the data-parallel
train and eval steps; a run that crashes after its step-2 checkpoint and
is started again must match an uninterrupted one step for step.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from lintunet_jax.attention import layout as layout_lib
from lintunet_jax.attention import masks as masks_lib
from tests import train_testutil as tu


def test_the_sparse_config_has_empty_and_partial_tiles():
  """The layout `block_sparse_attention` derives for tu.SPARSE (xla.py:
  mask bound to the grid width, query tile = key tile = block_size)."""
  mask = masks_lib.bind_grid(
      masks_lib.parse_pattern(tu.SPARSE['model__attention__pattern']), 4)
  layout = layout_lib.block_layout(mask, 16, 2)
  tiles = layout.tiles
  assert tiles.shape == (8, 8)
  # Query tile 0 is tokens (0,0),(0,1); key tile 7 is (3,2),(3,3): 3 rows
  # apart, outside the window. Key tile 1, (0,2),(0,3): only (0,1)-(0,2)
  # are neighbours. Key tile 2, (1,0),(1,1): all within one step.
  assert tiles[0, 7] == layout_lib.EMPTY
  assert tiles[0, 1] == layout_lib.PARTIAL
  assert tiles[0, 2] == layout_lib.FULL
  counts = {code: int(np.count_nonzero(tiles == code))
            for code in (layout_lib.EMPTY, layout_lib.PARTIAL, layout_lib.FULL)}
  assert counts[layout_lib.EMPTY] >= 16 and counts[layout_lib.PARTIAL] > 0


CODE = textwrap.dedent('''
    import json
    import chex, jax, numpy as np
    from lintunet_jax.attention import layout as layout_lib
    from lintunet_jax.training import checkpointing, loop, metric_logs
    from lintunet_jax.training import state as tsl
    from tests import train_testutil as tu

    assert jax.device_count() == 2, jax.devices()
    built = []  # every layout the attention kernels derive while tracing
    real_layout = layout_lib.block_layout
    def recording_layout(*args, **kwargs):
      layout = real_layout(*args, **kwargs)
      built.append([layout.seq_len, layout.block_q, layout.block_kv,
                    [int(np.count_nonzero(layout.tiles == code)) for code in
                     (layout_lib.EMPTY, layout_lib.PARTIAL, layout_lib.FULL)]])
      return layout
    layout_lib.block_layout = recording_layout

    def crash_at(at):
      """The real iterator, raising when asked for batch `at`."""
      def fault(count, batch):
        if count == at:
          raise RuntimeError('simulated crash')
        return batch
      return fault

    config = tu.tiny_config({data_dir!r}, **tu.SPARSE, num_train_steps=4,
                            checkpoint_every_steps=2, eval_every_steps=2,
                            keep_checkpoints=5)
    root = {root!r}
    loop.train_and_evaluate(config, root + '/reference')
    undo = tu.inject_train_faults(loop, crash_at(3))
    try:
      loop.train_and_evaluate(config, root + '/resumed')
      crashed = False
    except RuntimeError as e:
      crashed = str(e) == 'simulated crash'
    after_crash = checkpointing.list_checkpoints(root + '/resumed')
    undo()
    loop.train_and_evaluate(config, root + '/resumed')

    def variables(name):
      _, model, _ = checkpointing.restore_model(root + '/' + name, 4)
      return jax.device_get(tsl.model_variables(model))
    # The resumed run ends with the uninterrupted run's parameters and
    # BatchNorm statistics (chex names a leaf that differs; the failure
    # stops this process, and run_python shows its message).
    chex.assert_trees_all_close(variables('resumed'), variables('reference'),
                                rtol=1e-6, atol=1e-7)

    def run(name):
      return {{'records': metric_logs.read_metrics(root + '/' + name)}}
    print(json.dumps({{'layouts': built, 'crashed': crashed,
                      'after_crash': after_crash,
                      'reference': run('reference'), 'resumed': run('resumed')}}))
''')


@pytest.mark.slow
def test_train_eval_and_resume_skip_empty_tiles(tmp_path, tmp_path_factory):
  data_dir = tu.data_dir(tmp_path_factory)
  result = tu.run_python(CODE.format(data_dir=data_dir, root=str(tmp_path)),
                         devices=2, cache=tu.cache_dir(tmp_path_factory),
                         timeout=500)
  # The kernels ran on the 16-token layout, empty and partial tiles included
  # (forward and backward of the train step, the eval step).
  sparse = [counts for n, bq, bkv, counts in result['layouts']
            if (n, bq, bkv) == (16, 2, 2)]
  assert sparse, result['layouts']
  assert all(empty > 0 and partial > 0 for empty, partial, _ in sparse), sparse
  # Trained and evaluated: finite, changing losses; validation metrics.
  reference, resumed = result['reference'], result['resumed']
  train = [r for r in reference['records'] if r['type'] == 'train']
  assert [r['step'] for r in train] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) and r['skipped_steps'] == 0 for r in train)
  assert len({r['loss'] for r in train}) == 4
  evals = [r for r in reference['records'] if r['type'] == 'eval']
  assert [r['step'] for r in evals] == [2, 4]
  assert all(r['num_images'] == 64 and 0 <= r['iou'] <= 1 for r in evals)
  # Crashed after the step-2 checkpoint, started again: the same run.
  assert result['crashed'] and result['after_crash'] == [2]
  assert [r['step'] for r in resumed['records'] if r['type'] == 'resume'] == [2]
  for kind in ('train', 'eval'):
    want = [r for r in reference['records'] if r['type'] == kind]
    got = [r for r in resumed['records'] if r['type'] == kind]
    assert [r['step'] for r in got] == [r['step'] for r in want], kind
    key = 'loss' if kind == 'train' else 'iou'
    np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want],
                               rtol=1e-6, atol=1e-7, err_msg=kind)
  # Its final variables equal the reference's: asserted in the subprocess.
