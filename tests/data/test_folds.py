"""Cross-validation folds: nnU-Net's (scikit-learn's KFold) folds, splits
files and their errors, DIR/splits.json on start and resume."""

import json

import numpy as np
import pytest

from lintunet_jax.data import folds


def _random_ids(rng, count):
  return [f'case_{v:05d}.png' for v in rng.choice(100000, count, replace=False)]


@pytest.mark.parametrize('count,num_folds', [(23, 5), (10, 3), (7, 7), (64, 5)])
def test_folds_are_nnunets_kfold(count, num_folds):
  """nnU-Net: KFold(n_splits, shuffle=True, random_state=12345) over the
  sorted ids; scikit-learn is the reference here, not a runtime need."""
  model_selection = pytest.importorskip('sklearn.model_selection')
  ids = _random_ids(np.random.default_rng(), count)
  got = folds.make_folds(ids, num_folds)
  keys = np.sort(ids)
  kfold = model_selection.KFold(n_splits=num_folds, shuffle=True, random_state=12345)
  want = [{'train': list(keys[train]), 'val': list(keys[val])}
          for train, val in kfold.split(keys)]
  assert got == want


def test_folds_are_disjoint_covering_near_equal_and_order_free():
  rng = np.random.default_rng()
  ids = _random_ids(rng, 23)
  got = folds.make_folds(ids, 5)
  vals = [fold['val'] for fold in got]
  assert sorted(sum(vals, [])) == sorted(ids)  # every case validated once
  assert sorted(len(v) for v in vals) == [4, 4, 5, 5, 5]
  for fold in got:
    assert set(fold['train']).isdisjoint(fold['val'])
    assert sorted(fold['train'] + fold['val']) == sorted(ids)
    assert fold['train'] == sorted(fold['train']) and fold['val'] == sorted(fold['val'])
  assert folds.make_folds(list(rng.permutation(ids)), 5) == got
  assert folds.make_folds(ids, 5) == got
  assert folds.make_folds(ids, 5, seed=1) != got
  with pytest.raises(ValueError, match='num_folds=24'):
    folds.make_folds(ids, 24)
  with pytest.raises(ValueError, match='more than once'):
    folds.make_folds(ids + ids[:1], 5)


def _write(path, value):
  path.write_text(value if isinstance(value, str) else json.dumps(value))
  return str(path)


def test_bad_splits_files_name_the_file_and_the_problem(tmp_path):
  ids = ['a', 'b', 'c', 'd']
  good = [{'train': ['a', 'b'], 'val': ['c']}, {'train': ['c', 'd'], 'val': ['a']}]
  assert folds.read_splits(_write(tmp_path / 'good.json', good), ids) == good
  cases = {
      'not JSON': ('{"train": [', 'not JSON'),
      'a dict': ({'train': ['a'], 'val': ['b']}, 'expected a JSON list'),
      'no val': ([{'train': ['a']}], 'fold 0 is not an object'),
      'unknown id': ([{'train': ['a', 'x9'], 'val': ['b']}],
                     r'fold 0 "train" names 1 case ids that are not in the '
                     r"train split, e.g. \['x9'\]"),
      'overlap': ([good[0], {'train': ['a', 'b'], 'val': ['b', 'c']}],
                  r"fold 1 has 1 cases in both \"train\" and \"val\", e.g. \['b'\]"),
      'ints': ([{'train': [1, 2], 'val': [3]}], 'list of case ids'),
      'empty val': ([{'train': ['a'], 'val': []}], 'non-empty'),
      'repeated': ([{'train': ['a', 'a'], 'val': ['b']}], 'more than once'),
  }
  for name, (content, message) in cases.items():
    path = _write(tmp_path / f'{name}.json', content)
    with pytest.raises(folds.SplitsError, match=message) as error:
      folds.read_splits(path, ids)
    assert str(error.value).startswith(path), name
  with pytest.raises(folds.SplitsError, match=r'fold=2 but .*good.json has 2 folds'):
    folds.resolve(str(tmp_path / 'run'), ids, fold=2, num_folds=5,
                  splits_file=str(tmp_path / 'good.json'))
  with pytest.raises(folds.SplitsError, match='not found'):
    folds.read_splits(str(tmp_path / 'missing.json'), ids)


def test_resolve_writes_the_folds_and_a_resumed_run_keeps_them(tmp_path):
  ids = [f'img{i}' for i in range(12)]
  workdir = tmp_path / 'run'
  fold = folds.resolve(str(workdir), ids, fold=1, num_folds=3)
  written = json.loads((workdir / 'splits.json').read_text())
  assert written == folds.make_folds(ids, 3) and fold == written[1]
  # Resumed (or fold 2 pointed at the same workdir): the file is read back.
  custom = [{'train': ids[:6], 'val': ids[6:]}] * 3
  (workdir / 'splits.json').write_text(json.dumps(custom))
  assert folds.resolve(str(workdir), ids, fold=2, num_folds=3) == custom[2]
  with pytest.raises(folds.SplitsError, match='has 3 folds but config.dataset.num_folds=5'):
    folds.resolve(str(workdir), ids, fold=0, num_folds=5)
  with pytest.raises(folds.SplitsError, match='not in the train split'):
    folds.resolve(str(workdir), ids[:8], fold=0, num_folds=3)  # cases gone
  # A splits file replaces generated folds and is copied to the workdir.
  splits_file = _write(tmp_path / 'mine.json', [{'train': ids[2:], 'val': ids[:2]}])
  other = tmp_path / 'other'
  assert folds.resolve(str(other), ids, fold=0, num_folds=5,
                       splits_file=splits_file) == {'train': ids[2:], 'val': ids[:2]}
  assert json.loads((other / 'splits.json').read_text()) == json.loads(
      (tmp_path / 'mine.json').read_text())
  # ...and must stay the same when that run resumes.
  with pytest.raises(folds.SplitsError, match='differs from config.dataset.splits_file'):
    folds.resolve(str(workdir), ids, fold=0, num_folds=3, splits_file=splits_file)
  # Other processes read, never write.
  assert folds.resolve(str(tmp_path / 'p1'), ids, fold=0, num_folds=3, write=False)
  assert not (tmp_path / 'p1').exists()
