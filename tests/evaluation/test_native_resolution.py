"""eval's metrics at each image's own size, against counts made independently.

A tiny `segmentation_folder` dataset of odd-sized, non-square images (some
smaller than the model's 32x32 canvas, some larger) is evaluated in both
geometry modes. The expected counts never use our resize-back helper: the
model's class ids at 32x32 are cropped to where the image landed (found
from the preprocessed input of an all-white image) and resized to the
image's size by nearest neighbour written out in integer arithmetic, then
compared with the masks as written to disk by scikit-learn's confusion
matrix. With
`resolution='model'` the canvas that `resize='pad'` adds must not count.
"""

import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from lintunet_jax import metrics as metrics_lib
from lintunet_jax import models
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.evaluation import case_metrics
from lintunet_jax.evaluation import prediction
from lintunet_jax.evaluation import report as evaluation
from lintunet_jax.training import checkpointing
from tests.evaluation import eval_testutil

SIZE = 32
TEST_SIZES = [(21, 27), (37, 23), (45, 61), (50, 29), (17, 40), (33, 33)]  # (H, W)


def _example(rng, height, width):
  yy, xx = np.mgrid[:height, :width]
  cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
  ry, rx = rng.uniform(0.15, 0.35) * height, rng.uniform(0.15, 0.35) * width
  mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1).astype(np.uint8)
  image = rng.integers(0, 120, (height, width)).astype(np.uint8)
  image[mask > 0] += 100
  return image, mask


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('odd_sizes')
  rng = np.random.default_rng()
  pairs = {}
  for split, sizes in (('train', [(19, 25), (40, 31)]), ('test', TEST_SIZES)):
    for kind in ('images', 'masks'):
      (root / split / kind).mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
      image, mask = _example(rng, h, w)
      Image.fromarray(image).save(root / split / 'images' / f'{i}.png')
      Image.fromarray(mask * 255).save(root / split / 'masks' / f'{i}.png')
      if split == 'test':
        pairs[i] = (image, mask)
  return root, pairs, tmp_path_factory.mktemp('tfds')


def _config(dataset, resize):
  root, _, data_dir = dataset
  config = eval_testutil.tiny_config(data_dir)
  config.dataset.name = 'segmentation_folder'
  config.dataset.manual_dir = str(root)
  config.dataset.data_dir = str(data_dir / resize)
  config.dataset.image_size = SIZE
  config.dataset.resize = resize
  config.eval_batch_size = 4  # 6 images: the last batch is padded
  return config


def _placement(image, config):
  """(top, left, height, width) of the image on the model's canvas, read
  from the preprocessed input of an all-white image of the same size."""
  white = np.full(image.shape, 255, np.uint8)
  inside = input_pipeline.preprocess_image(white, config)[..., 0] > 0
  rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
  return rows[0], cols[0], rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]


def _nearest(array, height, width):
  """Nearest neighbour on pixel centres, in exact integer arithmetic:
  output pixel i reads input floor((i + 1/2) * n_in / n_out).

  (PIL's Image.NEAREST follows the same rule but computes it in floating
  point, so on an exact tie, e.g. 32 -> 33 pixels at i = 16, it reads the
  pixel before; the rule itself has no such ambiguity.)
  """
  in_h, in_w = array.shape
  rows = (2 * np.arange(height) + 1) * in_h // (2 * height)
  cols = (2 * np.arange(width) + 1) * in_w // (2 * width)
  return array[rows[:, None], cols[None, :]]


def _metrics(pairs):
  """sklearn's counts over (truth, prediction) pairs of any sizes."""
  tn = fp = fn = tp = 0
  per_image = []
  for truth, pred in pairs:
    c = skm.confusion_matrix(truth.ravel(), pred.ravel(), labels=[0, 1])
    tn, fp, fn, tp = tn + c[0, 0], fp + c[0, 1], fn + c[1, 0], tp + c[1, 1]
    if c[1, 1] + c[0, 1] + c[1, 0]:
      per_image.append(c[1, 1] / (c[1, 1] + c[0, 1] + c[1, 0]))
  return {'iou': tp / (tp + fp + fn), 'dice': 2 * tp / (2 * tp + fp + fn),
          'precision': tp / (tp + fp), 'recall': tp / (tp + fn),
          'accuracy': (tp + tn) / (tp + tn + fp + fn),
          'iou_per_image': float(np.mean(per_image)),
          'empty_images': len(pairs) - len(per_image),
          'pixels': int(tn + fp + fn + tp)}


@pytest.fixture(scope='module', params=['resize', 'pad'])
def run(request, dataset, tmp_path_factory):
  resize = request.param
  config = _config(dataset, resize)
  pairs = dataset[1]
  images = np.stack([input_pipeline.preprocess_image(pairs[i][0], config)
                     for i in sorted(pairs)])
  model = models.create_model(config.model, seed=0)
  model.eval()
  logits = np.asarray(prediction.make_forward(model)(images))
  # Shift the last bias so that about 40 % of the canvas is foreground.
  model.final_conv.bias[...] = model.final_conv.bias[...] - np.quantile(logits, 0.6)
  classes = np.asarray(metrics_lib.predict_classes(
      prediction.make_forward(model)(images), config.threshold))
  workdir = tmp_path_factory.mktemp(f'workdir_{resize}')
  checkpointing.write_weights_checkpoint(workdir, config, model, step=0)
  return dict(config=config, workdir=str(workdir), classes=classes,
              pairs=[pairs[i] for i in sorted(pairs)], resize=resize)


