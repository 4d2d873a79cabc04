"""segmentation_folder: layouts, pairing, formats and mask semantics."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from datasets_testlib import prepare, read_split, save, textured_image
from lintunet_jax.data.datasets import DataError, base, segmentation_folder


def _mask(seed, height, width, values=(0, 255)):
  rng = np.random.default_rng(seed)
  return np.asarray(values, np.uint8)[rng.integers(0, len(values),
                                                   (height, width))]


def test_split_folders_formats_suffixes_and_nesting(tmp_path):
  raw = tmp_path / 'raw'
  cases = {  # key -> (split, image path, mask path, image, mask)
      'a': ('train', 'a.png', 'a.png'),
      'b': ('train', 'b.tif', 'b_mask.gif'),  # tif image, gif mask + suffix
      'p1/c': ('train', 'p1/c.bmp', 'p1/c.png'),  # nested folder
      'd': ('val', 'd.png', 'd_seg.tiff'),  # val -> validation
      'e': ('test', 'e.gif', 'e.bmp'),
  }
  expected = {}
  for i, (key, (split, image_name, mask_name)) in enumerate(cases.items()):
    image = textured_image(i, 13, 17)  # odd sizes: stored as they are
    mask = _mask(i, 13, 17)
    save(raw / split / 'images' / image_name, image)
    save(raw / split / 'masks' / mask_name, mask)
    expected[image_name] = (image, (mask >= 128).astype(np.uint8))
  (raw / 'train' / 'images' / 'notes.txt').write_text('not an image')
  (raw / 'train' / 'images' / '.DS_Store').write_bytes(b'\0')

  builder = prepare('segmentation_folder', tmp_path / 'data', raw)
  assert builder.info.splits['train'].num_examples == 3
  stored = {}
  for split in ('train', 'validation', 'test'):
    stored.update(read_split(builder, split))
  assert sorted(stored) == sorted(expected)
  for name, (image, mask) in expected.items():
    np.testing.assert_array_equal(stored[name]['image'][..., 0], image)
    np.testing.assert_array_equal(stored[name]['mask'], mask)
  assert base.load_report(builder).handled == {
      'non-image files ignored': 1,
      'binary masks stored as 0/255 or lossy (thresholded at 128)': 5}


@pytest.mark.parametrize('layout', ['flat', 'kind_then_split'])
def test_other_layouts(tmp_path, layout):
  raw = tmp_path / 'raw'
  splits = ['train'] if layout == 'flat' else ['train', 'test']
  for s, split in enumerate(splits):
    sub = '' if layout == 'flat' else split
    save(raw / 'images' / sub / f'{split}.png', textured_image(s, 8, 8, 3))
    save(raw / 'masks' / sub / f'{split}.png', _mask(s, 8, 8, (0, 1)))
  builder = prepare('segmentation_folder', tmp_path / 'data', raw)
  assert sorted(builder.info.splits) == sorted(splits)
  example = read_split(builder, 'train')['train.png']
  np.testing.assert_array_equal(example['mask'], _mask(0, 8, 8, (0, 1)))
  # Gray storage of a colour image: ITU-R 601 luma, rounded.
  rgb = textured_image(0, 8, 8, 3).astype(np.int64)
  luma = (rgb @ np.array([299, 587, 114]) + 500) // 1000
  np.testing.assert_array_equal(example['image'][..., 0], luma)


def test_multiclass_masks_keep_class_ids(tmp_path):
  raw = tmp_path / 'raw'
  mask = _mask(3, 9, 11, values=(0, 1, 2, 3))
  save(raw / 'images' / 'x.png', textured_image(3, 9, 11))
  save(raw / 'masks' / 'x.png', mask)
  config = segmentation_folder.config_for(channels=1, num_classes=4)
  builder = prepare('segmentation_folder', tmp_path / 'data', raw,
                    config=config)
  assert builder.builder_config.name == 'gray_classes4'
  np.testing.assert_array_equal(read_split(builder, 'train')['x.png']['mask'],
                                mask)


@pytest.mark.parametrize('num_classes,values,problem', [
    (1, (0, 1, 2, 3), 'looks like class ids'),
    (3, (0, 1, 2, 3), r'mask values 3 are not class ids below num_classes=3'),
])
def test_masks_that_do_not_fit_num_classes(tmp_path, num_classes, values,
                                           problem):
  raw = tmp_path / 'raw'
  save(raw / 'images' / 'x.png', textured_image(3, 9, 11))
  save(raw / 'masks' / 'x.png', _mask(3, 9, 11, values))
  config = segmentation_folder.config_for(1, num_classes)
  with pytest.raises(DataError, match=r'masks/x\.png: .*' + problem):
    prepare('segmentation_folder', tmp_path / 'data', raw, config=config)


def test_colour_mask_is_refused_with_its_name(tmp_path):
  raw = tmp_path / 'raw'
  save(raw / 'images' / 'x.png', textured_image(3, 9, 11))
  save(raw / 'masks' / 'x.png', textured_image(4, 9, 11, 3))
  with pytest.raises(ValueError, match=r'masks/x\.png: colour mask'):
    prepare('segmentation_folder', tmp_path / 'data', raw)


def test_ambiguous_and_duplicate_names(tmp_path):
  raw = tmp_path / 'raw'
  save(raw / 'images' / 'x.png', textured_image(3, 4, 4))
  save(raw / 'masks' / 'x.png', _mask(3, 4, 4))
  save(raw / 'masks' / 'x_mask.png', _mask(3, 4, 4))
  with pytest.raises(DataError, match='several masks: x -> x, x_mask'):
    prepare('segmentation_folder', tmp_path / 'data', raw)
  (raw / 'masks' / 'x_mask.png').unlink()
  save(raw / 'images' / 'x.jpg', textured_image(3, 4, 4))
  with pytest.raises(DataError, match='share a name .*: x'):
    prepare('segmentation_folder', tmp_path / 'data', raw)


def test_configs_follow_channels_and_classes():
  assert segmentation_folder.config_for(1, 1).name == 'gray_binary'
  assert segmentation_folder.config_for(1, 2).name == 'gray_binary'
  assert segmentation_folder.config_for(3, 1).name == 'rgb_binary'
  assert segmentation_folder.config_for(3, 5).name == 'rgb_classes5'
  builder = tfds.builder('segmentation_folder', config='rgb_binary',
                         data_dir='/nonexistent')
  assert builder.info.features['image'].shape == (None, None, 3)


def test_training_and_testing_folders_and_the_folders_left_out(tmp_path):
  """Spellings as public datasets ship them; what is not read is listed."""
  raw = tmp_path / 'raw'
  for s, folder in enumerate(['Training', 'testing', 'validation']):
    save(raw / folder / 'images' / f'{folder}.png', textured_image(s, 8, 8))
    save(raw / folder / 'masks' / f'{folder}.png', _mask(s, 8, 8))
  save(raw / 'Training' / 'overlays' / 'Training.png', textured_image(9, 8, 8))
  (raw / 'extra' / 'more').mkdir(parents=True)
  (raw / '.cache').mkdir()
  builder = prepare('segmentation_folder', tmp_path / 'data', raw)
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} \
      == {'train': 1, 'test': 1, 'validation': 1}
  report = base.load_report(builder)  # as stored with the dataset
  assert report.ignored_folders == ['Training/overlays/', 'extra/']
  assert ('folders ignored (not a split, images or masks folder): '
          'Training/overlays/, extra/') in report.format()


def test_folders_left_out_of_the_kind_then_split_layout(tmp_path):
  raw = tmp_path / 'raw'
  for s, split in enumerate(['training', 'test']):
    save(raw / 'images' / split / 'a.png', textured_image(s, 8, 8))
    save(raw / 'masks' / split / 'a.png', _mask(s, 8, 8))
  save(raw / 'masks' / 'old' / 'a.png', _mask(5, 8, 8))
  (raw / 'docs').mkdir()
  builder = prepare('segmentation_folder', tmp_path / 'data', raw)
  assert sorted(builder.info.splits) == ['test', 'train']
  assert base.load_report(builder).ignored_folders == ['docs/', 'masks/old/']


def test_two_spellings_of_one_split_are_refused(tmp_path):
  raw = tmp_path / 'raw'
  for folder in ('train', 'training'):
    save(raw / folder / 'images' / 'a.png', textured_image(0, 8, 8))
    save(raw / folder / 'masks' / 'a.png', _mask(0, 8, 8))
  with pytest.raises(DataError, match=r"both train/ and training/ would "
                     r"become split 'train'"):
    prepare('segmentation_folder', tmp_path / 'data', raw)
