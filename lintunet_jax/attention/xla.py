"""Attention kernels as pure functions on [batch, heads, tokens, dim] arrays.

Two implementations of the same maths:

* `dense_attention`: the reference. Materialises the full n x n scores.
* `block_sparse_attention`: computes only the non-empty tiles of a
  `layout.block_layout`, gathering for each query block just the key/value blocks
  it may see, so FLOPs and memory grow with the number of non-empty tiles.

Both accept `global_kv`: extra keys/values every query sees (Linformer's k
projected summaries). They enter the SAME softmax as the masked keys, which
is the union of global and local attention of the Long-Short Transformer.

Both take `dropout` and `dropout_rng`: dropout on the attention
probabilities (after the softmax, before they weight the values), where
lucidrains' `linformer` package, the seed's, applies it. The normaliser is
that of the undropped probabilities, as in `torch.nn.Dropout(softmax(.))`.

Softmax runs in float32 whatever the input dtype. A query that may see no
key at all (possible with sparse patterns and no global keys) gets an
all-zero output and zero gradients, never NaN: its normaliser is zero, and
we divide by one instead.

How `block_sparse_attention` executes (same maths on every backend):

* Forward, query-major: each group of query blocks gathers the key/value
  tiles it sees and runs one softmax over them and the global keys. It keeps
  the normalised weights of the non-empty tiles (O(tiles), not O(n^2)).
* Backward, with a custom VJP in FlashAttention's order: a query-major pass
  gives dQ and the score gradients dS per tile; a key-major pass
  (`BlockLayout.kv_groups`) gathers, for each key block, the query blocks
  that see it and computes its dK and dV directly. Autodiff of the forward
  would instead scatter-add every gathered tile's gradient, which XLA:CPU
  runs as a slow serial loop.
* Scores are kept key-major ([..., keys, queries]) so that the gathered
  tiles feed XLA's matmuls without being transposed (see `_allowed`).
* The execution `Schedule` is chosen per backend (`SCHEDULES`). On CPU each
  pass walks its groups in chunks of query (or key) blocks with `lax.scan`,
  sized so that one chunk's gathered tiles stay in cache; on GPU/TPU a group
  is one batched op. XLA's cost
  analysis counts a loop body once, so for FLOP counts trace under
  `chunking(None)`, which does the same arithmetic unchunked.
* `Schedule.kernel='pallas'` hands the same layout to the fused kernels of
  `pallas` instead (GPU; elsewhere only when interpretation is asked for
  explicitly, `Schedule.pallas_interpret=True`, as tests do).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from lintunet_jax.attention import layout as layout_lib
from lintunet_jax.attention import masks as masks_lib

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


def check_arguments(q, k, v, global_kv: GlobalKV = None, *,
                    same_length: bool = False) -> None:
  """Shapes and dtypes at the kernels' public boundary (chex; at trace time).

  q [B, H, n, D], k [B, H, m, D], v [B, H, m, Dv], floating point; global
  keys/values [B, H, g, D] / [B, H, g, Dv]. `same_length`: m == n and
  Dv == D (the block-sparse kernels tile q, k and v alike). A mismatch
  raises an AssertionError naming the argument, not a shape error deep in
  an einsum.
  """
  chex.assert_rank(q, 4, custom_message='q must be [batch, heads, tokens, dim]')
  b, h, n, d = q.shape
  chex.assert_shape(k, (b, h, n if same_length else None, d),
                    custom_message=f'k must be [batch, heads, tokens, dim] = '
                                   f'[{b}, {h}, {n if same_length else "m"}, {d}] like q')
  chex.assert_shape(v, (b, h, k.shape[2], d if same_length else None),
                    custom_message=f'v must be [batch, heads, tokens, dim] with the '
                                   f'tokens of k ({k.shape[2]})')
  chex.assert_type([q, k, v], float, custom_message='q, k, v must be floating point')
  if global_kv is not None:
    gk, gv = global_kv
    chex.assert_shape(gk, (b, h, None, d), custom_message=(
        f'global_kv[0] (keys) must be [batch, heads, summaries, dim] = [{b}, {h}, g, {d}]'))
    chex.assert_shape(gv, (b, h, gk.shape[2], v.shape[3]), custom_message=(
        'global_kv[1] (values) must be [batch, heads, summaries, dim] like the '
        'keys, with the dim of v'))
    chex.assert_type([gk, gv], float, custom_message='global_kv must be floating point')


def _check_dropout(dropout: float, dropout_rng) -> bool:
  """Whether dropout applies; a rate without a key is a clear error."""
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'attention dropout must be in [0, 1), got {dropout}')
  if dropout and dropout_rng is None:
    raise ValueError('attention dropout > 0 needs a dropout_rng')
  return bool(dropout)


def _drop(p: jax.Array, keep: jax.Array | None, dropout: float) -> jax.Array:
  """Inverted dropout of probabilities `p` with a given keep mask."""
  if keep is None:
    return p
  return jnp.where(keep, p * (1.0 / (1.0 - dropout)), 0.0)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    mask: jax.Array | None = None,
                    global_kv: GlobalKV = None, dropout: float = 0.0,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
  """dropout(softmax(q k^T / sqrt(d))) v over all keys a boolean mask allows.

  q, k, v: [B, H, n, D]; mask: bool [n, n] (query, key) or None for all.
  dropout: rate on the probabilities [B, H, n, keys] (global keys last),
  drawn from `dropout_rng`.
  """
  check_arguments(q, k, v, global_kv)
  drops = _check_dropout(dropout, dropout_rng)
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
  if drops:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout, weights.shape)
    weights = _drop(weights, keep, dropout)
  out = jnp.einsum('bhqk,bhkd->bhqd', weights.astype(v.dtype), values,
                   preferred_element_type=jnp.float32)
  return _normalise(out, denom).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How `block_sparse_attention` executes on a backend (not what it computes).

  chunk_bytes: bytes of gathered key (or query) tiles one loop step may
    touch, for all batch elements and heads together (one step gathers its
    rows for every one of them); None runs each group as one batched op.
  query_block: smallest query tile edge. Key tiles keep the caller's
    `block_size` (the granularity at which work is skipped); wider query
    tiles make the score matmuls less skinny and gather each key tile for
    more queries, at the price of computing the union of their key tiles.
  lanes: independent loops each chunked pass is split into, which XLA:CPU
    may run concurrently on different cores (one loop of small matmuls keeps
    about one core busy); no gain could be shown on the loaded test machine.
  kernel: 'auto' (the default: 'pallas' on GPUs where the tiles suit it,
    'xla' elsewhere; `resolve_kernel`), 'xla' (these XLA ops, every
    backend) or 'pallas' (the fused kernels of `pallas`, GPUs only).
  pallas_interpret: the Pallas kernels' `interpret`. None compiles them,
    and off GPU raises `KernelUnavailableError` (naming the override that
    picks the XLA kernel) rather than running Pallas' interpreter, which is
    orders of magnitude slower. True interprets them on any backend (tests
    do, explicitly); False compiles without the check (cross-platform
    lowering, `.lower(lowering_platforms=('cuda',))`).
  """

  chunk_bytes: int | None = None
  query_block: int = 0
  lanes: int = 1
  kernel: str = 'auto'
  pallas_interpret: bool | None = None

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f'unknown attention kernel {self.kernel!r}; choose one of {KERNELS}')


