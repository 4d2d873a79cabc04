"""Evaluation through make_predict_fn (window, TTA, ensembles) at native size.

The synthetic split's images are 64x64 and the model's tile is 32: at
overlap 0 the window is exactly four disjoint tiles, so the expected
prediction is the model run on each quarter on its own (no Gaussian, no
make_predict_fn), thresholded in numpy; the counts are scikit-learn's
confusion matrices against the masks read straight from the stored TFDS
split. A misplaced tile, a wrong normalisation, a lost or
double-counted image or a wrong threshold changes them.
"""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from lintunet_jax import models
from lintunet_jax.data.datasets import preparation
from lintunet_jax.evaluation import prediction
from lintunet_jax.evaluation import report as evaluation
from lintunet_jax.evaluation import sliding_window as sw
from lintunet_jax.evaluation import whole_image_eval
from lintunet_jax.training import checkpointing
from tests.evaluation import eval_testutil


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  config = eval_testutil.tiny_config(base / 'tfds')
  model = models.create_model(config.model, seed=3)
  model.eval()
  # Shift and scale the last layer so that about half of the pixels are
  # foreground with logits of unit spread (a random model's are all close
  # to one value, and a threshold on them is a coin toss in rounding).
  probe = np.random.default_rng(0).uniform(size=(4, 32, 32, 1)).astype(np.float32)
  logits = np.asarray(prediction.make_forward(model)(probe))
  scale = 1.0 / np.std(logits)
  model.final_conv.kernel[...] = model.final_conv.kernel[...] * scale
  model.final_conv.bias[...] = (model.final_conv.bias[...] - np.median(logits)) * scale
  workdir = tmp_path_factory.mktemp('whole_image_eval') / 'workdir'
  checkpointing.write_weights_checkpoint(workdir, config, model, step=7)
  return dict(config=config, model=model, workdir=str(workdir))


def _stored(config, split='test'):
  """(image uint8 [H, W, 1], mask [H, W]) pairs as TFDS stores them."""
  source = preparation.make_builder(config.dataset, 1).as_data_source(split)
  return [(np.asarray(source[i]['image']), np.asarray(source[i]['mask']))
          for i in range(len(source))]


def _quarter_logits(model, images):
  """The model on each disjoint 32x32 tile of 64x64 images, stitched:
  float32 [N, 64, 64] logits (one jitted call on all the tiles)."""
  x = np.stack(images).astype(np.float32) / 255.0  # normalization 'unit'
  n = len(x)
  tiles = x.reshape(n, 2, 32, 2, 32, 1).transpose(0, 1, 3, 2, 4, 5)
  logits = np.asarray(prediction.make_forward(model)(tiles.reshape(-1, 32, 32, 1)))
  return logits.reshape(n, 2, 2, 32, 32).transpose(0, 1, 3, 2, 4).reshape(n, 64, 64)


def test_window_at_overlap_0_counts_the_stitched_tiles(setup):
  config, model = setup['config'], setup['model']
  settings = sw.inference_settings(config, sliding_window=True, overlap=0.0,
                                   tile_batch_size=3)
  seen = {}
  output = whole_image_eval.evaluate(
      sw.make_predict_fn([model], settings), config, 'test', settings,
      num_samples=2, on_image=lambda i, p, t: seen.setdefault(i, (p, t)))
  stored = _stored(config)
  assert stored[0][0].shape[:2] == (64, 64)  # 4 tiles of 32
  assert sorted(seen) == list(range(len(stored)))
  rows = output.per_image
  np.testing.assert_array_equal(rows['index'], np.arange(len(stored)))
  reference = _quarter_logits(model, [image for image, _ in stored])
  totals = np.zeros(4, np.int64)
  for i, (_, mask) in enumerate(stored):
    predicted, truth = seen[i]
    np.testing.assert_array_equal(truth, mask)
    # sigmoid(l) > 0.5 iff l > 0; a logit within 1e-4 of 0 may round
    # either way between a batch of tiles and this call.
    clear = np.abs(reference[i]) > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(predicted[clear], (reference[i] > 0)[clear])
    tn, fp, fn, tp = skm.confusion_matrix(mask.ravel(), predicted.ravel(),
                                          labels=[0, 1]).ravel()
    assert [rows[k][i, 0] for k in ('tp', 'fp', 'fn', 'tn')] == [tp, fp, fn, tn], i
    totals += [tp, fp, fn, tn]
  tp, fp, fn, tn = totals
  assert 0 < tp and 0 < fp and 0 < fn  # not a degenerate prediction
  m = output.metrics
  assert m['num_images'] == len(stored)
  assert m['dice'] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-9)
  assert m['accuracy'] == pytest.approx((tp + tn) / totals.sum(), rel=1e-9)
  assert output.loss is None and whole_image_eval.NO_LOSS_NOTE in output.notes
  # Overlays: the first two images of the split at their own size.
  assert list(output.samples['index']) == [0, 1]
  assert output.samples['prediction'][0].shape == (64, 64)


