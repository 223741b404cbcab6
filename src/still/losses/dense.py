"""Dense-prediction distillation losses: TransKD HCL/CSF (2.1), Chimera-Seg SGD (2.4), OADP pyramid
(2.5), FarSLIP patch-to-patch (2.2), MGD region/image/pixel terms (4.2), and a bilinear RoI pool.

Feature maps are `(B, C, H, W)`; boxes are `(B, K, 4)` as `(x0, y0, x1, y1)` in input pixels, with
rows of -1 for absent boxes; `spatial_scale` maps input pixels to feature cells.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_loss, register_schedule
from still.schedules import Linear

TRANSKD_PAPER = "Liu et al. TransKD: Transformer Knowledge Distillation for Efficient Semantic Segmentation (T-ITS 2024)"
CHIMERA_PAPER = "Chen et al. Chimera-Seg: selective global distillation for zero-shot segmentation (arXiv 2506.22032)"
OADP_PAPER = "Wang et al. Object-Aware Distillation Pyramid for Open-Vocabulary Object Detection (CVPR 2023)"
FARSLIP_PAPER = "FarSLIP: fine-grained aligned remote-sensing language-image pretraining (arXiv, Nov 2025)"
MGD_PAPER = "Qin et al. Multi-Granularity Distillation for Lightweight Semi-supervised Segmentation (ECCV 2022)"


def _f(x: torch.Tensor) -> torch.Tensor:
    """x in float32 unless it is already float32/float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _ex_maps() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 8, 8, generator=g, requires_grad=True), torch.randn(2, 3, 8, 8, generator=g)), {}


# --------------------------------------------------------------------------------- RoI pool
def roi_align(feat: torch.Tensor, boxes: torch.Tensor, output_size: int = 2, spatial_scale: float = 1.0,
              sampling: int = 2) -> torch.Tensor:
    """Bilinear RoI pooling (aligned=True semantics): feat (B, C, H, W), boxes (B, K, 4) → (B, K, C, S, S).

    Each output cell averages `sampling²` bilinear samples; absent boxes (any coordinate < 0) give 0.
    """
    b, c, h, w = feat.shape
    k = boxes.shape[1]
    s = output_size
    bx = boxes.to(feat.dtype) * spatial_scale - 0.5
    x0, y0, x1, y1 = bx.unbind(-1)  # (B, K)
    grid = (torch.arange(s * sampling, device=feat.device, dtype=feat.dtype) + 0.5) / (s * sampling)
    xs = x0[..., None] + (x1 - x0)[..., None] * grid  # (B, K, S·n) in feature pixels
    ys = y0[..., None] + (y1 - y0)[..., None] * grid
    # grid_sample wants [-1, 1] coordinates with align_corners=False: pixel centre i ↦ (2i + 1)/W - 1.
    gx = (2 * xs + 1) / w - 1
    gy = (2 * ys + 1) / h - 1
    gy_, gx_ = gy[..., :, None].expand(-1, -1, -1, gx.shape[-1]), gx[..., None, :].expand(-1, -1, gy.shape[-1], -1)
    grid2 = torch.stack([gx_, gy_], -1).reshape(b, k * gy.shape[-1], gx.shape[-1], 2)
    sampled = F.grid_sample(feat, grid2, mode="bilinear", align_corners=False)  # (B, C, K·S·n, S·n)
    sampled = sampled.view(b, c, k, s, sampling, s, sampling).mean((4, 6)).permute(0, 2, 1, 3, 4)
    valid = (boxes >= 0).all(-1).to(feat.dtype)[..., None, None, None]
    return sampled * valid


