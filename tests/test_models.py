"""Model shapes, the seed's parameter counts, dtypes and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lintunet as lintunet_config
from configs import unet as unet_config
from lintunet_jax.attention import bottleneck as attention
from lintunet_jax import models

RNG = np.random.default_rng()


def _tiny(config, kind='linformer_block_sparse'):
  config.model.width = 4
  config.model.attention.kind = kind
  config.model.attention.seq_len = 16
  config.model.attention.k = 4
  config.model.attention.block_size = 4
  config.model.attention.pattern = 'local_2d(radius=1) | global_tokens(num=1)'
  return config.model


def test_unet_has_the_seeds_parameter_count():
  model = nnx.eval_shape(lambda: models.create_model(unet_config.get_config().model))
  assert models.count_parameters(model) == 31_036_481


def test_lintunet_seed_variant_has_the_seeds_parameter_count():
  model = nnx.eval_shape(lambda: models.create_model(lintunet_config.get_config('seed').model))
  assert models.count_parameters(model) == 34_220_097


def test_batch_stats_are_not_parameters():
  model = models.create_model(_tiny(unet_config.get_config()))
  stats = nnx.state(model, nnx.BatchStat)
  assert len(jax.tree.leaves(stats)) == 2 * 9  # mean and var of 9 DoubleConvs


@pytest.mark.parametrize('kind', attention.KINDS)
def test_lintunet_shapes_for_each_attention_kind(kind):
  model = models.create_model(_tiny(lintunet_config.get_config(), kind))
  x = jnp.asarray(RNG.standard_normal((2, 64, 48, 1)), jnp.float32)
  logits = nnx.jit(lambda m, x: m(x))(model, x)
  assert logits.shape == (2, 64, 48, 1) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all()) and float(jnp.std(logits)) > 0


def test_multiclass_rgb_unet():
  config = _tiny(unet_config.get_config())
  config.in_channels, config.num_classes = 3, 4
  logits = models.create_model(config)(jnp.asarray(RNG.random((1, 32, 32, 3)), jnp.float32))
  assert logits.shape == (1, 32, 32, 4)


def test_attention_changes_the_output():
  """LinTUNet is the U-Net plus attention: same seed, different logits."""
  x = jnp.asarray(RNG.standard_normal((1, 32, 32, 1)), jnp.float32)
  unet = models.create_model(_tiny(unet_config.get_config()), seed=1)
  lint = models.create_model(_tiny(lintunet_config.get_config()), seed=1)
  unet.eval(), lint.eval()
  assert float(jnp.abs(unet(x) - lint(x)).max()) > 1e-4


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_is_close():
  config = _tiny(lintunet_config.get_config())
  full = models.create_model(config, seed=3)
  config.dtype = 'bfloat16'
  half = models.create_model(config, seed=3)
  params = jax.tree.leaves(nnx.state(half, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  full.eval(), half.eval()
  x = jnp.asarray(RNG.standard_normal((2, 32, 32, 1)), jnp.float32)
  a, b = full(x), half(x)
  assert b.dtype == jnp.float32
  assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 5e-2


def test_train_mode_updates_batch_stats_eval_mode_does_not():
  model = models.create_model(_tiny(unet_config.get_config()))
  x = jnp.asarray(RNG.standard_normal((2, 32, 32, 1)) + 3.0, jnp.float32)
  before = np.asarray(model.enc1.double_conv.norm.mean[...])
  model.eval()
  model(x)
  np.testing.assert_array_equal(np.asarray(model.enc1.double_conv.norm.mean[...]), before)
  model.train()
  model(x)
  assert np.abs(np.asarray(model.enc1.double_conv.norm.mean[...]) - before).max() > 1e-3


def test_bad_inputs_are_rejected_clearly():
  model = models.create_model(_tiny(unet_config.get_config()))
  with pytest.raises(ValueError, match='not a multiple of 16'):
    model(jnp.ones((1, 40, 32, 1)))
  with pytest.raises(ValueError, match='NHWC'):
    model(jnp.ones((32, 32, 1)))
  # RGB images into a one-channel model: named, not XLA's conv shape error.
  with pytest.raises(ValueError, match=r'images have 3 channels .* model.in_channels=1'):
    model(jnp.ones((1, 32, 32, 3)))
  config = _tiny(unet_config.get_config())
  config.dtype = 'float16'
  with pytest.raises(ValueError, match='model.dtype'):
    models.create_model(config)
  config = _tiny(lintunet_config.get_config())
  config.name = 'transunet'
  with pytest.raises(ValueError, match='model.name'):
    models.create_model(config)
