"""Block-sparse attention as fused Pallas kernels (GPU), FlashAttention-style.

Why a second implementation: `xla.block_sparse_attention`
expresses the sparse maths with XLA ops, so every gathered key tile, every
score tile and every probability tile is written to and read back from
memory, and the forward keeps the probabilities for the backward. On a GPU a
fused kernel can instead stream each query block's key tiles through on-chip
memory with an online softmax, keep only the log-sum-exp per query, and
recompute probabilities in the backward (FlashAttention-2's schedule),
which is where XLA is expected to leave speed on the table.

The sparsity is the same `BlockLayout`: each query block walks only its
non-empty key tiles (a table of tile indices and states built once at trace
time, with a per-row count so rows loop exactly as far as they need); FULL
tiles skip the element mask, PARTIAL tiles evaluate the mask function on
iota indices inside the kernel. The backward is two kernels: dQ walks the
same query-major table, dK/dV walk the key-major one (`BlockLayout.tiles`
by column), so nothing is scattered or added atomically. Linformer's global
keys (`global_kv`) join the same softmax inside the forward kernel; their
backward is small dense XLA maths.

Status: correctness is tested on CPU in Pallas interpret mode against the
dense reference (tests/attention/test_pallas.py) and was checked on an H200
by benchmarks/accelerator_suite.py (f32 and bf16, output and gradients),
where it ran 2-4x faster than the XLA ops on local patterns; so
`kernel='auto'` (the default) picks it on GPUs (`xla.resolve_kernel`;
benchmarks/NOTES.md item 21).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lintunet_jax.attention import layout as layout_lib
from lintunet_jax.attention import masks as masks_lib

# A finite "minus infinity" for masked scores: keeps max/exp free of
# inf - inf; masked probabilities are zeroed explicitly anyway.
_MASKED = -0.7 * float(np.finfo(np.float32).max)
MIN_TILE = 16  # smallest dot operand edge the GPU lowering accepts


@dataclasses.dataclass(frozen=True)
class _Tables:
  """Per-row lists of the non-empty tiles of a layout, padded to one width.

  count: int32 [rows]        how many entries of row r are real.
  index: int32 [rows, width] the other axis' block of each tile.
  state: int32 [rows, width] PARTIAL or FULL (PADDING after `count`).
  """

  count: np.ndarray
  index: np.ndarray
  state: np.ndarray


def _tables(tiles: np.ndarray) -> _Tables:
  """Tables of `tiles` [rows, cols] row by row (transpose for columns); one
  width for all rows, since each kernel program loops to its own count."""
  count = np.count_nonzero(tiles != layout_lib.EMPTY, axis=1).astype(np.int32)
  index, state = layout_lib.tiles_by_row(tiles, np.arange(tiles.shape[0]),
                                         max(int(count.max(initial=0)), 1))
  return _Tables(count, index, state.astype(np.int32))


def _layout_tables(layout: layout_lib.BlockLayout) -> tuple[_Tables, _Tables]:
  """Query-major and key-major tables (at trace time; a loop over rows)."""
  return _tables(layout.tiles), _tables(layout.tiles.T)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one call."""

  mask: masks_lib.Mask
  seq_len: int
  block_q: int
  block_kv: int
  scale: float
  num_global: int  # real global keys (0: none)
  interpret: bool


def _allowed(spec: _Spec, q_idx, kv_idx, state):
  """bool [len(q_idx), len(kv_idx)] for one tile (state: PARTIAL or FULL)."""
  element = spec.mask(q_idx[:, None], kv_idx[None, :]) & (kv_idx[None, :] < spec.seq_len)
  return (state == layout_lib.FULL) | element