KERNELS = ('auto', 'xla', 'pallas')


class KernelUnavailableError(ValueError):
  """The configured attention kernel cannot be compiled on this backend."""


def check_kernel(kernel: str) -> None:
  """Raises KernelUnavailableError when `kernel` cannot compile here.

  The Pallas kernels compile for GPUs only; elsewhere (CPU, TPU) they would
  run in the interpreter, which is never what a training or evaluation
  wants. The XLA kernel computes the same maths with the same parameters,
  so a checkpoint trained with either runs with the other.
  """
  if kernel not in KERNELS:
    raise ValueError(f'unknown attention kernel {kernel!r}; choose one of {KERNELS}')
  backend = jax.default_backend()
  if kernel == 'pallas' and backend != 'gpu':  # ('auto' never picks it there)
    raise KernelUnavailableError(
        f"model.attention.kernel='pallas' needs a GPU: the fused Pallas "
        f"kernels compile only for GPUs and this process runs on {backend!r}, "
        "where they could only run in Pallas' very slow interpreter. Pass "
        '--config.model.attention.kernel=xla (same parameters, same maths; '
        'eval.py, predict.py and a resumed train.py accept it on top of the '
        'saved config)')


def resolve_kernel(kernel: str, layout: layout_lib.BlockLayout,
                   backend: str | None = None, dropout: bool = False) -> str:
  """'auto' -> the kernel measured faster for this backend and layout.

  On an H200 the fused Pallas kernels were correct (f32 and bf16, output and
  gradients) and 2-4x faster than these XLA ops on local patterns, never
  slower (benchmarks/NOTES.md item 21), so 'auto' picks them on GPUs when
  the layout suits them: power-of-two tiles of at least 16 (the Triton
  lowering's smallest dot edge) and equal padded query and key lengths.
  Everywhere else, and with attention dropout (which only the XLA kernel
  implements), it picks 'xla'. 'xla' and 'pallas' are returned as they are.
  """
  if kernel != 'auto':
    return kernel
  if dropout:
    return 'xla'
  backend = backend or jax.default_backend()
  from lintunet_jax.attention import pallas as pallas_attention  # pylint: disable=g-import-not-at-top
  bq, bkv = layout.block_q, layout.block_kv
  suits = (min(bq, bkv) >= pallas_attention.MIN_TILE and not bq & (bq - 1)
           and not bkv & (bkv - 1) and layout.tiles.shape[1] * bkv == layout.padded_len)
  return 'pallas' if backend == 'gpu' and suits else 'xla'


