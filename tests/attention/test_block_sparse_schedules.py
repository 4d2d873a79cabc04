"""The block-sparse kernel's execution schedules: chunked loops, custom VJP.

`test_xla.py` checks the maths at sizes where every group runs
as one batched op; here the chunk budget is forced small so that every pass
(forward, query-major and key-major backward) loops over several chunks,
including ragged last chunks, groups that see no key, and global keys.
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from lintunet_jax.attention import xla as ak
from lintunet_jax.attention import layout as bl
from lintunet_jax.attention import masks
from tests.attention.attention_testutil import dense_mask, random_inputs, rel_err

TOL = 1e-5

PATTERNS = {
    'local_2d': masks.Local2DMask(1),
    'local_or_strided': masks.LocalMask(4) | masks.StridedMask(10),
    'global_tokens': masks.GlobalTokensMask(2) | masks.LocalMask(3),
    'fixed': masks.FixedMask(12, 2),
    'sees_nothing': masks.NotMask(masks.GlobalTokensMask(8)) & masks.LocalMask(3),
}


# (pattern, Schedule fields): chunk_bytes=1 is one block per loop step.
SCHEDULES = ([(name, dict(chunk_bytes=1)) for name in sorted(PATTERNS)]
             + [(name, dict(chunk_bytes=700, lanes=2, query_block=24))
                for name in ('local_or_strided', 'global_tokens', 'sees_nothing')]
             + [('local_2d', dict(chunk_bytes=None, query_block=16))])


@pytest.mark.parametrize('name, schedule', SCHEDULES, ids=str)
@pytest.mark.parametrize('global_len', [0, 3], ids=['sparse', 'linformer_sparse'])
def test_chunked_forward_and_gradients_match_dense(name, global_len, schedule):
  n, block = 90, 8  # 12 blocks, ragged last block, several groups
  mask = masks.bind_grid(PATTERNS[name], grid_width=9)
  (q, k, v, cot), global_kv = random_inputs(n, global_len, count=4)
  allowed = dense_mask(mask, n)

  def loss(fn):
    return lambda *a: jnp.sum(fn(*a) * cot)

  dense = lambda q, k, v, g: ak.dense_attention(q, k, v, mask=allowed, global_kv=g)
  sparse = lambda q, k, v, g: ak.block_sparse_attention(
      q, k, v, mask=mask, block_size=block, global_kv=g)
  argnums = (0, 1, 2, 3) if global_kv else (0, 1, 2)
  with ak.schedule(**schedule):
    out = jax.jit(sparse)(q, k, v, global_kv)
    grads = jax.jit(jax.grad(loss(sparse), argnums))(q, k, v, global_kv)
  assert rel_err(out, dense(q, k, v, global_kv)) <= TOL
  ref = jax.grad(loss(dense), argnums)(q, k, v, global_kv)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    assert not bool(jnp.isnan(a).any())
    assert rel_err(a, b) <= TOL


def test_chunked_and_unchunked_schedules_agree():
  n, block = 256, 16
  mask = masks.bind_grid(masks.Local2DMask(2), 16) | masks.GlobalTokensMask(3)
  (q, k, v, _), global_kv = random_inputs(n, 4, batch=1, heads=1, dim=32, count=4)
  # A fresh jit per schedule: jit caches traces, and the schedule is
  # chosen at trace time.
  fn = lambda: jax.jit(lambda q, k, v, g: ak.block_sparse_attention(
      q, k, v, mask=mask, block_size=block, global_kv=g))
  with ak.chunking(None):
    whole_fn = fn().lower(q, k, v, global_kv).compile()
    assert 'while' not in whole_fn.as_text()
    whole = whole_fn(q, k, v, global_kv)
  with ak.chunking(4096):
    chunked_fn = fn().lower(q, k, v, global_kv).compile()
    assert 'while' in chunked_fn.as_text()  # really a loop
    chunked = chunked_fn(q, k, v, global_kv)
  assert rel_err(chunked, whole) <= TOL


def test_unchunked_flops_follow_the_tiles_forward_and_backward():
  n, block, dim = 1024, 32, 64
  mask = masks.LocalMask(32)
  layout = bl.block_layout(mask, n, block)
  (q, k, v, cot), _ = random_inputs(n, 0, batch=1, heads=1, dim=dim, count=4)

  def flops(fn):
    cost = jax.jit(fn).lower(q, k, v).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost['flops']

  allowed = dense_mask(mask, n)
  dense = lambda q, k, v: ak.dense_attention(q, k, v, mask=allowed)
  sparse = lambda q, k, v: ak.block_sparse_attention(q, k, v, mask=mask, block_size=block)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2))
  with ak.chunking(None):
    for fn in (lambda f: f, grad):
      assert flops(fn(sparse)) <= 1.6 * layout.density * flops(fn(dense))


def test_key_major_groups_cover_every_tile_once():
  for mask in [masks.LocalMask(5), masks.StridedMask(8) | masks.GlobalTokensMask(2),
               masks.Local2DMask(1, grid_width=10), masks.EmptyMask(), masks.FullMask()]:
    layout = bl.block_layout(mask, 100, 8)
    flat = []  # (q block, kv block) of each flat tile; None for padding
    for group in layout.groups:
      for row, cols, states in zip(group.q_blocks, group.kv_blocks, group.tile_state):
        flat += [(int(row), int(c)) if s != bl.PADDING else None
                 for c, s in zip(cols, states)]
    assert layout.num_group_tiles == len(flat)
    seen = set()
    kv_blocks = np.concatenate([g.kv_blocks for g in layout.kv_groups])
    assert sorted(kv_blocks.tolist()) == list(range(layout.tiles.shape[1]))
    for group in layout.kv_groups:
      for col, rows, index in zip(group.kv_blocks, group.q_blocks, group.tile_index):
        for row, i in zip(rows, index):
          if i == len(flat):
            continue  # padding: the zero tile
          assert flat[i] == (int(row), int(col))
          seen.add(i)
    assert seen == {i for i, t in enumerate(flat) if t is not None}


@pytest.mark.slow
def test_bfloat16_chunked_gradients_are_finite_and_close():
  n, block = 128, 16
  mask = masks.LocalMask(9)
  (q, k, v, cot), global_kv = random_inputs(n, 4, batch=1, heads=1, dim=16, count=4)
  fn = lambda *a: jnp.sum(ak.block_sparse_attention(
      a[0], a[1], a[2], mask=mask, block_size=block, global_kv=a[3]).astype(jnp.float32) * cot)
  low = lambda x: jax.tree.map(lambda t: t.astype(jnp.bfloat16), x)
  with ak.chunking(2048):
    ref = jax.grad(fn, (0, 1, 2, 3))(q, k, v, global_kv)
    out = jax.grad(fn, (0, 1, 2, 3))(*low((q, k, v)), low(global_kv))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert a.dtype == jnp.bfloat16
    assert rel_err(a, b) < 5e-2


def _gathers(jaxpr):
  """Every gather in a jaxpr, loop bodies included: (output bytes, shape)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'gather':
      aval = eqn.outvars[0].aval
      yield aval.size * aval.dtype.itemsize, aval.shape
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _gathers(sub)


