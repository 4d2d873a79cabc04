"""Speed-motivated rewrites of layers compute exactly what they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lintunet_jax import layers

RNG = np.random.default_rng()


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize('shape', [(2, 5, 7, 16), (1, 8, 8, 32)])
def test_upsample_matches_conv_transpose_and_its_gradients(shape):
  cin = shape[-1]
  upconv = nnx.ConvTranspose(cin, cin // 2, kernel_size=(2, 2), strides=(2, 2),
                             padding='VALID', rngs=nnx.Rngs(int(RNG.integers(1 << 30))))
  upconv.bias[...] = jnp.asarray(RNG.standard_normal(cin // 2), jnp.float32)
  x = jnp.asarray(RNG.standard_normal(shape), jnp.float32)
  out = layers.upsample_2x2(upconv, x)
  ref = upconv(x)
  assert out.shape == ref.shape == (shape[0], 2 * shape[1], 2 * shape[2], cin // 2)
  assert _rel_err(out, ref) <= 1e-6
  cot = jnp.asarray(RNG.standard_normal(ref.shape), jnp.float32)
  graphdef, params = nnx.split(upconv)

  def loss(fn):
    return lambda params, x: jnp.sum(fn(nnx.merge(graphdef, params), x) * cot)

  got = jax.grad(loss(layers.upsample_2x2), (0, 1))(params, x)
  want = jax.grad(loss(lambda m, x: m(x)), (0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert _rel_err(a, b) <= 1e-5


def test_upsample_keeps_the_compute_dtype():
  upconv = nnx.ConvTranspose(8, 4, kernel_size=(2, 2), strides=(2, 2), padding='VALID',
                             dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.asarray(RNG.standard_normal((1, 3, 3, 8)), jnp.float32)
  out, ref = layers.upsample_2x2(upconv, x), upconv(x)
  assert out.dtype == ref.dtype == jnp.bfloat16
  assert _rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) <= 1e-6


@pytest.mark.parametrize('shape', [(2, 8, 6, 4), (1, 7, 9, 3)])  # odd sizes floor
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_max_pool_values_and_gradients_are_bit_identical_to_nnx_max_pool(shape, dtype):
  # Small integers after a ReLU: most windows hold ties, which is where the
  # gradient's choice of element shows.
  x = jnp.asarray(np.maximum(RNG.integers(-3, 4, shape), 0), dtype)
  ref_pool = lambda x: nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding='VALID')
  out, ref = layers.max_pool_2x2(x), ref_pool(x)
  assert out.shape == ref.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
  cot = jnp.asarray(RNG.standard_normal(ref.shape), dtype)
  grad = jax.jit(jax.vjp(layers.max_pool_2x2, x)[1])(cot)[0]
  want = jax.vjp(ref_pool, x)[1](cot)[0]
  assert grad.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(want, np.float32))
  assert np.count_nonzero(np.asarray(grad, np.float32)) == np.count_nonzero(np.asarray(cot, np.float32))