# Per backend; measured on CPU in benchmarks/NOTES.md: 2 MiB keeps a step's
# gathers within a core's L2 + its share of L3; wider query tiles (32, 64)
# did not pay for their extra key tiles; extra lanes showed no gain on the
# shared 2-core machine we could measure on. GPU/TPU run every group as one
# batched op, and on GPU `kernel='auto'` hands suitable layouts to the
# fused Pallas kernels instead (`resolve_kernel`).
SCHEDULES: dict[str, Schedule] = {'cpu': Schedule(chunk_bytes=2 << 20)}
_schedule_overrides: list[dict] = []


@contextlib.contextmanager
def schedule(**fields):
  """Traces `block_sparse_attention` with these `Schedule` fields changed.

  E.g. `schedule(chunk_bytes=None)` for FLOP counts (`cost_analysis()`
  counts a loop body once) or to compare schedules; the maths does not
  depend on it. It acts at trace time, and `jax.jit` caches traces: jit a
  fresh function inside the block.
  """
  _schedule_overrides.append(fields)
  try:
    yield
  finally:
    _schedule_overrides.pop()


def chunking(chunk_bytes: int | None):
  """`schedule(chunk_bytes=...)`: None traces every group unchunked."""
  return schedule(chunk_bytes=chunk_bytes)


def current_schedule() -> Schedule:
  result = SCHEDULES.get(jax.default_backend(), Schedule())
  for fields in _schedule_overrides:
    result = dataclasses.replace(result, **fields)
  return result


