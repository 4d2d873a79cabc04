"""The U-Net baseline and LinTUNet, its efficient-attention variant.

Both share one encoder/decoder (`UNet`); LinTUNet only inserts an
`AttentionBottleneck` on the pooled level-4 features (H/16 x W/16 tokens of
width 8w) before the bottleneck convolutions, so a comparison of the two
isolates the attention. Inputs are NHWC with H and W multiples of 16;
outputs are float32 logits [B, H, W, num_classes].

  level  encoder (skip)        decoder
  1      DoubleConv  1 -> w    Up 2w -> w     -> 1x1 conv -> num_classes
  2      DoubleConv  w -> 2w   Up 4w -> 2w
  3      DoubleConv 2w -> 4w   Up 8w -> 4w
  4      DoubleConv 4w -> 8w   Up 16w -> 8w
         [attention over (H/16)(W/16) tokens of 8w]   (LinTUNet only)
         bottleneck DoubleConv 8w -> 16w
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lintunet_jax.attention import bottleneck as attention_lib
from lintunet_jax import layers
from lintunet_jax.attention import masks as masks_lib
from lintunet_jax.attention import xla as attention_kernels

DOWNSAMPLING = 16  # four 2x2 pools


def _dtype(name: str):
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if name not in dtypes:
    raise ValueError(f'model.dtype must be one of {sorted(dtypes)}, got {name!r}')
  return dtypes[name]


class UNet(nnx.Module):

  def __init__(self, *, in_channels: int = 1, num_classes: int = 1,
               width: int = 64, dtype=jnp.float32,
               bn_axis_name: str | None = None,
               decoder_concat: str = layers.UPSAMPLED_SKIP, rngs: nnx.Rngs):
    w = width
    kw = dict(dtype=dtype, bn_axis_name=bn_axis_name, rngs=rngs)
    up = dict(kw, concat=decoder_concat)
    self.num_classes = num_classes
    self.in_channels = in_channels
    self.enc1 = layers.Down(in_channels, w, **kw)
    self.enc2 = layers.Down(w, 2 * w, **kw)
    self.enc3 = layers.Down(2 * w, 4 * w, **kw)
    self.enc4 = layers.Down(4 * w, 8 * w, **kw)
    self.bottleneck = layers.DoubleConv(8 * w, 16 * w, **kw)
    self.dec4 = layers.Up(16 * w, 8 * w, **up)
    self.dec3 = layers.Up(8 * w, 4 * w, **up)
    self.dec2 = layers.Up(4 * w, 2 * w, **up)
    self.dec1 = layers.Up(2 * w, w, **up)
    self.final_conv = nnx.Conv(w, num_classes, kernel_size=(1, 1), dtype=dtype,
                               param_dtype=jnp.float32, rngs=rngs)
    self.dtype = dtype

  def bottleneck_attention(self, x: jax.Array) -> jax.Array:
    return x  # the plain U-Net has none

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] float -> float32 logits [B, H, W, num_classes]."""
    _check_images(x, self.in_channels)
    x = x.astype(self.dtype)
    s1, x = self.enc1(x)
    s2, x = self.enc2(x)
    s3, x = self.enc3(x)
    s4, x = self.enc4(x)
    x = self.bottleneck(self.bottleneck_attention(x))
    x = self.dec4(x, s4)
    x = self.dec3(x, s3)
    x = self.dec2(x, s2)
    x = self.dec1(x, s1)
    return self.final_conv(x).astype(jnp.float32)


class LinTUNet(UNet):
  """U-Net + Linformer/block-sparse attention at the bottleneck."""

  def __init__(self, *, in_channels: int = 1, num_classes: int = 1,
               width: int = 64, dtype=jnp.float32,
               bn_axis_name: str | None = None,
               decoder_concat: str = layers.UPSAMPLED_SKIP,
               attention: ml_collections.ConfigDict, rngs: nnx.Rngs):
    super().__init__(in_channels=in_channels, num_classes=num_classes,
                     width=width, dtype=dtype, bn_axis_name=bn_axis_name,
                     decoder_concat=decoder_concat, rngs=rngs)
    pattern = None
    if attention.kind in ('block_sparse', 'linformer_block_sparse'):
      pattern = masks_lib.parse_pattern(attention.pattern)
    self.attention = attention_lib.AttentionBottleneck(
        8 * width, depth=attention.depth, ff_mult=attention.ff_mult,
        dropout=attention.dropout, dtype=dtype, rngs=rngs, kind=attention.kind,
        heads=attention.heads, dim_head=attention.get('dim_head'),
        seq_len=attention.seq_len, k=attention.k, share_kv=attention.share_kv,
        pattern=pattern, block_size=attention.block_size,
        kernel=attention.get('kernel', 'auto'))

  def bottleneck_attention(self, x: jax.Array) -> jax.Array:
    return self.attention(x)


def _check_images(x: jax.Array, in_channels: int) -> None:
  """ValueErrors a caller can act on, where XLA would raise a shape error
  from inside the first convolution."""
  if x.ndim != 4:
    raise ValueError(f'expected NHWC images [B, H, W, C], got shape {x.shape}')
  if x.shape[3] != in_channels:
    raise ValueError(
        f'images have {x.shape[3]} channels (shape {x.shape}) but the model takes '
        f'model.in_channels={in_channels}')
  h, w = x.shape[1:3]
  if h % DOWNSAMPLING or w % DOWNSAMPLING:
    raise ValueError(
        f'image size {h}x{w} is not a multiple of {DOWNSAMPLING}; set '
        f'dataset.image_size (the input pipeline resizes or pads to it) or '
        f'dataset.patch_size')


def decoder_concat(model_config: ml_collections.ConfigDict) -> str:
  """The decoder's concat order a model config means.

  A config without `decoder_concat` was saved by a workdir trained before
  the field existed (issue 16), with the old (skip, upsampled) order: it
  keeps that order, so its checkpoints compute what they were trained to.
  """
  return model_config.get('decoder_concat', layers.SKIP_UPSAMPLED)


def create_model(model_config: ml_collections.ConfigDict, *, seed: int = 0,
                 bn_axis_name: str | None = None) -> UNet:
  """Builds the configured model with freshly initialised parameters."""
  kw = dict(in_channels=model_config.in_channels,
            num_classes=model_config.num_classes, width=model_config.width,
            dtype=_dtype(model_config.dtype), bn_axis_name=bn_axis_name,
            decoder_concat=decoder_concat(model_config),
            rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  if model_config.name == 'unet':
    return UNet(**kw)
  if model_config.name == 'lintunet':
    return LinTUNet(attention=model_config.attention, **kw)
  raise ValueError(f"model.name must be 'unet' or 'lintunet', got {model_config.name!r}")


def check_backend(model_config: ml_collections.ConfigDict) -> None:
  """Raises `KernelUnavailableError` when the configured model would run a
  kernel this backend cannot compile (the Pallas kernels off GPU), before
  anything is built or traced. Only the block-sparse kinds use the kernel."""
  if model_config.name != 'lintunet':
    return
  attention = model_config.attention
  if attention.kind in ('block_sparse', 'linformer_block_sparse'):
    attention_kernels.check_kernel(attention.get('kernel', 'auto'))


def count_parameters(model: nnx.Module) -> int:
  """Trainable parameters (BatchNorm scale/bias in, running stats out)."""
  params = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(params))
