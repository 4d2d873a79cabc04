"""Sliding-window inference: tiling, Gaussian blending, flips TTA, ensembles.

References come from outside the module: nnU-Net's published step rule
worked out by hand, scipy's Gaussian window, numpy flips, and a plain
Python loop over tiles for the blending.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import windows

from lintunet_jax import models
from lintunet_jax.evaluation import sliding_window as sw
from tests import train_testutil as tu
from tests.evaluation import eval_testutil


def _pointwise(tiles):
  """A per-pixel model: whatever the tiling, its output is f(image)."""
  return jnp.tanh(2.0 * tiles[..., :1] - tiles[..., 1:2])


def _window(apply, images, **kwargs):
  return jax.jit(lambda x: sw.sliding_window_logits(apply, x, **kwargs))(images)


def test_tile_starts_follow_nnunet_step_rule():
  # nnU-Net: steps of at most tile * (1 - overlap), spread so the last tile
  # ends at the edge. 640 px, tile 256, overlap 0.5 -> 4 tiles, step 128.
  assert sw.tile_starts(640, 256, 0.5) == [0, 128, 256, 384]
  assert sw.tile_starts(256, 256, 0.5) == [0]
  # (300 - 256) / 128 -> 2 tiles, the second flush with the edge.
  assert sw.tile_starts(300, 256, 0.5) == [0, 44]
  # overlap 0: 100 px in tiles of 32 -> ceil(68/32) + 1 = 4 tiles.
  assert sw.tile_starts(100, 32, 0.0) == [0, 23, 45, 68]
  with pytest.raises(ValueError, match='shorter than the tile'):
    sw.tile_starts(20, 32, 0.5)
  with pytest.raises(ValueError, match='overlap'):
    sw.tile_starts(64, 32, 1.0)


def test_gaussian_matches_scipy_window():
  for tile, scale in ((32, 0.125), (48, 0.25)):
    reference = np.outer(windows.gaussian(tile, std=tile * scale),
                         windows.gaussian(tile, std=tile * scale))
    np.testing.assert_allclose(sw.gaussian_importance(tile, scale),
                               reference / reference.max(), rtol=1e-5)


@pytest.mark.parametrize('height,width', [(64, 64), (100, 77), (20, 30), (40, 130)])
@pytest.mark.parametrize('tta', ['none', 'flips'])
def test_pointwise_model_is_reproduced_exactly(height, width, tta):
  # Any misplaced tile, wrong padding or crop, or a tile that is not
  # un-flipped breaks the equality; sizes include one below the tile.
  rng = np.random.default_rng([height, width])
  images = jnp.asarray(rng.normal(size=(2, height, width, 2)), jnp.float32)
  out = _window(sw.with_tta(_pointwise, tta), images, tile_size=32,
                overlap=0.5, tile_batch_size=3)
  assert out.shape == (2, height, width, 1)
  np.testing.assert_allclose(out, _pointwise(images), rtol=1e-5, atol=1e-6)


def test_constant_model_blends_to_the_constant():
  images = jnp.asarray(np.random.default_rng(1).normal(size=(1, 90, 70, 1)),
                       jnp.float32)
  out = _window(lambda t: jnp.full(t.shape[:3] + (2,), 3.25, jnp.float32),
                images, tile_size=32, overlap=0.25, tile_batch_size=4)
  np.testing.assert_allclose(out, 3.25, rtol=1e-6)


def test_blending_is_the_gaussian_weighted_mean_of_tiles():
  # Each tile's output is its own mean intensity everywhere: the blended
  # value of a pixel is then sum_t w_t(p) mean_t / sum_t w_t(p), which a
  # plain loop over the tiles computes independently.
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(2, 75, 61, 1)).astype(np.float32)
  tile, overlap, scale = 32, 0.5, 0.125
  out = _window(lambda t: jnp.broadcast_to(jnp.mean(t, axis=(1, 2, 3),
                                                    keepdims=True), t.shape),
                jnp.asarray(images), tile_size=tile, overlap=overlap,
                sigma_scale=scale, tile_batch_size=5)
  weight = np.outer(windows.gaussian(tile, std=tile * scale),
                    windows.gaussian(tile, std=tile * scale))
  total = np.zeros(images.shape, np.float64)
  norm = np.zeros(images.shape[1:3], np.float64)
  step = tile * (1 - overlap)
  for axis_len in images.shape[1:3]:
    assert axis_len > tile
  rows = np.round(np.linspace(0, 75 - tile, int(np.ceil((75 - tile) / step)) + 1))
  cols = np.round(np.linspace(0, 61 - tile, int(np.ceil((61 - tile) / step)) + 1))
  for r in rows.astype(int):
    for c in cols.astype(int):
      patch = images[:, r:r + tile, c:c + tile]
      total[:, r:r + tile, c:c + tile] += weight[None, :, :, None] * patch.mean(
          axis=(1, 2, 3))[:, None, None, None]
      norm[r:r + tile, c:c + tile] += weight
  np.testing.assert_allclose(out, total / norm[None, :, :, None], rtol=1e-5)


def test_thin_structure_across_tile_borders_is_continuous():
  # A one-pixel line crossing every tile border of a 100x100 image.
  image = np.zeros((1, 100, 100, 2), np.float32)
  line = np.arange(100)
  image[0, line, (line * 7) // 10, 0] = 1.0
  out = np.asarray(_window(_pointwise, jnp.asarray(image), tile_size=32,
                           overlap=0.5, tile_batch_size=2))
  predicted = out[0, ..., 0] > 0.5
  np.testing.assert_array_equal(predicted, image[0, ..., 0] > 0)


def test_flip_tta_averages_unflipped_predictions():
  # A model that is not flip-equivariant (it looks at a fixed neighbour).
  def shifted(t):
    return jnp.roll(t, 1, axis=1)[..., :1] + 0.5 * jnp.roll(t, -2, axis=2)[..., :1]

  x = np.random.default_rng(3).normal(size=(3, 16, 16, 1)).astype(np.float32)
  expected = np.mean([np.flip(np.asarray(shifted(jnp.asarray(np.flip(x, a)))), a)
                      for a in ((), (1,), (2,), (1, 2))], axis=0)
  np.testing.assert_allclose(sw.with_flip_tta(shifted)(jnp.asarray(x)), expected,
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(expected, shifted(jnp.asarray(x)))


@pytest.fixture(scope='module')
def two_models():
  config = eval_testutil.tiny_config('/unused')
  return config, [models.create_model(config.model, seed=s) for s in (0, 1)]


@pytest.mark.slow
def test_one_tile_image_equals_the_plain_forward(two_models):
  config, (model, _) = two_models
  settings = sw.inference_settings(config, sliding_window=True)
  assert settings.tile_size == 32 and settings.window
  x = np.random.default_rng(4).uniform(size=(2, 32, 32, 1)).astype(np.float32)
  model.eval()
  np.testing.assert_allclose(sw.make_predict_fn([model], settings)(x),
                             model(jnp.asarray(x)), rtol=1e-5, atol=1e-5)


def test_ensemble_is_the_mean_of_the_members(two_models):
  config, members = two_models
  settings = sw.inference_settings(config, sliding_window=True, overlap=0.5,
                                   tta='flips', tile_batch_size=3)
  x = np.random.default_rng(5).uniform(size=(1, 50, 45, 1)).astype(np.float32)
  each = [np.asarray(sw.make_predict_fn([m], settings)(x)) for m in members]
  both = np.asarray(sw.make_predict_fn(members, settings)(x))
  np.testing.assert_allclose(both, (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-5)
  assert np.abs(each[0] - each[1]).mean() > 1e-3  # the members differ


def test_settings_come_from_config_and_patch_training():
  config = eval_testutil.tiny_config('/unused')
  assert not sw.inference_settings(config).window  # trained on whole images
  config.dataset.patch_size = 48
  settings = sw.inference_settings(config)
  assert settings.window and settings.tile_size == 48
  assert settings.tile_batch_size == config.eval_batch_size
  old = eval_testutil.tiny_config('/unused')
  del old['inference']  # a config saved before the field existed
  assert sw.inference_settings(old, tta='flips').tta == 'flips'
  with pytest.raises(ValueError, match='tta'):
    sw.inference_settings(config, tta='rotations')


SHARDED = textwrap.dedent('''
    import jax, numpy as np
    from lintunet_jax import models
    from lintunet_jax.evaluation import sliding_window as sw
    from lintunet_jax.training import parallel
    from tests.evaluation import eval_testutil
    assert jax.device_count() == 4
    config = eval_testutil.tiny_config('/unused')
    model = models.create_model(config.model, seed=0)
    settings = sw.inference_settings(config, sliding_window=True, tile_batch_size=3)
    x = np.random.default_rng(6).uniform(size=(1, 70, 50, 1)).astype(np.float32)
    one = np.asarray(sw.make_predict_fn([model], settings)(x))
    four = np.asarray(sw.make_predict_fn([model], settings,
                                         mesh=parallel.create_mesh())(x))
    err = np.abs(one - four).max() / np.abs(one).max()
    assert err < 1e-5, err
    # One tile (fewer than the devices) and a plain batch of 3 images: the
    # rows are padded to a multiple of the 4 devices and cut back.
    mesh = parallel.create_mesh()
    for window, shape in ((True, (1, 32, 32, 1)), (False, (3, 32, 32, 1))):
      plain = sw.inference_settings(config, sliding_window=window, tile_batch_size=3)
      y = np.random.default_rng(7).uniform(size=shape).astype(np.float32)
      one = np.asarray(sw.make_predict_fn([model], plain)(y))
      four = np.asarray(sw.make_predict_fn([model], plain, mesh=mesh)(y))
      assert four.shape == one.shape, (four.shape, one.shape)
      np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-5)
    print('OK', err)
''')


@pytest.mark.slow
def test_tiles_split_over_devices_give_the_same_logits():
  result = subprocess.run([sys.executable, '-c', SHARDED], env=tu.env(devices=4),
                          cwd=tu.ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'OK' in result.stdout
