"""The fused Pallas block-sparse kernels (interpret mode on CPU) against dense
masked softmax on fresh random inputs: forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lintunet_jax.attention import xla as ak
from lintunet_jax.attention import layout as bl
from lintunet_jax.attention import masks
from lintunet_jax.attention import pallas as pa
from tests.attention.attention_testutil import RNG, dense_mask, random_inputs, rel_err

TOL = 1e-5

PATTERNS = {
    'local_1d': masks.LocalMask(5),
    'global_tokens': masks.GlobalTokensMask(2) | masks.LocalMask(3),
    'local_2d': masks.Local2DMask(1),
    'strided': masks.StridedMask(7),
    'sees_nothing': masks.NotMask(masks.GlobalTokensMask(8)) & masks.LocalMask(3),
}


def _case(name, n):
  return masks.bind_grid(PATTERNS[name], grid_width=int(np.sqrt(n)))


def _pallas(q, k, v, global_kv, mask, block):
  with ak.schedule(kernel='pallas', pallas_interpret=True):  # explicitly
    return ak.block_sparse_attention(q, k, v, mask=mask, block_size=block,
                                     global_kv=global_kv)


@pytest.mark.parametrize('name', sorted(PATTERNS))
@pytest.mark.parametrize('global_len', [0, 5], ids=['sparse', 'linformer_sparse'])
def test_forward_and_gradients_match_dense(name, global_len):
  n, block = 81, 16  # 81 tokens: the last block is padding
  mask = _case(name, n)
  (q, k, v, cotangent), global_kv = random_inputs(n, global_len=global_len, count=4)
  allowed = dense_mask(mask, n)

  def loss(fn):
    return lambda *args: jnp.sum(fn(*args) * cotangent)

  dense = lambda q, k, v, g: ak.dense_attention(q, k, v, mask=allowed, global_kv=g)
  fused = lambda q, k, v, g: _pallas(q, k, v, g, mask, block)
  out, ref = jax.jit(fused)(q, k, v, global_kv), dense(q, k, v, global_kv)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert rel_err(out, ref) <= TOL
  argnums = (0, 1, 2, 3) if global_kv else (0, 1, 2)
  grads = jax.jit(jax.grad(loss(fused), argnums))(q, k, v, global_kv)
  refs = jax.grad(loss(dense), argnums)(q, k, v, global_kv)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(refs)):
    assert np.all(np.isfinite(np.asarray(got)))
    assert rel_err(got, want) <= TOL


def test_rectangular_tiles_and_the_xla_kernel_agree():
  n = 64
  mask = _case('local_2d', n)
  (q, k, v), _ = random_inputs(n, batch=1, heads=3, dim=12)
  xla = ak.block_sparse_attention(q, k, v, mask=mask, block_size=8)
  with ak.schedule(kernel='pallas', query_block=16, pallas_interpret=True):  # 16x8 tiles
    fused = ak.block_sparse_attention(q, k, v, mask=mask, block_size=8)
  assert rel_err(fused, xla) <= TOL


def test_bfloat16_inputs_keep_float32_softmax_and_gradients():
  n = 64
  mask = masks.LocalMask(6)
  (q, k, v, cotangent), global_kv = random_inputs(n, global_len=4, count=4)
  low = lambda xs: tuple(x.astype(jnp.bfloat16) for x in xs)
  loss = lambda q, k, v, g: jnp.sum(_pallas(q, k, v, g, mask, 16).astype(jnp.float32) * cotangent)
  ref_out = ak.dense_attention(q, k, v, mask=dense_mask(mask, n), global_kv=global_kv)
  out = _pallas(*low((q, k, v)), low(global_kv), mask, 16)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, ref_out) < 3e-2  # bf16 inputs, not a broken softmax
  grads = jax.grad(loss, (0, 1, 2, 3))(*low((q, k, v)), low(global_kv))
  refs = jax.grad(loss, (0, 1, 2, 3))(q, k, v, global_kv)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(refs)):
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, want) < 5e-2


def test_tables_list_exactly_the_nonempty_tiles():
  tiles = RNG.choice([bl.EMPTY, bl.PARTIAL, bl.FULL], size=(7, 5)).astype(np.int8)
  tables = pa._tables(tiles)
  for row in range(7):
    count = tables.count[row]
    np.testing.assert_array_equal(tables.index[row, :count], np.flatnonzero(tiles[row]))
    np.testing.assert_array_equal(tables.state[row, :count], tiles[row][tiles[row] != 0])


def test_unknown_kernel_and_compiling_off_gpu_are_clear_errors():
  with pytest.raises(ValueError, match='unknown attention kernel'):
    ak.Schedule(kernel='triton')
  if jax.default_backend() == 'cpu':
    (q, k, v), _ = random_inputs(32, batch=1, heads=1)
    layout = bl.block_layout(masks.LocalMask(3), 32, 16)
    with pytest.raises(ValueError, match='Only interpret mode'):
      pa.block_sparse_attention(q, k, v, layout=layout, mask=masks.LocalMask(3),
                                scale=1.0, interpret=False)


def test_pallas_off_gpu_is_refused_unless_interpretation_is_explicit():
  """Asked for without `pallas_interpret`, the Pallas kernel must compile;
  off GPU that is an error naming the override, never a silent fall-back
  to the (very slow) interpreter."""
  if jax.default_backend() == 'gpu':
    pytest.skip('the kernels compile on GPUs')
  (q, k, v), _ = random_inputs(32, batch=1, heads=1)
  mask = masks.LocalMask(3)
  with ak.schedule(kernel='pallas'):
    with pytest.raises(ak.KernelUnavailableError,
                       match='--config.model.attention.kernel=xla'):
      ak.block_sparse_attention(q, k, v, mask=mask, block_size=16)
  with pytest.raises(ak.KernelUnavailableError, match="kernel='pallas' needs a GPU"):
    ak.check_kernel('pallas')
  ak.check_kernel('xla')


@pytest.mark.parametrize('pattern, n, num_global', [
    ('global_tokens(num=16) | local_2d(radius=2)', 256, 64),
    ('local_2d(radius=1)', 400, 0),  # 25 blocks, uneven table widths
])
def test_kernels_lower_to_triton_for_cuda_without_a_gpu(pattern, n, num_global):
  """Cross-platform lowering runs Pallas' Triton lowering (shape and op
  checks) here; only the final PTX compile needs a GPU."""
  dim, block = 64, 16
  mask = masks.bind_grid(masks.parse_pattern(pattern), int(np.sqrt(n)))
  layout = bl.block_layout(mask, n, block)
  spec = pa._Spec(mask, n, block, block, dim ** -0.5, num_global, interpret=False)
  q_tables, kv_tables = pa._layout_tables(layout)
  x = jax.ShapeDtypeStruct((2, n, dim), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((2, num_global, dim), jnp.bfloat16) if num_global else None
  stats = jax.ShapeDtypeStruct((2, n), jnp.float32)
  forward = jax.jit(lambda q, k, v, gk, gv: pa._forward(spec, q_tables, q, k, v, gk, gv))
  backward = jax.jit(lambda q, k, v, o, lse, do: pa._backward(
      spec, q_tables, kv_tables, q, k, v, o, lse, do))
  for lowered in (forward.trace(x, x, x, g, g).lower(lowering_platforms=('cuda',)),
                  backward.trace(x, x, x, x, stats, x).lower(lowering_platforms=('cuda',))):
    assert 'xla.gpu.triton' in lowered.as_text()


@pytest.mark.parametrize('backend, block, n, want', [
    ('gpu', 16, 256, 'pallas'),    # the H200-measured case: Pallas on GPUs
    ('gpu', 32, 1024, 'pallas'),
    ('gpu', 4, 64, 'xla'),         # tiles below Triton's smallest dot edge
    ('gpu', 24, 576, 'xla'),       # not a power of two
    ('cpu', 16, 256, 'xla'),       # Pallas only interprets off GPU
    ('tpu', 16, 256, 'xla'),       # (the Triton kernels are not TPU kernels)
])
def test_auto_picks_pallas_only_on_gpus_with_tiles_it_compiles(backend, block, n, want):
  mask = masks.bind_grid(masks.parse_pattern('local_2d(radius=1)'), int(np.sqrt(n)))
  layout = bl.block_layout(mask, n, block)
  assert ak.resolve_kernel('auto', layout, backend) == want
  assert ak.resolve_kernel('xla', layout, backend) == 'xla'
  assert ak.resolve_kernel('pallas', layout, backend) == 'pallas'


def test_auto_is_the_default_and_runs_the_xla_kernel_off_gpu():
  """Off GPU the default schedule must never reach the Pallas code (which
  would raise KernelUnavailableError): same result as kernel='xla'."""
  if jax.default_backend() == 'gpu':
    pytest.skip('on GPUs auto picks Pallas')
  assert ak.Schedule().kernel == 'auto'
  n = 64
  mask = masks.bind_grid(masks.parse_pattern('local_2d(radius=1)'), 8)
  (q, k, v), global_kv = random_inputs(n, global_len=4)
  auto = ak.block_sparse_attention(q, k, v, mask=mask, block_size=16, global_kv=global_kv)
  with ak.schedule(kernel='xla'):
    xla = ak.block_sparse_attention(q, k, v, mask=mask, block_size=16, global_kv=global_kv)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
