"""Attention kernels as pure functions on [batch, heads, tokens, dim] arrays.

Two implementations of the same maths:

* `dense_attention`: the reference. Materialises the full n x n scores.
* `block_sparse_attention`: computes only the non-empty tiles of a
  `block_layout`, gathering for each query block just the key/value blocks
  it may see, so FLOPs and memory grow with the number of non-empty tiles.

Both accept `global_kv`: extra keys/values every query sees (Linformer's k
projected summaries). They enter the SAME softmax as the masked keys, which
is the union of global and local attention of the Long-Short Transformer.

Softmax runs in float32 whatever the input dtype. A query that may see no
key at all (possible with sparse patterns and no global keys) gets an
all-zero output and zero gradients, never NaN: its normaliser is zero, and
we divide by one instead.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lintunet_jax import block_layout as layout_lib
from lintunet_jax import masks as masks_lib

GlobalKV = Optional[tuple[jax.Array, jax.Array]]  # ([B,H,k,D], [B,H,k,D])


def _masked_softmax_weights(scores: jax.Array, allowed: jax.Array | None):
  """Unnormalised exp-weights and their row sums, stable and NaN-free.

  scores: float32 [..., keys]. allowed: bool broadcastable to scores, or None.
  """
  if allowed is not None:
    scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  row_max = jax.lax.stop_gradient(row_max)
  weights = jnp.exp(scores - row_max)  # exp(-inf) = 0 for masked keys
  return weights, jnp.sum(weights, axis=-1, keepdims=True)


def _normalise(out: jax.Array, denom: jax.Array) -> jax.Array:
  return out / jnp.where(denom > 0, denom, 1.0)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    mask: jax.Array | None = None,
                    global_kv: GlobalKV = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over all keys allowed by a boolean mask.

  q, k, v: [B, H, n, D]; mask: bool [n, n] (query, key) or None for all.
  """
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k,
                      preferred_element_type=jnp.float32) * scale
  allowed = None if mask is None else jnp.asarray(mask, bool)
  values = v
  if global_kv is not None:
    gk, gv = global_kv
    global_scores = jnp.einsum('bhqd,bhkd->bhqk', q, gk,
                               preferred_element_type=jnp.float32) * scale
    scores = jnp.concatenate([scores, global_scores], axis=-1)
    if allowed is not None:
      allowed = jnp.concatenate(
          [allowed, jnp.ones(allowed.shape[:-1] + (gk.shape[-2],), bool)], -1)
    values = jnp.concatenate([v, gv], axis=-2)
  weights, denom = _masked_softmax_weights(scores, allowed)
  out = jnp.einsum('bhqk,bhkd->bhqd', weights.astype(v.dtype), values,
                   preferred_element_type=jnp.float32)
  return _normalise(out, denom).astype(q.dtype)


def _pad_tokens(x: jax.Array, length: int) -> jax.Array:
  pad = length - x.shape[2]
  return x if pad == 0 else jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))


def _group_attention(qb, kb, vb, group: layout_lib.TileGroup,
                     layout: layout_lib.BlockLayout, mask: masks_lib.Mask,
                     global_kv: GlobalKV, scale: float) -> jax.Array:
  """Attention for one tile group; returns [B, H, G, block_q, D]."""
  bq, bkv = layout.block_q, layout.block_kv
  q_blocks = jnp.asarray(group.q_blocks)
  kv_blocks = jnp.asarray(group.kv_blocks)
  qg = qb[:, :, q_blocks]  # [B,H,G,bq,D]
  kg = kb[:, :, kv_blocks]  # [B,H,G,R,bkv,D]
  vg = vb[:, :, kv_blocks]
  scores = jnp.einsum('bhgqd,bhgrkd->bhgqrk', qg, kg,
                      preferred_element_type=jnp.float32) * scale
  # Element mask from indices (iota), no n x n constant: FULL tiles pass
  # unconditionally, PADDING tiles never, PARTIAL tiles ask the mask.
  q_idx = group.q_blocks[:, None] * bq + jnp.arange(bq)  # [G,bq]
  kv_idx = kv_blocks[..., None] * bkv + jnp.arange(bkv)  # [G,R,bkv]
  state = jnp.asarray(group.tile_state)[:, None, :, None]  # [G,1,R,1]
  element = mask(q_idx[:, :, None, None], kv_idx[:, None]) & (
      kv_idx[:, None] < layout.seq_len)
  allowed = (state == layout_lib.FULL) | ((state == layout_lib.PARTIAL) & element)
  G, R = group.kv_blocks.shape
  scores = scores.reshape(scores.shape[:4] + (R * bkv,))
  allowed = allowed.reshape(G, bq, R * bkv)
  values = vg.reshape(vg.shape[:3] + (R * bkv, vg.shape[-1]))
  local_keys = R * bkv
  if global_kv is not None:
    gk, gv = global_kv
    global_scores = jnp.einsum('bhgqd,bhkd->bhgqk', qg, gk,
                               preferred_element_type=jnp.float32) * scale
    scores = jnp.concatenate([scores, global_scores], axis=-1)
    allowed = jnp.concatenate(
        [allowed, jnp.ones((G, bq, gk.shape[-2]), bool)], axis=-1)
  weights, denom = _masked_softmax_weights(scores, allowed)
  weights = weights.astype(values.dtype)
  out = jnp.einsum('bhgqk,bhgkd->bhgqd', weights[..., :local_keys], values,
                   preferred_element_type=jnp.float32)
  if global_kv is not None:  # the global values are shared by every group row
    out += jnp.einsum('bhgqk,bhkd->bhgqd', weights[..., local_keys:], gv,
                      preferred_element_type=jnp.float32)
  return _normalise(out, denom)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           mask: masks_lib.Mask, block_size: int,
                           global_kv: GlobalKV = None) -> jax.Array:
  """Attention restricted to `mask`, computing only non-empty tiles.

  q, k, v: [B, H, n, D]. The layout is derived from `mask` at trace time
  (cached), so `mask` must be a `masks.Mask`, not an array.
  """
  n = q.shape[2]
  block = min(block_size, n)
  layout = layout_lib.block_layout(mask, n, block, block)
  length = layout.padded_len
  scale = q.shape[-1] ** -0.5

  def blocks(x):
    x = _pad_tokens(x, length)
    return x.reshape(x.shape[:2] + (length // block, block, x.shape[-1]))

  qb, kb, vb = blocks(q), blocks(k), blocks(v)
  out = jnp.zeros(qb.shape, jnp.float32)
  for group in layout.groups:  # a handful of static groups, not tokens
    if group.kv_blocks.shape[1] == 0 and global_kv is None:
      continue  # these queries see nothing: output stays zero
    group_out = _group_attention(qb, kb, vb, group, layout, mask, global_kv, scale)
    out = out.at[:, :, jnp.asarray(group.q_blocks)].set(group_out)
  out = out.reshape(out.shape[:2] + (length, out.shape[-1]))[:, :, :n]
  return out.astype(q.dtype)
