"""Overlay and training-curve PNGs from `lintunet_jax.evaluation.visualize`."""


import numpy as np
import pytest
from PIL import Image

from lintunet_jax.training import metric_logs as logging_utils
from lintunet_jax.evaluation import visualize


def _png_size(path):
  with Image.open(path) as image:
    assert image.format == 'PNG'
    return image.size


def test_error_map_colours():
  label = np.array([[1, 1], [0, 0]])
  pred = np.array([[1, 0], [1, 0]])
  err = visualize.error_map(label, pred)
  np.testing.assert_allclose(err[0, 0], visualize._TP)
  np.testing.assert_allclose(err[0, 1], visualize._FN)
  np.testing.assert_allclose(err[1, 0], visualize._FP)
  np.testing.assert_allclose(err[1, 1], 0.0)
  multi = visualize.error_map(np.array([[2, 1]]), np.array([[2, 0]]), num_classes=3)
  np.testing.assert_allclose(multi[0, 0], visualize._TP)
  np.testing.assert_allclose(multi[0, 1], visualize._FP)


def test_blend_leaves_background_untouched():
  rgb = np.random.default_rng(0).random((4, 4, 3))
  mask = np.zeros((4, 4), np.int32)
  mask[0, 0] = 1
  out = visualize.blend_mask(rgb, mask)
  np.testing.assert_array_equal(out[1:], rgb[1:])
  assert not np.allclose(out[0, 0], rgb[0, 0])


def test_image_iou():
  assert visualize.image_iou(np.zeros((3, 3)), np.zeros((3, 3))) is None
  a = np.zeros((4, 4))
  a[:2] = 1
  b = np.zeros((4, 4))
  b[:1] = 1
  assert visualize.image_iou(a, b) == pytest.approx(0.5)


@pytest.mark.parametrize('channels', [1, 3])
def test_save_overlays(tmp_path, channels):
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 32, 32, channels)).astype(np.float32)
  labels = (rng.random((2, 32, 32)) > 0.7).astype(np.int32)
  preds = (rng.random((2, 32, 32)) > 0.6).astype(np.int32)
  paths = visualize.save_overlays(tmp_path / 'ov', images, labels, preds,
                                  names=['0003', '0007'])
  assert [p.rsplit('/', 1)[1] for p in paths] == ['overlay-0003.png', 'overlay-0007.png']
  width, height = _png_size(paths[0])
  assert width > 3 * height  # four panels side by side
  # Without ground truth (new images): image and prediction only.
  path = visualize.save_overlay(tmp_path / 'p.png', images[0], None, preds[0])
  width2, _ = _png_size(path)
  assert width2 < width


@pytest.mark.parametrize('eval_split', ['validation', 'test', 'train[90%:]'])
def test_training_series_reads_the_training_log_format(eval_split):
  """The records `logging_utils.MetricWriter` writes (docs/training.md):
  `type` tells train from eval, whatever config.dataset.eval_split is
  called; 'compile' and 'resume' records hold no curve."""
  records = [
      {'type': 'compile', 'step': 1, 'first_step_s': 31.2, 'time': 9.8},
      {'type': 'train', 'step': 10, 'epoch': 0.5, 'loss': 0.4, 'lr': 1e-3},
      {'type': 'eval', 'step': 20, 'split': eval_split, 'loss': 0.3, 'iou': 0.7,
       'resolution': 'model'},
      {'type': 'resume', 'step': 20, 'time': 1.0},
      {'type': 'train', 'step': 30, 'loss': 'nan'},  # non-finite, as written
      {'type': 'train', 'step': 25, 'loss': 0.35, 'iou': 0.6},
  ]
  s = visualize.training_series(records)
  assert s['loss'] == {'train': [(10, 0.4), (25, 0.35)], 'validation': [(20, 0.3)]}
  assert s['iou'] == {'train': [(25, 0.6)], 'validation': [(20, 0.7)]}


def test_plot_training_curves(tmp_path):
  writer = logging_utils.MetricWriter(str(tmp_path))
  rng = np.random.default_rng(2)
  for step in range(1, 21):
    writer.write('train', step, {'loss': float(1 / step + rng.random() * 0.01)})
    if step % 5 == 0:
      writer.write('eval', step, {'split': 'validation', 'loss': 1.0 / step,
                                  'iou': 1 - 1.0 / step})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"type": "train", "st')  # a line cut short by a kill: ignored
  out = visualize.plot_training_curves(tmp_path, tmp_path / 'curves.png')
  width, height = _png_size(out)
  assert width > height
  with pytest.raises(FileNotFoundError, match='no training log'):
    visualize.plot_training_curves(tmp_path / 'missing', tmp_path / 'x.png')
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'metrics.jsonl').write_text('{"type": "train", "step": 1, "lr": 0.1}\n')
  with pytest.raises(ValueError, match='no train or validation'):
    visualize.plot_training_curves(empty, tmp_path / 'x.png')
