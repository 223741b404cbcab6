"""TransKD (Liu et al., IEEE T-ITS; code RuipingL/TransKD): patch-embedding alignment and HCL.

- **PEA** (patch-embedding alignment): a Linear maps each student patch-embedding stage
  `(B, N, C_s)` to the teacher's width, then MSE: `Σ_i w_i·MSE(Linear_i(E_s^i), E_t^i)` with the code's
  `embed_weights = (0.1, 0.1, 0.5, 1.0)` for the 4 MiT stages. The Linear is the `patch_embed`
  adapter registered here; when the token counts differ (N_s ≠ N_t, e.g. another patch stride) it
  also resamples the token grid bilinearly (an extension: in TransKD B0 and B2 have equal N).
The feature-map side of TransKD (CSF fusion + HCL, ReviewKD's hierarchical context loss) is the
`transkd_csf` / `hcl` losses in `still.losses.dense`; the `transkd_pea` method combines them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.adapters import LazyAdapter
from still.registry import register_adapter, register_loss

TRANSKD_PAPER = ("Liu, Yang, Zhang, Hu, Stiefelhagen. TransKD: Transformer Knowledge Distillation for Efficient "
                 "Semantic Segmentation (IEEE T-ITS)")
PAPER_EMBED_WEIGHTS = (0.1, 0.1, 0.5, 1.0)

Tensors = torch.Tensor | Sequence[torch.Tensor]


def _list(x: Tensors) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _f(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def resample_tokens(x: torch.Tensor, n_out: int, grid_in: tuple[int, int] | None = None,
                    grid_out: tuple[int, int] | None = None, cls_token: bool = False) -> torch.Tensor:
    """Tokens `(B, N_in, C)` -> `(B, n_out, C)`.

    Square (or given) grids are resized bilinearly (align_corners=False); otherwise the token axis
    is interpolated linearly. With `cls_token`, token 0 is kept as is and only the rest resampled.
    """
    if x.dim() != 3:
        raise ValueError(f"resample_tokens: expected tokens (B, N, C), got {tuple(x.shape)}")
    if cls_token:
        return torch.cat([x[:, :1], resample_tokens(x[:, 1:], n_out - 1, grid_in, grid_out)], dim=1)
    b, n, c = x.shape
    if n == n_out:
        return x
    gi = grid_in or (_square(n) and (math.isqrt(n), math.isqrt(n)))
    go = grid_out or (_square(n_out) and (math.isqrt(n_out), math.isqrt(n_out)))
    if gi and go:
        if gi[0] * gi[1] != n or go[0] * go[1] != n_out:
            raise ValueError(f"resample_tokens: grids {gi} -> {go} do not match N {n} -> {n_out}")
        m = x.transpose(1, 2).reshape(b, c, *gi)
        m = F.interpolate(m, size=go, mode="bilinear", align_corners=False)
        return m.reshape(b, c, n_out).transpose(1, 2)
    return F.interpolate(x.transpose(1, 2), size=n_out, mode="linear", align_corners=False).transpose(1, 2)


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


@register_adapter("patch_embed")
class PatchEmbedAdapter(LazyAdapter):
    """TransKD PEA projector: tokens `(B, N_s, C_s)` -> `(B, N_t, C_t)`.

    A Linear C_s -> C_t (built lazily from the first batch), then, when N_s ≠ N_t, the token grid is
    resampled to the teacher's (`resample_tokens`; square grids bilinear, else linear on the token
    axis). `grid_student`/`grid_teacher` give non-square (H, W) grids; `cls_token` keeps token 0 apart.
    """

    def __init__(self, bias: bool = True, cls_token: bool = False, grid_student: Sequence[int] | None = None,
                 grid_teacher: Sequence[int] | None = None) -> None:
        super().__init__()
        self.bias, self.cls_token = bias, cls_token
        self.grid_student = tuple(grid_student) if grid_student else None
        self.grid_teacher = tuple(grid_teacher) if grid_teacher else None

    def build(self, c_in: int, c_out: int) -> nn.Module:
        return nn.Linear(c_in, c_out, bias=self.bias)

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or like.dim() != 3:
            raise ValueError(f"patch_embed adapter: expected tokens (B, N, C) on both sides, got student "
                             f"{tuple(x.shape)} and teacher {tuple(like.shape)}")
        y = super().forward(x, like)
        if y.shape[1] != like.shape[1]:
            y = resample_tokens(y, like.shape[1], self.grid_student, self.grid_teacher,  # type: ignore[arg-type]
                                self.cls_token)
        return y


def _pea_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 16, 6, generator=g, requires_grad=True), torch.randn(2, 4, 6, generator=g, requires_grad=True)]
    t = [torch.randn(2, 16, 6, generator=g), torch.randn(2, 4, 6, generator=g)]
    return (s, t), {}


def stage_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    """The PEA weight per stage: given, else the paper's (0.1, 0.1, 0.5, 1.0) (its last n for n < 4)."""
    if weights is None:
        if n > len(PAPER_EMBED_WEIGHTS):
            raise ValueError(f"pea: {n} stages; give weights (the paper's are for 4 stages)")
        return list(PAPER_EMBED_WEIGHTS[len(PAPER_EMBED_WEIGHTS) - n:])
    if len(weights) != n:
        raise ValueError(f"pea: {n} stage(s) but {len(weights)} weight(s) {list(weights)}")
    return [float(w) for w in weights]


@register_loss("pea", paper=TRANSKD_PAPER, shape_check="same", example=_pea_example)
def pea(student: Tensors, teacher: Tensors, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Patch-embedding alignment: Σ_i w_i·MSE(E_s'^i, E_t^i) over (adapted) stage tokens `(B, N, C)`.

    Give the term the `patch_embed` adapter so student embeddings reach the teacher's shape.
    """
    ss, ts = _list(student), _list(teacher)
    if len(ss) != len(ts) or not ss:
        raise ValueError(f"pea: {len(ss)} student stage(s) but {len(ts)} teacher stage(s)")
    w = stage_weights(len(ss), weights)
    total = _f(ss[0]).new_zeros(())
    for wi, s, t in zip(w, ss, ts):
        if s.shape != t.shape:
            raise ValueError(f"pea: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; use the patch_embed adapter")
        total = total + wi * F.mse_loss(_f(s), _f(t).to(s.device))
    return total


__all__ = ["PatchEmbedAdapter", "resample_tokens", "pea", "stage_weights", "PAPER_EMBED_WEIGHTS"]
