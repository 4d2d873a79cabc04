"""configs/lintunet.py:volumes_quick end to end: train.py on the synthetic
nnU-Net raw dataset (its default) and on a raw folder given as manual_dir,
fold 0 of 5 by case; eval.py per volume, predict.py to NIfTI, and nnU-Net
v2's own evaluation of those files giving eval.py's numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests import train_testutil as tu
from tests.optional_deps import optional

sys.path.insert(0, str(Path(__file__).parents[1] / 'data' / 'datasets'))
from test_nnunet_raw import SHAPE, write_raw  # noqa: E402  pylint: disable=g-import-not-at-top

SMALL = ['--config.model.width=4', '--config.num_train_steps=4',
         '--config.eval_every_steps=2', '--config.checkpoint_every_steps=4',
         '--config.progress_bar=False', '--config.dataset.num_workers=0']


def _train(tmp_path, *extra):
  workdir = tmp_path / 'run'
  flags = [f'--config={tu.ROOT / "configs" / "lintunet.py"}:volumes_quick',
           f'--config.dataset.data_dir={tmp_path / "data"}', *SMALL, *extra]
  result = tu.run_train(str(workdir), flags, cache=None, timeout=400)
  assert result.returncode == 0, result.stderr[-5000:]
  return workdir


def _records(workdir, kind):
  return [r for r in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
          if r['type'] == kind]


@pytest.mark.slow
def test_volumes_quick_trains_on_the_synthetic_raw_dataset(tmp_path):
  workdir = _train(tmp_path)
  config = json.loads((workdir / 'config.json').read_text())
  assert (config['model']['in_channels'], config['model']['num_classes']) == (2, 3)
  assert config['dataset']['normalization'] == 'stored'
  folds = json.loads((workdir / 'splits.json').read_text())
  assert len(folds) == 5
  assert all(case.startswith('synth_') for case in folds[0]['train'] + folds[0]['val'])
  val_cases = len(folds[0]['val'])
  evals = _records(workdir, 'eval')
  assert evals and all(r['num_images'] == val_cases * 14 for r in evals)  # every val slice
  statistics = json.loads((workdir / 'volume_statistics.json').read_text())
  assert [e['scheme'] for e in statistics['normalization']] == ['ct', 'zscore']
  # eval.py: per-volume 3-D metrics of the test split, NSD tolerance in mm.
  report_path = tmp_path / 'eval' / 'report.json'
  evaluated = subprocess.run(
      [sys.executable, str(tu.ROOT / 'eval.py'), f'--workdir={workdir}', '--nothroughput',
       '--noprogress', f'--report={report_path}'], env=tu.env(1), capture_output=True,
      text=True, timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-4000:]
  assert 'per volume (3-D, mm)' in evaluated.stdout and 'HD95 mm' in evaluated.stdout
  report = json.loads(report_path.read_text())
  assert report['resolution'] == 'volume' and report['metrics']['num_images'] == 3
  cases = json.loads(report_path.with_suffix('.cases.json').read_text())
  assert [c['case'] for c in cases['metric_per_case']] == ['synth_008', 'synth_009',
                                                          'synth_010']
  assert all(c['spacing'] == pytest.approx([0.8, 0.8, 3.0]) for c in cases['metric_per_case'])

  # predict.py on the synthetic dataset's imagesTs: one label volume per
  # case with the input's geometry.
  images = tmp_path / 'data' / 'downloads' / 'manual' / 'nnunet_raw' / \
      'Dataset990_SyntheticCTMR' / 'imagesTs'
  out = tmp_path / 'predicted'
  predicted = subprocess.run(
      [sys.executable, str(tu.ROOT / 'predict.py'), f'--workdir={workdir}',
       f'--input={images}', f'--output={out}', '--save_probabilities'],
      env=tu.env(1), capture_output=True, text=True, timeout=300)
  assert predicted.returncode == 0, predicted.stderr[-4000:]
  assert 'volumes/s' in predicted.stdout and 'slices/s' in predicted.stdout
  cases = sorted(p.name[:-len('_0000.nii.gz')] for p in images.glob('*_0000.nii.gz'))
  assert sorted(p.name for p in out.glob('*.nii.gz')) == [f'{c}.nii.gz' for c in cases]
  for case in cases:
    written, source = (nib.load(str(out / f'{case}.nii.gz')),
                       nib.load(str(images / f'{case}_0000.nii.gz')))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2}
    assert np.load(out / f'{case}.npz')['probabilities'].shape == (3, *source.shape)
  # nnU-Net v2's own evaluation of predict.py's files against labelsTs
  # gives eval.py's per-volume counts and Dice: the written volumes hold
  # what eval.py scored, in the input's voxel order.
  if optional('nnunetv2') is not None:
    agreement = subprocess.run(
        [sys.executable, str(tu.ROOT / 'benchmarks' / 'nnunet_agreement.py'),
         f'--labels={images.parent / "labelsTs"}', f'--predicted={out}',
         f'--cases={report_path.with_suffix(".cases.json")}',
         f'--out={tmp_path / "nnunet_summary.json"}'],
        env=tu.env(1), capture_output=True, text=True, timeout=300)
    assert agreement.returncode == 0, agreement.stdout + agreement.stderr[-4000:]
    assert '3 volumes, largest per-case Dice difference 0.0e+00' in agreement.stdout
    summary = json.loads((tmp_path / 'nnunet_summary.json').read_text())
    assert all(c['metrics'][label]['n_pred'] > 0 for c in summary['metric_per_case']
               for label in ('1', '2'))  # something to compare
  # 2-D images are refused for a volume workdir, with the reason.
  png = tmp_path / 'slice.png'
  Image.fromarray(np.zeros((20, 20), np.uint8)).save(png)
  refused = subprocess.run(
      [sys.executable, str(tu.ROOT / 'predict.py'), f'--workdir={workdir}',
       f'--input={png}', f'--output={tmp_path / "png_out"}'],
      env=tu.env(1), capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and 'not 2-D images' in refused.stderr


@pytest.mark.slow
def test_volumes_quick_on_a_raw_folder(tmp_path):
  folder, _ = write_raw(tmp_path / 'raw', train=5, test=1,
                        channel_names=('T1', 'T2', 'FLAIR'))
  workdir = _train(tmp_path, f'--config.dataset.manual_dir={folder}',
                   '--config.dataset.image_size=16',
                   '--config.model.attention.seq_len=1',
                   '--config.model.attention.block_size=1',
                   '--config.model.attention.k=1',
                   '--config.model.attention.pattern=local_2d(radius=1)')
  config = json.loads((workdir / 'config.json').read_text())
  assert (config['model']['in_channels'], config['model']['num_classes']) == (3, 3)
  folds = json.loads((workdir / 'splits.json').read_text())
  assert sorted(folds[0]['train'] + folds[0]['val']) == [f'case_{i:03d}' for i in range(5)]
  assert all(r['num_images'] == SHAPE[2] for r in _records(workdir, 'eval'))  # 1 val case
