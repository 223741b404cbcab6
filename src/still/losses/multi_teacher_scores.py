"""DiSCo multi-teacher score distillation (1.4): several teachers' in-batch retrieval-score distributions.

Each teacher k gives embeddings (B, D_k) of the same batch (e.g. one LLM rewrite each); each sample
is a query whose candidates are the other B-1 samples (cosine scores, self excluded, as in
`score_kl` of still.losses.embedding, which this reuses for the scores). The teachers' softmax score
distributions are averaged (`combine="mean_probs"`, default) or their scores are averaged first
(`"mean_scores"`); the catalog could not see how DiSCo combines them (precomputed scores), so both
are offered, and the default is an [R] choice. Loss: mean_i KL(p̄_t[i] ‖ softmax(S_s[i]/τ)).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from still.losses.embedding import _scores
from still.registry import register_loss

DISCO_PAPER = ("Lupart et al., DiSCo Meets LLMs: A Unified Approach for Sparse Retrieval and Contextual "
               "Distillation in Conversational Search (SIGIR 2025)")


def _ex_multi() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(5, 4, generator=g, requires_grad=True),
            [torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)]), {}


@register_loss("disco_multi_kl", paper=DISCO_PAPER, shape_check="none", example=_ex_multi)
def disco_multi_kl(student: torch.Tensor, teacher: torch.Tensor | Sequence[torch.Tensor], temperature: float = 0.05,
                   teacher_temperature: float | None = None, combine: str = "mean_probs",
                   weights: Sequence[float] | None = None) -> torch.Tensor:
    """Student embeddings (B, Ds) vs K teachers' embeddings (a list of (B, D_k), or stacked (K, B, D)) → ().

    `weights` (K,) weight the teachers (default uniform; normalised to sum 1).
    """
    teachers = list(teacher.unbind(0)) if isinstance(teacher, torch.Tensor) and teacher.dim() == 3 else (
        [teacher] if isinstance(teacher, torch.Tensor) else list(teacher))
    if not teachers:
        raise ValueError("disco_multi_kl: give at least one teacher's embeddings")
    if combine not in ("mean_probs", "mean_scores"):
        raise ValueError(f"disco_multi_kl: combine must be 'mean_probs' or 'mean_scores', got {combine!r}")
    w = torch.tensor([1.0] * len(teachers) if weights is None else list(weights), dtype=torch.float32)
    if len(w) != len(teachers) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"disco_multi_kl: weights {list(w.tolist())} must be {len(teachers)} non-negative numbers")
    w = (w / w.sum()).to(student.device)
    ss, _ = _scores(student, True, True, "disco_multi_kl")
    tt = temperature if teacher_temperature is None else teacher_temperature
    scores = []
    for k, t in enumerate(teachers):
        if t.shape[0] != student.shape[0]:
            raise ValueError(f"disco_multi_kl: teacher {k} has {t.shape[0]} samples, the student {student.shape[0]}")
        scores.append(_scores(t.detach(), True, True, "disco_multi_kl")[0].to(ss.device))
    st = torch.stack(scores)  # (K, B, B-1)
    if combine == "mean_scores":
        p_t = F.softmax((w[:, None, None] * st).sum(0) / tt, dim=1)
    else:
        p_t = (w[:, None, None] * F.softmax(st / tt, dim=2)).sum(0)
    log_ps = F.log_softmax(ss / temperature, dim=1)
    return (p_t * (p_t.clamp_min(1e-30).log() - log_ps)).sum(1).mean()
