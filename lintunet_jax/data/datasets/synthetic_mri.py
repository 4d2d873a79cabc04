"""`synthetic_mri`: MRI-like slices with tumour masks, generated in seconds.

The embedded default, so the project trains and tests with no download. It
is built to be easy to see and not trivial to segment:
  * a bright skull ring, bright small vessels and an oedema halo that are
    NOT tumour, so "segment what is bright" fails;
  * tumours of varied size (radius about 3 % to 11 % of the width), irregular
    outline, either brighter or darker than tissue, some with a bright rim
    around a dark core, with contrast from faint to strong;
  * smooth tissue texture, dark ventricles, a multiplicative bias field and
    Rician noise of varied strength; about 15 % of slices have no tumour.
Everything is vectorised numpy, deterministic from the config's seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from lintunet_jax.data.datasets import base

_SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}
_CHUNK = 250  # slices generated at once (bounds memory at ~100 MB)
_TUMOUR_COUNT_PROBS = (0.15, 0.55, 0.22, 0.08)  # 0, 1, 2 or 3 tumours


@dataclasses.dataclass
class SyntheticMriConfig(tfds.core.BuilderConfig):
  image_size: int = 128
  num_train: int = 2000
  num_validation: int = 200
  num_test: int = 200
  seed: int = 0


class SyntheticMri(base.SegmentationBuilder):
  """Generated MRI-like slices with binary tumour masks."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SyntheticMriConfig(name='default', description='128x128, 2000/200/200.'),
      SyntheticMriConfig(name='small', image_size=64, num_train=256,
                         num_validation=64, num_test=64,
                         description='64x64, 256/64/64: for smoke tests.'),
  ]
  DEFAULT_CONFIG_NAME = 'default'
  DESCRIPTION = __doc__

  def _source_description(self, dl_manager) -> str:
    c = self.builder_config
    return f'generated (seed {c.seed}, {c.image_size}x{c.image_size})'

  def _split_generators(self, dl_manager):
    c = self.builder_config
    sizes = {'train': c.num_train, 'validation': c.num_validation,
             'test': c.num_test}
    return {split: self._generate_examples(split, n)
            for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split, count):
    c = self.builder_config
    images, masks = generate(count, c.image_size,
                             seed=(c.seed, _SPLIT_IDS[split]))
    for i, (image, mask) in enumerate(zip(images, masks)):
      name = f'{split}_{i:05d}'
      yield name, self.example(split, image[:, :, None], mask, name)


