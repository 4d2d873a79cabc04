"""The NNX attention bottleneck against a NumPy transcription of Linformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lintunet_jax.attention import bottleneck as attention
from lintunet_jax.attention import masks
from lintunet_jax.attention import xla as attention_kernels

RNG = np.random.default_rng()


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _weights(layer):
  return {name: np.asarray(getattr(layer, name).kernel[...], np.float64)
          for name in ('to_q', 'to_k', 'to_v', 'to_out') if getattr(layer, name) is not None}


def _numpy_attention(layer, x, grid_width, dense_mask=None):
  """softmax over [allowed tokens ; Linformer summaries], per head."""
  w = _weights(layer)
  x = np.asarray(x, np.float64)
  n = x.shape[1]
  q, keys = x @ w['to_q'], x @ w['to_k']
  values = keys if layer.share_kv else x @ w['to_v']
  heads, d = layer.heads, layer.dim_head
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(keys), split(values)
  scores = np.einsum('bhqd,bhkd->bhqk', q, k) / np.sqrt(d)
  allowed = np.ones((n, n), bool) if dense_mask is None else dense_mask
  if layer.kind == 'linformer':
    allowed = np.zeros((n, n), bool)
  if layer.proj_k is not None:
    pk = np.asarray(layer.proj_k[...], np.float64)[:n]
    pv = pk if layer.share_kv else np.asarray(layer.proj_v[...], np.float64)[:n]
    gk = split(np.einsum('bnd,nk->bkd', keys, pk))
    gv = split(np.einsum('bnd,nk->bkd', values, pv))
    scores = np.concatenate([scores, np.einsum('bhqd,bhkd->bhqk', q, gk) / np.sqrt(d)], -1)
    allowed = np.concatenate([allowed, np.ones((n, gk.shape[2]), bool)], -1)
    v = np.concatenate([v, gv], axis=2)
  scores = np.where(allowed, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum('bhqk,bhkd->bhqd', p, v).transpose(0, 2, 1, 3).reshape(x.shape[0], n, -1)
  return out @ w['to_out'] + np.asarray(layer.to_out.bias[...], np.float64)


@pytest.mark.parametrize('kind, kernel', [  # the kernel only concerns the sparse kinds
    (kind, kernel) for kind in attention.KINDS
    for kernel in (('xla', 'pallas') if 'sparse' in kind else ('xla',))])
@pytest.mark.parametrize('heads, share_kv', [(1, False), (2, True)])
def test_each_kind_matches_numpy(kind, kernel, heads, share_kv):
  grid, dim = 6, 16
  pattern = masks.Local2DMask(1) | masks.GlobalTokensMask(1)
  layer = attention.EfficientSelfAttention(
      dim, kind=kind, heads=heads, seq_len=64, k=8, share_kv=share_kv,
      pattern=pattern, block_size=8, kernel=kernel,
      rngs=nnx.Rngs(int(RNG.integers(1 << 30))))
  x = jnp.asarray(RNG.standard_normal((2, grid * grid, dim)), jnp.float32)
  bound = masks.bind_grid(pattern, grid)
  idx = np.arange(grid * grid)
  dense_mask = np.asarray(bound(idx[:, None], idx[None]), bool) if 'sparse' in kind else None
  # Off GPU the Pallas kernels run only when interpretation is asked for.
  interpret = None if jax.default_backend() == 'gpu' else True
  with attention_kernels.schedule(pallas_interpret=interpret):
    out = nnx.jit(lambda m, x: m(x, grid))(layer, x)
  assert _rel_err(out, _numpy_attention(layer, x, grid, dense_mask)) <= 1e-5


def test_linformer_uses_first_rows_for_short_sequences_and_rejects_long_ones():
  layer = attention.EfficientSelfAttention(8, kind='linformer', seq_len=16, k=4,
                                           rngs=nnx.Rngs(0))
  x = jnp.asarray(RNG.standard_normal((1, 9, 8)), jnp.float32)
  assert _rel_err(layer(x, 3), _numpy_attention(layer, x, 3)) <= 1e-5
  with pytest.raises(ValueError, match='exceed the Linformer seq_len=16'):
    layer(jnp.ones((1, 25, 8)), 5)


def test_projection_init_matches_linformer_package_bounds():
  layer = attention.EfficientSelfAttention(8, kind='linformer', seq_len=300, k=64,
                                           rngs=nnx.Rngs(0))
  proj = np.asarray(layer.proj_k[...])
  assert proj.shape == (300, 64)
  assert np.abs(proj).max() <= 64 ** -0.5 and np.abs(proj).max() > 0.9 * 64 ** -0.5


def test_bottleneck_is_pre_norm_residual_with_exact_gelu():
  dim, grid = 8, 4
  block = attention.AttentionBottleneck(dim, depth=2, kind='dense', seq_len=16, k=4,
                                        rngs=nnx.Rngs(3))
  x = jnp.asarray(RNG.standard_normal((2, grid, grid, dim)), jnp.float32)
  tokens = np.asarray(x, np.float64).reshape(2, grid * grid, dim)

  def layer_norm(t, ln):
    mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
    return ((t - mu) / np.sqrt(var + 1e-5) * np.asarray(ln.scale[...])
            + np.asarray(ln.bias[...]))

  from scipy.special import erf  # noqa: PLC0415 (scipy ships with scikit-learn)
  for layer in block.layers:
    tokens = tokens + _numpy_attention(layer.attn, layer_norm(tokens, layer.attn_norm), grid)
    h = layer_norm(tokens, layer.ff_norm)
    h = h @ np.asarray(layer.ff.w1.kernel[...]) + np.asarray(layer.ff.w1.bias[...])
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    tokens = tokens + h @ np.asarray(layer.ff.w2.kernel[...]) + np.asarray(layer.ff.w2.bias[...])
  out = block(x)
  assert out.shape == x.shape
  assert _rel_err(out, tokens.reshape(x.shape)) <= 1e-5


def test_unknown_kind_and_missing_pattern_are_rejected():
  with pytest.raises(ValueError, match='not one of'):
    attention.EfficientSelfAttention(8, kind='performer', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='needs a sparse pattern'):
    attention.EfficientSelfAttention(8, kind='block_sparse', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='unknown attention kernel'):
    attention.EfficientSelfAttention(8, kind='block_sparse', pattern=masks.LocalMask(2),
                                     kernel='cuda', rngs=nnx.Rngs(0))