def _dot(a, b, contract=(1, 0)):
  """2-D matmul in float32; `contract` names the contracted axis of a and b."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


def _forward_kernel(count_ref, index_ref, state_ref, q_ref, k_ref, v_ref, *refs,
                    spec: _Spec):
  if spec.num_global:
    gk_ref, gv_ref, o_ref, lse_ref = refs
  else:
    o_ref, lse_ref = refs
  bq, bkv = spec.block_q, spec.block_kv
  row = pl.program_id(0)
  q = q_ref[...]
  q_idx = row * bq + jnp.arange(bq)
  m = jnp.full((bq,), _MASKED, jnp.float32)
  l = jnp.zeros((bq,), jnp.float32)
  acc = jnp.zeros(q.shape, jnp.float32)
  if spec.num_global:  # global keys: every query sees them
    gk, gv = gk_ref[...], gv_ref[...]
    valid = (jnp.arange(gk.shape[0]) < spec.num_global)[None, :]
    s = jnp.where(valid, _dot(q, gk, (1, 1)) * spec.scale, _MASKED)
    m = jnp.max(s, axis=1)
    p = jnp.where(valid, jnp.exp(s - m[:, None]), 0.0)
    l = jnp.sum(p, axis=1)
    acc = _dot(p.astype(gv.dtype), gv)

  def tile(r, carry):
    m, l, acc = carry
    block, state = index_ref[row, r], state_ref[row, r]
    keys = pl.ds(block * bkv, bkv)
    allowed = _allowed(spec, q_idx, block * bkv + jnp.arange(bkv), state)
    s = jnp.where(allowed, _dot(q, k_ref[keys, :], (1, 1)) * spec.scale, _MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    correction = jnp.exp(m - m_new)
    p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, l * correction + jnp.sum(p, axis=1), acc

  m, l, acc = jax.lax.fori_loop(0, count_ref[row], tile, (m, l, acc))
  seen = l > 0  # a query that sees no key outputs 0 (and gets no gradient)
  safe_l = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), jnp.inf)


def _dq_kernel(count_ref, index_ref, state_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, spec: _Spec):
  bq, bkv = spec.block_q, spec.block_kv
  row = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_idx = row * bq + jnp.arange(bq)

  def tile(r, dq):
    block, state = index_ref[row, r], state_ref[row, r]
    keys = pl.ds(block * bkv, bkv)
    k, v = k_ref[keys, :], v_ref[keys, :]
    allowed = _allowed(spec, q_idx, block * bkv + jnp.arange(bkv), state)
    p = jnp.where(allowed, jnp.exp(_dot(q, k, (1, 1)) * spec.scale - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k) * spec.scale

  dq = jax.lax.fori_loop(0, count_ref[row], tile, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq


def _dkv_kernel(count_ref, index_ref, state_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, spec: _Spec):
  bq, bkv = spec.block_q, spec.block_kv
  col = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  kv_idx = col * bkv + jnp.arange(bkv)

  def tile(r, carry):
    dk, dv = carry
    block, state = index_ref[col, r], state_ref[col, r]
    queries = pl.ds(block * bq, bq)
    q, do = q_ref[queries, :], do_ref[queries, :]
    lse, delta = lse_ref[queries], delta_ref[queries]
    allowed = _allowed(spec, block * bq + jnp.arange(bq), kv_idx, state)
    p = jnp.where(allowed, jnp.exp(_dot(q, k, (1, 1)) * spec.scale - lse[:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
    ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
    return dk + _dot(ds.astype(q.dtype), q, (0, 0)) * spec.scale, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, count_ref[col], tile, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


def _compiler_params(spec: _Spec):
  if spec.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _whole(shape):
  """BlockSpec of a whole [rows, cols] table, the same for every program."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _call(kernel, spec: _Spec, grid, tables: _Tables, in_specs, out_specs, out_shape,
          *args):
  table_specs = [_whole(tables.count.shape), _whole(tables.index.shape),
                 _whole(tables.state.shape)]
  return pl.pallas_call(
      functools.partial(kernel, spec=spec), grid=grid,
      in_specs=table_specs + in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(spec), interpret=spec.interpret,
      name=f'block_sparse_{kernel.__name__.strip("_")}',
  )(jnp.asarray(tables.count), jnp.asarray(tables.index), jnp.asarray(tables.state),
    *args)