def generate(count: int, size: int, seed) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [count, size, size] and 0/1 masks, deterministic in seed."""
  rng = np.random.default_rng(seed)
  images, masks = [], []
  for start in range(0, count, _CHUNK):
    image, mask = _generate_chunk(rng, min(_CHUNK, count - start), size)
    images.append(image)
    masks.append(mask)
  if not images:
    return (np.zeros((0, size, size), np.uint8),) * 2
  return np.concatenate(images), np.concatenate(masks)


def _generate_chunk(rng: np.random.Generator, n: int, size: int):
  grid = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
  y, x = np.meshgrid(grid, grid, indexing='ij')  # pixel centres in [-1, 1]
  u = lambda lo, hi: rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)

  # Head: a rotated ellipse; skull = its outer band, brain = inside it.
  angle = u(-0.25, 0.25)
  hx, hy = x - u(-0.06, 0.06), y - u(-0.06, 0.06)
  rx = np.cos(angle) * hx + np.sin(angle) * hy
  ry = -np.sin(angle) * hx + np.cos(angle) * hy
  head_r = np.sqrt((rx / u(0.68, 0.84)) ** 2 + (ry / u(0.80, 0.93)) ** 2)
  skull_inner = 1.0 - u(0.06, 0.11)
  brain_edge = skull_inner - u(0.015, 0.04)  # dark CSF gap before the skull
  brain = head_r < brain_edge

  tissue = (u(0.32, 0.48) + 0.09 * _smooth_noise(rng, n, size, 0.18)
            + 0.035 * _smooth_noise(rng, n, size, 0.05))
  image = np.where(brain, tissue, np.float32(0.08))
  skull = (head_r >= skull_inner) & (head_r < 1.0)
  image = np.where(skull, u(0.72, 1.0), image)
  image[(head_r >= 1.0) & (head_r < 1.05)] = 0.25  # scalp

  # Ventricles: two dark lobes near the middle.
  for side in (-1.0, 1.0):
    vr = (((rx - side * u(0.06, 0.12)) / u(0.05, 0.11)) ** 2 +
          ((ry + u(-0.05, 0.1)) / u(0.15, 0.3)) ** 2)
    image = np.where(vr < 1.0, u(0.08, 0.2), image)

  mask = np.zeros((n, size, size), bool)
  tumours = rng.choice(len(_TUMOUR_COUNT_PROBS), size=n, p=_TUMOUR_COUNT_PROBS)
  for slot in range(len(_TUMOUR_COUNT_PROBS) - 1):
    params = _tumour_params(rng, n, brain_edge)
    chosen = np.flatnonzero(tumours > slot)  # draw for all: stable streams
    change, blob = _draw_tumours(rx[chosen], ry[chosen],
                                 {k: v[chosen] for k, v in params.items()})
    image[chosen] += change
    mask[chosen] |= blob & brain[chosen]

  _add_vessels(rng, image, brain & ~mask, size)

  bias = 1.0 + u(-0.2, 0.2) * x + u(-0.2, 0.2) * y + u(-0.15, 0.1) * (
      x ** 2 + y ** 2)
  sigma = u(0.01, 0.05)
  real = image * bias + sigma * rng.standard_normal(image.shape, np.float32)
  imaginary = sigma * rng.standard_normal(image.shape, np.float32)
  noisy = np.sqrt(real * real + imaginary * imaginary)  # Rician magnitude
  pixels = np.clip(np.round(noisy * 255.0), 0, 255).astype(np.uint8)
  return pixels, mask.astype(np.uint8)


def _add_vessels(rng, image, allowed, size, per_slice=3, window=5):
  """Small bright dots (vessels) inside the brain, easy to mistake for
  tumour. Painted in 5x5 windows rather than over whole slices: cheap."""
  n = image.shape[0]
  centre = rng.uniform(0.3, 0.7, (n, per_slice, 2)) * size
  radius = rng.uniform(0.8, 2.0, (n, per_slice, 1, 1))
  present = rng.random((n, per_slice, 1, 1)) < 0.6
  level = rng.uniform(0.75, 0.95, (n, per_slice, 1, 1)).astype(np.float32)
  offsets = np.arange(window) - window // 2
  rows = np.clip(centre[..., 0, None].astype(int) + offsets, 0, size - 1)
  cols = np.clip(centre[..., 1, None].astype(int) + offsets, 0, size - 1)
  distance2 = ((rows[..., :, None] + 0.5 - centre[..., 0, None, None]) ** 2 +
               (cols[..., None, :] + 0.5 - centre[..., 1, None, None]) ** 2)
  index = (np.arange(n)[:, None, None, None], rows[..., :, None],
           cols[..., None, :])
  paint = (distance2 < radius ** 2) & present & allowed[index]
  image[index] = np.where(paint, level, image[index])


def _tumour_params(rng, n, brain_edge):
  u = lambda lo, hi: rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)
  cy, cx = _point_in_brain(rng, n, brain_edge, 0.6)
  sign = np.where(rng.random((n, 1, 1)) < 0.78, 1.0, -1.0)
  faint = rng.random((n, 1, 1)) < 0.3
  return dict(
      cx=cx, cy=cy, radius=u(0.06, 0.22), stretch=u(0.75, 1.0),
      # Outline: radius * (1 + sum_k a_k cos(k phi - p_k)), k = 2, 3, 5,
      # stored as (a_k cos p_k, a_k sin p_k) pairs.
      harmonics=_harmonic_weights(rng, n),
      contrast=(sign * np.where(faint, u(0.07, 0.13), u(0.13, 0.4))
                ).astype(np.float32),
      softness=u(0.04, 0.18),  # partial-volume edge width (relative)
      ring=rng.random((n, 1, 1)) < 0.3)  # bright rim, darker necrotic core


def _draw_tumours(rx, ry, p):
  dx, dy = (rx - p['cx']) / p['stretch'], ry - p['cy']
  rho = np.sqrt(dx * dx + dy * dy) + 1e-6
  cos1, sin1 = dx / rho, dy / rho  # angle phi without trigonometry
  cos2, sin2 = cos1 * cos1 - sin1 * sin1, 2.0 * cos1 * sin1
  cos3, sin3 = cos2 * cos1 - sin2 * sin1, sin2 * cos1 + cos2 * sin1
  cos5, sin5 = cos3 * cos2 - sin3 * sin2, sin3 * cos2 + cos3 * sin2
  w = p['harmonics']
  outline = (1.0 + w[:, 0] * cos2 + w[:, 1] * sin2 + w[:, 2] * cos3
             + w[:, 3] * sin3 + w[:, 4] * cos5 + w[:, 5] * sin5)
  rel = rho / (p['radius'] * outline)  # < 1 inside
  profile = np.clip((1.0 - rel) / p['softness'] + 0.5, 0.0, 1.0)
  core = np.where(p['ring'], np.clip(1.0 - 1.6 * (1.0 - rel), 0.25, 1.0), 1.0)
  halo = 0.3 * np.abs(p['contrast']) * np.clip(1.6 - rel, 0.0, 0.6) / 0.6
  change = p['contrast'] * profile * core + np.where(rel >= 1.0, halo, 0.0)
  return change.astype(np.float32), rel < 1.0


def _harmonic_weights(rng, n):
  amplitude = rng.uniform(0, 0.14, (n, 3, 1, 1))
  phase = rng.uniform(0, 2 * np.pi, (n, 3, 1, 1))
  pairs = np.stack([amplitude * np.cos(phase), amplitude * np.sin(phase)], 2)
  return pairs.reshape(n, 6, 1, 1).astype(np.float32)


def _point_in_brain(rng, n, brain_edge, reach):
  """Random points within `reach` of the brain's radius (head coordinates)."""
  theta = rng.uniform(0, 2 * np.pi, (n, 1, 1))
  rho = np.sqrt(rng.uniform(0, 1, (n, 1, 1))) * reach * brain_edge * 0.75
  return (rho * np.sin(theta)).astype(np.float32), \
      (rho * np.cos(theta)).astype(np.float32)


