"""image_io: the one file reader, its conversions and its error messages."""

import io

import numpy as np
import pytest
from PIL import Image

from lintunet_jax.data import image_io
from lintunet_jax.data.image_io import ImageReadError


def _pixels(seed, shape):
  return np.random.default_rng(seed).integers(1, 256, shape, dtype=np.uint8)


def _save(path, image, **kwargs):
  image.save(path, **kwargs)
  return path


@pytest.mark.parametrize('suffix', ['.png', '.tif', '.bmp', '.gif'])
def test_lossless_formats_round_trip_gray(tmp_path, suffix):
  gray = _pixels(0, (9, 14))
  path = _save(tmp_path / f'x{suffix}', Image.fromarray(gray))
  # GIF stores a palette; a gray one reads back as gray.
  np.testing.assert_array_equal(image_io.read_image(path), gray)


def test_colour_palette_reads_as_colour(tmp_path):
  labels = np.array([[0, 1], [2, 1]], np.uint8)
  image = Image.fromarray(labels, 'P')
  image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 759)
  np.testing.assert_array_equal(
      image_io.read_image(_save(tmp_path / 'p.png', image)),
      [[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [40, 50, 60]]])


def test_colour_alpha_and_bilevel_conversions(tmp_path):
  rgba = _pixels(1, (6, 5, 4))
  read = image_io.read_image(_save(tmp_path / 'a.png',
                                   Image.fromarray(rgba, 'RGBA')))
  np.testing.assert_array_equal(read, rgba[..., :3])  # alpha dropped
  bits = _pixels(2, (6, 5)) > 128
  read = image_io.read_image(_save(tmp_path / 'b.png', Image.fromarray(bits)))
  np.testing.assert_array_equal(read, bits.astype(np.uint8) * 255)
  assert read.dtype == np.uint8


def test_jpeg_is_decoded_like_pil(tmp_path):
  rgb = _pixels(3, (16, 16, 3))
  path = _save(tmp_path / 'c.jpg', Image.fromarray(rgb), quality=90)
  np.testing.assert_array_equal(image_io.read_image(path),
                                np.asarray(Image.open(path).convert('RGB')))


def test_16_bit_images_are_stretched_from_their_own_range(tmp_path):
  values = np.array([[1000, 1500], [3000, 2000]], np.uint16)
  path = _save(tmp_path / 'd.png', Image.fromarray(values))
  read = image_io.read_image(path)
  np.testing.assert_array_equal(read, [[0, 64], [255, 128]])
  assert read.dtype == np.uint8


def test_masks_keep_label_values(tmp_path):
  labels = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
  palette = Image.fromarray(labels, 'P')
  palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 756)
  np.testing.assert_array_equal(
      image_io.read_mask(_save(tmp_path / 'p.png', palette)), labels)
  # Grayscale saved as GIF: the palette order is PIL's, the gray levels are
  # what the mask shows.
  gray = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
  np.testing.assert_array_equal(
      image_io.read_mask(_save(tmp_path / 'g.gif', Image.fromarray(gray))),
      gray)
  same = np.repeat(labels[..., None], 3, axis=-1)
  np.testing.assert_array_equal(
      image_io.read_mask(_save(tmp_path / 's.png', Image.fromarray(same))),
      labels)
  wide = np.array([[0, 7], [300, 1]], np.int32)
  with pytest.raises(ImageReadError, match=r'w\.tif: mask values must be '
                     r'integers in 0\.\.255, found 0\.\.300'):
    image_io.read_mask(_save(tmp_path / 'w.tif', Image.fromarray(wide)))


def test_colour_mask_is_refused(tmp_path):
  path = _save(tmp_path / 'm.png', Image.fromarray(_pixels(4, (4, 4, 3))))
  with pytest.raises(ImageReadError, match=r'm\.png: colour mask'):
    image_io.read_mask(path)


def test_errors_name_the_file_and_the_problem(tmp_path):
  with pytest.raises(ImageReadError, match=r'gone\.png: file not found'):
    image_io.read_image(tmp_path / 'gone.png')
  (tmp_path / 'text.png').write_text('hello')
  with pytest.raises(ImageReadError, match=r'text\.png: not a readable image'):
    image_io.read_image(tmp_path / 'text.png')
  with pytest.raises(ImageReadError, match='is a directory'):
    image_io.read_image(tmp_path)

  buffer = io.BytesIO()
  Image.fromarray(_pixels(5, (64, 64, 3))).save(buffer, 'JPEG')
  (tmp_path / 'cut.jpg').write_bytes(buffer.getvalue()[:1500])
  with pytest.raises(ImageReadError, match=r'cut\.jpg: corrupt or truncated'):
    image_io.read_image(tmp_path / 'cut.jpg')
  with pytest.raises(ImageReadError, match=r'cut\.jpg: corrupt or truncated'):
    image_io.read_mask(tmp_path / 'cut.jpg')

  frames = [Image.fromarray(_pixels(i, (8, 8))) for i in range(3)]
  frames[0].save(tmp_path / 'movie.gif', save_all=True,
                 append_images=frames[1:])
  with pytest.raises(ImageReadError, match=r'movie\.gif: has 3 frames'):
    image_io.read_image(tmp_path / 'movie.gif')


def test_read_size_reads_only_the_header(tmp_path):
  path = _save(tmp_path / 'h.png', Image.fromarray(_pixels(6, (7, 19))))
  assert image_io.read_size(path) == (7, 19)
  with pytest.raises(ImageReadError, match='file not found'):
    image_io.read_size(tmp_path / 'none.png')