# ------------------------------------------------------------------------------- TransKD HCL
@register_loss("hcl", paper=TRANSKD_PAPER, example=_ex_maps)
def hcl(student: torch.Tensor | Sequence[torch.Tensor], teacher: torch.Tensor | Sequence[torch.Tensor],
        levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss (ReviewKD): MSE(f_s, f_t) + Σ_{l<h} 0.5^k·MSE(pool_l f_s, pool_l f_t), normalised.

    `levels` are the pooled sizes l×l (adaptive average pooling), applied only where l < H; the k-th
    level gets weight 0.5^k and the total is divided by the sum of the weights. Lists of stages are
    summed.
    """
    if isinstance(student, (list, tuple)):
        return sum(hcl(s, t, levels) for s, t in zip(student, teacher))  # type: ignore[return-value]
    h = student.shape[-2]
    loss = F.mse_loss(_f(student), _f(teacher))
    tot, weight = 1.0, 1.0
    for lvl in levels:
        if lvl >= h:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(_f(student), lvl),
                                          F.adaptive_avg_pool2d(_f(teacher), lvl))
        tot += weight
    return loss / tot


class _SKFuse(nn.Module):
    """SK-style two-branch attention fusion (TransKD CSF): GAP → FC → 2 FCs → softmax over branches."""

    def __init__(self, mid: int) -> None:
        super().__init__()
        hidden = max(mid // 16, 32)
        self.fc = nn.Sequential(nn.Linear(mid, hidden), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(hidden, mid), nn.Linear(hidden, mid)])

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = self.fc((a + b).mean((2, 3)))
        w = torch.stack([hd(z) for hd in self.heads], 0).softmax(0)  # (2, B, mid)
        return a * w[0][..., None, None] + b * w[1][..., None, None]


@register_loss("transkd_csf", paper=TRANSKD_PAPER, shape_check="none", example=lambda: (
    ([torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 6, 4, 4)],
     [torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)]), {}))
class TransKDCSF(nn.Module):
    """Cross Selective Fusion + HCL over stages: student maps [(B, Cs_i, H_i, W_i)] → teacher widths.

    From deep to shallow, x_i = BN(conv1x1(F_s^i → mid)); it is fused with the upsampled previous
    (deeper) result by SK attention; BN(conv3x3(→ C_t^i)) gives F_s'^i, compared to F_t^i with HCL.
    Layers are sized lazily from the first batch.
    """

    def __init__(self, mid: int = 64, levels: Sequence[int] = (4, 2, 1)) -> None:
        super().__init__()
        self.mid, self.levels = mid, tuple(levels)
        self.reduce = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.out = nn.ModuleList()

    def _build(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> None:
        dev = student[0].device
        for s, t in zip(student, teacher):
            self.reduce.append(nn.Sequential(nn.Conv2d(s.shape[1], self.mid, 1, bias=False), nn.BatchNorm2d(self.mid)))
            self.fuse.append(_SKFuse(self.mid))
            self.out.append(nn.Sequential(nn.Conv2d(self.mid, t.shape[1], 3, padding=1, bias=False),
                                          nn.BatchNorm2d(t.shape[1])))
        self.to(dev)

    def fused(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(self.reduce) == 0:
            self._build(student, teacher)
        outs: list[torch.Tensor] = [None] * len(student)  # type: ignore[list-item]
        prev = None
        for i in reversed(range(len(student))):
            x = self.reduce[i](student[i])
            if prev is not None:
                x = self.fuse[i](x, F.interpolate(prev, size=x.shape[-2:], mode="nearest"))
            prev = x
            y = self.out[i](x)
            if y.shape[-2:] != teacher[i].shape[-2:]:
                y = F.interpolate(y, size=teacher[i].shape[-2:], mode="bilinear", align_corners=False)
            outs[i] = y
        return outs

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(student) != len(teacher):
            raise ValueError(f"transkd_csf: {len(student)} student stages but {len(teacher)} teacher stages")
        return sum(hcl(s, t, self.levels) for s, t in zip(self.fused(student, teacher), teacher))  # type: ignore[return-value]


# ------------------------------------------------------------------------- Chimera-Seg SGD
@register_schedule("shrinking_topk")
class ShrinkingTopK(Linear):
    """Fraction of dense features kept by Chimera-Seg's SGD: linear from `start` to `end` over the run."""

    def __init__(self, start: float = 0.5, end: float = 0.1) -> None:
        super().__init__(start, end)


@register_loss("selective_global", paper=CHIMERA_PAPER, shape_check="batch", example=lambda: (
    (torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 5)), {}))
class SelectiveGlobal(nn.Module):
    """SGD: 1 - cos(mean of the top-k(t) dense features most similar to the teacher's global embedding, it).

    Student dense features (B, C, H, W) are projected (lazy 1x1 conv) to the teacher's width D; the
    teacher gives a global embedding (B, D) (its CLS / pooled output). k(t) = ⌈fraction(t)·H·W⌉ with
    the `shrinking_topk` schedule. This is the catalog's [R] reconstruction.
    """

    def __init__(self, start: float = 0.5, end: float = 0.1) -> None:
        super().__init__()
        self.schedule = ShrinkingTopK(start, end)
        self.fraction = start
        self.proj: nn.Conv2d | None = None

    def set_progress(self, step: int, total_steps: int) -> None:
        self.fraction = self.schedule(step, total_steps)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if teacher.dim() == 4:  # a teacher feature map (B, D, h, w): its global average is the embedding
            teacher = _f(teacher).mean((2, 3))
        if self.proj is None:
            self.proj = nn.Conv2d(student.shape[1], teacher.shape[-1], 1).to(student.device)
        f = self.proj(student).flatten(2).transpose(1, 2)  # (B, N, D)
        g = F.normalize(_f(teacher), dim=-1)
        sim = torch.einsum("bnd,bd->bn", F.normalize(f, dim=-1), g)
        k = max(1, math.ceil(self.fraction * f.shape[1]))
        idx = sim.topk(k, dim=1).indices
        sel = torch.gather(f, 1, idx[..., None].expand(-1, -1, f.shape[-1])).mean(1)
        return (1 - F.cosine_similarity(sel, g, dim=-1)).mean()