@pytest.mark.parametrize('batch, heads', [(1, 1), (8, 4)])
def test_a_loop_step_gathers_at_most_the_chunk_budget(batch, heads):
  """Issue 16, item 9: the budget counts all batch elements and heads.

  Sizing chunks per (batch, head) pair made each step gather batch x heads
  times `chunk_bytes` (32x at the training batch), out of cache. Here every
  gather of the forward and of both backward passes must fit the budget.
  """
  n, block, dim = 256, 16, 32  # 16 query blocks, 3 key tiles per row
  mask = masks.bind_grid(masks.Local2DMask(1), 16)
  (q, k, v, cot), global_kv = random_inputs(n, 4, batch=batch, heads=heads,
                                            dim=dim, count=4)
  one_row = batch * heads * 3 * block * dim * 4  # one query block's key tiles
  budget = 2 * one_row  # two query blocks per step: a loop of ~8 steps

  def loss(q, k, v, g):
    out = ak.block_sparse_attention(q, k, v, mask=mask, block_size=block, global_kv=g)
    return jnp.sum(out * cot)

  with ak.chunking(budget):
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2, 3)))(q, k, v, global_kv)
  gathers = list(_gathers(jaxpr.jaxpr))
  assert gathers, 'no gathers traced: the test would check nothing'
  too_big = [(size, shape) for size, shape in gathers if size > budget]
  assert not too_big, f'gathers over the {budget}-byte budget: {too_big}'
  # And the loop really runs in steps of the budget, not of one block.
  assert max(size for size, _ in gathers) > budget // 2
