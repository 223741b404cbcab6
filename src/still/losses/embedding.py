"""Sentence-embedding distillation losses: pointwise (MSE, cosine), relational (in-batch similarity
matrices, DiSCo score-distribution KL) and contrastive (InfoNCE with the teacher as anchor).

All take embeddings `student (B, Ds)` and `teacher (B, Dt)`. The pointwise and contrastive losses
need `Ds == Dt` (put a `linear` adapter on the term otherwise: that adapter is the projection head);
the relational ones compare `(B, B)` similarity matrices, so the widths may differ.
`multi_teacher_terms` composes one term (and one projection head) per teacher into an Objective.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from still.registry import register_loss


def _f(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check(s: torch.Tensor, t: torch.Tensor, loss: str, same_width: bool) -> None:
    if s.dim() != 2 or t.dim() != 2:
        raise ValueError(f"{loss}: embeddings must be (B, D); got student {tuple(s.shape)}, teacher {tuple(t.shape)}")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{loss}: student batch {s.shape[0]} != teacher batch {t.shape[0]}")
    if same_width and s.shape[1] != t.shape[1]:
        raise ValueError(f"{loss}: student width {s.shape[1]} != teacher width {t.shape[1]}; add a 'linear' "
                         f"adapter (projection head) to the term")


def _same_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g)), {}


def _diff_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(6, 9, generator=g)), {}


@register_loss("embedding_mse", paper="Reimers, Gurevych. Making Monolingual Sentence Embeddings Multilingual "
               "using Knowledge Distillation (EMNLP 2020)", example=_same_example)
def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over batch and dims of (s - t)²: `(B, D), (B, D) -> ()` (sentence-transformers' MSELoss)."""
    s, t = _f(student), _f(teacher).to(student.device)
    _check(s, t, "embedding_mse", True)
    return (s - t).pow(2).mean()


@register_loss("embedding_cosine", paper="", example=_same_example)
def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mean_i (1 - cos(s_i, t_i)): `(B, D), (B, D) -> ()`; insensitive to the embeddings' norms."""
    s, t = _f(student), _f(teacher).to(student.device)
    _check(s, t, "embedding_cosine", True)
    return (1.0 - F.cosine_similarity(s, t, dim=1, eps=eps)).mean()


