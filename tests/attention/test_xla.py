"""Block-sparse attention against dense masked softmax on fresh random inputs."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lintunet_jax.attention import xla as ak
from lintunet_jax.attention import layout as bl
from lintunet_jax.attention import masks
from tests.attention.attention_testutil import RNG, dense_mask, random_inputs, rel_err

TOL = 1e-5


PATTERNS = {
    'local_1d': masks.LocalMask(5),
    'strided': masks.StridedMask(7),
    'fixed': masks.FixedMask(12, 2),
    'global_tokens': masks.GlobalTokensMask(2) | masks.LocalMask(3),
    'local_2d': masks.Local2DMask(1),
    'local_or_strided': masks.LocalMask(4) | masks.StridedMask(10),
    'full': masks.FullMask(),
}


def _case(name, n):
  return masks.bind_grid(PATTERNS[name], grid_width=int(np.sqrt(n)) or 1)


class KernelMatchesDenseTest(chex.TestCase):
  """Forward and gradients, each run jitted and op by op (chex.variants).

  Jitted catches trace-time bugs (a Python branch on, or a host read of, a
  traced value); op by op is the path of jax.disable_jit() and of eager
  callers, which the forward test did not run before."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(name=sorted(PATTERNS), n_block=[(64, 16), (100, 16), (144, 32)],
                         global_len=[0, 5])
  def test_forward_matches_dense(self, name, n_block, global_len):
    n, block = n_block
    mask = _case(name, n)
    (q, k, v), global_kv = random_inputs(n, global_len=global_len)
    ref = ak.dense_attention(q, k, v, mask=dense_mask(mask, n), global_kv=global_kv)
    out = self.variant(lambda q, k, v, g: ak.block_sparse_attention(
        q, k, v, mask=mask, block_size=block, global_kv=g))(q, k, v, global_kv)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= TOL

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(name=['local_1d', 'global_tokens', 'local_2d', 'strided'],
                         global_len=[0, 4])
  def test_gradients_match_dense(self, name, global_len):
    n, block = 81, 16
    mask = _case(name, n)
    (q, k, v), global_kv = random_inputs(n, global_len=global_len)
    cotangent = jnp.asarray(RNG.standard_normal(q.shape), jnp.float32)
    allowed = dense_mask(mask, n)

    def loss(fn):
      return lambda *args: jnp.sum(fn(*args) * cotangent)

    dense = loss(lambda q, k, v, g: ak.dense_attention(q, k, v, mask=allowed, global_kv=g))
    sparse = loss(lambda q, k, v, g: ak.block_sparse_attention(
        q, k, v, mask=mask, block_size=block, global_kv=g))
    argnums = (0, 1, 2, 3) if global_kv else (0, 1, 2)
    ref = jax.grad(dense, argnums)(q, k, v, global_kv)
    out = self.variant(jax.grad(sparse, argnums))(q, k, v, global_kv)
    chex.assert_trees_all_equal_structs(out, ref)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      assert rel_err(a, b) <= TOL


def test_dense_kernel_matches_numpy_softmax():
  (q, k, v), (gk, gv) = random_inputs(20, global_len=3)
  mask = dense_mask(masks.LocalMask(4), 20)
  out = ak.dense_attention(q, k, v, mask=mask, global_kv=(gk, gv))
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  keys = np.concatenate([k64, np.asarray(gk, np.float64)], axis=2)
  values = np.concatenate([v64, np.asarray(gv, np.float64)], axis=2)
  allowed = np.concatenate([mask, np.ones((20, 3), bool)], axis=1)
  scores = np.einsum('bhqd,bhkd->bhqk', q64, keys) / np.sqrt(q.shape[-1])
  scores = np.where(allowed, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  assert rel_err(out, np.einsum('bhqk,bhkd->bhqd', weights, values)) <= TOL


@pytest.mark.slow
def test_query_that_sees_nothing_outputs_zero_without_nan():
  # Queries 0..7 see no key (only queries >= 8 see keys >= 8).
  mask = masks.NotMask(masks.GlobalTokensMask(8)) & masks.LocalMask(3)
  n = 32
  (q, k, v), _ = random_inputs(n)
  fn = lambda q, k, v: ak.block_sparse_attention(q, k, v, mask=mask, block_size=8)
  out = jax.jit(fn)(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), (0, 1, 2))(q, k, v)
  assert not any(bool(jnp.isnan(x).any()) for x in [out, *grads])
  np.testing.assert_array_equal(np.asarray(out[:, :, :8]), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0][:, :, :8]), 0.0)
  ref = ak.dense_attention(q, k, v, mask=dense_mask(mask, n))
  assert rel_err(out, ref) <= TOL
  empty = ak.block_sparse_attention(q, k, v, mask=masks.EmptyMask(), block_size=8)
  np.testing.assert_array_equal(np.asarray(empty), 0.0)


