"""Relation losses: match how samples of a batch relate to each other (RKD, SP, PKT).

All take features `(B, ...)` (flattened to `(B, D)`); student and teacher dims may differ, only the
batch size must agree (`shape_check="batch"`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from still.registry import register_loss


def _flat(x: torch.Tensor) -> torch.Tensor:
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return x.reshape(x.shape[0], -1)


def _check_batch(s: torch.Tensor, t: torch.Tensor, loss: str) -> None:
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{loss}: student batch {s.shape[0]} != teacher batch {t.shape[0]}")


def _relation_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(5, 3, 2, generator=g, requires_grad=True), torch.randn(5, 7, generator=g)), {}


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances `(B, D) -> (B, B)`, zero diagonal (squared form clamped at `eps`, as in RKD's code)."""
    sq = e.pow(2).sum(1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * e @ e.t()).clamp(min=eps)
    off = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt() * off


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos ∠(e_j, e_i, e_k) for all (i, j, k): `(B, D) -> (B, B, B)`; 0 where j = i or k = i."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = unit(e_j - e_i)
    return torch.bmm(diff, diff.transpose(1, 2))


@register_loss("rkd", paper="Park, Kim, Lu, Cho. Relational Knowledge Distillation (CVPR 2019)",
               shape_check="batch", example=_relation_example)
def rkd(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
        angle_weight: float = 50.0) -> torch.Tensor:
    """RKD: w_d·Huber(ψ_D) + w_a·Huber(ψ_A) between student and teacher relations.

    ψ_D: pairwise distances `(B, B)`, each divided by its mean over distinct pairs; ψ_A: cosines of the
    angle at e_i of every triple `(B, B, B)`. Huber is smooth-L1 (δ = 1), averaged over all entries.
    Features `(B, ...)`, flattened; the paper's weights 25 and 50. Needs B ≥ 2.
    """
    s, t = _flat(student), _flat(teacher).to(student.device)
    _check_batch(s, t, "rkd")
    b = s.shape[0]
    if b < 2:
        raise ValueError("rkd needs a batch of at least 2 samples")
    loss = s.new_zeros(())
    if distance_weight:
        n_pairs = b * (b - 1)
        td = pairwise_distances(t)
        td = td / (td.sum() / n_pairs)
        sd = pairwise_distances(s)
        sd = sd / (sd.sum() / n_pairs)
        loss = loss + distance_weight * F.smooth_l1_loss(sd, td)
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss


def _sp_one(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = _flat(s), _flat(t).to(s.device)
    _check_batch(s, t, "sp")
    gs = F.normalize(s @ s.t(), p=2, dim=1)
    gt = F.normalize(t @ t.t(), p=2, dim=1)
    return (gt - gs).pow(2).sum() / (s.shape[0] ** 2)


@register_loss("sp", paper="Tung, Mori. Similarity-Preserving Knowledge Distillation (ICCV 2019)",
               shape_check="batch", example=_relation_example)
def similarity_preserving(student: torch.Tensor | Sequence[torch.Tensor],
                          teacher: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """SP: (1/B²)·‖G̃_t − G̃_s‖_F², G = F Fᵀ `(B, B)` with rows L2-normalised; summed over pairs.

    `student`, `teacher`: features `(B, ...)` (flattened), or equally long lists of them. The paper's
    weight is γ = 3000.
    """
    ss = [student] if isinstance(student, torch.Tensor) else list(student)
    ts = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    if len(ss) != len(ts) or not ss:
        raise ValueError(f"sp: {len(ss)} student feature(s) but {len(ts)} teacher feature(s)")
    out = _sp_one(ss[0], ts[0])
    for s, t in zip(ss[1:], ts[1:]):
        out = out + _sp_one(s, t)
    return out


def _cosine_kernel_probs(x: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's conditional probabilities `(B, D) -> (B, B)`: row-normalised (cos + 1) / 2."""
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


@register_loss("pkt", paper="Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer (ECCV 2018)",
               shape_check="batch", example=_relation_example)
def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT: mean_(i, j) p_t(j|i)·log((p_t(j|i) + ε) / (p_s(j|i) + ε)) with cosine-kernel probabilities.

    Features `(B, ...)` (flattened). Averaged over all B² entries as in the authors' code.
    """
    s, t = _flat(student), _flat(teacher).to(student.device)
    _check_batch(s, t, "pkt")
    ps = _cosine_kernel_probs(s, eps)
    pt = _cosine_kernel_probs(t, eps)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()
