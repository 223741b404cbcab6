"""A tiny ViT for momentum self-distillation (MMC, CMD): CLS + patch tokens, optional gated-attention
MIL pooling, a DINO-style projection head, optional random patch masking in training mode.

`ssl_vit_tiny`: forward(x (B, C, H, W), region=None) → image-level head logits (B, K).
Taps: `img_out` (B, K) image-level logits, `patch_out` (B, N, K) per-patch logits (the head applied to
every patch token), `reg_out` (B, K) logits of the `region` input (a crop, resized to the image size;
only when given), `embed_out` (B, d) the pooled embedding (for kNN probes), `recon_out` (B, N, C·p²)
pixel predictions of every patch (MMC's MIM head) and `mask_out` (B, N) the student's patch mask (1 = masked).
`pool="mil"`: the image embedding is the gated-attention MIL pooling of the patch tokens
(Ilse et al. 2018): a = softmax_k(wᵀ(tanh(V h_k) ⊙ σ(U h_k))), z = Σ_k a_k h_k; `pool="cls"`: the CLS token.
`mask_ratio` > 0: in training mode that fraction of patch tokens is replaced by a learned mask token
(MMC's masked student; an EMA copy in eval mode sees the full image).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from still.registry import register_model


class GatedAttentionMIL(nn.Module):
    """(B, N, d) instances → (B, d) bag embedding and (B, N) attention weights (gated attention)."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.v, self.u, self.w = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1), dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bn,bnd->bd", self.attention(h), h)


class SSLViT(nn.Module):
    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), patch: int = 7, dim: int = 64, depth: int = 2,
                 heads: int = 4, out_dim: int = 64, pool: str = "cls", mask_ratio: float = 0.0) -> None:
        super().__init__()
        if pool not in ("cls", "mil"):
            raise ValueError(f"ssl_vit_tiny: pool must be 'cls' or 'mil', got {pool!r}")
        c, h, w = (int(v) for v in input_shape)
        self.n = (h // patch) * (w // patch)
        self.patch_embed = nn.Conv2d(c, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.n, dim) * 0.02)
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.0, batch_first=True,
                                                                 norm_first=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.mil = GatedAttentionMIL(dim) if pool == "mil" else None
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out_dim))
        self.pixel_head = nn.Linear(dim, c * patch * patch)
        self.pool, self.mask_ratio = pool, float(mask_ratio)
        self.img_out, self.patch_out, self.reg_out, self.embed_out = (nn.Identity() for _ in range(4))
        self.recon_out, self.mask_out = nn.Identity(), nn.Identity()
        self._last_mask: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x → (pooled embedding (B, d), patch tokens (B, N, d))."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, d)
        m = torch.zeros(t.shape[:2], dtype=torch.bool, device=t.device)
        if self.training and self.mask_ratio > 0:
            m = torch.rand(t.shape[:2], device=t.device) < self.mask_ratio
            t = torch.where(m.unsqueeze(-1), self.mask_token.expand_as(t), t)
        self._last_mask = m
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        t = self.norm(self.blocks(t))
        patches = t[:, 1:]
        return (self.mil(patches) if self.mil is not None else t[:, 0]), patches

    def forward(self, x: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        z, patches = self.encode(x)
        self.mask_out(self._last_mask.float())
        self.embed_out(z)
        self.patch_out(self.head(patches))
        self.recon_out(self.pixel_head(patches))
        if region is not None:
            self.reg_out(self.head(self.encode(region)[0]))
        return self.img_out(self.head(z))


@register_model("ssl_vit_tiny", paper="Caron et al. Emerging Properties in Self-Supervised Vision Transformers "
                "(DINO, ICCV 2021), toy scale")
def ssl_vit_tiny(num_classes: int = 64, input_shape: Sequence[int] = (1, 28, 28), patch: int = 7, dim: int = 64,
                 depth: int = 2, heads: int = 4, out_dim: int | None = None, pool: str = "cls",
                 mask_ratio: float = 0.0) -> SSLViT:
    """~110k parameters: 16 patches of 7×7, d = 64, 2 layers; `out_dim` (default: num_classes) prototypes."""
    return SSLViT(input_shape, patch, dim, depth, heads, out_dim or num_classes, pool, mask_ratio)
