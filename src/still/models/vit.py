"""Tiny hierarchical patch transformers (SegFormer/MiT-like) for TransKD-style distillation.

Each stage: an overlapping patch embedding (conv k/s/p + LayerNorm) giving tokens `(B, N_i, C_i)`,
transformer blocks (pre-norm MHA + MLP), a LayerNorm, then the tokens folded back to a map
`(B, C_i, H_i, W_i)` for the next stage. Taps (no model edits):

- `stages.<i>.patch_embed`: the stage's patch embeddings `(B, N_i, C_i)` (TransKD's PEA input);
- `stages.<i>`: the stage's output feature map `(B, C_i, H_i, W_i)`;
- `""` / `head`: the class logits `(B, num_classes)` (GAP of the last stage's tokens, then Linear).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from still.registry import register_model


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: x (B, C_in, H, W) -> tokens (B, H'·W', C) after LayerNorm."""

    def __init__(self, c_in: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.proj = nn.Conv2d(c_in, dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        f = lambda n: (n + 2 * self.padding - self.kernel) // self.stride + 1  # noqa: E731
        return f(h), f(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)); x + MLP(LN(x)). Tokens (B, N, C)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    """patch_embed → blocks → norm → fold to a map: (B, C_in, H, W) -> (B, C, H', W')."""

    def __init__(self, c_in: int, dim: int, depth: int, heads: int, kernel: int, stride: int, padding: int,
                 mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(c_in, dim, kernel, stride, padding)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.patch_embed.out_hw(x.shape[-2], x.shape[-1])
        t = self.norm(self.blocks(self.patch_embed(x)))
        return t.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class PatchTransformer(nn.Module):
    """Hierarchical patch transformer classifier. x (B, C, H, W) -> logits (B, num_classes)."""

    def __init__(self, in_channels: int, num_classes: int, dims: Sequence[int], depths: Sequence[int],
                 heads: Sequence[int], patches: Sequence[Sequence[int]], mlp_ratio: float = 2.0) -> None:
        super().__init__()
        n = len(dims)
        if not (len(depths) == len(heads) == len(patches) == n):
            raise ValueError(f"PatchTransformer: dims {list(dims)}, depths {list(depths)}, heads {list(heads)} and "
                             f"patches {list(patches)} must have the same length")
        stages, c = [], in_channels
        for d, dep, hd, (k, s, p) in zip(dims, depths, heads, patches):
            if d % hd:
                raise ValueError(f"PatchTransformer: width {d} is not divisible by {hd} heads")
            stages.append(Stage(c, d, dep, hd, k, s, p, mlp_ratio))
            c = d
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s(x)
        return self.head(x.mean(dim=(-2, -1)))


def default_patches(input_shape: Sequence[int], n_stages: int, first_stride: int | None = None) -> list[list[int]]:
    """MiT-like (kernel, stride, padding) per stage: 7/4/3 first for inputs ≥ 24 px (3/2/1 below), then 3/2/1."""
    big = min(int(input_shape[-1]), int(input_shape[-2])) >= 24
    s0 = first_stride or (4 if big else 2)
    k0 = 2 * s0 - 1 if s0 > 1 else 3
    return [[k0, s0, k0 // 2]] + [[3, 2, 1] for _ in range(n_stages - 1)]


def _patch_vit(num_classes: int, input_shape: Sequence[int], dims: Sequence[int], depths: Sequence[int],
               heads: Sequence[int], patches: Sequence[Sequence[int]] | None, first_stride: int | None,
               mlp_ratio: float) -> PatchTransformer:
    patches = patches or default_patches(input_shape, len(dims), first_stride)
    return PatchTransformer(int(input_shape[0]), num_classes, dims, depths, heads, patches, mlp_ratio)


@register_model("vit_tiny", paper="Xie et al. SegFormer (NeurIPS 2021), MiT encoder shape")
def vit_tiny(num_classes: int = 10, input_shape: Sequence[int] = (1, 8, 8), dims: Sequence[int] = (32, 64),
             depths: Sequence[int] = (1, 2), heads: Sequence[int] = (2, 4),
             patches: Sequence[Sequence[int]] | None = None, first_stride: int | None = None,
             mlp_ratio: float = 2.0) -> PatchTransformer:
    """The TransKD-demo teacher: 2-stage patch transformer (32, 64 wide); taps `stages.<i>[.patch_embed]`."""
    return _patch_vit(num_classes, input_shape, dims, depths, heads, patches, first_stride, mlp_ratio)


@register_model("vit_nano", paper="Xie et al. SegFormer (NeurIPS 2021), MiT encoder shape")
def vit_nano(num_classes: int = 10, input_shape: Sequence[int] = (1, 8, 8), dims: Sequence[int] = (16, 32),
             depths: Sequence[int] = (1, 1), heads: Sequence[int] = (1, 2),
             patches: Sequence[Sequence[int]] | None = None, first_stride: int | None = None,
             mlp_ratio: float = 2.0) -> PatchTransformer:
    """The TransKD-demo student: 2-stage patch transformer (16, 32 wide), same strides as `vit_tiny`."""
    return _patch_vit(num_classes, input_shape, dims, depths, heads, patches, first_stride, mlp_ratio)


__all__ = ["PatchTransformer", "PatchEmbed", "Stage", "Block", "default_patches"]
