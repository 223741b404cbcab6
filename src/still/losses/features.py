"""Feature losses: the FitNets hint and attention transfer."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from still.registry import register_loss

Features = torch.Tensor | Sequence[torch.Tensor]


def _f(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _pairs(student: Features, teacher: Features, loss: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Student/teacher tensors (or equally long lists of them) as a list of pairs."""
    ss = [student] if isinstance(student, torch.Tensor) else list(student)
    ts = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    if len(ss) != len(ts) or not ss:
        raise ValueError(f"{loss}: {len(ss)} student feature(s) but {len(ts)} teacher feature(s)")
    return list(zip(ss, ts))


def _hint_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 5, 4, 3, generator=g, requires_grad=True), torch.randn(3, 5, 4, 3, generator=g)), {}


@register_loss("fitnets", paper="Romero, Ballas, Kahou, Chassang, Gatta, Bengio. FitNets: Hints for Thin Deep Nets (ICLR 2015)",
               shape_check="same", example=_hint_example)
def fitnets(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Hint loss: mean squared error between the (adapted) student feature and the teacher feature.

    Any matching shapes, e.g. `(B, C, H, W)`; the term's adapter (`conv1x1`, as the paper's regressor,
    or `linear` for `(B, D)`) maps the student's channels to the teacher's. Mean over all elements.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"fitnets: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; "
                         "give the term an adapter (conv1x1 or linear)")
    return F.mse_loss(_f(student), _f(teacher).to(student.device))


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a feature map: `(B, C, *S) -> (B, ΠS)`, mean_c |f|^p, L2-normalised per sample."""
    a = _f(f).abs().pow(p).mean(1).flatten(1)
    return F.normalize(a, dim=1)


def _at_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 4, 6, 6, generator=g, requires_grad=True), torch.randn(3, 2, 3, 3, generator=g, requires_grad=True)]
    t = [torch.randn(3, 7, 6, 6, generator=g), torch.randn(3, 5, 5, 5, generator=g)]
    return (s, t), {}


@register_loss("at", paper="Zagoruyko, Komodakis. Paying More Attention to Attention (ICLR 2017)",
               shape_check="batch", example=_at_example)
def attention_transfer(student: Features, teacher: Features, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: Σ_pairs mean_(b, j) (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)², Q = mean_c |f|^p.

    `student`, `teacher`: a feature map `(B, C, H, W)` each, or equally long lists of them (one per
    stage); channels may differ. Where the spatial sizes differ, the larger map is average-pooled to the
    smaller. The squared-and-averaged distance follows the authors' code; their weight is β/2, β = 1000.
    """
    total: torch.Tensor | None = None
    for i, (s, t) in enumerate(_pairs(student, teacher, "at")):
        if s.shape[0] != t.shape[0] or s.dim() != t.dim() or s.dim() < 3:
            raise ValueError(f"at: pair {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                             "need the same batch size and rank ≥ 3 (B, C, spatial...)")
        t = t.to(s.device)
        if s.shape[2:] != t.shape[2:]:
            if s.dim() != 4:
                raise ValueError(f"at: pair {i}: spatial sizes {tuple(s.shape[2:])} and {tuple(t.shape[2:])} differ")
            if s.shape[2] * s.shape[3] > t.shape[2] * t.shape[3]:
                s = F.adaptive_avg_pool2d(s, t.shape[2:])
            else:
                t = F.adaptive_avg_pool2d(t, s.shape[2:])
        d = (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
        total = d if total is None else total + d
    assert total is not None
    return total
