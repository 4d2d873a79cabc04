"""Whole images at their own size, predicted tile by tile (nnU-Net's way).

A model trained on patches (`dataset.patch_size`) has seen the anatomy at
its native scale; shrinking a 640x640 scan to the patch size would show it
at another scale. So prediction slides the model's input window over the
image at its own size:

  * tiles of the model's input size start at `tile_starts` along each axis,
    neighbours overlapping by `overlap` of a tile (0.5: nnU-Net's step of
    half a patch), the last tile flush with the image's edge;
  * each tile's logits are weighted by a Gaussian centred on the tile
    (`gaussian_importance`, sigma = tile / 8), since a tile's centre has
    seen more context than its border, and the weighted sum is divided by
    the summed weights: every pixel is a weighted mean of the tiles over it;
  * images smaller than a tile are padded with zeros (after normalisation,
    as nnU-Net) and the padding is cut off again.

Everything here is traceable with static image shapes, so one jit-compiled
function (or one `jax.export` artifact) holds the whole pipeline: tiles are
gathered and blended with `lax.fori_loop` over their positions (compile time
does not grow with the number of tiles), and run through the model in
batches of `tile_batch_size` with `lax.map`.

  logits = sliding_window_logits(apply_tiles, images, tile_size=64,
                                 overlap=0.5, tile_batch_size=8)

`apply_tiles(tiles [N, T, T, C]) -> logits [N, T, T, K]` is any forward:
one model, a TTA-wrapped one (`with_flip_tta`), or the mean of several
models. `make_predict_fn` builds the jit-compiled whole (an ensemble of
models, TTA, the window, split over devices) from
`inference_settings(config)`.

Which attention kinds can skip the window: Linformer's projections are
sized for `attention.seq_len` tokens, so the Linformer kinds only run on
tiles of the training size; dense and block-sparse attention run on any
multiple of 16 (`model_runs_any_size`), though their cost then grows with
the image (dense quadratically).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from lintunet_jax.data import pipeline as input_pipeline

ApplyFn = Callable[[jax.Array], jax.Array]

TTA_MODES = ('none', 'flips')
# The mirrorings of a 2-D image nnU-Net uses: none, rows, columns, both
# (axes of [N, H, W, C]).
FLIP_AXES: tuple[tuple[int, ...], ...] = ((), (1,), (2,), (1, 2))


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
  """Start offsets of the tiles along one axis of `length` (>= tile) pixels.

  nnU-Net's rule (`compute_steps_for_sliding_window`): as few tiles as give
  steps of at most tile * (1 - overlap), spread evenly so the first starts
  at 0 and the last ends at `length`.
  """
  if length < tile:
    raise ValueError(f'an axis of {length} pixels is shorter than the tile '
                     f'({tile}); pad it first')
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f'overlap must be in [0, 1), got {overlap}')
  target_step = max(1.0, tile * (1.0 - overlap))
  num_steps = int(math.ceil((length - tile) / target_step)) + 1
  if num_steps == 1:
    return [0]
  step = (length - tile) / (num_steps - 1)
  return [int(round(step * i)) for i in range(num_steps)]


def tile_positions(height: int, width: int, tile: int,
                   overlap: float) -> np.ndarray:
  """int32 [num_tiles, 2] (row, column) of every tile's top-left corner."""
  rows = tile_starts(height, tile, overlap)
  cols = tile_starts(width, tile, overlap)
  return np.asarray([(r, c) for r in rows for c in cols], np.int32)


def gaussian_importance(tile: int, sigma_scale: float = 0.125) -> np.ndarray:
  """float32 [tile, tile] weights: a Gaussian centred on the tile, max 1.

  nnU-Net builds it by blurring a centred delta with sigma = tile *
  sigma_scale; written out directly it is exp(-d^2 / (2 sigma^2)). Corner
  weights are about exp(-16) at the default 1/8: small but positive, so a
  pixel covered only by tile corners still gets a (well-defined) mean.
  """
  if sigma_scale <= 0:
    raise ValueError(f'sigma_scale must be > 0, got {sigma_scale}')
  sigma = tile * sigma_scale
  centre = (tile - 1) / 2.0
  axis = np.exp(-((np.arange(tile) - centre) ** 2) / (2.0 * sigma ** 2))
  weights = np.outer(axis, axis)
  weights /= weights.max()
  return np.maximum(weights, np.finfo(np.float32).tiny).astype(np.float32)


