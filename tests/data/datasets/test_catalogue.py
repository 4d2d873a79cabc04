"""Catalogue datasets: example mapping, and the TensorFlow-free failure."""

import numpy as np
import pytest

from datasets_testlib import config_for
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.data.datasets import catalogue, preparation


def test_pet_trimap_to_binary_and_three_classes():
  adapter = catalogue.adapter_for('oxford_iiit_pet:4.0.0',
                                  ['image', 'segmentation_mask', 'label'])
  trimap = np.array([[1, 2, 3], [2, 2, 1]], np.uint8)[..., None]
  image = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
  example = {'image': image, 'segmentation_mask': trimap, 'label': 4}
  got_image, binary = catalogue.read_example(adapter, example, num_classes=1)
  np.testing.assert_array_equal(got_image, image)
  np.testing.assert_array_equal(binary, [[1, 0, 1], [0, 0, 1]])
  _, classes = catalogue.read_example(adapter, example, num_classes=3)
  np.testing.assert_array_equal(classes, [[0, 1, 2], [1, 1, 0]])


def test_unknown_catalogue_dataset_by_feature_names():
  adapter = catalogue.adapter_for('some_set', ['image', 'mask', 'id'])
  assert (adapter.image_key, adapter.mask_key) == ('image', 'mask')
  with pytest.raises(ValueError, match="features \\['id', 'picture'\\]"):
    catalogue.adapter_for('other_set', ['picture', 'id'])


def test_unprepared_catalogue_dataset_explains_the_tensorflow_extra(tmp_path):
  if preparation._has_tensorflow():  # pylint: disable=protected-access
    pytest.skip('TensorFlow is installed: TFDS would download for real')
  config = config_for('oxford_iiit_pet', tmp_path)
  with pytest.raises(RuntimeError, match='needs TensorFlow: pip install '
                     'tensorflow'):
    input_pipeline.prepare_dataset(config)
