"""train.py's cross-validation on native-resolution patches, end to end:
fold 1 of 3 trains on its "train" cases, validates on its "val" cases of
the train split (tiles counting every native pixel once) and records the
folds in DIR/splits.json."""

import json
import textwrap

import numpy as np
import pytest

from lintunet_jax.data import folds
from lintunet_jax.data import pipeline as input_pipeline
from tests import train_testutil as tu

CODE = textwrap.dedent('''
    import json
    from lintunet_jax.training import loop, metric_logs
    from tests import train_testutil as tu

    seen = {{'train_cases': None, 'eval': []}}
    real_train, real_eval = (loop.input_pipeline.create_train_iterator,
                             loop.input_pipeline.create_eval_iterator)

    def train_iterator(*args, **kwargs):
      seen['train_cases'] = list(kwargs['cases'])
      return real_train(*args, **kwargs)

    def eval_iterator(*args, **kwargs):
      for batch in real_eval(*args, **kwargs):
        seen['eval'] += [[int(i), int(r.sum())] for i, r, ok in zip(
            batch['index'], batch['region'], batch['valid']) if ok]
        yield batch

    loop.input_pipeline.create_train_iterator = train_iterator
    loop.input_pipeline.create_eval_iterator = eval_iterator
    config = tu.tiny_config({data_dir!r}, **{overrides!r})
    loop.train_and_evaluate(config, {workdir!r})
    seen['records'] = metric_logs.read_metrics({workdir!r}, 'eval')
    seen['losses'] = [r['loss'] for r in metric_logs.read_metrics({workdir!r}, 'train')]
    print(json.dumps(seen))
''')

OVERRIDES = {'dataset__patch_size': 32, 'dataset__fold': 1, 'dataset__num_folds': 3,
             'dataset__num_train_examples': 24, 'dataset__foreground_fraction': 0.5,
             'num_train_steps': 2, 'checkpoint_every_steps': 2}


@pytest.mark.slow
def test_fold_one_of_three_on_patches(tmp_path_factory, tmp_path):
  data_dir = tu.data_dir(tmp_path_factory)
  workdir = str(tmp_path / 'fold1')
  seen = tu.run_python(CODE.format(data_dir=data_dir, overrides=OVERRIDES,
                                   workdir=workdir),
                       cache=tu.cache_dir(tmp_path_factory))
  config = tu.tiny_config(data_dir, **OVERRIDES)
  ids = input_pipeline.case_ids(config, 'train')
  assert len(ids) == 24
  with open(f'{workdir}/splits.json') as f:
    splits = json.load(f)
  assert splits == folds.make_folds(ids, 3)
  assert seen['train_cases'] == splits[1]['train']
  # Validation: every tile of each of fold 1's "val" images (64x64: four
  # 32x32 tiles), every native pixel once, and nothing else.
  tiles = {}
  for index, region in seen['eval']:
    tiles.setdefault(ids[index], []).append(region)
  assert sorted(tiles) == splits[1]['val']
  assert all(sorted(r) == [32 * 32] * 4 for r in tiles.values())
  record, = seen['records']
  assert (record['split'], record['fold'], record['resolution']) == (
      'train', 1, 'native_tiles')
  assert 0 <= record['iou'] <= 1 and np.all(np.isfinite(seen['losses']))
