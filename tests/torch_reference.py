"""PyTorch reference of the seed's U-Net and LinTUNet (test-only).

The seed notebook's classes (tests/seed_notebook.py, copied verbatim from
LinTUnet.ipynb) with their sizes made arguments, so that the parity tests
can also run small widths, several heads and layers. Module names are the
notebook's, so `state_dict()` has exactly the keys of its checkpoints.
Checked line by line against the notebook (cell numbers as in
tests/seed_notebook.py):

  DoubleConv  [35] DoubleConvBlock: conv1 (3x3, pad 1, bias) -> ReLU ->
              conv2 -> ReLU -> norm (BN). The notebook also builds a
              Dropout2d(0.3) that its forward never calls (no parameters).
  Down        [37] DownsampleBlock: double_conv, then a 2x2/2 max-pool;
              returns (skip, pooled)
  Up          [39] UpsampleBlock: upconv (ConvTranspose2d k2 s2, in ->
              out = in / 2 channels), torch.cat((upsampled, skip), dim=1),
              double_conv (in -> out)
  UNet        [41] enc1..enc4 (w, 2w, 4w, 8w), bottleneck 8w -> 16w,
              dec4..dec1, final_conv (1x1)
  LinTUNet    [72] + attention.linformer = linformer.Linformer(dim=8w,
              seq_len, depth, heads, k) over the pooled level-4 features
              flattened row-major (p4.flatten(2).transpose(1, 2)), back with
              .transpose(1, 2).view(b, c, h, w), before the bottleneck

tests/test_convert_torch.py checks that at the seed's sizes this and the
notebook's own classes compute the same function from the same state dict.

Imports torch and the `linformer` package, the test-only dependencies
(requirements-torch.txt); callers import them first (tests/test_convert_torch.py:
`_require`).
"""

from __future__ import annotations

import torch
from linformer import Linformer
from torch import nn


class DoubleConv(nn.Module):

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
    self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
    self.norm = nn.BatchNorm2d(out_channels)

  def forward(self, x):
    x = torch.relu(self.conv1(x))
    x = torch.relu(self.conv2(x))
    return self.norm(x)


class Down(nn.Module):

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.double_conv = DoubleConv(in_channels, out_channels)
    self.pool = nn.MaxPool2d(2)

  def forward(self, x):
    skip = self.double_conv(x)
    return skip, self.pool(skip)


class Up(nn.Module):

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.upconv = nn.ConvTranspose2d(in_channels, out_channels,
                                     kernel_size=2, stride=2)
    self.double_conv = DoubleConv(in_channels, out_channels)

  def forward(self, x, skip):
    x = self.upconv(x)
    return self.double_conv(torch.cat((x, skip), dim=1))  # notebook cell [39]


class LinformerAttention(nn.Module):
  """Tokens = NCHW features flattened row-major; back to NCHW after."""

  def __init__(self, dim: int, *, seq_len: int, depth: int, heads: int, k: int):
    super().__init__()
    self.linformer = Linformer(dim=dim, seq_len=seq_len, depth=depth,
                               heads=heads, k=k)

  def forward(self, x):
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
    tokens = self.linformer(tokens)
    return tokens.transpose(1, 2).view(b, c, h, w)


class UNet(nn.Module):

  def __init__(self, in_channels: int = 1, num_classes: int = 1, width: int = 64):
    super().__init__()
    w = width
    self.enc1 = Down(in_channels, w)
    self.enc2 = Down(w, 2 * w)
    self.enc3 = Down(2 * w, 4 * w)
    self.enc4 = Down(4 * w, 8 * w)
    self.bottleneck = DoubleConv(8 * w, 16 * w)
    self.dec4 = Up(16 * w, 8 * w)
    self.dec3 = Up(8 * w, 4 * w)
    self.dec2 = Up(4 * w, 2 * w)
    self.dec1 = Up(2 * w, w)
    self.final_conv = nn.Conv2d(w, num_classes, kernel_size=1)

  def bottleneck_attention(self, x):
    return x

  def forward(self, x):
    s1, x = self.enc1(x)
    s2, x = self.enc2(x)
    s3, x = self.enc3(x)
    s4, x = self.enc4(x)
    x = self.bottleneck(self.bottleneck_attention(x))
    x = self.dec4(x, s4)
    x = self.dec3(x, s3)
    x = self.dec2(x, s2)
    x = self.dec1(x, s1)
    return self.final_conv(x)


class LinTUNet(UNet):
  """The seed's defaults: Linformer(dim=512, seq_len=256, depth=1, heads=1, k=64)."""

  def __init__(self, in_channels: int = 1, num_classes: int = 1, width: int = 64,
               *, seq_len: int = 256, depth: int = 1, heads: int = 1, k: int = 64):
    super().__init__(in_channels, num_classes, width)
    self.attention = LinformerAttention(8 * width, seq_len=seq_len, depth=depth,
                                        heads=heads, k=k)

  def bottleneck_attention(self, x):
    return self.attention(x)


def build(model: str, **kwargs) -> UNet:
  if model == 'unet':
    kwargs = {k: v for k, v in kwargs.items()
              if k in ('in_channels', 'num_classes', 'width')}
    return UNet(**kwargs)
  if model == 'lintunet':
    return LinTUNet(**kwargs)
  raise ValueError(model)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Redraws every parameter and BatchNorm statistic (scale-preserving).

  Weights ~ N(0, 1/fan_in) (so activations stay O(1) through the depth),
  biases and BN/LN shifts ~ N(0, 0.1^2), BN/LN scales ~ U(0.5, 1.5), BN
  running variances ~ U(0.5, 2), running means ~ N(0, 0.1^2),
  Linformer projections ~ U(+-1/sqrt(k)), num_batches_tracked random.
  """
  g = torch.Generator().manual_seed(seed)

  def normal(t, std):
    t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * std)

  def uniform(t, lo, hi):
    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=torch.float64))

  for name, p in model.named_parameters():
    leaf = name.rsplit('.', 1)[-1]
    owner = model.get_submodule(name.rsplit('.', 1)[0])
    if isinstance(owner, (nn.BatchNorm2d, nn.LayerNorm)):
      if leaf == 'weight':
        uniform(p, 0.5, 1.5)
      else:
        normal(p, 0.1)
    elif leaf in ('proj_k', 'proj_v'):
      bound = p.shape[-1] ** -0.5
      uniform(p, -bound, bound)
    elif leaf == 'bias':
      normal(p, 0.1)
    else:  # conv / transposed conv / linear weights
      if isinstance(owner, nn.ConvTranspose2d):
        fan_in = p.shape[0] * p.shape[2] * p.shape[3] / 4  # stride-2 taps
      else:
        fan_in = p[0].numel()
      normal(p, fan_in ** -0.5)
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      normal(module.running_mean, 0.1)
      uniform(module.running_var, 0.5, 2.0)
      module.num_batches_tracked.fill_(
          int(torch.randint(1, 10_000, (), generator=g)))
  return model