def _smooth_noise(rng, n, size, scale):
  """Zero-mean, unit-std Gaussian-filtered noise; scale in image widths.

  Filtered at a coarse resolution and upsampled bilinearly: the fields are
  smooth, so this costs a fraction of a full-size FFT and looks the same.
  """
  coarse = min(size, 32)
  noise = rng.standard_normal((n, coarse, coarse)).astype(np.float32)
  freq_y = np.fft.fftfreq(coarse)[:, None]
  freq_x = np.fft.rfftfreq(coarse)[None, :]
  sigma = scale * coarse
  kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (freq_y ** 2 + freq_x ** 2))
  smooth = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(coarse, coarse))
  smooth -= smooth.mean(axis=(1, 2), keepdims=True)
  smooth /= smooth.std(axis=(1, 2), keepdims=True) + 1e-6
  upsample = _linear_interpolation_matrix(coarse, size)
  return np.einsum('sl,nlm,tm->nst', upsample, smooth.astype(np.float32),
                   upsample, optimize=True)


def _linear_interpolation_matrix(coarse: int, size: int) -> np.ndarray:
  """[size, coarse] weights of bilinear upsampling on pixel centres."""
  position = np.clip((np.arange(size) + 0.5) * coarse / size - 0.5, 0,
                     coarse - 1)
  low = np.floor(position).astype(int)
  high = np.minimum(low + 1, coarse - 1)
  weight = (position - low).astype(np.float32)
  matrix = np.zeros((size, coarse), np.float32)
  matrix[np.arange(size), low] += 1.0 - weight
  matrix[np.arange(size), high] += weight
  return matrix
