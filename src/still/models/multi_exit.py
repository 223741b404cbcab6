"""Multi-exit students (MoSE-style): exit heads after chosen layers, each tapped by name.

Every exit head is its own module `exits.<j>`, so a tap `"exits.1"` reads that exit's logits
`(B, num_classes)` with no model edit; the model returns the last exit's logits. `exit_layers`
lists the (1-based) layer after which each exit sits; the last must be the last layer.

`multi_exit_mlp` follows MoSE's shared head: one classifier `head` for all exits, with a learned
layer-index embedding added to the hidden state before it (`exits.<j>.position`).
`multi_exit_cnn` has one GAP + linear head per exit (the widths differ across blocks).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from still.registry import register_model


def _check_exits(exit_layers: Sequence[int], depth: int) -> list[int]:
    layers = [int(i) for i in exit_layers]
    if not layers or sorted(set(layers)) != layers or layers[0] < 1 or layers[-1] != depth:
        raise ValueError(f"exit_layers {list(exit_layers)} must be increasing, in 1..{depth}, and end at {depth}")
    return layers


class SharedExit(nn.Module):
    """One exit of a shared head: logits = head(h + position), `position` a learned (d,) layer embedding.

    The shared head is passed at call time (not registered here), so each parameter lives once.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(width))

    def forward(self, h: torch.Tensor, head: nn.Module) -> torch.Tensor:
        return head(h + self.position)


class MultiExitMLP(nn.Module):
    """Flatten → Linear(in, d) → `depth` residual blocks [LayerNorm, Linear, GELU] with exits.

    x (B, *input_shape) -> last exit logits (B, C). Modules: `stem`, `blocks.<i>` (i = 0..depth-1),
    `exits.<j>` (exit j's logits), `head` (shared classifier; `shared_head=False` gives one head per exit).
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 64, depth: int = 8,
                 exit_layers: Sequence[int] = (2, 4, 6, 8), shared_head: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.exit_layers = _check_exits(exit_layers, depth)
        self.depth, self.shared_head = depth, shared_head
        self.flatten = nn.Flatten()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout))
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        if shared_head:
            self.head = nn.Linear(width, num_classes)
            self.exits = nn.ModuleList(SharedExit(width) for _ in self.exit_layers)
        else:
            self.exits = nn.ModuleList(nn.Linear(width, num_classes) for _ in self.exit_layers)

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All exits' logits, shallow to deep: list of (B, C)."""
        h = self.stem(self.flatten(x))
        out, j = [], 0
        for i, block in enumerate(self.blocks, start=1):
            h = h + block(h)
            if j < len(self.exit_layers) and i == self.exit_layers[j]:
                z = self.norm(h)
                out.append(self.exits[j](z, self.head) if self.shared_head else self.exits[j](z))
                j += 1
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_exits(x)[-1]


class MultiExitCNN(nn.Module):
    """Conv blocks (conv-BN-ReLU, max-pool between) with a GAP + linear exit after each chosen block.

    x (B, C_in, H, W) -> last exit logits. Modules: `features.<i>`, `exits.<j>` (exit j's logits).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 32, 64),
                 exit_layers: Sequence[int] | None = None, pool_every: int = 2) -> None:
        super().__init__()
        depth = len(channels)
        self.exit_layers = _check_exits(exit_layers or range(1, depth + 1), depth)
        blocks, c = [], in_channels
        for i, c_out in enumerate(channels):
            layers: list[nn.Module] = [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            if (i + 1) % pool_every == 0 and i < depth - 1:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            c = c_out
        self.features = nn.ModuleList(blocks)
        self.exits = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[i - 1], num_classes))
            for i in self.exit_layers)

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, j = [], 0
        for i, block in enumerate(self.features, start=1):
            x = block(x)
            if j < len(self.exit_layers) and i == self.exit_layers[j]:
                out.append(self.exits[j](x))
                j += 1
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_exits(x)[-1]


def exit_views(model: MultiExitMLP | MultiExitCNN, prefix: str = "exit") -> dict[str, str]:
    """Student view taps for every exit: `{"exit0": "exits.0", ...}`."""
    return {f"{prefix}{j}": f"exits.{j}" for j in range(len(model.exit_layers))}


@register_model("multi_exit_mlp", paper="Gurioli et al. ModularStarEncoder / MoSE (AAAI 2026)")
def multi_exit_mlp(num_classes: int = 10, input_shape: Sequence[int] = (1, 8, 8), width: int = 64, depth: int = 8,
                   exit_layers: Sequence[int] = (2, 4, 6, 8), shared_head: bool = True,
                   dropout: float = 0.0) -> MultiExitMLP:
    """Residual MLP with exits (MoSE shape: shared head + layer-index embedding); taps `exits.<j>`."""
    return MultiExitMLP(int(math.prod(input_shape)), num_classes, width, depth, exit_layers, shared_head, dropout)


@register_model("multi_exit_cnn", paper="")
def multi_exit_cnn(num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
                   channels: Sequence[int] = (16, 32, 32, 64), exit_layers: Sequence[int] | None = None,
                   pool_every: int = 2) -> MultiExitCNN:
    """CNN with a GAP + linear exit after each chosen conv block; taps `exits.<j>`."""
    return MultiExitCNN(int(input_shape[0]), num_classes, channels, exit_layers, pool_every)


__all__ = ["MultiExitMLP", "MultiExitCNN", "SharedExit", "exit_views"]
