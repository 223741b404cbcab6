"""Small segmentation networks for the Fashion-MNIST mosaics, registered in `MODELS`.

An encoder of conv stages (`encoder.<i>`, each halving H and W) and a decoder that upsamples back
(`decoder.<i>`), with skip connections; output logits (B, num_classes, H, W). Taps on
`encoder.<i>` give multi-scale feature maps for feature and relation distillation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_model


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class UNet(nn.Module):
    """A small U-Net. x (B, C_in, H, W) with H, W divisible by 2**(len(channels)-1) → (B, K, H, W)."""

    def __init__(self, channels: Sequence[int], num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        chans = list(channels)
        self.encoder = nn.ModuleList()
        c = in_channels
        for c_out in chans:
            self.encoder.append(_block(c, c_out))
            c = c_out
        self.decoder = nn.ModuleList()
        for c_skip in reversed(chans[:-1]):
            self.decoder.append(_block(c + c_skip, c_skip))
            c = c_skip
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoder):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for dec, skip in zip(self.decoder, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = dec(torch.cat([x, skip], 1))
        return self.head(x)


@register_model("seg_unet")
def seg_unet(num_classes: int = 11, input_shape: Sequence[int] = (1, 64, 64),
             channels: Sequence[int] = (32, 64, 128)) -> UNet:
    """Segmentation teacher: a 3-stage U-Net (32-64-128)."""
    return UNet(channels, num_classes, int(input_shape[0]))


@register_model("seg_unet_small")
def seg_unet_small(num_classes: int = 11, input_shape: Sequence[int] = (1, 64, 64),
                   channels: Sequence[int] = (8, 16, 32)) -> UNet:
    """Segmentation student: a 3-stage U-Net (8-16-32), ~1/16 of the teacher's parameters."""
    return UNet(channels, num_classes, int(input_shape[0]))
