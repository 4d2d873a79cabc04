"""`python -m lintunet_jax.export`: the whole pipeline as one jax.export file.

The artifact is loaded in a subprocess that cannot import lintunet_jax
(`python -I` from a temporary folder, plus an import hook that refuses the
package) and called at two batch sizes through its symbolic batch; its masks
are compared with the library path predict.py's sliding window uses
(numpy normalisation (`transforms`), `sliding_window.make_predict_fn` and
`metrics.predict_classes`) and with the PNG masks predict.py's
`predict_paths` writes for the same images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from scipy.special import expit, logit

from lintunet_jax import export
from lintunet_jax.evaluation.settings import InferenceChoice
from lintunet_jax import metrics
from lintunet_jax import models
from lintunet_jax.data.datasets import transforms
from lintunet_jax.evaluation import ensemble as ensemble_lib
from lintunet_jax.evaluation import prediction
from lintunet_jax.evaluation import report
from lintunet_jax.evaluation import sliding_window as sw
from lintunet_jax.training import checkpointing
from tests.evaluation import eval_testutil

HEIGHT, WIDTH = 48, 40  # larger than the 32 px model: 2 x 2 tiles

LOADER = textwrap.dedent('''
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'lintunet_jax':
          raise ImportError('lintunet_jax must not be needed')

    sys.meta_path.insert(0, Refuse())
    try:
      import lintunet_jax
    except ImportError:
      pass
    else:
      raise SystemExit('lintunet_jax is importable here')
    import numpy as np
    from jax import export
    with open(sys.argv[1], 'rb') as f:
      exported = export.deserialize(bytearray(f.read()))
    images = np.load(sys.argv[2])
    outputs = {'platforms': np.asarray(exported.platforms)}
    for n in (3, 2):  # one artifact, two batch sizes
      out = exported.call(images[:n])
      outputs[f'mask{n}'] = np.asarray(out['mask'])
      outputs[f'logits{n}'] = np.asarray(out['logits'])
    np.savez(sys.argv[3], **outputs)
    assert not any(m.split('.')[0] == 'lintunet_jax' for m in sys.modules)
    print('OK')
''')


def _images(seed, n, height, width, channels=1):
  """uint8 noise with a different brightness and contrast per image (a
  normalisation over the batch instead of per image would show)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    low = 10 + 40 * i
    out.append(rng.integers(low, low + 60 + 50 * i, (height, width, channels)))
  return np.stack(out).astype(np.uint8)


def _workdir(path, config, model):
  checkpointing.write_weights_checkpoint(path, config, model, step=5)
  return path


def _library_logits(config, members, images):
  """predict.py's path: numpy normalisation, then the ensemble's window."""
  settings = sw.inference_settings(config, sliding_window=True, tta='flips',
                                   tile_batch_size=3)
  x = np.stack([transforms.normalize(transforms.to_unit_float(im),
                                     config.dataset.normalization)
                for im in images])
  return np.asarray(sw.make_predict_fn(members, settings)(x))


@pytest.fixture(scope='module')
def ensemble(tmp_path_factory):
  """Two workdirs (an ensemble) of tiny untrained models, the test images
  and their logits by the library path. The saved threshold is the
  probability at the median logit, so both classes fill the masks, and the
  last layer's weights are scaled up so that few logits lie near it."""
  root = tmp_path_factory.mktemp('export')
  config = eval_testutil.tiny_config('/unused')
  config.dataset.normalization = 'standardize'
  members = [models.create_model(config.model, seed=s) for s in (0, 1)]
  for model in members:  # untrained logits spread by ~0.03: make it ~3
    model.final_conv.kernel[...] = model.final_conv.kernel[...] * 100.0
  images = _images(0, 3, HEIGHT, WIDTH)
  logits = _library_logits(config, members, images)
  config.threshold = float(expit(np.median(logits)))
  workdirs = [_workdir(root / f'fold{i}', config, m) for i, m in enumerate(members)]
  return dict(workdirs=workdirs, images=images, logits=logits,
              threshold=config.threshold)