def _rows_per_chunk(rows: int, row_bytes: int, budget: int | None,
                    batch_heads: tuple[int, ...]) -> int:
  """Rows per loop step so that one step gathers at most `budget` bytes.

  `row_bytes` is what one row gathers for one (batch, head) pair; every
  step gathers its rows for all of them, so the budget is divided by
  batch x heads too (without it a batch of 32 gathered 32x the budget).
  """
  row_bytes *= int(np.prod(batch_heads))
  if budget is None or row_bytes == 0:
    return max(rows, 1)
  return max(1, min(rows, budget // row_bytes))


def _to_blocks(x: jax.Array, length: int, block: int) -> jax.Array:
  """[B, H, n, D] -> [B, H, length // block, block, D], zero-padded."""
  x = layout_lib.pad_to(x, 2, length)
  return x.reshape(x.shape[:2] + (length // block, block, x.shape[-1]))


def _chunked(body, xs, chunk: int, lanes: int = 1):
  """Maps `body` over the leading axis of `xs` in steps of `chunk` rows.

  Returns body's outputs with that axis restored (padded rows dropped).
  Arrays in `xs` have the row axis first; outputs have it third ([B, H,
  rows, ...]), like every blocked array here. The steps are split over
  `lanes` independent loops (see `Schedule.lanes`).
  """
  rows = jax.tree.leaves(xs)[0].shape[0]
  steps = -(-rows // chunk)
  if steps == 1:
    return body(xs)
  lanes = max(1, min(lanes, steps))
  steps = -(-steps // lanes) * lanes
  pad = steps * chunk - rows

  def split(x):
    lib = np if isinstance(x, np.ndarray) else jnp
    x = lib.concatenate([x, lib.repeat(x[-1:], pad, 0)])
    return x.reshape((lanes, steps // lanes, chunk) + x.shape[1:])

  xs = jax.tree.map(split, xs)
  per_lane = [jax.lax.scan(lambda carry, x: (carry, body(x)), None,
                           jax.tree.map(lambda x, i=i: x[i], xs))[1]
              for i in range(lanes)]
  ys = jax.tree.map(lambda *y: jnp.concatenate(y, axis=0), *per_lane)

  def unstack(y):  # [steps, B, H, chunk, ...] -> [B, H, rows, ...]
    y = jnp.moveaxis(y, 0, 2)
    return y.reshape(y.shape[:2] + (steps * chunk,) + y.shape[4:])[:, :, :rows]

  return jax.tree.map(unstack, ys)


def _take_blocks(x: jax.Array, blocks) -> jax.Array:
  """`x[:, :, blocks]` for blocked [B, H, N, ...] arrays and [G, R] indices.

  A group whose every row takes all N blocks in order (a global token's
  query row, or the key block every query sees) needs no gather: when the
  indices are static (a one-step group) that case broadcasts `x` instead of
  copying all of it, which cost more than that row's matmuls.
  """
  if (isinstance(blocks, np.ndarray) and blocks.ndim == 2
      and blocks.shape[1] == x.shape[2]
      and (blocks == np.arange(x.shape[2])).all()):
    return jnp.broadcast_to(x[:, :, None], x.shape[:2] + blocks.shape + x.shape[3:])
  return x[:, :, blocks]


def _in_block_order(parts: list, blocks: list[np.ndarray]) -> jax.Array:
  """Concatenates per-group [B,H,G_i,...] results, rows back in block order.

  `blocks[i]` lists the block of each row of `parts[i]`; together they are a
  permutation. It is static, so rows are copied as runs of static slices
  (memcpy speed) rather than by a gather, unless there are too many runs.
  """
  if len(parts) == 1 and np.array_equal(blocks[0], np.arange(blocks[0].size)):
    return parts[0]
  merged = jnp.concatenate(parts, axis=2)
  source = np.argsort(np.concatenate(blocks), kind='stable')  # row of each block
  breaks = np.flatnonzero(np.diff(source) != 1) + 1
  starts = np.concatenate([[0], breaks])
  ends = np.concatenate([breaks, [source.size]])
  if starts.size > 256:
    return merged[:, :, jnp.asarray(source.astype(np.int32))]
  return jnp.concatenate([merged[:, :, source[a]:source[a] + (b - a)]
                          for a, b in zip(starts, ends)], axis=2)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one block-sparse call."""

  layout: layout_lib.BlockLayout
  mask: masks_lib.Mask
  scale: float
  chunk_bytes: int | None
  lanes: int = 1
  dropout: float = 0.0


def _allowed(plan: _Plan, q_blocks, kv_blocks, state):
  """bool [rows, R * bkv, bq]: which scores of the gathered tiles count.

  From indices (iota), no n x n constant: FULL tiles pass unconditionally,
  PADDING tiles never, PARTIAL tiles ask the mask (fused into the softmax).
  Keys come before queries, the layout of the scores (see `_forward`).
  """
  layout = plan.layout
  bq, bkv = layout.block_q, layout.block_kv
  q_idx = q_blocks[:, None] * bq + jnp.arange(bq)  # [G,bq]
  kv_idx = kv_blocks[..., None] * bkv + jnp.arange(bkv)  # [G,R,bkv]
  state = state[:, :, None, None]  # [G,R,1,1]
  element = plan.mask(q_idx[:, None, None, :], kv_idx[..., None]) & (
      kv_idx[..., None] < layout.seq_len)
  allowed = (state == layout_lib.FULL) | ((state == layout_lib.PARTIAL) & element)
  rows, width = kv_blocks.shape
  return allowed.reshape(rows, width * bkv, bq)


# Layout note. Scores are kept key-major, [..., keys, queries]: XLA:CPU's
# matmul wants its right operand [contracting, free], so `q k^T` with the
# gathered keys on the right makes XLA transpose every gathered tile (a
# strided copy that cost more than the matmuls), while `k q^T` with the keys
# on the left reads them as gathered and transposes only the small query
# block. Products that consume the scores (P V, dS K, P^T dO) then have the
# big gathered operand on the right in its natural [contracting, free] form.


def _forward(plan: _Plan, q, k, v, global_kv, dropout_rng=None):
  """Returns (output [B,H,n,D], residuals for `_backward`).

  With dropout, each query-block row draws its keep masks from its own key
  (the group's key split per row), so they do not depend on the chunking.
  """
  layout = plan.layout
  n, bq, bkv = layout.seq_len, layout.block_q, layout.block_kv
  q_len, kv_len = layout.padded_len, layout.tiles.shape[1] * bkv
  qb = _to_blocks(q, q_len, bq)
  kb, vb = (_to_blocks(x, kv_len, bkv) for x in (k, v))
  gk, gv = global_kv if global_kv is not None else (None, None)
  batch_heads, dim = qb.shape[:2], qb.shape[-1]
  itemsize = jnp.dtype(k.dtype).itemsize
  outs, weights, global_weights, keeps, global_keeps = [], [], [], [], []
  for index, group in enumerate(layout.groups):
    rows, width = group.kv_blocks.shape
    row_keys = (None if dropout_rng is None else
                jax.random.split(jax.random.fold_in(dropout_rng, index), rows))

    def keep_masks(keys, shape):
      """bool [B, H, G, *shape]: one draw per row key."""
      draw = lambda key: jax.random.bernoulli(
          key, 1.0 - plan.dropout, batch_heads + shape)
      return jnp.moveaxis(jax.vmap(draw)(keys), 0, 2)

    def body(xs, width=width):
      q_blocks, kv_blocks, state, keys = xs
      qg = qb[:, :, q_blocks]  # [B,H,G,bq,D]
      kg = _take_blocks(kb, kv_blocks)  # [B,H,G,R,bkv,D]
      vg = _take_blocks(vb, kv_blocks)
      scores = jnp.einsum('bhgrkd,bhgqd->bhgrkq', kg, qg,
                          preferred_element_type=jnp.float32) * plan.scale
      scores = scores.reshape(scores.shape[:3] + (width * bkv, bq))
      allowed = _allowed(plan, q_blocks, kv_blocks, state)
      scores = jnp.where(allowed, scores, -jnp.inf)
      row_max = jnp.max(scores, axis=-2, keepdims=True, initial=-jnp.inf)
      if gk is not None:
        global_scores = jnp.einsum('bhkd,bhgqd->bhgkq', gk, qg,
                                   preferred_element_type=jnp.float32) * plan.scale
        row_max = jnp.maximum(row_max, jnp.max(global_scores, -2, keepdims=True))
      row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
      p = jnp.exp(scores - row_max)  # 0 where masked
      denom = jnp.sum(p, axis=-2, keepdims=True)
      if gk is not None:
        pg = jnp.exp(global_scores - row_max)
        denom = denom + jnp.sum(pg, axis=-2, keepdims=True)
      inv = 1.0 / jnp.where(denom > 0, denom, 1.0)
      p = p * inv  # [B,H,G,R*bkv,bq], normalised
      keep = keep_g = None
      if keys is not None:
        local_keys, global_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        keep = keep_masks(local_keys, (width * bkv, bq))
        if gk is not None:
          keep_g = keep_masks(global_keys, (gk.shape[2], bq))
      values = vg.reshape(vg.shape[:3] + (width * bkv, dim))
      out = jnp.einsum('bhgkq,bhgkd->bhgqd',
                       _drop(p, keep, plan.dropout).astype(v.dtype), values,
                       preferred_element_type=jnp.float32)
      if gk is None:
        return out, p, None, keep, None
      pg = pg * inv
      out = out + jnp.einsum('bhgkq,bhkd->bhgqd',
                             _drop(pg, keep_g, plan.dropout).astype(gv.dtype), gv,
                             preferred_element_type=jnp.float32)
      return out, p, pg, keep, keep_g

    chunk = _rows_per_chunk(rows, width * bkv * dim * itemsize, plan.chunk_bytes,
                            batch_heads)
    out, p, pg, keep, keep_g = _chunked(body, (group.q_blocks, group.kv_blocks,
                                               group.tile_state, row_keys),
                                        chunk, plan.lanes)
    outs.append(out)
    weights.append(p)
    global_weights.append(pg)
    keeps.append(keep)
    global_keeps.append(keep_g)
  q_blocks = [g.q_blocks for g in layout.groups]
  out = _in_block_order(outs, q_blocks)  # f32 [B,H,nq,bq,D]
  global_p = global_keep = None
  if gk is not None:  # [B,H,nq,kg,bq]
    global_p = _in_block_order(global_weights, q_blocks)
    if dropout_rng is not None:
      global_keep = _in_block_order(global_keeps, q_blocks)
  result = out.reshape(batch_heads + (q_len, dim))[:, :, :n].astype(q.dtype)
  residuals = (qb, kb, vb, gk, gv, out, tuple(weights), global_p,
               tuple(keeps), global_keep)
  return result, residuals


def _flat_tiles(per_group, batch_heads, bkv, bq):
  """Per-group [B,H,G,R*bkv,bq] tiles -> [B,H,T+1,bkv,bq] (+ a zero tile)."""
  flat = [t.reshape(batch_heads + (-1, bkv, bq)) for t in per_group]
  flat.append(jnp.zeros(batch_heads + (1, bkv, bq), per_group[0].dtype))
  return jnp.concatenate(flat, axis=2)


def _backward(plan: _Plan, residuals, d_out):
  layout = plan.layout
  n, bq, bkv = layout.seq_len, layout.block_q, layout.block_kv
  q_len, kv_len = layout.padded_len, layout.tiles.shape[1] * bkv
  qb, kb, vb, gk, gv, out, weights, global_p, keeps, global_keep = residuals
  batch_heads, dim = qb.shape[:2], qb.shape[-1]
  itemsize = jnp.dtype(kb.dtype).itemsize
  dob = _to_blocks(d_out, q_len, bq)  # [B,H,nq,bq,D]
  # delta_i = sum_j P_ij dP_ij = rowsum(dO_i * O_i), FlashAttention's D (also
  # with dropout, O being the dropped output and dP the gradient of the
  # undropped probabilities).
  # (An einsum, not sum(a * b): XLA:CPU hands the latter to YNNPACK's reduce,
  # which ran 30x slower than this dot; benchmarks/NOTES.md.)
  delta = jnp.einsum('bhiqd,bhiqd->bhiq', dob.astype(jnp.float32), out)  # [B,H,nq,bq]

  # Query-major pass: dS of every tile and the local part of dQ.
  dqs, dss = [], []
  for group, p, keep in zip(layout.groups, weights, keeps):
    rows, width = group.kv_blocks.shape

    def body(xs, width=width):
      q_blocks, kv_blocks, p, keep = xs
      p = jnp.moveaxis(p, 0, 2)  # scanned rows come first
      keep = None if keep is None else jnp.moveaxis(keep, 0, 2)
      dog = dob[:, :, q_blocks]
      vg = _take_blocks(vb, kv_blocks)
      kg = _take_blocks(kb, kv_blocks)
      dp = jnp.einsum('bhgrkd,bhgqd->bhgrkq', vg, dog,
                      preferred_element_type=jnp.float32)
      dp = _drop(dp.reshape(dp.shape[:3] + (width * bkv, bq)), keep, plan.dropout)
      ds = p * (dp - delta[:, :, q_blocks][:, :, :, None, :])
      keys = kg.reshape(kg.shape[:3] + (width * bkv, dim))
      dq = jnp.einsum('bhgkq,bhgkd->bhgqd', ds.astype(kb.dtype), keys,
                      preferred_element_type=jnp.float32) * plan.scale
      return dq, ds

    chunk = _rows_per_chunk(rows, width * bkv * dim * itemsize, plan.chunk_bytes,
                            batch_heads)
    rows_first = lambda x: None if x is None else jnp.moveaxis(x, 2, 0)
    dq, ds = _chunked(body, (group.q_blocks, group.kv_blocks, rows_first(p),
                             rows_first(keep)), chunk, plan.lanes)
    dqs.append(dq)
    dss.append(ds)
  dq = _in_block_order(dqs, [g.q_blocks for g in layout.groups])

  # Key-major pass: each key block gathers the query blocks that see it.
  p_flat = _flat_tiles([_drop(p, keep, plan.dropout)  # dV takes the dropped P
                        for p, keep in zip(weights, keeps)], batch_heads, bkv, bq)
  ds_flat = _flat_tiles(dss, batch_heads, bkv, bq)
  dks, dvs = [], []
  for kv_group in layout.kv_groups:
    rows, width = kv_group.q_blocks.shape

    def kv_body(xs):
      q_blocks, tile_index = xs
      qg = _take_blocks(qb, q_blocks)  # [B,H,G,R,bq,D]
      dog = _take_blocks(dob, q_blocks)
      p = p_flat[:, :, tile_index]  # [B,H,G,R,bkv,bq]
      ds = ds_flat[:, :, tile_index]
      dv = jnp.einsum('bhgrkq,bhgrqd->bhgkd', p.astype(dob.dtype), dog,
                      preferred_element_type=jnp.float32)
      dk = jnp.einsum('bhgrkq,bhgrqd->bhgkd', ds.astype(qb.dtype), qg,
                      preferred_element_type=jnp.float32) * plan.scale
      return dk, dv

    chunk = _rows_per_chunk(rows, width * bq * dim * itemsize, plan.chunk_bytes,
                            batch_heads)
    dk, dv = _chunked(kv_body, (kv_group.q_blocks, kv_group.tile_index), chunk,
                      plan.lanes)
    dks.append(dk)
    dvs.append(dv)
  kv_blocks = [g.kv_blocks for g in layout.kv_groups]
  dk = _in_block_order(dks, kv_blocks)
  dv = _in_block_order(dvs, kv_blocks)

  d_global = None
  if gk is not None:  # the global keys: plain dense maths over all queries
    dpg = jnp.einsum('bhkd,bhiqd->bhikq', gv, dob, preferred_element_type=jnp.float32)
    dpg = _drop(dpg, global_keep, plan.dropout)
    dsg = global_p * (dpg - delta[:, :, :, None, :])
    dq = dq + jnp.einsum('bhikq,bhkd->bhiqd', dsg.astype(gk.dtype), gk,
                         preferred_element_type=jnp.float32) * plan.scale
    dgk = jnp.einsum('bhikq,bhiqd->bhkd', dsg.astype(qb.dtype), qb,
                     preferred_element_type=jnp.float32) * plan.scale
    dgv = jnp.einsum('bhikq,bhiqd->bhkd',
                     _drop(global_p, global_keep, plan.dropout).astype(dob.dtype), dob,
                     preferred_element_type=jnp.float32)
    d_global = (dgk.astype(gk.dtype), dgv.astype(gv.dtype))

  def unblock(x, length, dtype):
    return x.reshape(batch_heads + (length, dim))[:, :, :n].astype(dtype)

  return (unblock(dq, q_len, qb.dtype), unblock(dk, kv_len, kb.dtype),
          unblock(dv, kv_len, vb.dtype), d_global)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           mask: masks_lib.Mask, block_size: int,
                           global_kv: GlobalKV = None, dropout: float = 0.0,
                           dropout_rng: jax.Array | None = None) -> jax.Array:
  """Attention restricted to `mask`, computing only non-empty tiles.

  q, k, v: [B, H, n, D]. The layout is derived from `mask` at trace time
  (cached), so `mask` must be a `masks.Mask`, not an array. Differentiable
  in q, k, v and global_kv (reverse mode, by a custom VJP). `dropout` drops
  attention probabilities (module docstring); the XLA kernel only.
  """
  check_arguments(q, k, v, global_kv, same_length=True)
  drops = _check_dropout(dropout, dropout_rng)
  n = q.shape[2]
  how = current_schedule()
  block = min(block_size, n)
  query_block = min(max(block, how.query_block), n)
  layout = layout_lib.block_layout(mask, n, query_block, block)
  scale = q.shape[-1] ** -0.5
  kernel = resolve_kernel(how.kernel, layout, dropout=bool(drops))
  if kernel == 'pallas':
    if drops:
      raise ValueError(
          "attention dropout > 0 is implemented by the 'xla' kernel only; "
          "train with model.attention.kernel='xla' (or 'auto') or dropout=0")
    from lintunet_jax.attention import pallas as pallas_attention  # pylint: disable=g-import-not-at-top
    interpret = how.pallas_interpret
    if interpret is None:
      check_kernel('pallas')  # compiled, or a clear error: never interpreted unasked
      interpret = False
    return pallas_attention.block_sparse_attention(
        q, k, v, layout=layout, mask=mask, scale=scale, global_kv=global_kv,
        interpret=interpret)
  plan = _Plan(layout, mask, scale, how.chunk_bytes, how.lanes,
               dropout if drops else 0.0)
  rng = dropout_rng if drops else None

  @jax.custom_vjp
  def attend(q, k, v, global_kv, rng):
    return _forward(plan, q, k, v, global_kv, rng)[0]

  def attend_fwd(q, k, v, global_kv, rng):
    return _forward(plan, q, k, v, global_kv, rng)

  def attend_bwd(residuals, d_out):
    return _backward(plan, residuals, d_out) + (None,)

  attend.defvjp(attend_fwd, attend_bwd)
  return attend(q, k, v, global_kv, rng)
