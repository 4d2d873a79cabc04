"""Mask patterns against their definitions, written out as explicit loops."""

import numpy as np
import pytest

from lintunet_jax.attention import masks


def _dense(mask, n):
  return np.asarray(mask(np.arange(n)[:, None], np.arange(n)[None, :]), bool)


def _loop(predicate, n):
  return np.array([[predicate(i, j) for j in range(n)] for i in range(n)])


@pytest.mark.parametrize('n', [7, 33, 64])
def test_patterns_match_their_definitions(n):
  w, s, l, c, g = 3, 5, 8, 2, 2
  cases = [
      (masks.LocalMask(w), lambda i, j: abs(i - j) < w),
      (masks.StridedMask(s), lambda i, j: (i - j) % s == 0),
      (masks.FixedMask(l, c), lambda i, j: i // l == j // l or j % l >= l - c),
      (masks.GlobalTokensMask(g), lambda i, j: i < g or j < g),
      (masks.CausalMask(), lambda i, j: j <= i),
      (masks.FullMask(), lambda i, j: True),
      (masks.EmptyMask(), lambda i, j: False),
  ]
  for mask, predicate in cases:
    np.testing.assert_array_equal(_dense(mask, n), _loop(predicate, n), err_msg=str(mask))


def test_local_2d_respects_the_grid():
  height, width, r = 5, 7, 1
  mask = masks.Local2DMask(r, grid_width=width)
  n = height * width
  expected = _loop(lambda i, j: abs(i // width - j // width) <= r
                   and abs(i % width - j % width) <= r, n)
  np.testing.assert_array_equal(_dense(mask, n), expected)
  # A 1-D window would wrap from the end of one row to the next; this must not.
  assert not _dense(mask, n)[width - 1, width]


def test_composition_and_parsing():
  n = 40
  a, b = masks.LocalMask(2), masks.StridedMask(7)
  np.testing.assert_array_equal(_dense(a | b, n), _dense(a, n) | _dense(b, n))
  np.testing.assert_array_equal(_dense(a & ~b, n), _dense(a, n) & ~_dense(b, n))
  parsed = masks.parse_pattern('local_1d(window=2) | strided(7)')
  assert parsed == a | b
  bound = masks.bind_grid(masks.parse_pattern('local_2d(radius=1) & ~causal()'), 8)
  np.testing.assert_array_equal(
      _dense(bound, 64),
      _dense(masks.Local2DMask(1, 8), 64) & ~_dense(masks.CausalMask(), 64))


@pytest.mark.parametrize('spec, message', [
    ('local_3d(2)', 'unknown mask'),
    ('local_1d(window=0)', 'positive'),
    ('local_1d(window=2.5)', 'integers'),
    ('__import__("os")', 'unknown mask'),
    ('local_1d(2) +', 'not an expression'),
    ('local_1d(2) + strided(3)', 'expected mask calls'),
    ('local_1d(size=2)', 'bad arguments'),
])
def test_bad_patterns_are_rejected_clearly(spec, message):
  with pytest.raises(ValueError, match=message):
    masks.parse_pattern(spec)


def test_unbound_local_2d_says_what_to_do():
  with pytest.raises(ValueError, match='grid width'):
    masks.Local2DMask(1)(np.arange(4)[:, None], np.arange(4)[None])