def padding_for(height: int, width: int, tile: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """((top, bottom), (left, right)) zero padding that makes both sides >= tile
  (split evenly, as nnU-Net's pad_nd_image)."""

  def split(length):
    extra = max(0, tile - length)
    return extra // 2, extra - extra // 2

  return split(height), split(width)


def sliding_window_logits(apply_tiles: ApplyFn, images: jax.Array, *,
                          tile_size: int, overlap: float = 0.5,
                          sigma_scale: float = 0.125,
                          tile_batch_size: int = 8) -> jax.Array:
  """Blended float32 logits [B, H, W, K] of images [B, H, W, C] (static size).

  `apply_tiles` maps [tile_batch_size * B, T, T, C] tiles to logits of the
  same spatial size (T = tile_size): each call takes `tile_batch_size`
  positions of every image. A `lax.fori_loop` over the calls gathers the
  tiles, runs them and adds their weighted logits into the output, so
  memory holds one call's tiles, not all of them; the last call is filled
  up with the first position at weight 0.
  """
  if images.ndim != 4:
    raise ValueError(f'images must be [B, H, W, C], got shape {images.shape}')
  batch, height, width, channels = images.shape
  (top, bottom), (left, right) = padding_for(height, width, tile_size)
  padded = jnp.pad(images, ((0, 0), (top, bottom), (left, right), (0, 0)))
  full_h, full_w = padded.shape[1:3]
  positions = tile_positions(full_h, full_w, tile_size, overlap)
  num_tiles = len(positions)
  per_call = max(1, min(int(tile_batch_size), num_tiles))
  num_calls = -(-num_tiles // per_call)
  filler = num_calls * per_call - num_tiles
  groups = jnp.asarray(np.concatenate(
      [positions, np.repeat(positions[:1], filler, axis=0)]
  ).reshape(num_calls, per_call, 2))
  used = jnp.asarray(np.concatenate([np.ones(num_tiles, np.float32),
                                     np.zeros(filler, np.float32)]
                                    ).reshape(num_calls, per_call))
  host_weights = gaussian_importance(tile_size, sigma_scale)
  weights = jnp.asarray(host_weights)

  def gather(position):
    return lax.dynamic_slice(padded, (0, position[0], position[1], 0),
                             (batch, tile_size, tile_size, channels))

  def run_call(call, total):
    tiles = jax.vmap(gather)(groups[call])  # [per_call, B, T, T, C]
    logits = apply_tiles(tiles.reshape(per_call * batch, tile_size, tile_size,
                                       channels)).astype(jnp.float32)
    logits = logits.reshape(per_call, batch, *logits.shape[1:])
    for j in range(per_call):  # static: per_call is small
      row, col = groups[call, j, 0], groups[call, j, 1]
      window = lax.dynamic_slice(total, (0, row, col, 0),
                                 (batch, tile_size, tile_size, total.shape[-1]))
      window = window + logits[j] * (weights * used[call, j])[None, :, :, None]
      total = lax.dynamic_update_slice(total, window, (0, row, col, 0))
    return total

  num_outputs = jax.eval_shape(
      apply_tiles, jax.ShapeDtypeStruct(
          (per_call * batch, tile_size, tile_size, channels), images.dtype)
  ).shape[-1]
  total = jnp.zeros((batch, full_h, full_w, num_outputs), jnp.float32)
  total = lax.fori_loop(0, num_calls, run_call, total)
  # The normaliser depends only on shapes: computed here once, a constant.
  coverage = np.zeros((full_h, full_w), np.float32)
  for row, col in positions:
    coverage[row:row + tile_size, col:col + tile_size] += host_weights
  blended = total / jnp.asarray(coverage)[None, :, :, None]
  return blended[:, top:top + height, left:left + width]


def with_flip_tta(apply_tiles: ApplyFn) -> ApplyFn:
  """Mirroring test-time augmentation: the mean of the logits of the tiles
  and their row, column and row+column flips, un-flipped. The four copies
  go through `apply_tiles` as one batch (4x the rows, one call)."""

  def apply(tiles):
    n = tiles.shape[0]
    stacked = jnp.concatenate([jnp.flip(tiles, axes) if axes else tiles
                               for axes in FLIP_AXES])
    logits = apply_tiles(stacked)
    parts = [logits[i * n:(i + 1) * n] for i in range(len(FLIP_AXES))]
    unflipped = [jnp.flip(p, axes) if axes else p
                 for p, axes in zip(parts, FLIP_AXES)]
    return sum(u.astype(jnp.float32) for u in unflipped) / len(FLIP_AXES)

  return apply


def with_tta(apply_tiles: ApplyFn, tta: str) -> ApplyFn:
  """`apply_tiles` with the test-time augmentation named by `tta`."""
  if tta == 'none':
    return apply_tiles
  if tta == 'flips':
    return with_flip_tta(apply_tiles)
  raise ValueError(f'tta must be one of {TTA_MODES}, got {tta!r}')


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """How whole images become logits: `window` None resizes them to the
  model's size (and masks back); else tiles of `tile_size` slide over the
  image at its own size. `tta` is a key of TTA_MODES."""
  tile_size: int
  window: bool
  overlap: float = 0.5
  sigma_scale: float = 0.125
  tile_batch_size: int = 8
  tta: str = 'none'

  def describe(self) -> dict:
    return dataclasses.asdict(self)


def inference_settings(config, *, sliding_window: bool | None = None,
                       overlap: float | None = None, tta: str | None = None,
                       tile_batch_size: int | None = None) -> InferenceSettings:
  """config.inference (absent from configs saved before it existed: its
  defaults) with the command line's choices on top. The window is on by
  default for models trained on patches (dataset.patch_size)."""
  defaults = {'sliding_window': None, 'overlap': 0.5, 'sigma_scale': 0.125,
              'tile_batch_size': None, 'tta': 'none'}
  saved = config.get('inference')
  fields = {k: (saved.get(k, v) if saved is not None else v)
            for k, v in defaults.items()}
  for key, value in (('sliding_window', sliding_window), ('overlap', overlap),
                     ('tta', tta), ('tile_batch_size', tile_batch_size)):
    if value is not None:
      fields[key] = value
  window = fields['sliding_window']
  if window is None:
    window = bool(config.dataset.get('patch_size'))
  if fields['tta'] not in TTA_MODES:
    raise ValueError(f'tta must be one of {TTA_MODES}, got {fields["tta"]!r}')
  if not 0.0 <= float(fields['overlap']) < 1.0:
    raise ValueError(f'the sliding window overlap must be in [0, 1), got '
                     f'{fields["overlap"]}')
  tile_batch = int(fields['tile_batch_size'] or config.eval_batch_size)
  if tile_batch < 1:
    raise ValueError(f'tile_batch_size must be >= 1, got {tile_batch}')
  return InferenceSettings(
      tile_size=input_pipeline.model_input_size(config), window=bool(window),
      overlap=float(fields['overlap']), sigma_scale=float(fields['sigma_scale']),
      tile_batch_size=tile_batch, tta=str(fields['tta']))


def make_predict_fn(models: Sequence[nnx.Module], settings: InferenceSettings,
                    *, mesh: Mesh | None = None) -> Callable[[jax.Array], jax.Array]:
  """jit(images [B, H, W, C]) -> float32 logits [B, H, W, K]: the mean of
  `models` (an ensemble of one or more, e.g. cross-validation folds; they
  must agree on input and output channels), with `settings.tta`, over a
  sliding window (`settings.window`; any H, W) or on model-size images.

  With a `mesh` (one axis), each model call's rows are split over its
  devices; the tile batch is rounded up to a multiple of the device count.
  The variables are arguments of the jitted function, not constants, so
  one compilation serves every image of a shape.
  """
  if not models:
    raise ValueError('make_predict_fn needs at least one model')
  graphdefs, variables = zip(*(nnx.split(m) for m in models))
  devices = 1 if mesh is None else mesh.devices.size
  tile_batch = -(-settings.tile_batch_size // devices) * devices

  def forward(all_variables, tiles):
    logits = []
    for graphdef, state in zip(graphdefs, all_variables):
      module = nnx.merge(graphdef, state)
      module.eval()
      logits.append(module(tiles).astype(jnp.float32))
    return sum(logits) / len(logits)

  if mesh is not None:
    axis = mesh.axis_names[0]
    sharded = jax.shard_map(forward, mesh=mesh, in_specs=(P(), P(axis)),
                            out_specs=P(axis))

    def forward(all_variables, tiles):  # pylint: disable=function-redefined
      # Rows padded to a multiple of the devices: an image of fewer tiles
      # than the tile batch, or a plain batch of any size, still splits.
      rows = tiles.shape[0]
      extra = -rows % devices
      if extra:
        tiles = jnp.concatenate(
            [tiles, jnp.zeros((extra, *tiles.shape[1:]), tiles.dtype)])
      return sharded(all_variables, tiles)[:rows]

  @jax.jit
  def predict(all_variables, images):
    apply = with_tta(functools.partial(forward, all_variables), settings.tta)
    if not settings.window:
      return apply(images)
    return sliding_window_logits(
        apply, images, tile_size=settings.tile_size, overlap=settings.overlap,
        sigma_scale=settings.sigma_scale, tile_batch_size=tile_batch)

  return lambda images: predict(variables, images)


def model_runs_any_size(model_config) -> bool:
  """Whether the model runs whole images of any multiple of 16 (no window
  needed): U-Nets and the dense / block-sparse attention kinds; not the
  Linformer kinds, whose projections fix the token count."""
  if model_config.name != 'lintunet':
    return True
  return 'linformer' not in model_config.attention.kind
