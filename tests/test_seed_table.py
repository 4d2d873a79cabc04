"""benchmarks/seed_table.py: the table's statistics, and one tiny table end to end.

The end-to-end test writes its own small COCO export (bright rectangles on
noise, one test image without a tumour) so it runs the same here and in CI,
whatever ../shared holds; tests/data/datasets/test_shared_exports.py covers
the real export's preparation. The statistics are checked against hand
computations and a known difference.
"""

import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import seed_table  # noqa: E402  pylint: disable=wrong-import-position


# ----------------------------------------------------------------- statistics


def test_bootstrap_interval_finds_a_known_difference():
  rng = np.random.default_rng()
  shifted = 0.1 + rng.normal(0, 0.02, 200)
  low, high = seed_table.bootstrap_interval(shifted)
  # Around the sample mean, clear of zero. (Not `< 0.1 <`: a 95% interval
  # misses the true mean of fresh random data one time in twenty.)
  assert 0 < low < shifted.mean() < high
  # The spread of the mean of 200 values: ~ 1.96 * 0.02 / sqrt(200) each side.
  assert high - low == pytest.approx(2 * 1.96 * shifted.std() / np.sqrt(200), rel=0.2)
  assert seed_table.verdict('lintunet', 'unet', low, high).endswith(
      '(distinguishable from zero)')

  symmetric = rng.uniform(0.01, 0.3, 100)
  symmetric = np.concatenate([symmetric, -symmetric])  # mean exactly 0
  low, high = seed_table.bootstrap_interval(symmetric)
  assert low < 0 < high
  assert 'not distinguishable' in seed_table.verdict('lintunet', 'unet', low, high)
  # NaN (images with no IoU) are left out, not counted as 0.
  assert seed_table.bootstrap_interval(np.r_[shifted, [np.nan] * 50]) == \
      seed_table.bootstrap_interval(shifted)


def _run(model, seed, tp, fp, fn, iou):
  return {'model': model, 'seed': seed, 'workdir': f'{model}/{seed}',
          'metrics': {'iou': iou, 'iou_per_image': 0.0, 'dice': 0.0,
                      'precision': 0.0, 'recall': 0.0},
          'per_image': {'index': [0, 1, 2], 'tp': tp, 'fp': fp, 'fn': fn}}


def test_aggregation_and_paired_differences_by_hand():
  runs = {
      'unet': [_run('unet', 0, [1, 0, 2], [1, 0, 0], [0, 0, 2], 0.5),   # IoU 1/2, nan, 2/4
               _run('unet', 1, [3, 0, 1], [1, 2, 0], [0, 0, 0], 0.7)],  # 3/4, 0, 1
      'lintunet': [_run('lintunet', 0, [2, 0, 1], [0, 0, 1], [0, 0, 2], 0.6),  # 1, nan, 1/4
                   _run('lintunet', 1, [1, 0, 4], [1, 0, 0], [2, 0, 0], 0.9)],  # 1/4, nan, 1
  }
  summary = seed_table.aggregate(runs)
  assert summary['unet']['iou']['mean'] == pytest.approx(0.6)
  assert summary['unet']['iou']['std'] == pytest.approx(np.sqrt(0.02))  # ddof=1
  assert summary['lintunet']['iou']['std'] == pytest.approx(np.sqrt(0.045))
  diffs, per_image = seed_table.differences(runs)
  # Seed means per image: unet [5/8, 0 (nan ignored), 3/4]; lintunet [5/8, nan, 5/8].
  np.testing.assert_allclose(per_image['unet'], [0.625, 0.0, 0.75])
  np.testing.assert_allclose(per_image['lintunet'], [0.625, np.nan, 0.625])
  d = diffs['lintunet']
  assert d['num_images'] == 2 and d['images_excluded_empty'] == 1
  assert d['mean_difference'] == pytest.approx((0 - 0.125) / 2)
  # Seed 0: (1 - 1/2, -, 1/4 - 1/2) -> mean 0.125; seed 1: (1/4-3/4, -, 0).
  assert d['per_seed_difference'] == {'0': pytest.approx(0.125),
                                      '1': pytest.approx(-0.25)}
  # Only image 2 differs (images 0 and 1 agree or have one IoU): no padding.
  assert seed_table.disagreements(per_image, 2) == [2]


# ----------------------------------------------------------------- end to end


