"""The efficient-attention bottleneck of LinTUNet (Flax NNX modules).

Mirrors the seed's `linformer.Linformer` (lucidrains' package) block for
block: pre-LayerNorm attention and feed-forward with residuals, exact GELU,
LayerNorm epsilon 1e-5, Linformer projections `proj_k` / `proj_v` of shape
[seq_len, k] initialised U(+-1/sqrt(k)), no final norm, and dropout where
the package puts it: on the attention probabilities (inside the kernels,
for every kind) and after the feed-forward's GELU, none on the residual
branches. With
kind='linformer' and the seed's sizes it has the seed's parameter count, and
`convert_torch` maps the seed's weights one to one.

`kind` chooses which keys a query sees:
  dense                   all n tokens                      O(n^2)
  linformer               the k projected summaries         O(n k)
  block_sparse            the tokens the pattern allows     O(nonempty tiles)
  linformer_block_sparse  both, in one softmax (LinTUNet)   O(n k + tiles)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lintunet_jax.attention import xla as attention_kernels
from lintunet_jax.attention import masks as masks_lib

KINDS = ('dense', 'linformer', 'block_sparse', 'linformer_block_sparse')
LAYER_NORM_EPSILON = 1e-5  # PyTorch's default, which the seed used


def _uses_linformer(kind: str) -> bool:
  return kind in ('linformer', 'linformer_block_sparse')


def _uses_pattern(kind: str) -> bool:
  return kind in ('block_sparse', 'linformer_block_sparse')


def _projection_init(key, shape, dtype=jnp.float32):
  """U(-1/sqrt(k), 1/sqrt(k)) as in the linformer package's `init_`."""
  bound = shape[-1] ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class EfficientSelfAttention(nnx.Module):
  """Multi-head self-attention over image tokens, of any of the four kinds."""

  def __init__(self, dim: int, *, kind: str = 'linformer_block_sparse',
               heads: int = 1, dim_head: int | None = None, seq_len: int = 256,
               k: int = 64, share_kv: bool = False,
               pattern: masks_lib.Mask | None = None, block_size: int = 16,
               kernel: str = 'auto', dropout: float = 0.0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if kind not in KINDS:
      raise ValueError(f'attention kind {kind!r} is not one of {KINDS}')
    if _uses_pattern(kind) and pattern is None:
      raise ValueError(f'attention kind {kind!r} needs a sparse pattern')
    dim_head = dim_head or dim // heads
    inner = heads * dim_head
    self.kind, self.heads, self.dim_head = kind, heads, dim_head
    self.seq_len, self.share_kv = seq_len, share_kv
    self.pattern, self.block_size, self.dtype = pattern, block_size, dtype
    self.kernel = attention_kernels.Schedule(kernel=kernel).kernel  # validated
    linear = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.to_q = nnx.Linear(dim, inner, **linear)
    self.to_k = nnx.Linear(dim, inner, **linear)
    self.to_v = nnx.data(None if share_kv else nnx.Linear(dim, inner, **linear))
    self.proj_k = nnx.data(None)
    self.proj_v = nnx.data(None)
    if _uses_linformer(kind):
      self.proj_k = nnx.Param(_projection_init(rngs.params(), (seq_len, k)))
      if not share_kv:
        self.proj_v = nnx.Param(_projection_init(rngs.params(), (seq_len, k)))
    self.to_out = nnx.Linear(inner, dim, dtype=dtype, param_dtype=jnp.float32,
                             rngs=rngs)
    # Holds the rate, the train/eval switch (model.train()/eval()) and the
    # RNG stream of the kernels' dropout on attention probabilities.
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def _dropout_args(self) -> dict:
    if not self.dropout.rate or self.dropout.deterministic:
      return {}
    return dict(dropout=self.dropout.rate, dropout_rng=self.dropout.rngs())

  def _split_heads(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    return x.reshape(b, n, self.heads, self.dim_head).transpose(0, 2, 1, 3)

  def _linformer_summaries(self, keys: jax.Array, values: jax.Array):
    """Projects n tokens to k along the sequence; shorter inputs use the
    first n rows of the projections (the linformer package's convention)."""
    n = keys.shape[1]
    if n > self.seq_len:
      raise ValueError(
          f'{n} tokens exceed the Linformer seq_len={self.seq_len}; set '
          f'model.attention.seq_len >= (input size / 16)**2 = {n} (input '
          'size: dataset.patch_size if set, else dataset.image_size)')
    proj_k = self.proj_k[...][:n].astype(keys.dtype)
    proj_v = proj_k if self.share_kv else self.proj_v[...][:n].astype(keys.dtype)
    gk = jnp.einsum('bnd,nk->bkd', keys, proj_k)
    gv = jnp.einsum('bnd,nk->bkd', values, proj_v)
    return self._split_heads(gk), self._split_heads(gv)

  def __call__(self, x: jax.Array, grid_width: int) -> jax.Array:
    """x: [B, n, dim] row-major tokens of a grid `grid_width` wide."""
    x = x.astype(self.dtype)
    keys = self.to_k(x)
    values = keys if self.share_kv else self.to_v(x)
    q = self._split_heads(self.to_q(x))
    global_kv = (self._linformer_summaries(keys, values)
                 if _uses_linformer(self.kind) else None)
    drop = self._dropout_args()
    if self.kind == 'dense':
      out = attention_kernels.dense_attention(
          q, self._split_heads(keys), self._split_heads(values), **drop)
    elif self.kind == 'linformer':
      out = attention_kernels.dense_attention(q, *global_kv, **drop)
    else:
      with attention_kernels.schedule(kernel=self.kernel):
        out = attention_kernels.block_sparse_attention(
            q, self._split_heads(keys), self._split_heads(values),
            mask=masks_lib.bind_grid(self.pattern, grid_width),
            block_size=self.block_size, global_kv=global_kv, **drop)
    b, _, n, _ = out.shape
    out = out.transpose(0, 2, 1, 3).reshape(b, n, self.heads * self.dim_head)
    return self.to_out(out)


class FeedForward(nnx.Module):
  """dim -> mult*dim -> dim with exact (erf) GELU, as torch.nn.GELU()."""

  def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.w1 = nnx.Linear(dim, dim * mult, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.w2 = nnx.Linear(dim * mult, dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w2(self.dropout(jax.nn.gelu(self.w1(x), approximate=False)))


class TransformerLayer(nnx.Module):
  """x + Attn(LN(x)), then x + FF(LN(x))."""

  def __init__(self, dim: int, *, ff_mult: int, dropout: float, dtype,
               rngs: nnx.Rngs, **attention_kwargs):
    norm = dict(epsilon=LAYER_NORM_EPSILON, dtype=jnp.float32,
                param_dtype=jnp.float32, rngs=rngs)
    self.attn_norm = nnx.LayerNorm(dim, **norm)
    self.attn = EfficientSelfAttention(dim, dropout=dropout, dtype=dtype,
                                       rngs=rngs, **attention_kwargs)
    self.ff_norm = nnx.LayerNorm(dim, **norm)
    self.ff = FeedForward(dim, mult=ff_mult, dropout=dropout, dtype=dtype,
                          rngs=rngs)

  def __call__(self, x: jax.Array, grid_width: int) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), grid_width)
    return x + self.ff(self.ff_norm(x))


class AttentionBottleneck(nnx.Module):
  """Attention over the flattened H x W feature grid, back to NHWC."""

  def __init__(self, dim: int, *, depth: int = 1, ff_mult: int = 4,
               dropout: float = 0.0, dtype=jnp.float32, rngs: nnx.Rngs,
               **attention_kwargs):
    self.layers = nnx.List([
        TransformerLayer(dim, ff_mult=ff_mult, dropout=dropout, dtype=dtype,
                         rngs=rngs, **attention_kwargs) for _ in range(depth)])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c).astype(jnp.float32)
    for layer in self.layers:
      tokens = layer(tokens, grid_width=w)
    return tokens.reshape(b, h, w, c).astype(x.dtype)
