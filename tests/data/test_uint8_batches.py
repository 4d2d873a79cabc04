"""The uint8 datasets give exactly the batches they gave before the input
path learnt float multi-channel volumes (fixture: tests/data/uint8_batches.py,
recorded before that change). A change to resizing, channel conversion,
augmentation, normalisation, patch cropping or batching of uint8 images
fails here."""

from __future__ import annotations

import numpy as np

from tests.data import uint8_batches


def test_uint8_batches_are_unchanged(tmp_path):
  want = np.load(uint8_batches.FIXTURE)
  got = uint8_batches.batches(str(tmp_path / 'data'))
  assert sorted(got) == sorted(want.files)
  for name in want.files:
    expected, actual = want[name], got[name]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if np.issubdtype(expected.dtype, np.floating):
      np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(actual, expected, err_msg=name)
