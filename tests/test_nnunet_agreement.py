"""benchmarks/nnunet_agreement.py's comparison finds every disagreement.

The agreement itself, on real files with nnU-Net, is checked end to end in
tests/training/test_volumes_recipe.py; here the comparison is fed nnU-Net's
per-case layout by hand, so a check that passed everything would fail."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / 'benchmarks'))
import nnunet_agreement  # noqa: E402  pylint: disable=g-import-not-at-top

NAN = float('nan')


def _pair():
  counts = {'TP': 30, 'FP': 5, 'FN': 10, 'TN': 955}
  dice = 2 * 30 / (2 * 30 + 5 + 10)
  ours = {'metric_per_case': [
      {'case': 'a', 'metrics': {'1': {**counts, 'Dice': dice},
                                '2': {'TP': 0, 'FP': 0, 'FN': 0, 'TN': 1000, 'Dice': None}}}]}
  theirs = {'metric_per_case': [
      {'prediction_file': '/x/pred/a.nii.gz',
       'metrics': {1: {**counts, 'Dice': dice},
                   2: {'TP': 0, 'FP': 0, 'FN': 0, 'TN': 1000, 'Dice': NAN}}}]}
  return ours, theirs


def test_agreeing_numbers_pass():
  ours, theirs = _pair()
  assert nnunet_agreement._compare(ours, theirs, [1, 2]) == (0.0, [])


def test_each_kind_of_disagreement_is_reported():
  ours, theirs = _pair()
  swapped = copy.deepcopy(theirs)
  swapped['metric_per_case'][0]['metrics'][1].update(FP=10, FN=5)
  _, problems = nnunet_agreement._compare(ours, swapped, [1, 2])
  assert problems == ['a class 1 FP: 5 vs 10', 'a class 1 FN: 10 vs 5']
  off = copy.deepcopy(ours)
  off['metric_per_case'][0]['metrics']['1']['Dice'] += 1e-3
  worst, problems = nnunet_agreement._compare(off, theirs, [1, 2])
  assert worst > 1e-4 and problems == ['Dice differs by up to 1.00e-03']
  nan_vs_zero = copy.deepcopy(ours)
  nan_vs_zero['metric_per_case'][0]['metrics']['2']['Dice'] = 0.0
  _, problems = nnunet_agreement._compare(nan_vs_zero, theirs, [1, 2])
  assert problems == ['a class 2 Dice: 0.0 vs nan']
  renamed = copy.deepcopy(theirs)
  renamed['metric_per_case'][0]['prediction_file'] = '/x/pred/b.nii.gz'
  _, problems = nnunet_agreement._compare(ours, renamed, [1, 2])
  assert problems == ['a: no predicted file scored by nnU-Net']


def test_folders_nnunet_cannot_read_are_refused_by_name(tmp_path, capsys):
  cases = tmp_path / 'test.cases.json'
  cases.write_text('{"metric_per_case": []}')
  common = [f'--cases={cases}', f'--out={tmp_path / "summary.json"}']
  with pytest.raises(SystemExit) as exit_info:
    nnunet_agreement.main(['--labels=gs://bkt/labelsTs', f'--predicted={tmp_path}', *common])
  assert exit_info.value.code == 2
  assert "--labels 'gs://bkt/labelsTs': nnU-Net reads local files only" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    nnunet_agreement.main([f'--labels={tmp_path}', f'--predicted={tmp_path / "nope"}', *common])
  assert 'does not exist or is not a folder' in capsys.readouterr().err
  assert not (tmp_path / 'summary.json').exists()
