"""benchmarks/model_scaling.py at toy sizes: the result file and what it reports.

The script's main() at two sizes (32 and 64 px, width 4, one timed round),
the U-Net and LinTUNet with dense attention (each configuration compiles a
whole train step: seconds each): every configuration measured at every
size, the attention shares derived from the U-Net of the same size, the
finding's rows those of dense attention, whose planned memory grows with
the image.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests import train_testutil as tu

sys.path.insert(0, str(tu.ROOT / 'benchmarks'))
import model_scaling  # noqa: E402  pylint: disable=wrong-import-position

MODELS = ['unet', 'lintunet/dense']


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp('scaling') / 'model_scaling.json'
  model_scaling.main(['--sizes=32,64', '--width=4', '--rounds=1', '--kinds=dense',
                      f'--out={out}'])
  return json.loads(out.read_text())


def test_unknown_kinds_are_refused(capsys):
  with pytest.raises(SystemExit):
    model_scaling.main(['--kinds=dense,sparse'])
  assert "unknown ['sparse']" in capsys.readouterr().err


@pytest.mark.slow
def test_every_configuration_is_measured_at_every_size(result):
  assert result['benchmark'] == 'model_scaling'
  assert result['settings']['sizes'] == [32, 64] and result['settings']['width'] == 4
  rows = {(r['size'], r['model']): r for r in result['results']}
  assert sorted(rows) == sorted((s, m) for s in (32, 64) for m in MODELS)
  for (size, model), row in rows.items():
    assert row['tokens'] == (size // 16) ** 2
    assert row['fits'] and row['compile_s'] > 0
    assert row['step_s']['median'] > 0 and row['flops_per_step'] > 0
    assert row['memory']['peak_bytes'] > 0
    if model == 'unet':
      assert 'attention_time_share' not in row
      continue
    # LinTUNet is the U-Net plus the attention block: more FLOPs, and the
    # shares are 1 - U-Net / LinTUNet of the same size.
    unet = rows[(size, 'unet')]
    assert row['flops_per_step'] > unet['flops_per_step']
    assert row['attention_flop_share'] == pytest.approx(
        1 - unet['flops_per_step'] / row['flops_per_step'])
    assert 0 < row['attention_flop_share'] < 1
    assert row['attention_time_share'] == pytest.approx(1 - 1 / row['time_vs_unet'])
    assert row['attention_time_share'] < 1


@pytest.mark.slow
def test_finding_follows_dense_attention_across_sizes(result):
  finding = result['finding']
  dense = [r for r in result['results'] if r['model'] == 'lintunet/dense']
  assert [r['size'] for r in finding['rows']] == [32, 64]
  for row, measured in zip(finding['rows'], dense):
    assert row['dense_attention_time_share'] == measured['attention_time_share']
    assert row['dense_peak_gb'] == measured['memory']['peak_bytes'] / 2**30
    assert row['best_sparse_kind'] is None  # none measured here
  # 4x the pixels: the dense model's planned memory grows.
  assert finding['rows'][1]['dense_peak_gb'] > finding['rows'][0]['dense_peak_gb']
  assert finding['dense_does_not_fit_at'] is None  # toy sizes fit
