"""From a mask to a tile layout: *how* to skip work, decided at trace time.

The n x n score matrix is cut into (block_q x block_kv) tiles. Each tile is
EMPTY (no query sees any key: never computed), PARTIAL (computed, element
mask applied) or FULL (computed, no mask needed). This is splash attention's
`MaskInfo` / FlexAttention's `BlockMask` idea in NumPy: it runs once per
(mask, sequence length, tile size), is cached, and its output is static
shapes and index constants, so the compiled kernel contains no trace of the
mask function beyond the element test of partial tiles.

To execute with dense, static-shape ops, query blocks are grouped by how
many non-empty key tiles they touch (rounded up a little to keep the number
of groups small); each group becomes one batched gather-matmul whose size is
proportional to its tiles. Rounding up adds PADDING tiles, which are masked
out completely.

The same tiles seen column by column (`kv_groups`) drive the backward pass:
each key block gathers the query blocks that see it and computes its own
gradient directly, so no gradient is ever scattered-and-added.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lintunet_jax.attention import masks as masks_lib

EMPTY, PARTIAL, FULL = 0, 1, 2
PADDING = -1


@dataclasses.dataclass(frozen=True)
class TileGroup:
  """Query blocks that touch the same (padded) number of key tiles.

  q_blocks: int32 [G]          which query blocks are in the group.
  kv_blocks: int32 [G, R]      the key tiles each of them touches.
  tile_state: int8 [G, R]      PARTIAL, FULL, or PADDING for filler tiles.
  """

  q_blocks: np.ndarray
  kv_blocks: np.ndarray
  tile_state: np.ndarray

  @property
  def num_tiles(self) -> int:
    return int(self.kv_blocks.size)


@dataclasses.dataclass(frozen=True)
class KVGroup:
  """Key blocks seen by the same (padded) number of query blocks.

  kv_blocks: int32 [G]        which key blocks are in the group.
  q_blocks: int32 [G, R]      the query blocks that see each of them.
  tile_index: int32 [G, R]    where each such tile sits in the flat tile
                              order (the groups' tiles, group by group, row
                              by row); `num_tiles` (one past the end) for
                              padding, which points at an all-zero tile.
  """

  kv_blocks: np.ndarray
  q_blocks: np.ndarray
  tile_index: np.ndarray


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Tile classification of a mask for one sequence length and tile size."""

  seq_len: int
  block_q: int
  block_kv: int
  tiles: np.ndarray  # int8 [num_q_blocks, num_kv_blocks] of EMPTY/PARTIAL/FULL
  groups: tuple[TileGroup, ...]
  kv_groups: tuple[KVGroup, ...] = ()

  @property
  def num_group_tiles(self) -> int:
    """Tiles in the flat tile order of `groups`, padding included."""
    return sum(g.num_tiles for g in self.groups)

  @property
  def padded_len(self) -> int:
    return self.tiles.shape[0] * self.block_q

  @property
  def num_nonempty(self) -> int:
    return int(np.count_nonzero(self.tiles != EMPTY))

  @property
  def density(self) -> float:
    """Fraction of tiles that are computed."""
    return self.num_nonempty / self.tiles.size

  def summary(self) -> str:
    counts = {name: int(np.count_nonzero(self.tiles == code))
              for name, code in (('empty', EMPTY), ('partial', PARTIAL), ('full', FULL))}
    padding = sum(g.num_tiles for g in self.groups) - self.num_nonempty
    return (f'{self.tiles.shape[0]}x{self.tiles.shape[1]} tiles of '
            f'{self.block_q}x{self.block_kv}: {counts["full"]} full, '
            f'{counts["partial"]} partial, {counts["empty"]} empty '
            f'(computed {self.density:.1%}, +{padding} padding tiles in '
            f'{len(self.groups)} groups)')


