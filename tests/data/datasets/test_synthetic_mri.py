"""synthetic_mri: deterministic, varied, and not solvable by thresholding."""

import numpy as np
import tensorflow_datasets as tfds

from lintunet_jax.data.datasets import base, synthetic_mri

SIZE = 96


def _generated(seed=0, count=240):
  return synthetic_mri.generate(count, SIZE, seed=seed)


def test_deterministic_in_the_seed():
  images, masks = _generated(seed=5, count=40)
  again_images, again_masks = _generated(seed=5, count=40)
  other_images, _ = _generated(seed=6, count=40)
  np.testing.assert_array_equal(images, again_images)
  np.testing.assert_array_equal(masks, again_masks)
  assert np.mean(images != other_images) > 0.5


def test_tumours_are_varied_and_some_slices_have_none():
  images, masks = _generated()
  assert images.dtype == np.uint8 and set(np.unique(masks)) == {0, 1}
  areas = masks.reshape(len(masks), -1).sum(1)
  empty = np.mean(areas == 0)
  assert 0.05 < empty < 0.3
  lesions = areas[areas > 0] / SIZE ** 2
  assert np.percentile(lesions, 10) < 0.01 < 0.03 < np.percentile(lesions, 90)
  # Tumours both brighter and darker than the tissue around them.
  brighter = darker = 0
  for image, mask in zip(images, masks):
    if mask.sum() < 20:
      continue
    ring = _dilate(mask, 4) & ~_dilate(mask, 2)
    delta = image[mask > 0].mean() - image[ring].mean()
    brighter += delta > 8
    darker += delta < -8
  assert brighter > 30 and darker > 5


def test_bright_distractors_defeat_a_global_threshold():
  """The skull ring and vessels are brighter than most tumours, so the best
  single intensity threshold segments them poorly; an untrained model has
  no better a prior."""
  images, masks = _generated()
  truth = masks > 0
  best = 0.0
  for threshold in range(40, 250, 5):
    predicted = images > threshold
    union = np.logical_or(predicted, truth).sum()
    best = max(best, np.logical_and(predicted, truth).sum() / union)
  assert best < 0.2
  # ...while the skull is bright and never tumour.
  assert np.percentile(images[:, SIZE // 2, :3].astype(float), 50) < 60
  assert images.max(axis=(1, 2)).min() > 150


def test_prepares_through_tfds_with_the_requested_sizes(tmp_path):
  config = synthetic_mri.SyntheticMriConfig(
      name='tiny', image_size=32, num_train=12, num_validation=4, num_test=3)
  builder = tfds.builder('synthetic_mri', config=config,
                         data_dir=str(tmp_path))
  builder.download_and_prepare(file_format='array_record')
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 12, 'validation': 4, 'test': 3}
  images, masks = synthetic_mri.generate(12, 32, seed=(0, 0))
  source = builder.as_data_source('train')
  by_name = {source[i]['file_name'].decode(): source[i]
             for i in range(len(source))}
  for i in range(12):
    stored = by_name[f'train_{i:05d}']
    np.testing.assert_array_equal(stored['image'][..., 0], images[i])
    np.testing.assert_array_equal(stored['mask'], masks[i])
  assert base.load_report(builder).source == 'generated (seed 0, 32x32)'


def _dilate(mask, steps):
  out = mask > 0
  for _ in range(steps):
    grown = out.copy()
    grown[1:] |= out[:-1]
    grown[:-1] |= out[1:]
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    out = grown
  return out