def similarity_matrix(e: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """`(B, D) -> (B, B)`: cosine similarities (or dot products when `normalize=False`)."""
    e = _f(e)
    if normalize:
        e = F.normalize(e, dim=1)
    return e @ e.t()


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """`(B, B) -> (B, B-1)`: each row without its diagonal entry."""
    b = m.shape[0]
    return m.flatten()[:-1].view(b - 1, b + 1)[:, 1:].reshape(b, b - 1)


@register_loss("embedding_relation", paper="Park et al., Relational Knowledge Distillation (CVPR 2019); "
               "in-batch cosine-similarity matrices as in sentence-embedding relation distillation",
               shape_check="batch", example=_diff_example)
def embedding_relation(student: torch.Tensor, teacher: torch.Tensor, normalize: bool = True,
                       exclude_diagonal: bool = True) -> torch.Tensor:
    """MSE between the in-batch similarity matrices: mean_{i≠j} (cos(s_i, s_j) - cos(t_i, t_j))².

    `(B, Ds), (B, Dt) -> ()`, widths may differ; B ≥ 2 when the diagonal is excluded.
    """
    s, t = _f(student), _f(teacher).to(student.device)
    _check(s, t, "embedding_relation", False)
    ss, st = similarity_matrix(s, normalize), similarity_matrix(t, normalize)
    if exclude_diagonal:
        if s.shape[0] < 2:
            raise ValueError("embedding_relation needs a batch of at least 2 to exclude the diagonal")
        ss, st = _off_diagonal(ss), _off_diagonal(st)
    return (ss - st).pow(2).mean()


def _scores(x: torch.Tensor | Sequence[torch.Tensor], normalize: bool, exclude_self: bool, loss: str
            ) -> tuple[torch.Tensor, bool]:
    """Query × candidate scores: in-batch `(B, B-1)` (self excluded) or `(B, N)` for `(queries, candidates)`."""
    if isinstance(x, torch.Tensor):
        m = similarity_matrix(x, normalize)
        if exclude_self:
            if x.shape[0] < 2:
                raise ValueError(f"{loss}: in-batch candidates need a batch of at least 2")
            m = _off_diagonal(m)
        return m, True
    if len(x) != 2:
        raise ValueError(f"{loss}: give embeddings (B, D) or a pair (queries (B, D), candidates (N, D))")
    q, d = _f(x[0]), _f(x[1])
    if normalize:
        q, d = F.normalize(q, dim=1), F.normalize(d, dim=1)
    return q @ d.t(), False


def _score_kl_example() -> tuple[tuple, dict]:
    (s, t), _ = _diff_example()
    return (s, t), {"temperature": 0.1}


@register_loss("score_kl", paper="Lupart et al., DiSCo Meets LLMs: A Unified Approach for Sparse Retrieval and "
               "Contextual Distillation in Conversational Search (SIGIR 2025)", shape_check="none",
               example=_score_kl_example)
def score_kl(student: torch.Tensor | Sequence[torch.Tensor], teacher: torch.Tensor | Sequence[torch.Tensor],
             temperature: float = 0.05, teacher_temperature: float | None = None, normalize: bool = True,
             exclude_self: bool = True) -> torch.Tensor:
    """DiSCo score-distribution KL: mean_i KL(softmax(S_t[i]/τ_t) ‖ softmax(S_s[i]/τ)) over candidates.

    With embeddings `(B, Ds), (B, Dt)` each sample is a query and the other B-1 in-batch samples are
    its candidates (`S = cos` similarities, self excluded). With pairs `[queries (B, D), candidates
    (N, D)]` (a term with two student and two teacher views) the scores are queries × candidates.
    KL summed over candidates, averaged over queries. `τ_t` defaults to `τ`.
    """
    ss, in_batch = _scores(student, normalize, exclude_self, "score_kl")
    st, _ = _scores(teacher, normalize, exclude_self, "score_kl")
    st = st.to(ss.device)
    if ss.shape != st.shape:
        raise ValueError(f"score_kl: student scores {tuple(ss.shape)} != teacher scores {tuple(st.shape)}")
    tt = temperature if teacher_temperature is None else teacher_temperature
    log_ps = F.log_softmax(ss / temperature, dim=1)
    log_pt = F.log_softmax(st / tt, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


@register_loss("teacher_infonce", paper="Oord et al., Representation Learning with Contrastive Predictive Coding "
               "(2018); teacher-anchored InfoNCE as in CRD/SimCLR-style embedding distillation",
               example=_same_example)
def teacher_infonce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.05,
                    symmetric: bool = False) -> torch.Tensor:
    """InfoNCE with the teacher as anchor: CE over j of cos(s_i, t_j)/τ with positive j = i.

    `(B, D), (B, D) -> ()`: each student embedding must pick its own teacher embedding out of the
    batch's. `symmetric` also adds the teacher→student direction (mean of both).
    """
    s, t = _f(student), _f(teacher).to(student.device)
    _check(s, t, "teacher_infonce", True)
    logits = F.normalize(s, dim=1) @ F.normalize(t, dim=1).t() / temperature
    target = torch.arange(s.shape[0], device=s.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.t(), target))
    return loss


def multi_teacher_terms(teachers: Mapping[str, float] | Sequence[str], student: str = "embedding",
                        loss: str = "embedding_cosine", params: Mapping[str, Any] | None = None,
                        adapter: str | dict | None = "linear", relation_weight: float = 0.0,
                        prefix: str = "") -> list:
    """One term per teacher view, each with its own projection head (a lazy `linear` adapter).

    `teachers` maps teacher view names to weights (`{"minilm": 1.0, "mpnet": 1.0}`) or lists them
    (weight 1). With `relation_weight > 0` each teacher also gets an `embedding_relation` term on
    the student's own embedding (no head), which ties the student's native space to every teacher.

    >>> obj = Objective(multi_teacher_terms({"minilm": 1.0, "mpnet": 1.0}))
    >>> obj({"embedding": s}, {"minilm": t384, "mpnet": t768})   # heads 384→384 and 384→768
    """
    from still.objective import Term
    from still.registry import LOSSES

    weights = dict(teachers) if isinstance(teachers, Mapping) else {n: 1.0 for n in teachers}
    if not weights:
        raise ValueError("multi_teacher_terms: give at least one teacher view")
    terms = []
    for view, w in weights.items():
        terms.append(Term(f"{prefix}{loss}_{view}", LOSSES.build(loss, **dict(params or {})), student=student,
                          teacher=view, weight=float(w), adapter=adapter))
        if relation_weight > 0:
            terms.append(Term(f"{prefix}relation_{view}", LOSSES.build("embedding_relation"), student=student,
                              teacher=view, weight=float(w) * relation_weight))
    return terms


__all__ = ["embedding_mse", "embedding_cosine", "embedding_relation", "score_kl", "teacher_infonce",
           "similarity_matrix", "multi_teacher_terms"]