def _like(x, shape, dtype) -> jax.ShapeDtypeStruct:
  """An output varying over the same mesh axes as `x`: inside `jax.shard_map`
  (data-parallel training) Pallas must be told, or it refuses the call."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(x).manual_axis_type)


def _rows(block, dim):  # [BH, n, D] arrays, one block of rows per program
  return pl.BlockSpec((None, block, dim), lambda i, bh: (bh, i, 0))


def _all_rows(length, dim):  # [BH, n, D] arrays, all rows for every program
  return pl.BlockSpec((None, length, dim), lambda i, bh: (bh, 0, 0))


def _stats(block):  # [BH, n] per-query statistics
  return pl.BlockSpec((None, block), lambda i, bh: (bh, i))


def _all_stats(length):
  return pl.BlockSpec((None, length), lambda i, bh: (bh, 0))


def _forward(spec, tables, q, k, v, gk, gv):
  bh, length, dim = q.shape
  grid = (length // spec.block_q, bh)
  in_specs = [_rows(spec.block_q, dim), _all_rows(length, dim), _all_rows(length, dim)]
  args = [q, k, v]
  if spec.num_global:
    in_specs += [_all_rows(gk.shape[1], dim)] * 2
    args += [gk, gv]
  return _call(_forward_kernel, spec, grid, tables, in_specs,
               [_rows(spec.block_q, dim), _stats(spec.block_q)],
               [_like(q, q.shape, q.dtype), _like(q, (bh, length), jnp.float32)], *args)


def _backward(spec, q_tables, kv_tables, q, k, v, out, lse, do):
  bh, length, dim = q.shape
  delta = jnp.einsum('bnd,bnd->bn', do.astype(jnp.float32), out.astype(jnp.float32))
  common = [_all_rows(length, dim)] * 4 + [_all_stats(length)] * 2
  dq = _call(_dq_kernel, spec, (length // spec.block_q, bh), q_tables,
             [_rows(spec.block_q, dim)] + common[1:3] + [_rows(spec.block_q, dim),
                                                         _stats(spec.block_q),
                                                         _stats(spec.block_q)],
             _rows(spec.block_q, dim), _like(q, q.shape, jnp.float32),
             q, k, v, do, lse, delta)
  dk, dv = _call(_dkv_kernel, spec, (length // spec.block_kv, bh), kv_tables,
                 [common[0], _rows(spec.block_kv, dim), _rows(spec.block_kv, dim)]
                 + common[3:],
                 [_rows(spec.block_kv, dim)] * 2,
                 [_like(k, k.shape, jnp.float32)] * 2,
                 q, k, v, do, lse, delta)
  return dq, dk, dv, delta


def _padded_dim(dim: int) -> int:
  return max(MIN_TILE, pl.next_power_of_2(dim))


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           layout: layout_lib.BlockLayout, mask: masks_lib.Mask,
                           scale: float, global_kv=None,
                           interpret: bool = False) -> jax.Array:
  """Same maths as `xla.block_sparse_attention`, as kernels.

  q, k, v: [B, H, n, D]; `layout` must be `block_layout(mask, n, ...)`.
  interpret: True runs Pallas' interpreter (tests on CPU; not inside
    `jax.shard_map`); never chosen implicitly (`xla.check_kernel`). False
    compiles: on a GPU, or on a CPU-only machine for cross-platform lowering
    (`.lower(lowering_platforms=('cuda',))`).
  """
  if interpret and jax.typeof(q).manual_axis_type.varying:
    raise NotImplementedError(
        "the Pallas kernels cannot run interpreted inside jax.shard_map "
        "(data-parallel training): JAX's Pallas interpreter does not track "
        "which values vary across devices. Off GPU use the XLA kernel "
        "(model.attention.kernel='xla'); on a GPU the kernels run compiled")
  bq, bkv = layout.block_q, layout.block_kv
  if not interpret and (min(bq, bkv) < MIN_TILE or bq & (bq - 1) or bkv & (bkv - 1)):
    raise ValueError(f'the GPU kernel needs power-of-two tiles of at least {MIN_TILE}, '
                     f'got {bq}x{bkv} (block_size)')
  batch, heads, n, dim = q.shape
  length = layout.padded_len
  if layout.tiles.shape[1] * bkv != length:
    raise ValueError('the Pallas kernel needs the same padded length for queries '
                     f'and keys; got {length} and {layout.tiles.shape[1] * bkv}')
  dim_p = _padded_dim(dim)

  def prepare(x):  # [B, H, m, D] -> [B*H, m_padded, D_padded]
    x = x.reshape((batch * heads,) + x.shape[2:])
    return layout_lib.pad_to(x, 2, dim_p)

  qp, kp, vp = (layout_lib.pad_to(prepare(x), 1, length) for x in (q, k, v))
  gk = gv = None
  num_global = 0
  if global_kv is not None:
    num_global = global_kv[0].shape[2]
    size = _padded_dim(num_global)
    gk, gv = (layout_lib.pad_to(prepare(x), 1, size) for x in global_kv)
  spec = _Spec(mask, n, bq, bkv, scale, num_global, interpret)
  q_tables, kv_tables = _layout_tables(layout)

  def unpad(x, dtype):
    return x[:, :n, :dim].reshape(batch, heads, n, dim).astype(dtype)

  @jax.custom_vjp
  def attend(qp, kp, vp, gk, gv):
    return _forward(spec, q_tables, qp, kp, vp, gk, gv)[0]

  def attend_fwd(qp, kp, vp, gk, gv):
    out, lse = _forward(spec, q_tables, qp, kp, vp, gk, gv)
    return out, (qp, kp, vp, gk, gv, out, lse)

  def attend_bwd(residuals, d_out):
    qp, kp, vp, gk, gv, out, lse = residuals
    dq, dk, dv, delta = _backward(spec, q_tables, kv_tables, qp, kp, vp, out, lse, d_out)
    dgk = dgv = None
    if gk is not None:  # the global keys' share: small dense maths
      valid = jnp.arange(gk.shape[1]) < num_global
      s = jnp.einsum('bnd,bgd->bng', qp, gk, preferred_element_type=jnp.float32) * scale
      p = jnp.where(valid, jnp.exp(s - lse[..., None]), 0.0)
      dp = jnp.einsum('bnd,bgd->bng', d_out, gv, preferred_element_type=jnp.float32)
      ds = p * (dp - delta[..., None])
      dq = dq + jnp.einsum('bng,bgd->bnd', ds, gk.astype(jnp.float32)) * scale
      dgk = (jnp.einsum('bng,bnd->bgd', ds, qp.astype(jnp.float32)) * scale).astype(gk.dtype)
      dgv = jnp.einsum('bng,bnd->bgd', p, d_out.astype(jnp.float32)).astype(gv.dtype)
    return dq.astype(qp.dtype), dk.astype(kp.dtype), dv.astype(vp.dtype), dgk, dgv

  attend.defvjp(attend_fwd, attend_bwd)
  return unpad(attend(qp, kp, vp, gk, gv), q.dtype)
