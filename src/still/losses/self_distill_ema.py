"""DeGLA (5.2): hard-negative CLIP loss, its two local-global terms and the EMA-anchor distillation.

Shapes: image embeddings `v (B, D)`, text embeddings `t (B, D)`, hard-negative texts `neg (B, K, D)`;
every embedding is L2-normalised inside the losses. The EMA teacher (an `EMATeacher` with
α = 0.9996) gives the anchors `v*`, `t*`, `neg*`.
Total in the paper: `L = L_base + 0.1·L_IGC + 0.1·L_TGC + 0.005·L_Distill`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from still.registry import register_loss

DEGLA_PAPER = "Hu et al. Decoupled Global-Local Alignment for Improving Compositional Understanding (ACM MM 2025)"


def _n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _ex_pair() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 6, generator=g, requires_grad=True)
    return (v, torch.randn(4, 6, generator=g)), {"negatives": torch.randn(4, 3, 6, generator=g)}


@register_loss("degla_base", paper=DEGLA_PAPER, shape_check="same", example=_ex_pair)
def degla_base(image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor | None = None,
               tau: float = 0.07) -> torch.Tensor:
    """½(L_I→T + L_T→I); L_I→T's denominator adds each image's K hard-negative texts (B, K, D)."""
    v, t = _n(image), _n(text)
    sim = v @ t.T / tau  # (B, B)
    labels = torch.arange(len(v), device=v.device)
    i2t_logits = sim
    if negatives is not None:
        hn = torch.einsum("bd,bkd->bk", v, _n(negatives)) / tau
        i2t_logits = torch.cat([sim, hn], 1)
    return 0.5 * (F.cross_entropy(i2t_logits, labels) + F.cross_entropy(sim.T, labels))


@register_loss("degla_igc", paper=DEGLA_PAPER, shape_check="same", example=_ex_pair)
def degla_igc(image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """IGC: -log e^{v·t/τ} / (e^{v·t/τ} + Σ_k e^{v·t̄_k/τ}), batch mean."""
    v, t, neg = _n(image), _n(text), _n(negatives)
    pos = (v * t).sum(-1, keepdim=True)
    logits = torch.cat([pos, torch.einsum("bd,bkd->bk", v, neg)], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(v), dtype=torch.long, device=v.device))


@register_loss("degla_tgc", paper=DEGLA_PAPER, shape_check="same", example=_ex_pair)
def degla_tgc(text: torch.Tensor, anchor_text: torch.Tensor, negatives: torch.Tensor, tau: float = 0.07
              ) -> torch.Tensor:
    """TGC: -log e^{t·t*/τ} / (e^{t·t*/τ} + Σ_k e^{t·t̄_k/τ}); t* is the EMA teacher's text embedding."""
    t, ta, neg = _n(text), _n(anchor_text).detach(), _n(negatives)
    pos = (t * ta).sum(-1, keepdim=True)
    logits = torch.cat([pos, torch.einsum("bd,bkd->bk", t, neg)], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long, device=t.device))


@register_loss("ema_anchor", paper=DEGLA_PAPER, shape_check="same", example=_ex_pair)
def ema_anchor(student: torch.Tensor, teacher: torch.Tensor, negatives: torch.Tensor | None = None,
               teacher_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """L_Distill: Σ_i ‖x_i - x_i*‖² over L2-normalised embeddings (B, D) [+ negatives (B, K, D)], batch mean.

    Pass image and text embeddings as two terms (or concatenated); the teacher side is the EMA model's.
    """
    d = (_n(student) - _n(teacher).detach()).pow(2).sum(-1)
    if negatives is not None and teacher_negatives is not None:
        d = d + (_n(negatives) - _n(teacher_negatives).detach()).pow(2).sum(-1).sum(-1)
    return d.mean()
