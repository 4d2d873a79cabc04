"""Attention dropout drops attention probabilities (issue 16, item 8).

Where lucidrains' `linformer` package (the seed's) puts it:
`attn = dropout(softmax(dots)); out = attn @ values`, with the normaliser
of the undropped probabilities. The keep mask a kernel draws is read back
by attending to identity values (the output row of query i is then its
dropped probabilities, P_ij / (1 - rate) or 0); a fresh draw with the same
key and shapes draws the same mask, against which outputs and gradients
are compared with an independent softmax reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lintunet_jax.attention import bottleneck as attention
from lintunet_jax.attention import masks
from lintunet_jax.attention import xla as ak
from tests.attention.attention_testutil import RNG, dense_mask, rel_err

RATE = 0.3
TOL = 1e-5


def _softmax(q, k, allowed):
  """float64 softmax(q k^T / sqrt(d)) over allowed keys (numpy)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  scores = np.einsum('bhqd,bhkd->bhqk', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(allowed, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _normal(*shape):
  return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _identity_values(b, h, n, g):
  """Local values [I_n, 0] and global values [0, I_g], width n + g."""
  eye = np.eye(n + g, dtype=np.float32)
  tile = lambda a: jnp.asarray(np.broadcast_to(a, (b, h) + a.shape))
  return tile(eye[:n]), tile(eye[n:])


def _check_dropped(dropped, p):
  """Every probability is kept and scaled by 1/(1-rate), or dropped to 0;
  about `rate` of the allowed ones are dropped. Returns the keep mask."""
  keep = np.abs(np.asarray(dropped)) > 0
  np.testing.assert_allclose(np.where(keep, dropped, 0.0),
                             np.where(keep, p / (1 - RATE), 0.0), rtol=1e-4, atol=1e-7)
  assert not (keep & (p == 0)).any()
  share = 1 - keep[p > 0].mean()
  assert abs(share - RATE) < 0.05, share
  return keep


def _reference(q, k, v, gk, gv, allowed, keep):
  """jnp: (softmax * keep / (1 - rate)) @ values; differentiable."""
  keys, values = jnp.concatenate([k, gk], 2), jnp.concatenate([v, gv], 2)
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, keys) / np.sqrt(q.shape[-1])
  p = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
  return jnp.einsum('bhqk,bhkd->bhqd', jnp.where(keep, p / (1 - RATE), 0.0), values)


@pytest.mark.parametrize('kernel', ['dense', 'block_sparse', 'block_sparse_chunked'])
def test_kernels_drop_attention_probabilities(kernel):
  b, h, n, g, block = 2, 2, 40, 3, 8
  d = n + g  # identity values need n + g columns; q and k share the width
  mask = masks.LocalMask(6) | masks.GlobalTokensMask(1)
  allowed = np.concatenate([dense_mask(mask, n), np.ones((n, g), bool)], 1)
  key = jax.random.key(int(RNG.integers(1 << 30)))

  def attend(q, k, v, gk, gv):
    if kernel == 'dense':
      return ak.dense_attention(q, k, v, mask=dense_mask(mask, n), global_kv=(gk, gv),
                                dropout=RATE, dropout_rng=key)
    return ak.block_sparse_attention(q, k, v, mask=mask, block_size=block,
                                     global_kv=(gk, gv), dropout=RATE, dropout_rng=key)

  with ak.chunking(1 if kernel.endswith('chunked') else None):
    q, k, gk = _normal(b, h, n, d), _normal(b, h, n, d), _normal(b, h, g, d)
    v_eye, gv_eye = _identity_values(b, h, n, g)
    dropped = jax.jit(attend)(q, k, v_eye, gk, gv_eye)
    keep = _check_dropped(dropped, _softmax(q, jnp.concatenate([k, gk], 2), allowed))
    # Any values, same key and shapes: the same mask, dropped as the reference.
    args = [_normal(b, h, n, d), _normal(b, h, n, d), _normal(b, h, n, d),
            _normal(b, h, g, d), _normal(b, h, g, d)]
    out = jax.jit(attend)(*args)
    cot = _normal(b, h, n, d)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * cot)
    grads = jax.jit(jax.grad(loss(attend), range(5)))(*args)
  ref_fn = lambda *a: _reference(*a, allowed, keep)
  assert rel_err(out, ref_fn(*args)) <= TOL
  for got, want in zip(grads, jax.grad(loss(ref_fn), range(5))(*args)):
    assert rel_err(got, want) <= TOL


