"""Small vision models for the bundled data sets, registered in `MODELS`.

Every factory takes `num_classes` and `input_shape` (C, H, W) or (C, L); the pipeline fills them
from the data set unless the recipe sets them. Submodules have stable names for taps:
`features.<i>` (conv blocks), `pool`, `classifier.<i>`; `embed` is the penultimate layer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from still.registry import register_model


def _conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Conv blocks → global average pool → MLP head. x (B, C, H, W) → logits (B, num_classes)."""

    def __init__(self, channels: Sequence[int], num_classes: int, in_channels: int, embed_dim: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        blocks, c = [], in_channels
        for i, c_out in enumerate(channels):
            blocks.append(_conv_block(c, c_out, pool=i < len(channels) - 1))
            c = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(self.pool(self.features(x))))


@register_model("fmnist_cnn")
def fmnist_cnn(num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
               channels: Sequence[int] = (32, 64, 128), embed_dim: int = 256, dropout: float = 0.2) -> ConvNet:
    """The Fashion-MNIST teacher: 3 conv blocks (32-64-128, BN, ReLU, max-pool), GAP, 256-d embedding."""
    return ConvNet(channels, num_classes, int(input_shape[0]), embed_dim, dropout)


@register_model("small_cnn")
def small_cnn(num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
              channels: Sequence[int] = (8, 16), embed_dim: int = 32, dropout: float = 0.0) -> ConvNet:
    """A small student CNN: 2 conv blocks (8-16), GAP, 32-d embedding."""
    return ConvNet(channels, num_classes, int(input_shape[0]), embed_dim, dropout)


class MLP(nn.Module):
    """Flatten → [Linear, ReLU]* → Linear. Hidden layers are `hidden.<i>`, the head `classifier`."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        layers, d = [], in_features
        for h in hidden:
            layers.append(nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)))
            d = h
        self.hidden = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.flatten(x)))


@register_model("mlp")
def mlp(num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28), hidden: Sequence[int] = (128,),
        dropout: float = 0.0) -> MLP:
    """A multi-layer perceptron on flattened inputs; x (B, *input_shape) → logits (B, num_classes)."""
    return MLP(int(math.prod(input_shape)), hidden, num_classes, dropout)


class ConvNet1d(nn.Module):
    """1-D conv blocks → flatten → linear, for MNIST-1D. x (B, 1, L) → logits (B, num_classes)."""

    def __init__(self, channels: Sequence[int], num_classes: int, in_channels: int, length: int) -> None:
        super().__init__()
        blocks, c = [], in_channels
        for c_out in channels:
            blocks.append(nn.Sequential(nn.Conv1d(c, c_out, 5, stride=2, padding=2), nn.ReLU()))
            c = c_out
            length = (length + 1) // 2
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_model("cnn1d")
def cnn1d(num_classes: int = 10, input_shape: Sequence[int] = (1, 40), channels: Sequence[int] = (25, 25, 25)) -> ConvNet1d:
    """The MNIST-1D reference CNN shape: three stride-2 conv1d blocks and a linear head."""
    return ConvNet1d(channels, num_classes, int(input_shape[0]), int(input_shape[-1]))