def _write_export(root: pathlib.Path) -> None:
  rng = np.random.default_rng(0)
  for split, count in (('train', 8), ('valid', 4), ('test', 5)):
    folder = root / split
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
      height, width = 40, 48
      image = rng.integers(0, 90, (height, width)).astype(np.uint8)
      name = f'{split}_{i}.jpg'
      images.append({'id': i, 'file_name': name, 'height': height, 'width': width})
      if not (split == 'test' and i == count - 1):  # the last test image: no tumour
        x, y = int(rng.integers(2, 26)), int(rng.integers(2, 18))
        w, h = int(rng.integers(8, 18)), int(rng.integers(8, 18))
        image[y:y + h, x:x + w] += 120
        annotations.append({'id': len(annotations), 'image_id': i, 'category_id': 1,
                            'bbox': [x, y, w, h],
                            'segmentation': [[x, y, x + w, y, x + w, y + h, x, y + h]]})
      Image.fromarray(image).save(folder / name, quality=95)
    (folder / '_annotations.coco.json').write_text(json.dumps({
        'images': images, 'annotations': annotations,
        'categories': [{'id': 1, 'name': 'tumor'}]}))


@pytest.fixture
def scripts_jax_cache(monkeypatch):
  """Lets the script point this process's compilation cache at its --root,
  as it does for a user (the seeds of one model compile the same programs:
  once), and puts the cache back afterwards."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  before = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update('jax_compilation_cache_dir', before)
  compilation_cache.reset_cache()


@pytest.mark.slow
def test_tiny_table_end_to_end_and_resume(tmp_path, capsys, scripts_jax_cache):
  data = tmp_path / 'export'
  _write_export(data)
  argv = ['--scale', 'tiny', '--data', str(data), '--seeds', '0,1',
          '--models', 'unet,block_sparse', '--root', str(tmp_path / 'runs'),
          '--out', str(tmp_path / 'out')]
  assert seed_table.main(argv) == 0
  first = capsys.readouterr().out
  assert first.count('training in') == 4

  out = tmp_path / 'out'
  table = json.loads((out / 'seed_table_tiny.json').read_text())
  for name in ('seed_table_tiny.md', 'seed_table_tiny.png',
               'seed_table_tiny_disagreements.png'):
    assert (out / name).stat().st_size > 0, name
  assert table['num_test_images'] == 5
  assert sorted(table['test_index']) == list(range(5))
  assert {(r['model'], r['seed']) for r in table['runs']} == {
      ('unet', 0), ('unet', 1), ('block_sparse', 0), ('block_sparse', 1)}
  # Each run's file: the test split at native size, the best checkpoint.
  run = json.loads((tmp_path / 'runs' / 'unet' / 'seed1' / 'test_metrics.json').read_text())
  assert run['test_split'] == 'test' and run['resolution'] == 'native'
  assert run['validation']['split'] == 'validation'
  counts = run['per_image']
  tp, fp, fn = (np.asarray(counts[k]) for k in ('tp', 'fp', 'fn'))
  assert tp.sum() + fn.sum() > 0  # the rectangles were counted
  assert run['metrics']['iou'] == pytest.approx(tp.sum() / max(tp.sum() + fp.sum() + fn.sum(), 1))
  # The aggregate is the mean of the two runs' values.
  ious = [r['metrics']['iou'] for r in table['runs'] if r['model'] == 'unet']
  assert table['aggregates']['unet']['iou']['mean'] == pytest.approx(np.mean(ious))
  assert set(table['differences']) == {'block_sparse'}
  assert 'interval' in (out / 'seed_table_tiny.md').read_text() and \
      table['differences']['block_sparse']['verdict'] in (out / 'seed_table_tiny.md').read_text()
  assert len(table['disagreements']) >= 1

  # A rerun trains nothing: every run is reused, no checkpoint is touched.
  runs_dir = tmp_path / 'runs'
  before = {p: p.stat().st_mtime_ns for p in runs_dir.rglob('*') if p.is_file()
            and not {'tfds', 'jax_cache'} & set(p.parts)}
  assert seed_table.main(argv) == 0
  second = capsys.readouterr().out
  assert 'training in' not in second
  assert second.count('finished earlier') == 4
  after = {p: p.stat().st_mtime_ns for p in runs_dir.rglob('*') if p.is_file()
           and not {'tfds', 'jax_cache'} & set(p.parts)}
  assert any('seed1' in p.parts for p in after)  # the runs' own files are compared
  assert after == before

  # Other settings on the same root are refused, not mixed in.
  assert seed_table.main(argv[:-4] + ['--epochs', '3', '--root', str(runs_dir),
                                      '--out', str(tmp_path / 'out2')]) == 2
  assert 'other settings' in capsys.readouterr().err


def test_missing_data_skips_cleanly(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(seed_table, 'DEFAULT_DATA', tmp_path / 'absent')
  assert seed_table.main(['--scale', 'tiny', '--root', str(tmp_path / 'r'),
                          '--out', str(tmp_path / 'o')]) == 0
  assert 'skipped' in capsys.readouterr().out
  assert not (tmp_path / 'o').exists() and not (tmp_path / 'r').exists()
