"""The model summary CLI: table, parameter total and XLA FLOPs."""

import re
import subprocess
import sys

import pytest

from configs import unet as unet_config
from lintunet_jax import models
from lintunet_jax import summary
from tests.conftest import ROOT


def test_flops_of_a_tiny_unet_match_a_hand_count():
  config = unet_config.get_config('quick').model
  config.width = 4
  model = models.create_model(config)
  model.eval()
  size = 32
  # Multiply-adds of every convolution, x2 for FLOPs. XLA counts only the
  # taps of a 3x3 'SAME' window that land inside the image: (3s - 2)^2 per
  # s x s map, not 9 s^2. Bias, ReLU and BatchNorm add a little on top.
  taps = lambda s: (3 * s - 2) ** 2
  w = 4
  chans = [1, w, 2 * w, 4 * w, 8 * w, 16 * w]
  macs = 0
  for level in range(5):  # encoder levels and the bottleneck
    s = size >> level
    macs += taps(s) * (chans[level] * chans[level + 1] + chans[level + 1] ** 2)
  for level in range(4, 0, -1):  # decoder: 2x2 stride-2 upconv, then convs
    c_in, c_out, s = chans[level + 1], chans[level], size >> (level - 1)
    macs += s * s * c_in * (c_in // 2) + taps(s) * (c_in * c_out + c_out * c_out)
  macs += size * size * w  # the 1x1 head
  flops = summary.forward_flops_per_image(model, (size, size, 1))
  assert 2 * macs <= flops <= 1.15 * 2 * macs, (flops, 2 * macs)


@pytest.mark.slow
def test_cli_prints_table_total_and_gflops():
  out = subprocess.run(
      [sys.executable, '-m', 'lintunet_jax.summary', '--config',
       'configs/lintunet.py:quick', '--config.model.width=4'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
  total = int(re.search(r'Total parameters: ([\d,]+)', out).group(1).replace(',', ''))
  assert total > 0
  assert 'attention' in out and 'AttentionBottleneck' in out and 'final_conv' in out
  assert float(re.search(r'GFLOPs per image.*: ([\d.]+)', out).group(1)) > 0