def test_bfloat16_inputs_keep_float32_softmax():
  (q, k, v), global_kv = random_inputs(64, global_len=4)
  mask = masks.LocalMask(6)
  ref = ak.block_sparse_attention(q, k, v, mask=mask, block_size=16, global_kv=global_kv)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  low_global = tuple(x.astype(jnp.bfloat16) for x in global_kv)
  out = ak.block_sparse_attention(*low, mask=mask, block_size=16, global_kv=low_global)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, ref) < 3e-2  # bf16 inputs, not a broken softmax


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops']


def test_sparse_attention_really_skips_work():
  n, block, dim = 1024, 32, 64
  mask = masks.LocalMask(32)  # 3 of 32 tile columns per row: density 3/32 <= 1/8
  layout = bl.block_layout(mask, n, block)
  assert layout.density <= 1 / 8
  (q, k, v), _ = random_inputs(n, batch=1, heads=1, dim=dim)
  dense = _flops(lambda q, k, v: ak.dense_attention(q, k, v, mask=dense_mask(mask, n)), q, k, v)
  sparse = _flops(lambda q, k, v: ak.block_sparse_attention(
      q, k, v, mask=mask, block_size=block), q, k, v)
  assert sparse <= dense / 4, (sparse, dense)
  # Work follows the tiles: about density x dense, plus the mask arithmetic.
  assert sparse <= 1.6 * layout.density * dense, (sparse, dense, layout.summary())


def test_rows_taking_every_block_in_order_broadcast_instead_of_gathering():
  x = jnp.asarray(RNG.standard_normal((2, 3, 5, 4, 8)), jnp.float32)
  every = np.tile(np.arange(5, dtype=np.int32), (2, 1))  # [G=2, R=5]
  some = np.array([[4, 0, 2], [1, 1, 3]], np.int32)
  np.testing.assert_array_equal(ak._take_blocks(x, every), x[:, :, every])
  np.testing.assert_array_equal(ak._take_blocks(x, some), x[:, :, some])
  hlo = jax.jit(lambda x: ak._take_blocks(x, every)).lower(x).as_text()
  assert 'gather' not in hlo and 'broadcast' in hlo


@pytest.mark.parametrize('kernel', ['dense', 'block_sparse'])
def test_bad_arguments_are_named(kernel):
  """chex checks at the public boundary: the error names the argument."""
  (q, k, v), global_kv = random_inputs(32, 3, batch=2, heads=2, dim=8)

  def call(q, k, v, global_kv=None):
    if kernel == 'dense':
      return ak.dense_attention(q, k, v, global_kv=global_kv)
    return ak.block_sparse_attention(q, k, v, mask=masks.LocalMask(4), block_size=8,
                                     global_kv=global_kv)

  with pytest.raises(AssertionError, match=r'q must be \[batch, heads, tokens, dim\]'):
    call(q[0], k, v)
  with pytest.raises(AssertionError, match='k must be'):
    call(q, k[:, :, :, :4], v)
  with pytest.raises(AssertionError, match='v must be'):
    call(q, k, v[:1])
  with pytest.raises(AssertionError, match='floating point'):
    call(q, k, v.astype(jnp.int32))
  with pytest.raises(AssertionError, match=r'global_kv\[0\]'):
    call(q, k, v, (global_kv[0][..., :4], global_kv[1]))
  with pytest.raises(AssertionError, match=r'global_kv\[1\]'):
    call(q, k, v, (global_kv[0], global_kv[1][:, :, :2]))
  if kernel == 'block_sparse':  # tiles q, k and v alike: the same tokens
    with pytest.raises(AssertionError, match='k must be'):
      call(q, k[:, :, :16], v[:, :, :16])