def test_without_a_key_or_on_pallas_dropout_is_a_clear_error():
  q = _normal(1, 1, 16, 4)
  with pytest.raises(ValueError, match='needs a dropout_rng'):
    ak.dense_attention(q, q, q, dropout=0.1)
  with ak.schedule(kernel='pallas'), pytest.raises(ValueError, match="'xla' kernel only"):
    ak.block_sparse_attention(q, q, q, mask=masks.LocalMask(2), block_size=8,
                              dropout=0.1, dropout_rng=jax.random.key(0))


def test_the_layer_drops_where_the_linformer_package_does():
  """TransformerLayer(kind='linformer') in training mode against the
  package's layer written out in numpy: x + to_out(dropout(softmax) @ V),
  then the feed-forward (its dropout off here). Dropping the attention
  block's output instead (the code before issue 16) fails this."""
  dim, heads, grid, k = 16, 2, 4, 8
  n, dh = grid * grid, dim // heads
  layer = attention.TransformerLayer(
      dim, ff_mult=2, dropout=RATE, dtype=jnp.float32, kind='linformer',
      heads=heads, seq_len=n, k=k, rngs=nnx.Rngs(int(RNG.integers(1 << 30))))
  layer.train()
  layer.ff.dropout.deterministic = True
  x = _normal(2, n, dim)
  key = nnx.clone(layer).attn.dropout.rngs()  # the key the call will draw
  out = layer(x, grid)

  # The mask that key draws for [batch, heads, n, k] probabilities.
  w = lambda m: np.asarray(m[...], np.float64)
  eye = jnp.asarray(np.broadcast_to(np.eye(k, dtype=np.float32), (2, heads, k, k)))
  probe = ak.dense_attention(_normal(2, heads, n, k), _normal(2, heads, k, k), eye,
                             dropout=RATE, dropout_rng=key)
  keep = np.asarray(probe) != 0

  def layer_norm(t, ln):
    mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
    return (t - mu) / np.sqrt(var + 1e-5) * w(ln.scale) + w(ln.bias)

  a = layer.attn
  t = layer_norm(np.asarray(x, np.float64), layer.attn_norm)
  split = lambda z: z.reshape(2, -1, heads, dh).transpose(0, 2, 1, 3)
  keys, values = t @ w(a.to_k.kernel), t @ w(a.to_v.kernel)
  gk = split(np.einsum('bnd,nk->bkd', keys, w(a.proj_k)))
  gv = split(np.einsum('bnd,nk->bkd', values, w(a.proj_v)))
  p = _softmax(split(t @ w(a.to_q.kernel)), gk, True)
  attended = np.einsum('bhqk,bhkd->bhqd', np.where(keep, p / (1 - RATE), 0.0), gv)
  attended = attended.transpose(0, 2, 1, 3).reshape(2, n, dim)
  y = np.asarray(x, np.float64) + attended @ w(a.to_out.kernel) + w(a.to_out.bias)
  from scipy.special import erf  # noqa: PLC0415 (scipy ships with scikit-learn)
  hid = layer_norm(y, layer.ff_norm) @ w(layer.ff.w1.kernel) + w(layer.ff.w1.bias)
  hid = 0.5 * hid * (1 + erf(hid / np.sqrt(2)))
  want = y + hid @ w(layer.ff.w2.kernel) + w(layer.ff.w2.bias)
  assert rel_err(out, want) <= TOL
  layer.eval()  # and no dropout at inference
  assert rel_err(layer(x, grid), layer(x, grid)) == 0