def test_ensemble_report_states_tta_and_equals_its_single_member(setup):
  # The same workdir twice is its own mean: identical metrics and per-image
  # counts; the report and its table say TTA and the two members.
  kwargs = dict(measure_throughput=False, num_overlays=0, tta='flips')
  single = eval_testutil.run_eval(setup['workdir'], **kwargs)
  pair = eval_testutil.run_eval([setup['workdir'], setup['workdir']], **kwargs)
  for key in ('dice', 'iou', 'accuracy', 'iou_per_image'):
    assert pair['metrics'][key] == single['metrics'][key], key
  # Per-case metrics in this mode too, next to the report, one per image.
  assert pair['per_case']['path'].endswith('/eval/test-ensemble2-7.cases.json')
  with open(pair['per_case']['path']) as f:
    cases = json.load(f)
  assert cases['num_cases'] == pair['metrics']['num_images'] == 64
  assert cases['foreground_mean'] == single['per_case']['foreground_mean']
  dice = [c['metrics']['1']['Dice'] for c in cases['metric_per_case']]
  assert cases['mean']['1']['Dice'] == pytest.approx(
      np.mean([d for d in dice if d is not None]), rel=1e-9)
  assert pair['report_path'].endswith('/eval/test-ensemble2-7.json')
  assert single['report_path'].endswith('/eval/test-7.json')
  inference = pair['inference']
  assert inference['tta'] == 'flips' and not inference['window']
  assert [m['step'] for m in inference['members']] == [7, 7]
  assert pair['metrics']['loss'] is None
  table = evaluation.format_table([pair])
  assert 'whole image at 32px, tta flips, 2 models' in table
  assert 'Loss' in table and 'n/a' in table
  with pytest.raises(evaluation.EvaluationError, match='native size only'):
    eval_testutil.run_eval(setup['workdir'], resolution='model',
                         sliding_window=True, measure_throughput=False)


def test_process_shares_add_up_to_the_whole_split(setup):
  # Two processes' strided shares (run here one after the other): together
  # every image once, each counted as in the one-process run.
  config, model = setup['config'], setup['model']
  settings = sw.inference_settings(config, tta='flips')
  predict_fn = sw.make_predict_fn([model], settings)
  whole = whole_image_eval.evaluate(predict_fn, config, 'test', settings)
  shares = [whole_image_eval.evaluate(predict_fn, config, 'test', settings,
                                      process_index=p, process_count=2)
            for p in range(2)]
  assert [s.per_image['index'].tolist() for s in shares] == [
      list(range(0, 64, 2)), list(range(1, 64, 2))]
  for key in ('tp', 'fp', 'fn', 'tn'):
    merged = np.zeros_like(whole.per_image[key])
    for p, share in enumerate(shares):
      merged[p::2] = share.per_image[key]
    np.testing.assert_array_equal(merged, whole.per_image[key])
  assert sum(s.metrics['num_images'] for s in shares) == 64
