"""Dense-prediction losses with their own projection heads: OADP's object / block / global pyramid
(2.5), TransKD's embedding assistant (2.1 EA) and an ignore-safe pixel cross-entropy.

Student maps are `(B, C, H, W)`; teacher embeddings `(B, K, D)` (one per box or block) or `(B, D)`.
Projections are lazy (sized from the first batch) and train with the student.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.losses.dense import OADP_PAPER, TRANSKD_PAPER, _f, l1_embed, mse_sum, roi_align
from still.losses.relations import rkd
from still.registry import register_loss


def grid_boxes(b: int, g: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """The g×g blocks of an (h, w) canvas as boxes (B, g², 4) `(x0, y0, x1, y1)`, row-major."""
    ys = torch.linspace(0, h, g + 1, device=device)
    xs = torch.linspace(0, w, g + 1, device=device)
    rows = [torch.stack([xs[j], ys[i], xs[j + 1], ys[i + 1]]) for i in range(g) for j in range(g)]
    return torch.stack(rows)[None].expand(b, -1, -1).contiguous()


class _Lazy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj: nn.Linear | None = None

    def project(self, x: torch.Tensor, d: int) -> torch.Tensor:
        if self.proj is None:
            self.proj = nn.Linear(x.shape[-1], d).to(x.device)
        return self.proj(_f(x))


def _obj_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [-1.0, -1.0, -1.0, -1.0]], [[4.0, 2.0, 16.0, 12.0], [0, 0, 6, 6]]])
    return (torch.randn(2, 3, 4, 4, generator=g, requires_grad=True), torch.randn(2, 2, 5, generator=g)), {
        "boxes": boxes, "spatial_scale": 0.25}


@register_loss("oadp_object", paper=OADP_PAPER, shape_check="none", example=_obj_example)
class OADPObject(_Lazy):
    """OADP object term: L1(normalised Linear(RoI-pool(student map, box)), teacher box embedding).

    student (B, C, H, W); teacher (B, K, D) embeddings of each box's crop (OAKE: the teacher sees the
    box region); `boxes` (B, K, 4) in input pixels (rows of -1 absent, excluded from the mean).
    """

    def __init__(self, spatial_scale: float = 1.0, output_size: int = 2) -> None:
        super().__init__()
        self.spatial_scale, self.output_size = spatial_scale, output_size

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, boxes: torch.Tensor,
                spatial_scale: float | None = None) -> torch.Tensor:
        scale = self.spatial_scale if spatial_scale is None else spatial_scale
        pooled = roi_align(student, boxes, self.output_size, scale).mean((-2, -1))  # (B, K, C)
        emb = self.project(pooled, teacher.shape[-1])
        return l1_embed(emb, teacher, mask=(boxes >= 0).all(-1))


def _block_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 3, 4, 4, generator=g, requires_grad=True), torch.randn(3, 4, 5, generator=g)), {}


@register_loss("oadp_block", paper=OADP_PAPER, shape_check="batch", example=_block_example)
class OADPBlock(_Lazy):
    """OADP block term: L1 over the g×g blocks (g² = K of the teacher) + `rkd_weight`·RKD between blocks.

    student (B, C, H, W) is average-pooled to g×g; teacher (B, g², D) embeddings of the blocks'
    crops. The RKD relation is over the B·g² block embeddings (distance + angle, RKD's 25 / 50
    inside; OADP's gain 8 relative to the block gain 128 is `rkd_weight` = 8/128 here).
    """

    def __init__(self, rkd_weight: float = 8 / 128) -> None:
        super().__init__()
        self.rkd_weight = rkd_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        k = teacher.shape[1]
        g = int(round(k ** 0.5))
        if g * g != k:
            raise ValueError(f"oadp_block: teacher gives {k} blocks; expected a square number (g×g)")
        pooled = F.adaptive_avg_pool2d(_f(student), g).flatten(2).transpose(1, 2)  # (B, g², C)
        emb = self.project(pooled, teacher.shape[-1])
        loss = l1_embed(emb, teacher)
        if self.rkd_weight:
            loss = loss + self.rkd_weight * rkd(F.normalize(emb, dim=-1).reshape(-1, emb.shape[-1]),
                                                 F.normalize(_f(teacher), dim=-1).reshape(-1, emb.shape[-1]))
        return loss


@register_loss("oadp_global", paper=OADP_PAPER, shape_check="batch", example=lambda: (
    (torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 5)), {}))
class OADPGlobal(_Lazy):
    """OADP global term: Σ_d (Linear(GAP(student)) − teacher)² of normalised embeddings, batch mean.

    student (B, C, H, W); teacher (B, D) global embedding (or a map (B, D, h, w), averaged).
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if teacher.dim() == 4:
            teacher = _f(teacher).mean((2, 3))
        return mse_sum(self.project(_f(student).mean((2, 3)), teacher.shape[-1]), teacher)


# ------------------------------------------------------------------ TransKD embedding assistant
def _ea_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, 8, 8, generator=g, requires_grad=True), torch.randn(2, 6, 4, 4, generator=g, requires_grad=True)]
    t = [torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 7, 4, 4, generator=g)]
    return (s, t), {}


