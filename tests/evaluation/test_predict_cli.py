"""`predict.py` as a user runs it: a subprocess on a tiny workdir.

Inputs: a folder with a grayscale PNG (not square), an RGB JPEG, a corrupt
PNG and a text file, plus a file named twice-over by stem in a sub-folder
and a missing path. Masks come back at each image's own size and equal what
the restored model predicts in-process; the unreadable and missing inputs
are skipped with a warning and listed at the end (exit status 1), and the
rest are still written.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lintunet_jax.training import checkpointing
from lintunet_jax.data import image_io
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.data import whole_images
from lintunet_jax import metrics
from lintunet_jax import models
from tests.evaluation import eval_testutil
from tests.evaluation.eval_testutil import ROOT, cli_env, tiny_config
from lintunet_jax.evaluation import prediction
from lintunet_jax.evaluation import sliding_window

def run_cli(env, *args, timeout=300):
  return subprocess.run([sys.executable, str(ROOT / 'predict.py'), *map(str, args)],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def textured(seed, shape):
  """Smooth blobs plus noise (never constant), uint8."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  base = 120 + 80 * np.sin(xx / 4.0 + seed) * np.cos(yy / 5.0)
  if len(shape) == 3:
    base = base[..., None] * np.ones(shape[2])
  return np.clip(base + rng.normal(0, 20, shape), 1, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  root = tmp_path_factory.mktemp('predict_cli')
  config = tiny_config(base / 'tfds')
  model = models.create_model(config.model, seed=2)
  workdir = root / 'workdir'
  checkpointing.write_weights_checkpoint(workdir, config, model, step=5)
  inputs = root / 'inputs'
  (inputs / 'sub').mkdir(parents=True)
  Image.fromarray(textured(0, (40, 56))).save(inputs / 'scan_a.png')
  Image.fromarray(textured(1, (48, 48, 3))).save(inputs / 'scan_b.jpg', quality=95)
  (inputs / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  (inputs / 'notes.txt').write_text('not an image')
  Image.fromarray(textured(2, (20, 24))).save(inputs / 'sub' / 'scan_a.png')
  return dict(workdir=workdir, inputs=inputs, env=cli_env(base), root=root)


@pytest.mark.slow
def test_predict_folder_and_files(setup, tmp_path):
  out = tmp_path / 'out'
  missing = setup['inputs'] / 'missing.png'
  proc = run_cli(setup['env'], '--workdir', setup['workdir'], '--output', out,
                 '--input', setup['inputs'], setup['inputs'] / 'sub' / 'scan_a.png',
                 missing, '--save-logits', '--overlay', '--batch_size', '2')
  assert proc.returncode == 1, proc.stderr  # something was skipped
  names = sorted(p.name for p in out.iterdir())
  assert names == sorted([
      'predictions.json', 'scan_a.png', 'scan_a.npy', 'scan_a_overlay.png',
      'scan_b.png', 'scan_b.npy', 'scan_b_overlay.png',
      'scan_a-2.png', 'scan_a-2.npy', 'scan_a-2_overlay.png'])
  # Masks at each input's own size; logits at model resolution.
  for name, size in (('scan_a', (40, 56)), ('scan_b', (48, 48)), ('scan_a-2', (20, 24))):
    with Image.open(out / f'{name}.png') as mask:
      assert mask.mode == 'L' and mask.size[::-1] == size
      assert set(np.unique(np.asarray(mask))) <= {0, 255}
    logits = np.load(out / f'{name}.npy')
    assert logits.shape == (32, 32, 1) and logits.dtype == np.float32
  # Skipped inputs: warned about, listed at the end and in predictions.json.
  err = proc.stderr
  tail = err[err.rindex('skipped 2 input(s):'):]
  assert 'corrupt.png' in tail and 'missing.png' in tail
  assert 'warning: skipping' in err
  summary = json.loads((out / 'predictions.json').read_text())
  assert summary['step'] == 5 and len(summary['written']) == 3
  assert {os.path.basename(s['input']) for s in summary['skipped']} == {
      'corrupt.png', 'missing.png'}
  assert [os.path.basename(p) for p in summary['ignored']] == ['notes.txt']
  # The written mask is what the restored model predicts for that image.
  config, model, _ = checkpointing.restore_model(setup['workdir'])
  image = image_io.read_image(setup['inputs'] / 'scan_a.png')
  x = input_pipeline.preprocess_image(image, config)[None]
  logits = np.asarray(prediction.make_forward(model)(x))
  np.testing.assert_allclose(np.load(out / 'scan_a.npy'), logits[0], atol=1e-5)
  classes = np.asarray(metrics.predict_classes(logits, config.threshold))[0]
  expected = input_pipeline.restore_mask_size(classes, image.shape, config)
  with Image.open(out / 'scan_a.png') as mask:
    np.testing.assert_array_equal(np.asarray(mask) > 0, np.asarray(expected) > 0)


def _fails(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  assert 'Traceback' not in proc.stderr
  for needle in needles:
    assert needle in proc.stderr, (needle, proc.stderr)


@pytest.mark.slow
def test_nothing_readable(setup, tmp_path):
  proc = run_cli(setup['env'], '--workdir', setup['workdir'], '--output', tmp_path,
                 '--input', setup['inputs'] / 'corrupt.png', tmp_path / 'none.png')
  _fails(proc, 'no input image could be processed', 'corrupt.png',
         'not a readable image', 'none.png')


def test_workdir_without_checkpoints(setup, tmp_path):
  checkpointing.save_config(tmp_path, tiny_config('/nowhere'))
  proc = run_cli(setup['env'], '--workdir', tmp_path, '--output', tmp_path / 'o',
                 '--input', setup['inputs'])
  _fails(proc, 'predict.py: error:', 'no checkpoints', 'config.json')


@pytest.mark.slow
def test_checkpoint_of_a_different_model(setup, tmp_path):
  proc = run_cli(setup['env'], '--workdir', setup['workdir'], '--output', tmp_path,
                 '--input', setup['inputs'], '--config',
                 ROOT / 'configs' / 'unet.py:quick')
  _fails(proc, 'predict.py: error:', 'does not match the configured model')


def test_output_never_overwrites_an_input(tmp_path):
  folder = tmp_path / 'scans'
  folder.mkdir()
  Image.fromarray(textured(3, (16, 16))).save(folder / 'a.png')
  with pytest.raises(prediction.PredictionError, match='overwrite an input'):
    prediction.predict_paths(None, tiny_config('/nowhere'), [folder], folder)
  assert sorted(p.name for p in folder.iterdir()) == ['a.png']


def test_collect_inputs_and_stems(tmp_path):
  (tmp_path / 'd' / 'deep').mkdir(parents=True)
  for name in ('b.png', 'a.TIF', '.hidden.png', 'x.txt', 'deep/c.png'):
    (tmp_path / 'd' / name).write_bytes(b'x')
  files, skipped, ignored = prediction.collect_inputs([tmp_path / 'd'])
  assert [f.name for f in files] == ['a.TIF', 'b.png']
  assert [os.path.basename(p) for p in ignored] == ['x.txt'] and not skipped
  files, _, _ = prediction.collect_inputs([tmp_path / 'd'], recursive=True)
  assert [f.name for f in files] == ['a.TIF', 'b.png', 'c.png']
  files, skipped, _ = prediction.collect_inputs([tmp_path / 'd' / 'deep' / '..' / 'b.png',
                                                 tmp_path / 'd' / 'b.png'])
  assert len(files) == 1  # the same file named twice is processed once
  _, skipped, _ = prediction.collect_inputs([tmp_path / 'd' / 'deep' / 'nothing'])
  assert skipped[0][1] == 'no such file or folder'
  empty = tmp_path / 'empty'
  empty.mkdir()
  _, skipped, _ = prediction.collect_inputs([empty])
  assert 'folder has no image files' in skipped[0][1]
  stems = prediction.output_stems([pathlib.Path('x/a.png'), pathlib.Path('y/a.png'),
                                   pathlib.Path('a-2.png'), pathlib.Path('b.png')])
  assert stems == ['a', 'a-2', 'a-2-2', 'b']
  assert prediction.mask_to_png_array(np.array([[0, 1]]), 1).tolist() == [[0, 255]]
  assert prediction.mask_to_png_array(np.array([[0, 2]]), 3).tolist() == [[0, 2]]


@pytest.mark.slow
def test_kernel_override_on_top_of_the_saved_config(setup, tmp_path):
  """As eval.py: a Pallas-trained checkpoint runs off GPU with
  --config.model.attention.kernel=xla, and stops with a clear error
  naming that override without it (never the slow interpreter)."""
  pallas = eval_testutil.as_trained_with_pallas(setup['workdir'], tmp_path / 'pallas')
  image = setup['inputs'] / 'scan_a.png'
  _fails(run_cli(setup['env'], '--workdir', pallas, '--input', image,
                 '--output', tmp_path / 'refused'),
         "kernel='pallas' needs a GPU", '--config.model.attention.kernel=xla')
  assert not (tmp_path / 'refused').exists()
  proc = run_cli(setup['env'], '--workdir', pallas, '--input', image,
                 '--output', tmp_path / 'out', '--config.model.attention.kernel=xla')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / 'out' / 'scan_a.png').exists()


@pytest.mark.slow
def test_sliding_window_ensemble_at_native_size(setup, tmp_path):
  """The same workdir twice (its own mean), flips TTA and the window: masks
  and logits at each image's own size, equal to make_predict_fn's output
  for the single model on the image normalised at its own size."""
  big = tmp_path / 'big.png'
  Image.fromarray(textured(4, (70, 90))).save(big)
  out = tmp_path / 'out'
  workdir = setup['workdir']
  proc = run_cli(setup['env'], '--workdir', workdir, '--workdir', workdir,
                 '--output', out, '--input', big, setup['inputs'] / 'scan_a.png',
                 '--sliding_window', '--tta', 'flips', '--overlap', '0.25',
                 '--tile_batch_size', '3', '--save-logits')
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name, size in (('big', (70, 90)), ('scan_a', (40, 56))):
    with Image.open(out / f'{name}.png') as mask:
      assert mask.size[::-1] == size
    assert np.load(out / f'{name}.npy').shape == (*size, 1)
  config, model, _ = checkpointing.restore_model(workdir)
  settings = sliding_window.inference_settings(
      config, sliding_window=True, tta='flips', overlap=0.25, tile_batch_size=3)
  x = whole_images.native_input(image_io.read_image(big), config)[None]
  logits = np.asarray(sliding_window.make_predict_fn([model], settings)(x))[0]
  np.testing.assert_allclose(np.load(out / 'big.npy'), logits,
                             rtol=1e-5, atol=1e-5 * np.abs(logits).max())
  expected = np.asarray(metrics.predict_classes(logits[None], config.threshold))[0]
  clear = np.abs(logits[..., 0]) > 1e-4 * np.abs(logits).max()  # off the threshold
  assert clear.mean() > 0.9
  with Image.open(out / 'big.png') as mask:
    np.testing.assert_array_equal((np.asarray(mask) > 0)[clear], expected[clear] > 0)
  summary = json.loads((out / 'predictions.json').read_text())
  assert [m['step'] for m in summary['members']] == [5, 5]
  assert summary['inference']['window'] and summary['inference']['tta'] == 'flips'
  assert summary['inference']['overlap'] == 0.25
