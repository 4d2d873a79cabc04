"""eval.py on volume slices: one case per volume, 3-D metrics in mm.

A stand-in predictor (passed to the stream) returns the label each slice
holds, except on one case where it erases class 2; the per-volume metrics
must then be those of case_metrics on the stacked volumes, and the
processes must split the split by whole cases."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from configs import lintunet
from lintunet_jax.data import pipeline
from lintunet_jax.data import volume_config
from lintunet_jax.evaluation import case_metrics
from lintunet_jax.evaluation import sliding_window as sw
from lintunet_jax.evaluation import volume_eval

sys.path.insert(0, str(Path(__file__).parents[1] / 'data' / 'datasets'))
from test_nnunet_raw import SHAPE, write_raw  # noqa: E402  pylint: disable=g-import-not-at-top

SPACING = (0.7, 0.9, 2.5)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('volumes')
  # One channel holding the label itself (z-scored per case, so the stand-in
  # recovers the class by rank: the label values 0 < 1 < 2 keep their order).
  folder, written = write_raw(root / 'raw', spacing=SPACING, train=2, test=3,
                              channel_names=('T1',))
  for case, w in written.items():  # channel 0 := the label, as float
    import nibabel as nib  # pylint: disable=g-import-not-at-top
    sub = 'imagesTr' if w['split'] == 'train' else 'imagesTs'
    image = nib.Nifti1Image(w['label'].astype(np.float32), w['affine'])
    nib.save(image, str(folder / sub / f'{case}_0000.nii.gz'))
  config = lintunet.get_config('volumes_quick')
  config.dataset.manual_dir = str(folder)
  config.dataset.data_dir = str(root / 'data')
  config.dataset.image_size = 16
  config.eval_batch_size = 4
  config = volume_config.resolve(config)
  pipeline.prepare_dataset(config)
  return config, written


def _label_predictor(config):
  """Logits whose argmax is the stored label (values sorted into 0, 1, 2)."""
  def predict(images):
    x = images[..., 0]
    # three distinct z-scored values per slice: class = rank of the value
    lo = jnp.min(x, axis=(1, 2), keepdims=True)
    hi = jnp.max(x, axis=(1, 2), keepdims=True)
    ids = jnp.round(2.0 * (x - lo) / jnp.maximum(hi - lo, 1e-6)).astype(jnp.int32)
    return 10.0 * jnp.eye(3)[ids]
  return predict


def test_metrics_are_per_volume_in_mm(prepared):
  config, written = prepared
  settings = sw.InferenceSettings(tile_size=16, window=True, tile_batch_size=4)
  output = volume_eval.evaluate(_label_predictor(config), config, 'test', settings,
                                tolerance=1.5, process_index=0, process_count=1)
  cases = output.per_case['metric_per_case']
  assert [c['case'] for c in cases] == ['case_002', 'case_003', 'case_004']
  assert output.metrics['num_images'] == 3 and output.resolution == 'volume'
  for entry in cases:
    truth = written[entry['case']]['label']
    assert entry['spacing'] == pytest.approx(SPACING, rel=1e-6)
    want = case_metrics.case_metrics(truth, truth, num_classes=3, tolerance=1.5,
                                     spacing=SPACING)
    for c in ('1', '2'):
      assert entry['metrics'][c]['Dice'] == pytest.approx(want[c]['Dice'])
      assert entry['metrics'][c]['TP'] == int((truth == int(c)).sum())
  assert output.metrics['dice'] == pytest.approx(1.0)


def test_processes_take_whole_cases(prepared):
  config, _ = prepared
  settings = sw.InferenceSettings(tile_size=16, window=False, tile_batch_size=4)
  shares = [volume_eval.evaluate(_label_predictor(config), config, 'test', settings,
                                 process_index=p, process_count=2)
            for p in range(2)]
  # Each process sees whole cases (one process here gathers only its own).
  rows = [s.per_image['index'][s.per_image['index'] >= 0].tolist() for s in shares]
  assert rows == [[0, 2], [1]]


def test_an_imperfect_prediction_is_scored_on_the_stacked_volume(prepared):
  # The stand-in shifts every slice's labels down one row (array axis 0,
  # 0.7 mm): the metrics must be those of the shifted volume in mm.
  config, written = prepared
  label_of = _label_predictor(config)
  settings = sw.InferenceSettings(tile_size=16, window=True, tile_batch_size=4)
  output = volume_eval.evaluate(lambda x: jnp.roll(label_of(x), 1, axis=1), config,
                                'test', settings, tolerance=0.5,
                                process_index=0, process_count=1)
  for entry in output.per_case['metric_per_case']:
    truth = written[entry['case']]['label']
    want = case_metrics.case_metrics(np.roll(truth, 1, axis=0), truth, num_classes=3,
                                     tolerance=0.5, spacing=SPACING)
    for c in ('1', '2'):
      for metric in ('Dice', 'NSD', 'HD95'):
        assert entry['metrics'][c][metric] == pytest.approx(want[c][metric], rel=1e-6), (
            entry['case'], c, metric)