@register_loss("transkd_ea", paper=TRANSKD_PAPER, shape_check="none", example=_ea_example)
class TransKDEA(nn.Module):
    """TransKD embedding assistant: Σ_i w_i·MSE(a_i·proj_i(e_i) + b_i·EA_i(x_{i-1}), E_t^i).

    student: stage embeddings [(B, Cs_i, H_i, W_i)] (then x = e), or those followed by the n stage
    maps x_i the assistant runs on; teacher: embeddings [(B, Ct_i, H_i', W_i')]. proj_i is
    the PEA projection (1x1 conv to Ct_i); EA_i is an extra teacher-width overlapping patch embedding
    (3x3 conv, stride 2 when the previous stage is larger, + BatchNorm) run on the *previous* student
    stage (the input image for i = 0 is not available, so stage 0 uses proj only). a_i, b_i are
    learnable, initialised to 0.1·(i+1) and 0.1·(i+1+n) as in the code. `weights` are the stage
    weights w_i (TransKD's embed_weights).
    """

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.weights = list(weights) if weights is not None else None
        self.proj = nn.ModuleList()
        self.ea = nn.ModuleList()
        self.mix = nn.Parameter(torch.zeros(0))

    @staticmethod
    def _split(student: Sequence[torch.Tensor], n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(embeddings e_i, maps the EA runs on): 2n student tensors are [e_0..e_n-1, x_0..x_n-1]."""
        s = list(student)
        return (s[:n], s[n:]) if len(s) == 2 * n else (s, s)

    def _build(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
               maps: Sequence[torch.Tensor]) -> None:
        n = len(student)
        dev = student[0].device
        for i, (s, t) in enumerate(zip(student, teacher)):
            self.proj.append(nn.Conv2d(s.shape[1], t.shape[1], 1))
            if i == 0:
                self.ea.append(nn.Identity())
            else:
                prev = maps[i - 1]
                stride = 2 if prev.shape[-1] > t.shape[-1] else 1
                self.ea.append(nn.Sequential(nn.Conv2d(prev.shape[1], t.shape[1], 3, stride, 1), nn.BatchNorm2d(t.shape[1])))
        init = [0.1 * (i + 1) for i in range(n)] + [0.1 * (i + 1 + n) for i in range(n)]
        self.mix = nn.Parameter(torch.tensor(init, device=dev))
        self.to(dev)

    def mixed(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The assisted embeddings [(B, Ct_i, H_i', W_i')]."""
        n = len(teacher)
        student, maps = self._split(student, n)
        if len(self.proj) == 0:
            self._build(student, teacher, maps)
        out = []
        for i, (s, t) in enumerate(zip(student, teacher)):
            e = self.mix[i] * self.proj[i](_f(s))
            if i > 0:
                a = self.ea[i](_f(maps[i - 1]))
                if a.shape[-2:] != e.shape[-2:]:
                    a = F.interpolate(a, size=e.shape[-2:], mode="bilinear", align_corners=False)
                e = e + self.mix[i + n] * a
            if e.shape[-2:] != t.shape[-2:]:
                e = F.interpolate(e, size=t.shape[-2:], mode="bilinear", align_corners=False)
            out.append(e)
        return out

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(student) not in (len(teacher), 2 * len(teacher)):
            raise ValueError(f"transkd_ea: {len(student)} student tensors for {len(teacher)} teacher stages; give n "
                             "embeddings, or n embeddings followed by the n stage maps the assistant runs on")
        w = self.weights or [1.0] * len(teacher)
        if len(w) != len(teacher):
            raise ValueError(f"transkd_ea: {len(teacher)} stages but {len(w)} weights")
        return sum(wi * F.mse_loss(e, _f(t)) for wi, e, t in zip(w, self.mixed(student, teacher), teacher))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- pixel CE
@register_loss("seg_ce", paper="", shape_check="none", example=lambda: (
    (torch.randn(2, 3, 4, 4, requires_grad=True), torch.randint(0, 3, (2, 4, 4))), {}))
def seg_ce(student: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Pixel cross-entropy of logits (B, K, H, W) vs labels (B, H, W), mean over labelled pixels;
    0 (with a gradient path) when no pixel of the batch is labelled (semi-supervised batches)."""
    # sum / count instead of a Python `if` on valid.any(): no host sync per step on an accelerator
    n = (target != ignore_index).sum().clamp_min(1)
    return F.cross_entropy(_f(student), target.long(), ignore_index=ignore_index, reduction="sum") / n
