"""Tile classification and grouping against brute force."""

import numpy as np
import pytest

from lintunet_jax.attention import layout as bl
from lintunet_jax.attention import masks


def _brute_force_tiles(mask, n, block):
  nb = -(-n // block)
  dense = np.zeros((nb * block, nb * block), bool)
  idx = np.arange(n)
  dense[:n, :n] = np.asarray(mask(idx[:, None], idx[None, :]), bool)
  tiles = np.zeros((nb, nb), np.int8)
  for i in range(nb):
    for j in range(nb):
      rows = slice(i * block, min((i + 1) * block, n))
      tile = dense[rows, j * block:(j + 1) * block]
      full = tile.all() and (j + 1) * block <= n
      tiles[i, j] = bl.FULL if full else (bl.PARTIAL if tile.any() else bl.EMPTY)
  return tiles


PATTERNS = [
    masks.LocalMask(5),
    masks.StridedMask(8),
    masks.FixedMask(16, 2),
    masks.GlobalTokensMask(3),
    masks.Local2DMask(1, grid_width=12),
    masks.LocalMask(3) | masks.StridedMask(12),
    masks.FullMask(),
    masks.EmptyMask(),
]


@pytest.mark.parametrize('mask', PATTERNS, ids=str)
@pytest.mark.parametrize('n, block', [(96, 8), (100, 16), (144, 12)])
def test_tiles_match_brute_force(mask, n, block):
  layout = bl.block_layout(mask, n, block)
  np.testing.assert_array_equal(layout.tiles, _brute_force_tiles(mask, n, block))


@pytest.mark.parametrize('mask', PATTERNS, ids=str)
def test_groups_cover_every_nonempty_tile_once(mask):
  layout = bl.block_layout(mask, 100, 8)
  seen = np.full(layout.tiles.shape, bl.EMPTY, np.int8)
  q_blocks = np.concatenate([g.q_blocks for g in layout.groups])
  assert sorted(q_blocks.tolist()) == list(range(layout.tiles.shape[0]))
  for group in layout.groups:
    for row, cols, states in zip(group.q_blocks, group.kv_blocks, group.tile_state):
      real = states != bl.PADDING
      assert (seen[row, cols[real]] == bl.EMPTY).all()  # no tile twice
      seen[row, cols[real]] = states[real]
  np.testing.assert_array_equal(seen, layout.tiles)
  padding = sum(g.num_tiles for g in layout.groups) - layout.num_nonempty
  assert padding <= 0.25 * layout.num_nonempty + layout.tiles.shape[0]


def test_local_window_touches_only_the_diagonal_band():
  window, block, n = 8, 16, 256
  tiles = bl.block_layout(masks.LocalMask(window), n, block).tiles
  i, j = np.indices(tiles.shape)
  # |q - kv| < 8 with 16-wide tiles reaches only the neighbouring tile.
  assert (tiles[np.abs(i - j) > 1] == bl.EMPTY).all()
  assert (tiles[np.abs(i - j) <= 1] != bl.EMPTY).all()
  # Diagonal tiles are partial (corners are outside the window).
  assert (np.diag(tiles) == bl.PARTIAL).all()


def test_fixed_pattern_has_full_diagonal_tiles_when_blocks_align():
  tiles = bl.block_layout(masks.FixedMask(16, 1), 128, 16).tiles
  assert (np.diag(tiles) == bl.FULL).all()
  off_diagonal = ~np.eye(8, dtype=bool)
  assert (tiles[off_diagonal] == bl.PARTIAL).all()  # the summary columns


def test_padding_keys_are_never_full():
  tiles = bl.block_layout(masks.FullMask(), 20, 8).tiles
  assert (tiles[:, :2] == bl.FULL).all()
  assert (tiles[:, 2] == bl.PARTIAL).all()  # keys 20..23 do not exist


def test_layouts_are_cached():
  assert bl.block_layout(masks.LocalMask(4), 64, 8) is bl.block_layout(masks.LocalMask(4), 64, 8)


def test_bad_sizes_are_rejected():
  with pytest.raises(ValueError, match='positive'):
    bl.block_layout(masks.LocalMask(4), 0, 8)
