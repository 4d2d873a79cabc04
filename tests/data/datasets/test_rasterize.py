"""Polygon, box and RLE rasterisation against independent references."""

import numpy as np
import pytest

from datasets_testlib import reference_polygon_mask
from lintunet_jax.data.datasets import rasterize


def _fill(xy, height, width):
  mask = np.zeros((height, width), np.uint8)
  rasterize.fill_polygon(mask, np.asarray(xy, np.float64).reshape(-1, 2))
  return mask


def test_integer_rectilinear_polygon_covers_exact_pixels():
  # An L: box [2, 9) x [1, 4) plus box [2, 5) x [4, 10), in x, y.
  mask = _fill([2, 1, 9, 1, 9, 4, 5, 4, 5, 10, 2, 10], 12, 11)
  expected = np.zeros((12, 11), np.uint8)
  expected[1:4, 2:9] = 1
  expected[4:10, 2:5] = 1
  np.testing.assert_array_equal(mask, expected)


def test_quarter_pixel_box_like_the_seed_export():
  # The seed writes boxes as 5-vertex closed polygons with .25/.75 corners.
  mask = _fill([13.75, 2.25, 3, 2.25, 3, 9.5, 13.75, 9.5, 13.75, 2.25], 12,
               16)
  expected = np.zeros((12, 16), np.uint8)
  expected[2:9, 3:14] = 1  # centres 2.5..8.5 and 3.5..13.5 are inside
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize('seed', range(12))
def test_random_polygons_match_point_in_polygon_reference(seed):
  """Concave, self-intersecting and partly-outside polygons alike."""
  rng = np.random.default_rng(seed)
  count = rng.integers(3, 10)
  angles = np.sort(rng.uniform(0, 2 * np.pi, count))
  if seed % 3 == 0:
    rng.shuffle(angles)  # self-intersecting
  radii = rng.uniform(2, 14, count)
  centre = rng.uniform(-2, 22, 2)  # sometimes partly outside the image
  xy = np.stack([centre[0] + radii * np.cos(angles),
                 centre[1] + radii * np.sin(angles)], 1)
  reference = reference_polygon_mask(xy, 18, 21)
  np.testing.assert_array_equal(_fill(xy, 18, 21), reference)


def test_centres_on_edges_follow_the_half_open_rule():
  # Triangle whose slanted edge passes exactly through pixel centres.
  xy = [0, 0, 8, 0, 0, 8]
  mask = _fill(xy, 8, 8)
  np.testing.assert_array_equal(mask, reference_polygon_mask(xy, 8, 8))
  # Row r: centres (c + .5) with c + .5 < 8 - (r + .5), i.e. c <= 6 - r.
  assert mask.sum(axis=1).tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
  # Two boxes sharing an edge never share a pixel.
  left, right = _fill([0, 0, 4, 0, 4, 5, 0, 5], 6, 8), _fill(
      [4, 0, 8, 0, 8, 5, 4, 5], 6, 8)
  assert not (left & right).any() and (left | right).sum() == 40


def test_degenerate_and_outside_polygons_draw_nothing():
  assert _fill([1, 1, 5, 5, 9, 9], 10, 10).sum() == 0  # collinear
  assert _fill([20, 20, 30, 20, 30, 30], 10, 10).sum() == 0  # outside
  assert rasterize.polygon_area(np.array([[1, 1], [5, 5], [9, 9]])) == 0


def test_box_matches_its_polygon():
  mask = np.zeros((10, 12), np.uint8)
  rasterize.fill_box(mask, [1.5, 2.0, 4.0, 3.0])
  np.testing.assert_array_equal(
      mask, reference_polygon_mask([1.5, 2, 5.5, 2, 5.5, 5, 1.5, 5], 10, 12))
  assert mask.sum() == 12


def _pycocotools_example_mask():
  mask = np.zeros((7, 9), np.uint8)
  mask[1:4, 2:6] = 1
  mask[5, :] = 1
  mask[6, 8] = 1
  return mask


def test_compressed_rle_decodes_a_pycocotools_string():
  # Written by pycocotools 2.0.11 `mask.encode` for the mask above.
  rle = {'size': [7, 9], 'counts': '5160L2ON12ON12ON12ON500001'}
  np.testing.assert_array_equal(rasterize.decode_rle(rle, 7, 9),
                                _pycocotools_example_mask())
  rle['counts'] = rle['counts'].encode()  # bytes, as pycocotools returns
  np.testing.assert_array_equal(rasterize.decode_rle(rle, 7, 9),
                                _pycocotools_example_mask())


def test_uncompressed_rle_is_column_major():
  mask = _pycocotools_example_mask()
  # Columns top to bottom: col 0 has rows 5 only, etc.; runs written by hand
  # for the first columns, the rest checked by totals.
  flat = mask.T.reshape(-1)
  changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
  counts = np.diff(np.concatenate([[0], changes])).tolist()
  assert counts[:3] == [5, 1, 6]
  decoded = rasterize.decode_rle({'size': [7, 9], 'counts': counts}, 7, 9)
  np.testing.assert_array_equal(decoded, mask)


def test_rle_with_wrong_size_or_total_is_refused():
  with pytest.raises(ValueError, match='differs from the image'):
    rasterize.decode_rle({'size': [9, 7], 'counts': [63]}, 7, 9)
  with pytest.raises(ValueError, match='sum to 60'):
    rasterize.decode_rle({'size': [7, 9], 'counts': [30, 30]}, 7, 9)
