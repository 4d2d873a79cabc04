"""U-Net building blocks, in the seed's order and with its names.

The seed's DoubleConv is conv3x3 -> ReLU -> conv3x3 -> ReLU -> BatchNorm
(normalising after the second activation, not after each conv as in the
original U-Net paper); we keep that order so seed checkpoints convert
exactly. Attribute names (conv1, conv2, norm, double_conv, upconv) match
the PyTorch module names for the same reason. Everything is NHWC.

BatchNorm uses PyTorch's conventions (momentum 0.1 in PyTorch's sense,
i.e. 0.9 here; epsilon 1e-5). `bn_axis_name` names the device axis over
which batch statistics are averaged in data-parallel training (synchronised
BatchNorm), so N devices with B images each normalise exactly as one device
with N*B images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

BATCH_NORM_MOMENTUM = 0.9  # = 1 - PyTorch's momentum of 0.1
BATCH_NORM_EPSILON = 1e-5


class DoubleConv(nnx.Module):

  def __init__(self, in_channels: int, out_channels: int, *, dtype=jnp.float32,
               bn_axis_name: str | None = None, rngs: nnx.Rngs):
    conv = dict(kernel_size=(3, 3), padding='SAME', dtype=dtype,
                param_dtype=jnp.float32, rngs=rngs)
    self.conv1 = nnx.Conv(in_channels, out_channels, **conv)
    self.conv2 = nnx.Conv(out_channels, out_channels, **conv)
    self.norm = nnx.BatchNorm(out_channels, momentum=BATCH_NORM_MOMENTUM,
                              epsilon=BATCH_NORM_EPSILON, dtype=dtype,
                              param_dtype=jnp.float32, axis_name=bn_axis_name,
                              rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return self.norm(x)


def _pool_windows(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H//2, 2, W//2, 2, C] (odd trailing row/column dropped)."""
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2 (floors odd sizes, as torch.nn.MaxPool2d(2)).

  The same values and gradients as `nnx.max_pool` - the gradient goes to
  the first maximum of each window in row-major order, as XLA's
  select-and-scatter gives it, ties included (tested bit for bit) - but
  written as reshape + max with elementwise, fusible backward code: the
  select-and-scatter took ~190 ms of a 4.6 s CPU training step (batch 2,
  256x256), this ~27 ms (benchmarks/NOTES.md item 20).
  """
  return _pool_windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
  return max_pool_2x2(x), x


def _max_pool_bwd(x, grad):
  windows = _pool_windows(x)
  best = windows.max(axis=(2, 4))
  taken = jnp.zeros(best.shape, bool)
  rows = []
  for i in range(2):
    row = []
    for j in range(2):
      first = ~taken & (windows[:, :, i, :, j] == best)
      taken = taken | first
      row.append(jnp.where(first, grad, jnp.zeros_like(grad)))
    rows.append(jnp.stack(row, axis=3))
  b, h, w, c = x.shape
  dx = jnp.stack(rows, axis=2).reshape(b, h // 2 * 2, w // 2 * 2, c)
  return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class Down(nnx.Module):
  """Encoder level: returns (skip features, pooled features)."""

  def __init__(self, in_channels: int, out_channels: int, **kwargs):
    self.double_conv = DoubleConv(in_channels, out_channels, **kwargs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    skip = self.double_conv(x)
    return skip, max_pool_2x2(skip)


def upsample_2x2(upconv: nnx.ConvTranspose, x: jax.Array) -> jax.Array:
  """`upconv(x)` for a 2x2, stride-2, VALID transposed conv, as one matmul.

  Each input pixel writes its own 2x2 output patch (no overlap), so the
  transposed conv is `x @ kernel` to 4 * out channels, then depth-to-space.
  Same parameters and values as `nnx.ConvTranspose` (which, not transposing
  the kernel, applies it flipped), but XLA:CPU's gradient of the conv form
  (a whole-image window, rhs-dilated convolution) was 15-40x slower than
  these matmuls and dominated the training step; see benchmarks/NOTES.md.
  """
  kernel, bias = upconv.kernel[...], upconv.bias[...] if upconv.bias is not None else None
  dtype = upconv.dtype or jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  b, h, w, _ = x.shape
  y = jnp.einsum('bhwi,acio->bhawco', x, kernel[::-1, ::-1],
                 precision=upconv.precision)
  y = y.reshape(b, 2 * h, 2 * w, kernel.shape[-1])
  return y if bias is None else y + bias.astype(dtype)


# The decoder's channel order: the seed notebook's UpsampleBlock (cell 39 of
# LinTUnet.ipynb) concatenates (upsampled, skip). Workdirs trained by this
# project before that was fixed (issue 16) used (skip, upsampled); their
# saved configs have no `model.decoder_concat` and keep that order.
UPSAMPLED_SKIP = 'upsampled_skip'
SKIP_UPSAMPLED = 'skip_upsampled'
CONCAT_ORDERS = (UPSAMPLED_SKIP, SKIP_UPSAMPLED)


class Up(nnx.Module):
  """Decoder level: 2x upsampling to half the channels, concat skip, convs.

  `concat` orders the channels fed to double_conv: UPSAMPLED_SKIP, the
  seed's, or SKIP_UPSAMPLED, only for checkpoints trained that way.
  """

  def __init__(self, in_channels: int, out_channels: int, *, dtype=jnp.float32,
               bn_axis_name: str | None = None, concat: str = UPSAMPLED_SKIP,
               rngs: nnx.Rngs):
    if concat not in CONCAT_ORDERS:
      raise ValueError(f'model.decoder_concat must be one of {CONCAT_ORDERS}, '
                       f'got {concat!r}')
    self.concat = concat
    self.upconv = nnx.ConvTranspose(
        in_channels, in_channels // 2, kernel_size=(2, 2), strides=(2, 2),
        padding='VALID', dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.double_conv = DoubleConv(in_channels // 2 + out_channels, out_channels,
                                  dtype=dtype, bn_axis_name=bn_axis_name,
                                  rngs=rngs)

  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    x = upsample_2x2(self.upconv, x).astype(skip.dtype)
    parts = [x, skip] if self.concat == UPSAMPLED_SKIP else [skip, x]
    return self.double_conv(jnp.concatenate(parts, axis=-1))