@pytest.mark.slow
def test_artifact_without_the_package_matches_the_library(ensemble, tmp_path):
  workdirs, images = ensemble['workdirs'], ensemble['images']
  output = tmp_path / 'out' / 'model.jaxexport'
  assert export.main(['export', '--workdir', str(workdirs[0]), '--workdir',
                      str(workdirs[1]), '--output', str(output),
                      '--height', str(HEIGHT), '--width', str(WIDTH),
                      '--sliding_window', '--tta', 'flips',
                      '--tile_batch_size', '3']) == 0
  description = json.loads((tmp_path / 'out' / 'model.jaxexport.json').read_text())
  assert description['platforms'] == ['cpu', 'cuda', 'tpu']
  assert description['inputs']['images']['shape'] == ['b', HEIGHT, WIDTH, 1]
  assert description['attention_kernel'] == 'xla'
  assert description['threshold'] == ensemble['threshold']
  assert [m['step'] for m in description['members']] == [5, 5]
  assert description['inference']['tta'] == 'flips'

  np.save(tmp_path / 'images.npy', images)
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run(
      [sys.executable, '-I', '-c', LOADER, str(output), 'images.npy', 'out.npz'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stdout + proc.stderr
  got = np.load(tmp_path / 'out.npz')
  assert list(got['platforms']) == ['cpu', 'cuda', 'tpu']

  logits = ensemble['logits']
  mask = np.asarray(metrics.predict_classes(logits, ensemble['threshold']))
  assert 0.2 < mask.mean() < 0.8, mask.mean()  # both classes present
  assert got['mask3'].dtype == np.uint8 and got['mask3'].shape == (3, HEIGHT, WIDTH)
  assert got['logits3'].dtype == np.float32
  _assert_masks_agree(got['mask3'], mask, logits, ensemble['threshold'])
  np.testing.assert_allclose(got['logits3'], logits, rtol=1e-4, atol=1e-4)
  # Batch 2 through the same artifact: the same first two images (XLA's
  # convolutions sum in another order for another batch: ~1e-5 relative).
  _assert_masks_agree(got['mask2'], got['mask3'][:2], logits[:2],
                      ensemble['threshold'])
  np.testing.assert_allclose(got['logits2'], got['logits3'][:2], rtol=1e-4,
                             atol=1e-4)
  # And predict.py's own path on the same images saved as PNG files: the
  # workdirs restored as it restores them, its masks as it writes them
  # (0/255 for a binary model).
  folder = tmp_path / 'pngs'
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image[..., 0]).save(folder / f'{i}.png')
  members = ensemble_lib.restore_members([str(w) for w in workdirs], None, None)
  settings = sw.inference_settings(members[0].config, sliding_window=True,
                                   tta='flips', tile_batch_size=3)
  summary = prediction.predict_paths([m.model for m in members],
                                     members[0].config, [str(folder)],
                                     tmp_path / 'masks', settings=settings)
  assert len(summary.written) == 3 and not summary.skipped
  written = np.stack([np.asarray(Image.open(tmp_path / 'masks' / f'{i}.png'))
                      for i in range(3)])
  assert set(np.unique(written)) <= {0, 255}
  _assert_masks_agree(got['mask3'], (written > 0).astype(np.uint8), logits,
                      ensemble['threshold'])


def _assert_masks_agree(mask, reference, logits, threshold):
  """Equal masks, except where the logit is within 1e-4 of the threshold's
  (float rounding may fall either way there); such pixels are < 0.1%."""
  near = np.abs(logits[..., 0] - logit(threshold)) < 1e-4
  assert near.mean() < 1e-3
  differ = mask != reference
  assert not (differ & ~near).any(), np.argwhere(differ & ~near)[:5]


@pytest.mark.parametrize('mode', transforms.IMAGE_NORMALIZATIONS)
def test_normalize_is_the_numpy_transform(mode):
  images = _images(1, 3, 20, 12, channels=3)
  images[2] = np.where(images[2] > 100, 101, 100)  # low contrast: std ~ 0.002
  expected = np.stack([transforms.normalize(transforms.to_unit_float(im), mode)
                       for im in images])
  got = np.asarray(export.normalize(images, mode))
  assert got.dtype == np.float32
  # Image 2 has a std of 0.002: ~1e-5 of it in the mean moves every value.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=5e-5)


def test_refusals_are_clear(ensemble):
  workdirs = ensemble['workdirs']
  with pytest.raises(export.ExportError, match=r'3 channel\(s\).*in_channels=1'):
    export.export_pipeline([str(workdirs[0])], channels=3,
                           inference=InferenceChoice(sliding_window=True))
  with pytest.raises(export.ExportError, match='without the sliding window'):
    export.export_pipeline([str(workdirs[0])], height=HEIGHT, width=WIDTH,
                           inference=InferenceChoice(sliding_window=False))
  with pytest.raises(export.ExportError, match='--platforms'):
    export.export_pipeline([str(workdirs[0])], platforms='cpu,gpu')


def test_command_line_errors_write_nothing(tmp_path, capsys):
  output = tmp_path / 'model.jaxexport'
  assert export.main(['export', '--workdir', str(tmp_path / 'none')]) == 2
  assert '--workdir and --output are required' in capsys.readouterr().err
  assert export.main(['export', '--workdir', str(tmp_path / 'none'),
                      '--output', str(output)]) == 2
  assert 'does not exist' in capsys.readouterr().err
  assert export.main(['export', '--workdir', str(tmp_path), '--output',
                      str(output), '--tta', 'rotations']) == 2
  assert 'export: error:' in capsys.readouterr().err
  assert not output.exists()


def test_ensemble_members_must_agree(ensemble, tmp_path):
  config = eval_testutil.tiny_config('/unused')  # 'unit', not 'standardize'
  unit = _workdir(tmp_path / 'unit', config,
                  models.create_model(config.model, seed=2))
  with pytest.raises(export.ExportError, match='dataset.normalization'):
    export.restore_members([str(ensemble['workdirs'][0]), str(unit)], None)


def test_pallas_kernel_is_replaced_by_xla(ensemble, tmp_path):
  workdirs = ensemble['workdirs']
  # A run trained on a GPU with the fused kernels: off GPU, restoring it as
  # saved fails (predict.py needs --config.model.attention.kernel=xla).
  pallas = eval_testutil.as_trained_with_pallas(workdirs[0], tmp_path / 'pallas')
  with pytest.raises(report.EvaluationError, match="kernel='pallas'"):
    report.restore(str(pallas), None)
  artifact, description = export.export_pipeline(
      [str(pallas)], inference=InferenceChoice(sliding_window=False))
  assert description['attention_kernel'] == 'xla'
  assert description['inputs']['images']['shape'] == ['b', 32, 32, 1]
  module = export.jax_export.deserialize(bytearray(artifact)).mlir_module()
  for marker in ('tpu_custom_call', 'triton', 'mosaic'):
    assert marker not in module


def test_platforms_that_cannot_lower_are_dropped_with_a_message():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  calls, messages = [], []

  def fake_export(fn, platforms):
    calls.append(platforms)

    def lower(*args):
      if 'tpu' in platforms:
        raise RuntimeError('no TPU lowering for this op')
      return export.jax_export.export(fn, platforms=platforms)(*args)
    return lower

  spec = export.jax.ShapeDtypeStruct((2, 3), jnp.float32)
  exported, dropped = export.export_with_fallback(
      lambda x: x * 2, [spec], ('cpu', 'cuda', 'tpu'), export=fake_export,
      log=lambda *a, **k: messages.append(' '.join(a)))
  assert exported.platforms == ('cpu', 'cuda')
  assert list(dropped) == ['tpu'] and 'no TPU lowering' in dropped['tpu']
  assert 'cannot lower for tpu' in messages[0]
  assert calls[0] == ('cpu', 'cuda', 'tpu') and calls[-1] == ('cpu', 'cuda')