def _check(report, expected):
  m = report['metrics']
  for key in ('iou', 'dice', 'precision', 'recall', 'accuracy', 'iou_per_image'):
    assert m[key] == pytest.approx(expected[key], abs=1e-6), key
  assert m['empty_images'] == expected['empty_images']
  assert m['num_images'] == len(TEST_SIZES)
  assert 0 < m['precision'] < 1 and 0 < m['recall'] < 1  # not degenerate


@pytest.mark.slow
def test_native_resolution_counts_each_image_at_its_own_size(run):
  expected_pairs = []
  for (image, mask), canvas in zip(run['pairs'], run['classes']):
    top, left, h, w = _placement(image, run['config'])
    crop = canvas[top:top + h, left:left + w]
    expected_pairs.append((mask, _nearest(crop, *mask.shape)))
  expected = _metrics(expected_pairs)
  assert expected['pixels'] == sum(h * w for h, w in TEST_SIZES)
  report = eval_testutil.run_eval(run['workdir'], split='test', num_overlays=0,
                          measure_throughput=False)  # native: the default
  assert report['resolution'] == 'native'
  assert 'own size' in report['conventions']
  _check(report, expected)
  assert dict(evaluation.table_rows(report))['Counted at'] == 'native size'
  _check_cases(report, run, [pred for _, pred in expected_pairs])


def _split_order(config):
  """File number of the split's i-th example: the split stores examples in
  its own order, and every test size differs."""
  stored = input_pipeline.prepare_dataset(config).as_data_source('test')
  file_of = [TEST_SIZES.index(stored[i]['mask'].shape[:2])
             for i in range(len(TEST_SIZES))]
  assert sorted(file_of) == list(range(len(TEST_SIZES)))
  return file_of


def _check_cases(report, run, predictions):
  """The per-case file next to the report: one case per image, keyed by its
  split index, with the metrics of the independently resized prediction."""
  cases = report['per_case']
  assert cases['path'] == report['report_path'][:-len('.json')] + '.cases.json'
  with open(cases['path']) as f:
    summary = json.load(f, parse_constant=lambda c: pytest.fail(c))
  assert summary['num_cases'] == cases['num_cases'] == len(TEST_SIZES)
  assert summary['tolerance'] == cases['tolerance'] == case_metrics.DEFAULT_TOLERANCE
  assert summary['foreground_mean'] == cases['foreground_mean']
  entries = summary['metric_per_case']
  assert [e['index'] for e in entries] == list(range(len(TEST_SIZES)))
  for entry, f in zip(entries, _split_order(run['config'])):
    assert entry['case'] == f'{f}.png'  # named by the stored file name
    mask, pred = run['pairs'][f][1], predictions[f]
    expected = case_metrics.case_metrics(pred, mask, num_classes=1, tolerance=2.0)['1']
    got = entry['metrics']['1']
    assert got['TP'] + got['FP'] + got['FN'] + got['TN'] == mask.size
    for key, value in expected.items():
      assert (got[key] is None if math.isnan(value) else
              got[key] == pytest.approx(value, rel=1e-9)), (f, key)
  dice = [e['metrics']['1']['Dice'] for e in entries]
  assert cases['foreground_mean']['Dice'] == pytest.approx(
      np.mean([d for d in dice if d is not None]), rel=1e-9)
  assert 0 < cases['foreground_mean']['NSD'] < 1  # not degenerate
  rows = dict(evaluation.table_rows(report))
  assert rows['NSD @ 2 px (case mean)'] == f"{cases['foreground_mean']['NSD']:.4f}"


def test_model_resolution_never_counts_the_padding(run):
  expected_pairs = []
  for (image, mask), canvas in zip(run['pairs'], run['classes']):
    top, left, h, w = _placement(image, run['config'])
    truth = _nearest(mask, h, w)  # the mask as the model's canvas holds it
    expected_pairs.append((truth, canvas[top:top + h, left:left + w]))
  expected = _metrics(expected_pairs)
  if run['resize'] == 'pad':  # the images do not fill the canvas
    assert expected['pixels'] < len(TEST_SIZES) * SIZE * SIZE
  report = eval_testutil.run_eval(run['workdir'], split='test', num_overlays=0,
                          measure_throughput=False, resolution='model')
  assert report['resolution'] == 'model'
  assert report['per_case'] is None  # per-case metrics are native only
  _check(report, expected)
  assert dict(evaluation.table_rows(report))['Counted at'] == f'model {SIZE}x{SIZE}'


def test_native_per_image_counts_are_each_images_own(run):
  """Per-image counts (for paired comparisons), keyed by the split index,
  against sklearn's confusion matrix of each image at its own size."""
  expected = {}
  for i, ((image, mask), canvas) in enumerate(zip(run['pairs'], run['classes'])):
    top, left, h, w = _placement(image, run['config'])
    pred = _nearest(canvas[top:top + h, left:left + w], *mask.shape)
    c = skm.confusion_matrix(mask.ravel(), pred.ravel(), labels=[0, 1])
    expected[i] = {'tn': c[0, 0], 'fp': c[0, 1], 'fn': c[1, 0], 'tp': c[1, 1]}
  file_of = _split_order(run['config'])
  _, model, _, _ = evaluation.restore(run['workdir'], 'latest')
  output = evaluation.evaluate(model, run['config'], 'test')  # batches of 4: padded
  per_image = output.per_image
  np.testing.assert_array_equal(per_image['index'], np.arange(len(TEST_SIZES)))
  for key in ('tp', 'fp', 'fn', 'tn'):
    assert per_image[key].shape == (len(TEST_SIZES), 1)
    np.testing.assert_array_equal(
        per_image[key][:, 0], [expected[f][key] for f in file_of], err_msg=key)
  assert evaluation.evaluate(model, run['config'], 'test',
                             resolution='model').per_image is None
