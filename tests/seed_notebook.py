"""The seed notebook's model classes, copied verbatim (test-only).

Source: github.com/Lawrence-Menegus/LinTUNet-CNN-Transformer-, file
`LinTUnet.ipynb` at commit dbdccbd424afaf52a56ffce7682a2e92f7bb8c60 (the
notebook as uploaded in 56b32f7, 2025-06-15). Cells are numbered from 0 in
the notebook's `cells` list (the notebook stores no execution counts):

  [35] DoubleConvBlock   [37] DownsampleBlock   [39] UpsampleBlock
  [41] UNet              [72] AttentionBlock (wraps linformer.Linformer as
                              `linformer`) and LinTUNet

Nothing below the imports is edited: these classes are the outside
reference that pins the project's layer order, the decoder's
`torch.cat((x, skip_connection), dim=1)` (cell 39: upsampled first, skip
second) above all. They are fixed at the seed's sizes (width 64; LinTUNet's
Linformer dim 512, seq_len 16*16, depth 1, heads 1, k 64).
tests/torch_reference.py is the same network with those sizes as
arguments; tests/test_convert_torch.py checks both against each other and
against the converted JAX model.

Imports torch and `linformer` (requirements-torch.txt), as the notebook's
cell [4] does.
"""

# pylint: skip-file
import torch
import torch.nn as nn
import torch.nn.functional as F
from linformer import Linformer

# ---- LinTUnet.ipynb, code cell [35] (verbatim) ----
# Define the Double Conv Block
class DoubleConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super(DoubleConvBlock, self).__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout2d(0.3)

    def forward(self, x):
        return self.norm(F.relu(self.conv2(F.relu(self.conv1(x)))))


# ---- LinTUnet.ipynb, code cell [37] (verbatim) ----
# Define the Downsample Block
class DownsampleBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super(DownsampleBlock, self).__init__()
        self.double_conv = DoubleConvBlock(in_channels, out_channels)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        x = self.double_conv(x)
        p = self.pool(x)
        return x, p


# ---- LinTUnet.ipynb, code cell [39] (verbatim) ----
# Define the Upsample Block
class UpsampleBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super(UpsampleBlock, self).__init__()
        self.upconv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.double_conv = DoubleConvBlock(in_channels, out_channels)

    def forward(self, x, skip_connection):
        x = self.upconv(x)
        x = torch.cat((x, skip_connection), dim=1)
        return self.double_conv(x)


# ---- LinTUnet.ipynb, code cell [41] (verbatim) ----
class UNet(nn.Module):
    def __init__(self, in_channels, out_channels):
        super(UNet, self).__init__()
        self.enc1 = DownsampleBlock(in_channels, 64)
        self.enc2 = DownsampleBlock(64, 128)
        self.enc3 = DownsampleBlock(128, 256)
        self.enc4 = DownsampleBlock(256, 512)
        self.bottleneck = DoubleConvBlock(512, 1024)

        self.dec4 = UpsampleBlock(1024, 512)
        self.dec3 = UpsampleBlock(512, 256)
        self.dec2 = UpsampleBlock(256, 128)
        self.dec1 = UpsampleBlock(128, 64)
        self.final_conv = nn.Conv2d(64, out_channels, kernel_size=1)

    def forward(self, x):
        enc1, p1 = self.enc1(x)
        enc2, p2 = self.enc2(p1)
        enc3, p3 = self.enc3(p2)
        enc4, p4 = self.enc4(p3)
        bottleneck = self.bottleneck(p4)
        dec4 = self.dec4(bottleneck, enc4)
        dec3 = self.dec3(dec4, enc3)
        dec2 = self.dec2(dec3, enc2)
        dec1 = self.dec1(dec2, enc1)
        return self.final_conv(dec1)


# ---- LinTUnet.ipynb, code cell [72] (verbatim) ----
# Define the Sparse Attention Block (Using Linformer for efficient self-attention)
class AttentionBlock(nn.Module):
    def __init__(self, dim, seq_len, heads=1, depth=1, k=64):
        super().__init__()
        self.linformer = Linformer(
            dim=dim, seq_len=seq_len, depth=depth, heads=heads, k=k
        )

    def forward(self, x):
        return self.linformer(x)

# Define the SparseTransformer UNet Architecture
class LinTUNet(nn.Module):
    def __init__(self, in_channels, out_channels):
        super(LinTUNet, self).__init__()
        self.enc1 = DownsampleBlock(in_channels, 64)
        self.enc2 = DownsampleBlock(64, 128)
        self.enc3 = DownsampleBlock(128, 256)
        self.enc4 = DownsampleBlock(256, 512)

        # Transformer-based bottleneck
        self.attention = AttentionBlock(dim=512, seq_len=16*16)
        self.bottleneck = DoubleConvBlock(512, 1024)

        self.dec4 = UpsampleBlock(1024, 512)
        self.dec3 = UpsampleBlock(512, 256)
        self.dec2 = UpsampleBlock(256, 128)
        self.dec1 = UpsampleBlock(128, 64)
        self.final_conv = nn.Conv2d(64, out_channels, kernel_size=1)

    def forward(self, x):
        enc1, p1 = self.enc1(x)
        enc2, p2 = self.enc2(p1)
        enc3, p3 = self.enc3(p2)
        enc4, p4 = self.enc4(p3)

        # Apply sparse transformer-based attention
        b, c, h, w = p4.shape

        # Convert to sequence
        p4 = p4.flatten(2).transpose(1, 2)
        p4 = self.attention(p4)

        # Convert back to image shape
        p4 = p4.transpose(1, 2).view(b, c, h, w)

        bottleneck = self.bottleneck(p4)
        dec4 = self.dec4(bottleneck, enc4)
        dec3 = self.dec3(dec4, enc3)
        dec2 = self.dec2(dec3, enc2)
        dec1 = self.dec1(dec2, enc1)
        return self.final_conv(dec1)
