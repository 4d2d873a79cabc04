"""`eval.py` as a user runs it: a subprocess on tiny workdirs.

Workdirs are written with the real `checkpointing.write_weights_checkpoint`
(a LinTUNet and a U-Net, width 4, 32x32 synthetic MRI images). Each bad
input stops with exit status 2 and a message naming what is missing and
what exists. Subprocesses share a persistent XLA compilation cache so only
the first one pays for compiling.
"""

import json
import shutil
import subprocess
import sys

import pytest

from lintunet_jax.training import checkpointing
from lintunet_jax.training import metric_logs as logging_utils
from lintunet_jax import models
from tests.evaluation.eval_testutil import ROOT, as_trained_with_pallas, cli_env, tiny_config

def run_cli(env, *args, timeout=300):
  proc = subprocess.run([sys.executable, str(ROOT / 'eval.py'), *map(str, args)],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  return proc


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  root = tmp_path_factory.mktemp('eval_cli')
  out = {}
  for name in ('lintunet', 'unet'):
    config = tiny_config(base / 'tfds', name)
    model = models.create_model(config.model, seed=1)
    checkpointing.write_weights_checkpoint(root / name, config, model, step=0)
    out[name] = root / name
  writer = logging_utils.MetricWriter(str(out['lintunet']))
  for step in (1, 2, 3):
    writer.write('train', step, {'loss': 1.0 / step})
    writer.write('eval', step, {'split': 'validation', 'loss': 1.1 / step,
                                'iou': 0.2 * step})
  writer.close()
  out['root'] = root
  out['env'] = cli_env(base)
  return out


@pytest.mark.slow
def test_eval_and_compare(workdirs, tmp_path):
  report_path = tmp_path / 'reports' / 'lin.json'
  proc = run_cli(workdirs['env'], '--workdir', workdirs['lintunet'],
                 '--compare', workdirs['unet'], '--report', report_path,
                 '--throughput_batch_sizes', '2', '--throughput_runs', '2',
                 '--throughput_warmup', '1', '--num_overlays', '2', '--noprogress',
                 '--nsd_tolerance', '1.5')
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  header = next(l for l in out.splitlines() if l.startswith('Metric'))
  assert header.split() == ['Metric', 'lintunet', 'unet']
  for label in ('F1 (Dice)', 'IoU (dataset)', 'IoU (per image)', 'Precision',
                'Recall', 'Accuracy', 'Images/s (batch 2)', 'latency ms (batch 2)',
                'GFLOPs/image', 'Parameters', 'latest (step 0)',
                'Dice (case mean)', 'NSD @ 1.5 px (case mean)', 'HD95 px (case mean)'):
    assert label in out, label
  report = json.loads(report_path.read_text())
  # Per-case metrics next to the report, at the tolerance asked for.
  cases = tmp_path / 'reports' / 'lin.cases.json'
  assert report['per_case']['path'] == str(cases) and f'per-case metrics: {cases}' in out
  summary = json.loads(cases.read_text())
  assert summary['tolerance'] == report['per_case']['tolerance'] == 1.5
  assert summary['num_cases'] == 64 and list(summary['mean']) == ['1']
  assert report['checkpoint'] == {'requested': 'latest', 'step': 0}
  assert report['data']['num_images'] == 64 and report['data']['split'] == 'test'
  assert [b['batch_size'] for b in report['throughput']['batches']] == [2]
  assert report['comparison']['model'] == 'unet'
  # Pictures next to the report: overlays and training curves.
  pictures = tmp_path / 'reports' / 'lin'
  assert sorted(p.name for p in pictures.iterdir()) == [
      'overlay-test-00000.png', 'overlay-test-00001.png', 'training_curves.png']
  other = json.loads((workdirs['unet'] / 'eval' / 'test-0.json').read_text())
  assert other['model']['name'] == 'unet'
  assert other['data'] == report['data']
  # The U-Net has no training log: said, not failed.
  assert any('no training log' in n for n in other['notes'])
  assert 'no training log' in out


def _fails(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  assert 'eval.py: error:' in proc.stderr
  assert 'Traceback' not in proc.stderr
  for needle in needles:
    assert needle in proc.stderr, (needle, proc.stderr)


# Each case is one process: a few seconds each, most of it imports. More
# variants of each (missing workdir, 'best' without metrics, bad selectors)
# run in-process in test_report.py.


@pytest.mark.slow
def test_workdir_without_checkpoints(workdirs, tmp_path):
  checkpointing.save_config(tmp_path, tiny_config('/nowhere'))
  _fails(run_cli(workdirs['env'], '--workdir', tmp_path),
         'no checkpoints', 'config.json')


@pytest.mark.slow
def test_unknown_checkpoint(workdirs):
  _fails(run_cli(workdirs['env'], '--workdir', workdirs['lintunet'],
                 '--checkpoint', '12'),
         'no checkpoint for step 12', 'available steps: [0]')


@pytest.mark.slow
def test_checkpoint_of_a_different_model(workdirs):
  proc = run_cli(workdirs['env'], '--workdir', workdirs['lintunet'],
                 '--config', ROOT / 'configs' / 'unet.py:quick')
  _fails(proc, 'does not match the configured model', 'attention')


@pytest.mark.slow
def test_split_that_does_not_exist(workdirs):
  proc = run_cli(workdirs['env'], '--workdir', workdirs['unet'], '--split', 'tset',
                 '--nothroughput')
  _fails(proc, "split 'tset'", "['train', 'validation', 'test']")


@pytest.mark.slow
def test_config_that_cannot_be_restored(workdirs, tmp_path):
  broken = tmp_path / 'broken'
  shutil.copytree(workdirs['unet'], broken)
  (broken / 'config.json').write_text('{"model": {"name": "unet", ')
  for path in (broken / 'checkpoints' / '0' / 'config').iterdir():
    path.write_text('not json')
  _fails(run_cli(workdirs['env'], '--workdir', broken),
         'cannot be read', str(broken))


@pytest.mark.slow
def test_kernel_override_on_top_of_the_saved_config(workdirs, tmp_path):
  """A checkpoint trained with the Pallas kernel (saved config says so) is
  evaluated off GPU with --config.model.attention.kernel=xla; without it,
  a clear error names that override (never a silent interpreter run)."""
  pallas = as_trained_with_pallas(workdirs['lintunet'], tmp_path / 'pallas')
  _fails(run_cli(workdirs['env'], '--workdir', pallas, '--nothroughput',
                 '--num_overlays', '0'),
         "kernel='pallas' needs a GPU", '--config.model.attention.kernel=xla')
  report_path = tmp_path / 'report.json'
  proc = run_cli(workdirs['env'], '--workdir', pallas, '--nothroughput',
                 '--num_overlays', '0', '--report', report_path,
                 '--config.model.attention.kernel=xla')
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(report_path.read_text())
  assert report['config']['model']['attention']['kernel'] == 'xla'
  assert "model.attention.kernel='xla'" in report['config_source']
  assert report['config']['model']['width'] == 4  # the rest is the saved config
  assert report['resolution'] == 'native'
  assert 'Counted at' in proc.stdout and 'native size' in proc.stdout


def test_channels_that_do_not_match_the_model(workdirs):
  _fails(run_cli(workdirs['env'], '--workdir', workdirs['unet'], '--nothroughput',
                 '--config.dataset.channels=3'),
         'config.dataset.channels=3 but config.model.in_channels=1')


@pytest.mark.slow
def test_sliding_window_ensemble_with_tta(workdirs):
  """Two --workdir (the same one: its own mean), the window and flips TTA:
  the report says so, under a name no single-model report has."""
  workdir = workdirs['lintunet']
  proc = run_cli(workdirs['env'], '--workdir', workdir, '--workdir', workdir,
                 '--sliding_window', '--overlap', '0', '--tta', 'flips',
                 '--nothroughput', '--num_overlays', '1', '--noprogress')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'window 32px overlap 0, tta flips, 2 models' in proc.stdout
  report = json.loads((workdir / 'eval' / 'test-ensemble2-0.json').read_text())
  inference = report['inference']
  assert inference['window'] and inference['tile_size'] == 32
  assert inference['overlap'] == 0.0 and inference['tta'] == 'flips'
  assert [m['workdir'] for m in inference['members']] == [str(workdir)] * 2
  assert report['metrics']['loss'] is None and report['data']['num_images'] == 64
  assert (workdir / 'eval' / 'test-ensemble2-0' / 'overlay-test-00000.png').exists()