def classify_tiles(mask: masks_lib.Mask, seq_len: int, block_q: int,
                   block_kv: int) -> np.ndarray:
  """int8 [ceil(n/bq), ceil(n/bkv)] tile states of `mask` over n tokens.

  Positions past `seq_len` (padding of the last block) count as masked, so a
  tile that covers them is never FULL and the kernel masks them.
  Evaluated one query block at a time to keep memory at O(block_q * n).
  """
  nq, nk = -(-seq_len // block_q), -(-seq_len // block_kv)
  kv = np.arange(nk * block_kv)
  kv_valid = kv < seq_len
  tiles = np.empty((nq, nk), np.int8)
  for i in range(nq):
    q = np.arange(i * block_q, (i + 1) * block_q)[:, None]
    allowed = np.broadcast_to(np.asarray(mask(q, kv[None, :]), bool),
                              (block_q, kv.size))
    allowed = allowed & kv_valid[None, :] & (q < seq_len)
    per_tile = allowed.reshape(block_q, nk, block_kv)
    any_ = per_tile.any(axis=(0, 2))
    # A tile is FULL only if every *real* query row sees every key in it.
    rows = min(block_q, seq_len - i * block_q)
    all_ = per_tile[:rows].all(axis=(0, 2))
    tiles[i] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
  return tiles


def group_query_blocks(tiles: np.ndarray, max_waste: float = 0.25) -> tuple[TileGroup, ...]:
  """Buckets query blocks by tile count, padding each bucket to its largest.

  A bucket admits a row while its padded size stays within (1 + max_waste)
  of the row's own count, so padding costs at most that fraction of the
  real work, and patterns with many distinct row counts (strided, global
  tokens) still compile to a handful of matmuls.
  """
  counts = np.count_nonzero(tiles != EMPTY, axis=1)
  order = np.argsort(-counts, kind='stable')
  buckets: list[list[int]] = []
  for row in order:
    if buckets and counts[row] * (1 + max_waste) >= counts[buckets[-1][0]]:
      buckets[-1].append(int(row))
    else:
      buckets.append([int(row)])
  groups = []
  for rows in buckets:
    q_blocks = np.array(sorted(rows), np.int32)
    groups.append(TileGroup(q_blocks, *tiles_by_row(tiles, q_blocks, int(counts[rows[0]]))))
  return tuple(groups)


def tiles_by_row(tiles: np.ndarray, rows: np.ndarray, width: int):
  """The non-empty tiles of each of `rows`, left-aligned and padded to `width`.

  Returns (int32 [len(rows), width] the other axis' block of each tile,
  int8 [len(rows), width] its state, PADDING after the row's last tile).
  """
  blocks = np.zeros((len(rows), width), np.int32)
  state = np.full((len(rows), width), PADDING, np.int8)
  for g, row in enumerate(rows):
    (cols,) = np.nonzero(tiles[row] != EMPTY)
    blocks[g, :cols.size] = cols
    state[g, :cols.size] = tiles[row, cols]
  return blocks, state


def group_key_blocks(groups: tuple[TileGroup, ...], num_kv_blocks: int,
                     max_waste: float = 0.25) -> tuple[KVGroup, ...]:
  """The tiles of `groups` seen from the key side (for the backward pass).

  Key blocks are bucketed by how many query blocks see them, exactly as
  `group_query_blocks` buckets query blocks; each entry names the query
  block and the tile's position in the flat order of `groups`.
  """
  kv, q, index, offset = [], [], [], 0
  for group in groups:
    real = group.tile_state != PADDING
    flat = offset + np.arange(group.num_tiles).reshape(group.kv_blocks.shape)
    kv.append(group.kv_blocks[real])
    q.append(np.broadcast_to(group.q_blocks[:, None], real.shape)[real])
    index.append(flat[real])
    offset += group.num_tiles
  kv, q, index = (np.concatenate(x).astype(np.int64) if x else np.zeros(0, np.int64)
                  for x in (kv, q, index))
  by_kv = np.argsort(kv, kind='stable')  # keeps each column's rows in order
  kv, q, index = kv[by_kv], q[by_kv], index[by_kv]
  counts = np.bincount(kv, minlength=num_kv_blocks)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  order = np.argsort(-counts, kind='stable')
  buckets: list[list[int]] = []
  for col in order:
    if buckets and counts[col] * (1 + max_waste) >= counts[buckets[-1][0]]:
      buckets[-1].append(int(col))
    else:
      buckets.append([int(col)])
  kv_groups = []
  for cols in buckets:
    width = int(counts[cols[0]])
    kv_blocks = np.array(sorted(cols), np.int32)
    q_blocks = np.zeros((len(cols), width), np.int32)
    tile_index = np.full((len(cols), width), offset, np.int32)
    for g, col in enumerate(kv_blocks):
      span = slice(starts[col], starts[col] + counts[col])
      q_blocks[g, :counts[col]] = q[span]
      tile_index[g, :counts[col]] = index[span]
    kv_groups.append(KVGroup(kv_blocks, q_blocks, tile_index))
  return tuple(kv_groups)


@functools.lru_cache(maxsize=64)
def block_layout(mask: masks_lib.Mask, seq_len: int, block_q: int,
                 block_kv: int | None = None) -> BlockLayout:
  """The cached layout of `mask` over `seq_len` tokens."""
  block_kv = block_kv or block_q
  if seq_len <= 0 or block_q <= 0 or block_kv <= 0:
    raise ValueError(f'need positive sizes, got seq_len={seq_len}, '
                     f'block_q={block_q}, block_kv={block_kv}')
  tiles = classify_tiles(mask, seq_len, block_q, block_kv)
  groups = group_query_blocks(tiles)
  return BlockLayout(seq_len, block_q, block_kv, tiles, groups,
                     group_key_blocks(groups, tiles.shape[1]))


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  """`x` zero-padded at the end of `axis` to `size` (both attention kernels)."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)