# ---------------------------------------------------------------------------- OADP pyramid
@register_loss("l1_embed", paper=OADP_PAPER, example=lambda: (
    (torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4)), {}))
def l1_embed(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
             normalize: bool = True) -> torch.Tensor:
    """OADP object / block term: L1 between (normalised) embeddings (..., D), mean over valid rows.

    `mask` (...) selects valid rows (e.g. present boxes). The paper's gains (256 object, 128 block)
    are the terms' weights.
    """
    s, t = _f(student), _f(teacher)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    d = (s - t).abs().sum(-1)
    if mask is None:
        return d.mean()
    m = mask.to(d.dtype)
    return (d * m).sum() / m.sum().clamp_min(1.0)


@register_loss("mse_sum", paper=OADP_PAPER, example=lambda: (
    (torch.randn(2, 4, requires_grad=True), torch.randn(2, 4)), {}))
def mse_sum(student: torch.Tensor, teacher: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """OADP global term: Σ (s - t)² over embedding dims, mean over the batch (gain 0.5 as the weight)."""
    s, t = _f(student), _f(teacher)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    return (s - t).pow(2).sum(-1).mean()


# ------------------------------------------------------------------------------ FarSLIP P2P
@register_loss("patch_to_patch", paper=FARSLIP_PAPER, shape_check="none", example=lambda: (
    (torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 2, 3)),
    {"boxes": torch.tensor([[[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 16.0, 16.0]]] * 2), "spatial_scale": 0.25}))
def patch_to_patch(student: torch.Tensor, teacher: torch.Tensor, boxes: torch.Tensor, spatial_scale: float = 1.0,
                   output_size: int = 2) -> torch.Tensor:
    """1 - mean cos(RoI-pooled student patches, pooled teacher embedding of each local crop).

    student: patch grid (B, C, H, W) of the global image; teacher: (B, K, C) mean-pooled patch tokens
    of each crop encoded on its own (an EMA teacher in FarSLIP); boxes (B, K, 4) the crops.
    """
    pooled = roi_align(student, boxes, output_size, spatial_scale).mean((-2, -1))  # (B, K, C)
    valid = (boxes >= 0).all(-1)
    cos = F.cosine_similarity(_f(pooled), _f(teacher), dim=-1)
    return (1 - cos)[valid].mean() if valid.any() else student.sum() * 0.0


# ---------------------------------------------------------------------------------- MGD
@register_loss("region_similarity", paper=MGD_PAPER, shape_check="batch", example=_ex_maps)
def region_similarity(student: torch.Tensor, teacher: torch.Tensor, grid: int = 7) -> torch.Tensor:
    """MGD region-level content-aware loss: MSE of the (g², g²) cosine self-similarity of g×g pooled maps."""
    def sim(x: torch.Tensor) -> torch.Tensor:
        q = F.normalize(F.adaptive_avg_pool2d(_f(x), grid).flatten(2), dim=1)  # (B, C, g²)
        return q.transpose(1, 2) @ q
    return F.mse_loss(sim(student), sim(teacher))


@register_loss("gap_l1", paper=MGD_PAPER, example=_ex_maps)
def gap_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MGD image-level semantic-sensitive loss: Σ_c |GAP(z_s) - GAP(z_t)|, mean over the batch (λ1 = 0.002)."""
    return (_f(student).mean((2, 3)) - _f(teacher).mean((2, 3))).abs().sum(-1).mean()


@register_loss("pseudo_label_ce", paper=MGD_PAPER, shape_check="same", example=_ex_maps)
def pseudo_label_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross pseudo-supervision: CE(student logits (B, K, ...), argmax of the other branch's logits)."""
    return F.cross_entropy(_f(student), teacher.detach().argmax(1))
