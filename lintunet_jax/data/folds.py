"""K-fold cross-validation of the train split, in nnU-Net's splits layout.

A splits file (nnU-Net's `splits_final.json`) is a JSON list with one
object per fold, `{"train": [case ids], "val": [case ids]}`; a case id is
the `file_name` our builders store (`input_pipeline.case_ids`).

The generated folds are nnU-Net's: the case ids sorted, then scikit-learn's
`KFold(n_splits=num_folds, shuffle=True, random_state=12345)` (implemented
here with NumPy's legacy RandomState, which is what KFold shuffles with, so
the same ids give nnU-Net's folds): near-equal disjoint "val" parts that
together cover every case, each fold training on all the others, both
lists in sorted order. They depend only on the set of ids and num_folds:
not on the order the ids come in, the machine or the number of processes.

  make_folds(case_ids, num_folds)        -> the folds
  parse_splits(text, case_ids, where)    -> checked folds from a file's text
  resolve(workdir, case_ids, ...)        -> the run's folds, DIR/splits.json written
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from lintunet_jax import paths

SEED = 12345  # nnU-Net's KFold random_state
SPLITS_FILE = 'splits.json'  # in the workdir

Folds = list[dict[str, list[str]]]


class SplitsError(ValueError):
  """A splits file that cannot be used; the message names the file."""


def make_folds(case_ids: Sequence[str], num_folds: int,
               seed: int = SEED) -> Folds:
  """num_folds folds of `case_ids` (unique strings, any order).

  Fold k's "val" is the k-th of num_folds consecutive runs of a seeded
  shuffle of the sorted ids, the first len % num_folds runs one longer;
  its "train" is every other case.
  """
  ids = sorted(str(i) for i in case_ids)
  _check_unique(ids, 'case ids')
  if num_folds < 2 or num_folds > len(ids):
    raise ValueError(f'config.dataset.num_folds={num_folds}: need 2 <= '
                     f'num_folds <= the {len(ids)} cases of the train split')
  order = np.arange(len(ids))
  np.random.RandomState(seed).shuffle(order)
  sizes = np.full(num_folds, len(ids) // num_folds)
  sizes[:len(ids) % num_folds] += 1
  folds, start = [], 0
  for size in sizes:
    in_val = np.zeros(len(ids), bool)
    in_val[order[start:start + size]] = True
    start += size
    folds.append({'train': [ids[i] for i in np.flatnonzero(~in_val)],
                  'val': [ids[i] for i in np.flatnonzero(in_val)]})
  return folds


def parse_splits(text: str, case_ids: Sequence[str], where: str) -> Folds:
  """The folds in a splits file's `text`, checked against the train split.

  Raises SplitsError naming `where` (the file) and the problem: not JSON,
  not a list of {"train": [...], "val": [...]} objects of string ids, an
  empty or repeated id list, ids that are not cases of the split, or a case
  in both train and val of a fold. A fold need not cover every case.
  """
  try:
    folds = json.loads(text)
  except json.JSONDecodeError as e:
    raise SplitsError(f'{where}: not JSON ({e})') from None
  layout = ('a JSON list of folds, each {"train": [case ids], "val": '
            '[case ids]} (nnU-Net\'s splits_final.json)')
  if not isinstance(folds, list) or not folds:
    raise SplitsError(f'{where}: expected {layout}; got '
                      f'{type(folds).__name__} {str(folds)[:80]}')
  known = set(case_ids)
  for k, fold in enumerate(folds):
    if not isinstance(fold, dict) or set(fold) != {'train', 'val'}:
      raise SplitsError(f'{where}: fold {k} is not an object with exactly the '
                        f'keys "train" and "val"; expected {layout}')
    for part in ('train', 'val'):
      ids = fold[part]
      if (not isinstance(ids, list) or not ids
          or not all(isinstance(i, str) for i in ids)):
        raise SplitsError(f'{where}: fold {k} "{part}" must be a non-empty '
                          'list of case ids (strings)')
      _check_unique(ids, f'{where}: fold {k} "{part}"', SplitsError)
      unknown = sorted(set(ids) - known)
      if unknown:
        raise SplitsError(
            f'{where}: fold {k} "{part}" names {len(unknown)} case ids that '
            f'are not in the train split, e.g. {unknown[:5]} (case ids are '
            'the stored file_name, or the index for datasets without one)')
    both = sorted(set(fold['train']) & set(fold['val']))
    if both:
      raise SplitsError(f'{where}: fold {k} has {len(both)} cases in both '
                        f'"train" and "val", e.g. {both[:5]}')
  return folds


def read_splits(path: str, case_ids: Sequence[str]) -> Folds:
  """parse_splits of the file at `path` (local or gs://)."""
  target = paths.check(path, 'splits file')
  if not target.exists():
    raise SplitsError(f'{path}: splits file not found')
  return parse_splits(target.read_text(), case_ids, str(path))


def select(folds: Folds, fold: int, where: str) -> dict[str, list[str]]:
  """Fold `fold` of `folds` ({"train", "val"}), or an error naming `where`."""
  if not 0 <= fold < len(folds):
    raise SplitsError(f'config.dataset.fold={fold} but {where} has '
                      f'{len(folds)} folds (0 to {len(folds) - 1})')
  return folds[fold]


def resolve(workdir: str, case_ids: Sequence[str], *, fold: int,
            num_folds: int, splits_file: str | None = None,
            write: bool = True) -> dict[str, list[str]]:
  """The run's fold `fold`: {"train": [ids], "val": [ids]}.

  The folds come from `splits_file` when given, else from DIR/splits.json
  when it exists (a resumed run, which keeps its folds), else from
  `make_folds(case_ids, num_folds)`. With `write` (process 0), they are
  written to DIR/splits.json, so the workdir records which cases trained.
  A DIR/splits.json that differs from `splits_file`, or that has another
  number of folds than `num_folds` when no splits_file is given, is an
  error: a resumed run must train on the cases it started with.
  """
  stored_path = str(paths.check(workdir, 'workdir') / SPLITS_FILE)
  stored = None
  if paths.check(stored_path).exists():
    stored = read_splits(stored_path, case_ids)
  if splits_file:
    folds = read_splits(splits_file, case_ids)
    where = splits_file
    if stored is not None and stored != folds:
      raise SplitsError(
          f'{stored_path} (the folds this run started with) differs from '
          f'config.dataset.splits_file={splits_file}; resume with the same '
          'splits file, or use a new workdir')
  elif stored is not None:
    folds, where = stored, stored_path
    if len(folds) != num_folds:
      raise SplitsError(
          f'{stored_path} (the folds this run started with) has {len(folds)} '
          f'folds but config.dataset.num_folds={num_folds}; resume with '
          f'--config.dataset.num_folds={len(folds)}, or use a new workdir')
  else:
    folds, where = make_folds(case_ids, num_folds), f'num_folds={num_folds}'
  chosen = select(folds, fold, where)
  if write and stored != folds:
    paths.check(workdir).mkdir(parents=True, exist_ok=True)
    paths.write_text(stored_path, json.dumps(folds, indent=2) + '\n')
  return chosen


def _check_unique(ids: Sequence[str], what: str,
                  error: type[Exception] = ValueError) -> None:
  seen, repeated = set(), set()
  for i in ids:
    (repeated if i in seen else seen).add(i)
  if repeated:
    raise error(f'{what}: {len(repeated)} ids appear more than once, e.g. '
                f'{sorted(repeated)[:5]}')
