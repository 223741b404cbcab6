"""ARRA (catalog 2.3): global visual alignment of the next-token hidden states to a frozen encoder.

L_ARRA = L_AR + λ·L_GVA, λ = 1;  L_GVA = 1 − cos(A_φ(h_t), f_GF), averaged over every position t
(the ordinary next-token position carries both constraints: <HYBNEXT>), with A_φ a 2-layer MLP and
f_GF the frozen foundation encoder's global feature of the image. A_φ lives in the loss module (it
trains with the student and is dropped at inference: the student model holds no alignment weights).
`positions="last"` aligns only the last position (a fixed <REP>-style token: the paper's weaker ablation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_loss

ARRA_PAPER = "Xie et al. Unleashing the Potential of Large Language Models for Text-to-Image Generation through " \
             "Autoregressive Representation Alignment (ARRA, AAAI 2026)"


def gva_cosine(aligned: torch.Tensor, global_feature: torch.Tensor) -> torch.Tensor:
    """mean over B and L of 1 − cos(aligned[b, t], f[b]): `(B, L, D), (B, D) -> ()`."""
    f = global_feature.float().reshape(global_feature.shape[0], -1).to(aligned.device)
    return (1.0 - F.cosine_similarity(aligned.float(), f.unsqueeze(1), dim=-1)).mean()


def _ex_gva() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 5, 8, generator=g, requires_grad=True), torch.randn(3, 6, 1, 1, generator=g)), {}


@register_loss("arra_gva", paper=ARRA_PAPER, shape_check="none", example=_ex_gva)
class ARRAGlobalAlignment(nn.Module):
    """1 − cos(A_φ(h_t), f_GF): hidden (B, L, d) of a student layer, f_GF (B, D) (or (B, D, 1, 1), flattened).

    A_φ = Linear(d, hidden) → GELU → Linear(hidden, D), built lazily on the first batch.
    `positions`: "all" (ARRA: every next-token position) or "last" (a single fixed position).
    """

    def __init__(self, hidden: int = 128, positions: str = "all") -> None:
        super().__init__()
        if positions not in ("all", "last"):
            raise ValueError(f"arra_gva: positions must be 'all' or 'last', got {positions!r}")
        self.hidden, self.positions = hidden, positions
        self.align: nn.Module | None = None

    def _build(self, d: int, out: int, like: torch.Tensor) -> None:
        self.align = nn.Sequential(nn.Linear(d, self.hidden), nn.GELU(), nn.Linear(self.hidden, out)).to(like.device)

    def forward(self, hidden: torch.Tensor, global_feature: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3:
            raise ValueError(f"arra_gva: hidden must be (B, L, d), got {tuple(hidden.shape)}")
        f = global_feature.reshape(global_feature.shape[0], -1)
        if f.shape[0] != hidden.shape[0]:
            raise ValueError(f"arra_gva: batch {hidden.shape[0]} (hidden) != {f.shape[0]} (global feature)")
        if self.align is None:
            self._build(hidden.shape[-1], f.shape[1], hidden)
        h = hidden if self.positions == "all" else hidden[:, -1:]
        return gva_cosine(self.align(h.float()), f.detach())
