"""`lintunet_jax.evaluation.report` end to end on a tiny workdir (in-process).

The workdir holds three checkpoints written with the real checkpointing
module: step 0 (weights only), step 7 (validation IoU 0.9: the best) and
step 9 (IoU 0.1: the latest), each with a different final-layer bias
(predicting foreground on 50 %, 30 % and 70 % of the pixels) so that which
one was restored shows in the metrics. The data set is the
embedded synthetic MRI one (64 test images), at 32x32, evaluated in batches
of 24 so the last batch is padded.

Metrics are checked against scikit-learn on predictions computed
separately (one batch, no padding), so the eval loop, the padding and the
accumulation are all tested.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx
from sklearn import metrics as skm

from lintunet_jax.training import checkpointing
from lintunet_jax.evaluation import report as evaluation
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.training import metric_logs as logging_utils
from lintunet_jax import models
from lintunet_jax.evaluation import prediction
from lintunet_jax.training import state as train_state
from tests.evaluation import eval_testutil

FOREGROUND = {0: 0.5, 7: 0.3, 9: 0.7}  # predicted foreground fraction per step


def tiny_config(data_dir, name='lintunet'):
  config = eval_testutil.tiny_config(data_dir, name)
  config.loss = 'bce'  # the expected loss below is binary cross-entropy
  config.batch_size = 8
  return config


def load_test_split(config):
  """All test images and masks, in split order (one padded batch)."""
  batch = next(input_pipeline.create_eval_iterator(config, 'test', batch_size=64))
  assert batch['valid'].all()
  return batch['image'], batch['mask']


def with_foreground(model, logits, fraction):
  """A copy of `model` predicting foreground on `fraction` of the pixels.

  Only the final bias changes, so its logits are `logits` + the returned
  shift: no second forward pass (and compilation) is needed.
  """
  shift = -float(np.quantile(logits, 1.0 - fraction))
  copy = nnx.clone(model)
  copy.final_conv.bias[...] = model.final_conv.bias[...] + shift
  return copy, shift


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  data_dir = tmp_path_factory.getbasetemp() / 'tfds'
  workdir = tmp_path_factory.mktemp('workdir') / 'lintunet'
  config = tiny_config(data_dir)
  images, masks = load_test_split(config)
  model = models.create_model(config.model, seed=0)
  model.eval()
  logits = np.asarray(prediction.make_forward(model)(images))[..., 0]
  models_by_step, logits_by_step = {}, {}
  for step, fraction in FOREGROUND.items():
    models_by_step[step], shift = with_foreground(model, logits, fraction)
    logits_by_step[step] = logits + shift
  checkpointing.write_weights_checkpoint(workdir, config, models_by_step[0], step=0)
  manager = checkpointing.create_manager(workdir, async_save=False)
  for step, iou in ((7, 0.9), (9, 0.1)):
    checkpointing.save_checkpoint(
        manager, step, train=None, config=config, metrics={'iou': iou},
        variables=jax.device_get(train_state.model_variables(models_by_step[step])))
  manager.wait_until_finished()
  manager.close()
  writer = logging_utils.MetricWriter(str(workdir))
  for step in range(1, 10):
    writer.write('train', step, {'loss': 1.0 / step})
    if step % 3 == 0:
      writer.write('eval', step, {'split': 'validation', 'loss': 1.2 / step,
                                  'iou': 0.1 * step})
  writer.close()
  return dict(workdir=str(workdir), config=config, images=images, masks=masks,
              models=models_by_step, logits=logits_by_step, data_dir=data_dir)


def expected_metrics(logits, masks, threshold=0.5):
  pred = (1 / (1 + np.exp(-logits.astype(np.float64))) > threshold).astype(int)
  t, p = masks.ravel(), pred.ravel()
  per_image = [skm.jaccard_score(masks[i].ravel(), pred[i].ravel(), zero_division=0)
               for i in range(len(masks)) if masks[i].any() or pred[i].any()]
  bce = np.mean(np.logaddexp(0, logits) - masks * logits)
  return {
      'iou': skm.jaccard_score(t, p, zero_division=0),
      'dice': skm.f1_score(t, p, zero_division=0),
      'precision': skm.precision_score(t, p, zero_division=0),
      'recall': skm.recall_score(t, p, zero_division=0),
      'accuracy': skm.accuracy_score(t, p),
      'iou_per_image': float(np.mean(per_image)),
      'empty_images': len(masks) - len(per_image),
      'loss': bce,
  }


@pytest.fixture(scope='module')
def report(setup):
  # At model resolution (the counts training validation makes), which the
  # expected metrics below compute; native resolution has its own test file.
  return eval_testutil.run_eval(setup['workdir'], num_overlays=3,
                        throughput_batch_sizes=(1, 2), throughput_runs=2,
                        throughput_warmup=1, resolution='model')


@pytest.mark.slow
def test_report_metrics_match_sklearn(setup, report):
  # Default checkpoint: 'best' (highest validation IoU) = step 7.
  assert report['checkpoint'] == {'requested': 'best', 'step': 7}
  expected = expected_metrics(setup['logits'][7], setup['masks'])
  m = report['metrics']
  for key in ('iou', 'dice', 'precision', 'recall', 'accuracy', 'iou_per_image'):
    assert m[key] == pytest.approx(expected[key], abs=1e-6), key
  assert m['precision'] > 0 and 0.05 < m['recall'] < 0.95  # not degenerate
  assert m['accuracy'] == pytest.approx(0.7, abs=0.05)  # ~30 % predicted foreground
  assert m['f1'] == m['dice']
  assert m['empty_images'] == expected['empty_images']
  assert m['loss'] == pytest.approx(expected['loss'], rel=1e-4)
  assert m['num_images'] == report['data']['num_images'] == 64


def test_report_schema_and_files(setup, report):
  path = os.path.join(setup['workdir'], 'eval', 'test-7.json')
  assert report['report_path'] == os.path.abspath(path)
  with open(path) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(report))
  for key in ('schema_version', 'created', 'workdir', 'checkpoint', 'config_source',
              'model', 'data', 'threshold', 'resolution', 'conventions', 'metrics',
              'eval_seconds', 'throughput', 'train_throughput', 'artifacts',
              'notes', 'config', 'report_path'):
    assert key in report, key
  assert report['data'] == {'dataset': 'synthetic_mri/small', 'split': 'test',
                            'num_images': 64, 'image_size': 32, 'resize': 'resize',
                            'channels': 1, 'batch_size': 24}
  assert report['resolution'] == 'model'
  assert report['conventions'].startswith(evaluation.RESOLUTIONS['model'])
  assert report['model']['name'] == 'lintunet'
  assert report['model']['num_parameters'] == models.count_parameters(setup['models'][7])
  assert 'both empty' in report['conventions'] or 'empty' in report['conventions']
  assert report['threshold'] == 0.5
  t = report['throughput']
  assert [b['batch_size'] for b in t['batches']] == [1, 2]
  assert t['device_count'] >= 1 and t['device_kind'] and t['dtype'] == 'float32'
  assert t['input_shape'] == [32, 32, 1]
  for b in t['batches']:
    assert b['flops_per_image'] > 0 and b['achieved_flops_per_s'] > 0
    assert b['latency_s']['count'] == 2
  art = report['artifacts']
  assert len(art['overlays']) == 3
  assert [os.path.basename(p) for p in art['overlays']] == [
      'overlay-test-00000.png', 'overlay-test-00001.png', 'overlay-test-00002.png']
  assert all(os.path.exists(p) for p in art['overlays'])
  assert os.path.exists(art['training_curves'])
  assert os.path.dirname(art['overlays'][0]) == art['folder'] == os.path.abspath(
      os.path.join(setup['workdir'], 'eval', 'test-7'))
  assert report['notes'] == []


def test_checkpoint_selection(setup):
  workdir = setup['workdir']
  for selector, step in (('latest', 9), ('0', 0), (7, 7)):
    _, model, got, used = evaluation.restore(workdir, selector)
    assert got == step
    np.testing.assert_allclose(np.asarray(model.final_conv.bias[...]),
                               np.asarray(setup["models"][step].final_conv.bias[...]))
  with pytest.raises(checkpointing.CheckpointError, match=r'step 5.*\[0, 7, 9\]'):
    evaluation.restore(workdir, '5')
  with pytest.raises(evaluation.EvaluationError, match="'best', 'latest' or a step"):
    evaluation.restore(workdir, 'newest')


def test_split_that_does_not_exist(setup):
  with pytest.raises(evaluation.EvaluationError,
                     match=r"split 'tset'.*\['train', 'validation', 'test'\]"):
    eval_testutil.run_eval(setup['workdir'], split='tset', measure_throughput=False)


def test_workdir_without_checkpoints(setup, tmp_path):
  with pytest.raises(evaluation.EvaluationError, match='does not exist'):
    eval_testutil.run_eval(str(tmp_path / 'nowhere'))
  checkpointing.save_config(tmp_path, setup['config'])
  with pytest.raises(FileNotFoundError, match=r'no checkpoints.*config\.json'):
    eval_testutil.run_eval(str(tmp_path))
  # Weights only, no validation metrics: the default falls back to 'latest',
  # an explicit 'best' says why it cannot.
  checkpointing.write_weights_checkpoint(tmp_path, setup['config'],
                                         setup['models'][0], step=3)
  assert evaluation.restore(str(tmp_path), None)[2:] == (3, 'latest')
  with pytest.raises(checkpointing.CheckpointError, match=r'no best one.*\[3\]'):
    evaluation.restore(str(tmp_path), 'best')


def test_config_without_a_model(setup, tmp_path):
  checkpointing.write_weights_checkpoint(tmp_path, setup['config'],
                                         setup['models'][0], step=0)
  for path in (tmp_path / 'checkpoints' / '0' / 'config').iterdir():
    path.write_text('not json')
  (tmp_path / 'config.json').write_text('{"dataset": {"name": "x"}}')
  with pytest.raises(evaluation.EvaluationError,
                     match="cannot build a model from the config.*'model'"):
    evaluation.restore(str(tmp_path), None)


def test_checkpoint_of_a_different_model(setup):
  other = tiny_config(setup['data_dir'])
  other.model.width = 8
  with pytest.raises(checkpointing.CheckpointError, match='does not match'):
    eval_testutil.run_eval(setup['workdir'], config=other, measure_throughput=False)
  unet = tiny_config(setup['data_dir'], name='unet')
  with pytest.raises(checkpointing.CheckpointError,
                     match='in the checkpoint but not the model'):
    eval_testutil.run_eval(setup['workdir'], config=unet, measure_throughput=False)


def _report(name, iou, images_per_s=100.0, multiclass=False):
  metrics = {'iou': iou, 'iou_per_image': iou, 'dice': 0.8, 'precision': 0.7,
             'recall': 0.6, 'accuracy': 0.99, 'num_images': 64, 'loss': 0.2}
  if multiclass:
    metrics.update(iou_per_class=[0.9, iou], mean_iou=(0.9 + iou) / 2)
  batch = {'batch_size': 8, 'latency_s': {'median': 8 / images_per_s,
                                          'p10': 0.07, 'p90': 0.09},
           'images_per_s': {'median': images_per_s}, 'flops_per_image': 2e9,
           'achieved_flops_per_s': 2e11, 'fraction_of_peak': 0.25}
  return {
      'model': {'name': name, 'num_parameters': 1234567},
      'workdir': f'/runs/{name}', 'checkpoint': {'requested': 'best', 'step': 100},
      'data': {'dataset': 'ds', 'split': 'test', 'image_size': 32, 'num_images': 64},
      'threshold': 0.5, 'metrics': metrics,
      'throughput': {'device_kind': 'TPU v4', 'device_count': 4,
                     'platform': 'tpu', 'input_shape': [32, 32, 1],
                     'dtype': 'float32', 'batches': [batch]},
  }


def test_comparison_table():
  table = evaluation.format_table([_report('unet', 0.6111, 250.0),
                                   _report('lintunet', 0.6522, 200.0)])
  lines = table.splitlines()
  assert 'timed on TPU v4 x4' in lines[0]
  assert lines[1].split() == ['Metric', 'unet', 'lintunet']
  cells = [re.split(r'\s{2,}', l.strip()) for l in lines[3:]]
  rows = {c[0]: c[1:] for c in cells}
  assert rows['IoU (dataset)'] == ['0.6111', '0.6522']
  assert rows['F1 (Dice)'] == ['0.8000', '0.8000']
  assert rows['Images/s (batch 8)'] == ['250.0', '200.0']
  assert rows['Parameters'] == ['1,234,567', '1,234,567']
  assert rows['% of device peak'] == ['25.0', '25.0']
  for label in ('Precision', 'Recall', 'Accuracy', 'GFLOPs/image'):
    assert label in rows
  # Same model name twice: the workdirs tell them apart; different data warns.
  a, b = _report('lintunet', 0.5), _report('lintunet', 0.6)
  b['workdir'] = '/runs/lintunet_v2'
  b['data']['num_images'] = 60
  table = evaluation.format_table([a, b])
  assert 'lintunet (lintunet)' in table and 'lintunet (lintunet_v2)' in table
  assert 'WARNING: the reports evaluate different data' in table
  # Counted at different resolutions: not comparable either, and the table says so.
  a, b = _report('unet', 0.5), _report('lintunet', 0.6)
  a['resolution'], b['resolution'] = 'native', 'model'
  table = evaluation.format_table([a, b])
  assert 'WARNING: the reports evaluate different data' in table
  rows = {c[0]: c[1:] for c in (re.split(r'\s{2,}', l.strip())
                                for l in table.splitlines()[4:])}
  assert rows['Counted at'] == ['native size', 'model 32x32']


def test_multiclass_rows():
  rows = dict(evaluation.table_rows(_report('lintunet', 0.5, multiclass=True)))
  assert rows['Mean IoU (all classes)'] == '0.7000'
  assert rows['  IoU class 1'] == '0.5000'
