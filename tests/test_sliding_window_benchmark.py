"""benchmarks/sliding_window.py in its --quick mode: the result file's
structure, and the counts a wrong tiling would change."""

import json
import sys

from tests.evaluation.eval_testutil import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import sliding_window as benchmark  # noqa: E402  pylint: disable=wrong-import-position


def test_quick_run_writes_every_variant(tmp_path, capsys):
  out = tmp_path / 'sliding_window.json'
  benchmark.main(['--quick', '--out', str(out)])
  result = json.loads(out.read_text())
  settings = result['settings']
  assert settings['training_size'] == 32 and settings['image_size'] == 64
  rows = {row['variant']: row for row in result['rows']}
  assert list(rows) == ['resize', 'window', 'window+flips']
  # 64 px in tiles of 32 at overlap 0.5: starts 0, 16, 32 on each axis.
  assert rows['window']['tiles'] == 9 and rows['window']['forward_passes'] == 9
  assert rows['window+flips']['forward_passes'] == 36
  assert rows['resize']['forward_passes'] == 1
  for row in rows.values():
    assert len(row['times_s']) == 2 and row['median_s'] > 0
    assert row['memory']['temp_plus_output_bytes'] >= row['memory']['output_bytes'] > 0
  # The window's output alone is [1, 64, 64, 1] float32.
  assert rows['window']['memory']['output_bytes'] == 64 * 64 * 4
  assert rows['resize']['time_vs_resize'] == 1.0
  assert 'window+flips' in capsys.readouterr().out
