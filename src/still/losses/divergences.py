"""Token-level divergences between student and teacher distributions, written once.

Every divergence has a *row function* `rows(s, t, labels=None) -> (M,)` that takes **prepared** logits
(fp32, divided by the temperature, `-inf` clamped to a finite floor; see `prepare_logits`) of M valid rows
and returns each row's loss. The dense functions below (`forward_kl(student, teacher, ...)`) and the
chunked fused-linear engine (`still.losses.chunked`) both call these same row functions, so the maths
exists once.

Public dense API (all registered as losses; shapes: logits `(..., V)`, mask/labels `(...)`):

    forward_kl(student, teacher, *, temperature=1.0, mask=None, labels=None, ignore_index=-100,
               reduction="mean", scale_t2=False) -> Tensor

`reduction`: "mean" over valid tokens (0 when none is valid), "sum", or "none" (shape `(...)`, 0 at
masked positions). `scale_t2` multiplies by T². Inputs of any float dtype are computed in fp32 and the
result is fp32. Conventions (p_t teacher, p_s student, both softened by T):

- forward_kl  KL(p_t ‖ p_s)           reverse_kl  KL(p_s ‖ p_t)
- jsd(beta)   TRL/GKD generalized JSD: m = β·p_t + (1-β)·p_s, JSD = β·KL(p_t‖m) + (1-β)·KL(p_s‖m);
              β=0 is *defined* as forward KL and β=1 as reverse KL (as TRL's `generalized_jsd_loss`).
              The continuous limits are JSD(β)/β → KL(p_t‖p_s) as β→0 and JSD(β)/(1-β) → KL(p_s‖p_t)
              as β→1. β=0.5 is the symmetric JSD (≤ log 2).
- tv          ½ Σ |p_t - p_s|
- skew_kl(α)  DistiLLM: KL(p_t ‖ α·p_t + (1-α)·p_s)      skew_rkl(α)  KL(p_s ‖ α·p_s + (1-α)·p_t)
- sinkhorn    SinKD batch-wise OT (see `sinkhorn_rows`)
- sparse_topk_kl  teacher given as top-k ids + log-probs (see `sparse_topk_rows`)
- dac_kl      `DACKL` module (learnable adaptive clipping of the teacher distribution)

TopKLD (Dissecting Bit-Level Scaling Laws in Quantizing Vision Generative Models, 2025) is not implemented:
its formula could not be pinned down. Only the abstract is available here ("balancing implicit and explicit
knowledge"), no code was released, and searches of stored papers, code and issues found no formula; a
guessed top-k/tail split would be a different loss under the paper's name.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_loss

NEG_FLOOR = -1e30  # -inf logits are clamped here: exp() is still exactly 0, but differences stay finite.
REDUCTIONS = ("mean", "sum", "none")
MISSING_POLICIES = ("drop", "renormalise", "uniform")

RowFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------------
# preparation and masking (shared with the chunked engine)
# --------------------------------------------------------------------------------------------------
def prepare_logits(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 logits `(M, V)` divided by T with `-inf` clamped to `NEG_FLOOR` (so no NaN appears)."""
    x = x.float()
    if temperature != 1.0:
        x = x / temperature
    return x.clamp_min(NEG_FLOOR)


def valid_mask(
    lead_shape: torch.Size | Sequence[int],
    device: torch.device,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Flat `(M,)` bool: True where the token counts (mask True and label != ignore_index)."""
    n = math.prod(lead_shape)
    valid = torch.ones(n, dtype=torch.bool, device=device)
    for name, m in (("mask", mask), ("labels", labels)):
        if m is None:
            continue
        if m.numel() != n:
            raise ValueError(f"{name} has shape {tuple(m.shape)} but the logits have leading shape {tuple(lead_shape)}")
        m = m.reshape(-1).to(device)
        valid &= (m.bool() if name == "mask" else m != ignore_index)
    return valid


def _kl_terms(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_v p·(log p − log q) over the last dim (inputs finite: prepared logits)."""
    return (p * (logp - logq)).sum(-1)


# --------------------------------------------------------------------------------------------------
# row functions: prepared fp32 logits (M, V) -> (M,)
# --------------------------------------------------------------------------------------------------
def forward_kl_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_t ‖ p_s) per row."""
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return _kl_terms(lt.exp(), lt, ls)


def reverse_kl_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_s ‖ p_t) per row."""
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return _kl_terms(ls.exp(), ls, lt)


def jsd_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD(β) per row, TRL/GKD convention (β=0 → forward KL, β=1 → reverse KL)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl_rows(s, t)
    if beta == 1.0:
        return reverse_kl_rows(s, t)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return beta * _kl_terms(lt.exp(), lt, lm) + (1.0 - beta) * _kl_terms(ls.exp(), ls, lm)


# Closed-form (rows, d Σrows / ds) for the hot divergences, so the chunked engine needs 4 (M, V) buffers
# instead of autograd's ~10-20. They are the derivatives of the row functions above, and
# tests/test_divergences.py::test_fused_gradients_equal_autograd_of_rows holds them to it.
def forward_kl_fused(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_t ‖ p_s) rows and their gradient w.r.t. s: p_s − p_t."""
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    d = lt - ls
    p = lt.exp_()
    rows = d.mul_(p).sum(-1)
    return rows, ls.exp_().sub_(p)


def reverse_kl_fused(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_s ‖ p_t) rows and their gradient: p_s ⊙ (log p_s − log p_t − KL)."""
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    d = torch.sub(ls, lt, out=lt)
    q = ls.exp_()
    rows = (q * d).sum(-1)
    return rows, d.sub_(rows[:, None]).mul_(q)


def jsd_fused(s: torch.Tensor, t: torch.Tensor, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """JSD(β) rows and their gradient: (1−β) p_s ⊙ (log(p_s/m) − KL(p_s ‖ m)) (the p_t/m terms cancel)."""
    if beta == 0.0:
        return forward_kl_fused(s, t)
    if beta == 1.0:
        return reverse_kl_fused(s, t)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    lm = lt + math.log(beta)
    tmp = ls + math.log1p(-beta)
    torch.logaddexp(lm, tmp, out=lm)
    kl_p = torch.sub(lt, lm, out=tmp).mul_(lt.exp_()).sum(-1)
    d = torch.sub(ls, lm, out=tmp)  # log(p_s / m)
    q = ls.exp_()
    kl_q = torch.mul(q, d, out=lm).sum(-1)
    rows = beta * kl_p + (1.0 - beta) * kl_q
    return rows, d.sub_(kl_q[:, None]).mul_(q).mul_(1.0 - beta)


def tv_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Total variation ½ Σ |p_t − p_s| per row."""
    return 0.5 * (F.softmax(t, -1) - F.softmax(s, -1)).abs().sum(-1)


def _check_alpha(name: str, alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"{name}: alpha must be in [0, 1), got {alpha}")


def skew_kl_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM skew KL: KL(p_t ‖ α p_t + (1−α) p_s) per row (α=0 is forward KL)."""
    _check_alpha("skew_kl", alpha)
    if alpha == 0.0:
        return forward_kl_rows(s, t)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    lm = torch.logaddexp(lt + math.log(alpha), ls + math.log1p(-alpha))
    return _kl_terms(lt.exp(), lt, lm)


def skew_rkl_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM skew reverse KL: KL(p_s ‖ α p_s + (1−α) p_t) per row (α=0 is reverse KL)."""
    _check_alpha("skew_rkl", alpha)
    if alpha == 0.0:
        return reverse_kl_rows(s, t)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    lm = torch.logaddexp(ls + math.log(alpha), lt + math.log1p(-alpha))
    return _kl_terms(ls.exp(), ls, lm)


def sinkhorn_rows(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, eps: float = 0.1, n_iters: int = 20
) -> torch.Tensor:
    """SinKD batch-wise Sinkhorn distance; returns each row's share Σ_j P_ij·C_ij, `(M,)`.

    C_ij = ‖p_s,i − p_t,j‖₁ is the cost between *samples* of the group (M × M); K = exp(−C/ε); P is K
    scaled `n_iters` times, rows then columns, to unit row/column sums (the paper's code, run in the
    log domain so small ε does not underflow). Gradients flow through P. Σ rows / M equals POT's
    `sinkhorn2(1/M, 1/M, C, ε)` once converged.
    """
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    cost = torch.cdist(ps, pt, p=1)  # (M, M)
    logp = -cost / eps
    for _ in range(int(n_iters)):
        logp = logp - torch.logsumexp(logp, 1, keepdim=True)
        logp = logp - torch.logsumexp(logp, 0, keepdim=True)
    return (logp.exp() * cost).sum(1)


def sparse_topk_rows(
    s: torch.Tensor,
    t: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor | None = None,
    missing: str = "renormalise",
) -> torch.Tensor:
    """KL(p_t ‖ p_s) per row for a teacher given as top-k `(ids (M, k) int64, log-probs (M, k))`.

    The teacher log-probs are used as given (record them at the distillation temperature); the
    student `s` is full `(M, V)`. `missing` says what happens to the teacher mass 1 − Σ_k p_t:
    "drop": Σ_k p_t (log p_t − log p_s), the rest ignored (not a true KL; DistillKit's ZERO);
    "renormalise": the teacher is renormalised over its top-k (exact KL to that distribution);
    "uniform": the missing mass is spread evenly over the V − k other tokens (DistillKit SYMMETRIC_UNIFORM).
    """
    missing = "renormalise" if missing == "renormalize" else missing
    if missing not in MISSING_POLICIES:
        raise ValueError(f"sparse_topk_kl: missing must be one of {MISSING_POLICIES}, got {missing!r}")
    ids, lp = t
    ls = F.log_softmax(s, -1)
    lq = ls.gather(-1, ids.long())
    lp = lp.float().clamp_min(NEG_FLOOR)
    if missing == "renormalise":
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
        return _kl_terms(lp.exp(), lp, lq)
    p = lp.exp()
    out = _kl_terms(p, lp, lq)
    if missing == "uniform":
        n_rest = s.shape[-1] - ids.shape[-1]
        if n_rest > 0:
            mass = (1.0 - p.sum(-1)).clamp_min(0.0)
            u = mass / n_rest
            rest_lq = ls.sum(-1) - lq.sum(-1)
            out = out + torch.xlogy(mass, u) - u * rest_lq
    return out


# --------------------------------------------------------------------------------------------------
# the divergence table the chunked engine reads
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Divergence:
    """A row function and how it may be split: `batchwise` rows couple all rows of a group."""

    name: str
    rows: RowFn
    batchwise: bool = False
    sparse_teacher: bool = False
    params: tuple[str, ...] = field(default_factory=tuple)
    fused: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # (s, t, **params) -> (rows, grad_s)
    overlap: int = 0  # pairwise rows (e.g. span_kd): row i also reads rows i+1..i+overlap (chunked engine only)


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in [
        Divergence("forward_kl", forward_kl_rows, fused=forward_kl_fused),
        Divergence("reverse_kl", reverse_kl_rows, fused=reverse_kl_fused),
        Divergence("jsd", jsd_rows, params=("beta",), fused=jsd_fused),
        Divergence("tv", tv_rows),
        Divergence("skew_kl", skew_kl_rows, params=("alpha",)),
        Divergence("skew_rkl", skew_rkl_rows, params=("alpha",)),
        Divergence("sinkhorn", sinkhorn_rows, batchwise=True, params=("eps", "n_iters")),
        Divergence("sparse_topk_kl", sparse_topk_rows, sparse_teacher=True, params=("missing",)),
    ]
}


def get_divergence(name: str) -> Divergence:
    """The `Divergence` called `name` (error lists the known ones)."""
    if name not in DIVERGENCES:
        raise KeyError(f"unknown divergence {name!r}; known: {', '.join(sorted(DIVERGENCES))} (and the DACKL module)")
    return DIVERGENCES[name]


# --------------------------------------------------------------------------------------------------
# the dense path: flatten, mask, prepare, call rows, reduce
# --------------------------------------------------------------------------------------------------
def reduce_rows(
    rows: Callable[..., torch.Tensor],
    student: torch.Tensor,
    teacher: Any,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_t2: bool = False,
    group_size: int | None = None,
    sparse_teacher: bool = False,
    name: str = "divergence",
) -> torch.Tensor:
    """Apply `rows` to the valid tokens of student logits `(..., V)` and reduce.

    `teacher` is logits `(..., V)` or, when `sparse_teacher`, `(ids (..., k), log-probs (..., k))`.
    `group_size` splits the valid rows into consecutive groups (batch-wise divergences only).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    V = student.shape[-1]
    lead = student.shape[:-1]
    s = student.reshape(-1, V)
    if sparse_teacher:
        ids, vals = _split_topk(teacher, name)
        if ids.shape != vals.shape or ids.shape[:-1] != lead:
            raise ValueError(f"{name}: teacher ids {tuple(ids.shape)} / log-probs {tuple(vals.shape)} do not match "
                             f"student logits {tuple(student.shape)}")
        k = ids.shape[-1]
        ids, vals = ids.reshape(-1, k), vals.reshape(-1, k)
    elif teacher.shape != student.shape:
        raise ValueError(f"{name}: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    valid = valid_mask(lead, s.device, mask, labels, ignore_index)
    idx = valid.nonzero().squeeze(1)
    dense = idx.numel() == valid.numel()  # nothing masked: skip the gathers

    def take(x: torch.Tensor) -> torch.Tensor:
        return x if dense else x.index_select(0, idx)

    sv = prepare_logits(take(s), temperature)
    if sparse_teacher:
        tv: Any = (take(ids), take(vals))
    else:
        tv = prepare_logits(take(teacher.reshape(-1, V)), temperature)
    lab = take(labels.reshape(-1).to(s.device)) if labels is not None else None
    n = idx.numel()
    if n == 0:
        per_row = sv.sum(-1)  # empty, but connected to the graph: the gradient is zeros, not an error
    elif group_size is None or group_size >= n:
        per_row = rows(sv, tv, lab)
    else:
        parts = []
        for a in range(0, n, group_size):
            sl = slice(a, a + group_size)
            tg = (tv[0][sl], tv[1][sl]) if sparse_teacher else tv[sl]
            parts.append(rows(sv[sl], tg, None if lab is None else lab[sl]))
        per_row = torch.cat(parts)
    scale = float(temperature) ** 2 if scale_t2 else 1.0
    if reduction == "none":
        out = per_row.new_zeros(valid.numel()).index_copy(0, idx, per_row)
        return out.reshape(lead) * scale
    total = per_row.sum()
    if reduction == "mean":
        total = total / max(n, 1)
    return total * scale


def _split_topk(teacher: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(teacher, dict):
        return teacher["indices"], teacher["values"]
    if isinstance(teacher, (tuple, list)) and len(teacher) == 2:
        return teacher[0], teacher[1]
    raise TypeError(f"{name}: the teacher must be (indices, log-probs) or {{'indices', 'values'}}, got {type(teacher)}")


# --------------------------------------------------------------------------------------------------
# registered dense losses
# --------------------------------------------------------------------------------------------------
def _example(sparse: bool = False) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, 3, 4], [5, -100, 6, 7, 8]])
    if sparse:
        top = torch.randn(2, 5, 11, generator=g).log_softmax(-1).topk(4, -1)
        return (s, (top.indices, top.values)), {"labels": labels}
    return (s, torch.randn(2, 5, 11, generator=g)), {"labels": labels, "temperature": 2.0}


_PAPER_GKD = "Agarwal et al., On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes (2024)"
_PAPER_DISTILLM = "Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models (2024)"


@register_loss("forward_kl", paper="Hinton et al., Distilling the Knowledge in a Neural Network (2015)",
               example=_example, shape_check="same")
def forward_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
               mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, ignore_index: int = -100,
               reduction: str = "mean", scale_t2: bool = False) -> torch.Tensor:
    """Forward KL(p_t ‖ p_s) per token of logits `(..., V)`; mask/labels `(...)`; see the module docstring."""
    return reduce_rows(forward_kl_rows, student, teacher, temperature=temperature, mask=mask, labels=labels,
                       ignore_index=ignore_index, reduction=reduction, scale_t2=scale_t2, name="forward_kl")


@register_loss("reverse_kl", paper="Gu et al., MiniLLM: Knowledge Distillation of Large Language Models (2024)",
               example=_example, shape_check="same")
def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
               mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, ignore_index: int = -100,
               reduction: str = "mean", scale_t2: bool = False) -> torch.Tensor:
    """Reverse KL(p_s ‖ p_t) per token of logits `(..., V)` (mode-seeking, MiniLLM)."""
    return reduce_rows(reverse_kl_rows, student, teacher, temperature=temperature, mask=mask, labels=labels,
                       ignore_index=ignore_index, reduction=reduction, scale_t2=scale_t2, name="reverse_kl")


@register_loss("tv", paper="Wen et al., f-Divergence Minimization for Sequence-Level Knowledge Distillation (2023)",
               example=_example, shape_check="same")
def tv(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None,
       labels: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
       scale_t2: bool = False) -> torch.Tensor:
    """Total variation ½ Σ |p_t − p_s| per token of logits `(..., V)`."""
    return reduce_rows(tv_rows, student, teacher, temperature=temperature, mask=mask, labels=labels,
                       ignore_index=ignore_index, reduction=reduction, scale_t2=scale_t2, name="tv")


@register_loss("jsd", paper=_PAPER_GKD, example=_example, shape_check="same")
def jsd(student: torch.Tensor, teacher: torch.Tensor, *, beta: float = 0.5, temperature: float = 1.0,
        mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, ignore_index: int = -100,
        reduction: str = "mean", scale_t2: bool = False) -> torch.Tensor:
    """Generalized JSD(β) (TRL convention: m = β p_t + (1−β) p_s; β=0 forward KL, β=1 reverse KL)."""
    return reduce_rows(functools.partial(jsd_rows, beta=beta), student, teacher, temperature=temperature, mask=mask,
                       labels=labels, ignore_index=ignore_index, reduction=reduction, scale_t2=scale_t2, name="jsd")


@register_loss("skew_kl", paper=_PAPER_DISTILLM, example=_example, shape_check="same")
def skew_kl(student: torch.Tensor, teacher: torch.Tensor, *, alpha: float = 0.1, temperature: float = 1.0,
            mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, ignore_index: int = -100,
            reduction: str = "mean", scale_t2: bool = False) -> torch.Tensor:
    """Skew KL: KL(p_t ‖ α p_t + (1−α) p_s) per token (DistiLLM default α = 0.1)."""
    return reduce_rows(functools.partial(skew_kl_rows, alpha=alpha), student, teacher, temperature=temperature,
                       mask=mask, labels=labels, ignore_index=ignore_index, reduction=reduction, scale_t2=scale_t2,
                       name="skew_kl")


@register_loss("skew_rkl", paper=_PAPER_DISTILLM, example=_example, shape_check="same")
def skew_rkl(student: torch.Tensor, teacher: torch.Tensor, *, alpha: float = 0.1, temperature: float = 1.0,
             mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, ignore_index: int = -100,
             reduction: str = "mean", scale_t2: bool = False) -> torch.Tensor:
    """Skew reverse KL: KL(p_s ‖ α p_s + (1−α) p_t) per token (DistiLLM default α = 0.1)."""
    return reduce_rows(functools.partial(skew_rkl_rows, alpha=alpha), student, teacher, temperature=temperature,
                       mask=mask, labels=labels, ignore_index=ignore_index, reduction=reduction, scale_t2=scale_t2,
                       name="skew_rkl")


@register_loss("sinkhorn", paper="Cui et al., SinKD: Sinkhorn Distance Minimization for Knowledge Distillation (2024)",
               example=_example, shape_check="same")
def sinkhorn(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 2.0, eps: float = 0.1,
             n_iters: int = 20, group_size: int | None = None, mask: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
             scale_t2: bool = False) -> torch.Tensor:
    """SinKD batch-wise Sinkhorn distance between the softened distributions of the valid tokens.

    Paper defaults: T=2, ε=0.1, 20 iterations. The OT batch is all valid tokens, or consecutive groups
    of `group_size` valid tokens (the chunked engine uses its chunk as the group). "mean" divides
    Σ P·C by the number of valid tokens (= the entropic OT cost with uniform marginals); "sum" is the
    paper code's Σ P·C (its 0.002 factor is a term weight, not part of the loss). "none" gives each
    token's row share.
    """
    return reduce_rows(functools.partial(sinkhorn_rows, eps=eps, n_iters=n_iters), student, teacher,
                       temperature=temperature, mask=mask, labels=labels, ignore_index=ignore_index,
                       reduction=reduction, scale_t2=scale_t2, group_size=group_size, name="sinkhorn")


@register_loss("sparse_topk_kl", paper="arcee-ai DistillKit sparse_kl_div (2024)", example=lambda: _example(True),
               shape_check="none")
def sparse_topk_kl(student: torch.Tensor, teacher: Any, *, missing: str = "renormalise", temperature: float = 1.0,
                   mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, ignore_index: int = -100,
                   reduction: str = "mean", scale_t2: bool = False) -> torch.Tensor:
    """KL from a top-k teacher: `teacher` = (ids `(..., k)`, log-probs `(..., k)`) or {"indices", "values"}.

    Student logits `(..., V)` are softened by `temperature`; the teacher log-probs are used as given.
    `missing` ∈ {"drop", "renormalise", "uniform"} handles the teacher mass outside the top-k
    (see `sparse_topk_rows`).
    """
    return reduce_rows(functools.partial(sparse_topk_rows, missing=missing), student, teacher, temperature=temperature,
                       mask=mask, labels=labels, ignore_index=ignore_index, reduction=reduction, scale_t2=scale_t2,
                       sparse_teacher=True, name="sparse_topk_kl")


# --------------------------------------------------------------------------------------------------
# DAC-KL
# --------------------------------------------------------------------------------------------------
def _dac_example() -> tuple[tuple, dict]:
    args, kw = _example()
    return args, {"labels": kw["labels"]}


@register_loss("dac_kl", paper="Liu et al., Multi-Granularity Semantic Revision for Large Language Model Distillation (2024)",
               example=_dac_example, shape_check="same")
class DACKL(nn.Module):
    """DAC-KL: KL(p̃_t ‖ p̃_s) on an adaptively clipped slice of the teacher distribution.

    A sub-network `net` reads the teacher's sorted top-`top_k` probabilities `(M, top_k)` and predicts
    quantile bounds l ∈ (0, ½), u ∈ (½, 1). Sorted by teacher probability, token v covers the mass
    interval [a_v, c_v] (a_v: mass ranked above it, c_v = a_v + p_v). Tokens whose interval meets [l, u]
    are kept through a soft mask σ((c_v − l)/τ)·σ((u − a_v)/τ); the ground-truth token (labels) is always kept. Teacher and student are
    renormalised on the mask and the KL taken. The paper gives no size for the sub-network: a 2-layer MLP.
    Its bounds start near (0, 1), i.e. near plain forward KL. Note: trained only by this loss, the
    bounds are pushed to narrow the slice (a smaller slice has a smaller KL); the paper's other terms
    anchor them. Call as `loss(student (..., V), teacher (..., V), labels=None, mask=None)`.
    """

    def __init__(self, top_k: int = 32, hidden: int = 64, tau: float = 0.01, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", scale_t2: bool = False) -> None:
        super().__init__()
        self.top_k, self.tau, self.temperature = int(top_k), float(tau), float(temperature)
        self.ignore_index, self.reduction, self.scale_t2 = ignore_index, reduction, scale_t2
        self.net = nn.Sequential(nn.Linear(self.top_k, hidden), nn.GELU(), nn.Linear(hidden, 2))
        with torch.no_grad():
            self.net[2].weight.mul_(0.01)
            self.net[2].bias.copy_(torch.tensor([-7.0, 4.0]))

    def bounds(self, pt_sorted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower/upper quantile bounds `(M,)` from sorted teacher probabilities `(M, ≥1)`."""
        k = self.top_k
        x = pt_sorted[:, :k]
        if x.shape[1] < k:
            x = F.pad(x, (0, k - x.shape[1]))
        w = self.net[0].weight
        raw = self.net(x.to(w.dtype)).float()
        return 0.5 * torch.sigmoid(raw[:, 0]), 0.5 + 0.5 * torch.sigmoid(raw[:, 1])

    def rows(self, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row DAC-KL on prepared logits `(M, V)` (the chunked engine calls this)."""
        ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
        pt = lt.exp()
        sorted_p, order = pt.sort(-1, descending=True)
        lo, hi = self.bounds(sorted_p)
        upto = sorted_p.cumsum(-1)  # token v covers the mass interval [above_v, upto_v] of the sorted teacher
        upto_v = torch.empty_like(pt).scatter_(-1, order, upto)
        above_v = torch.empty_like(pt).scatter_(-1, order, upto - sorted_p)
        keep = torch.sigmoid((upto_v - lo[:, None]) / self.tau) * torch.sigmoid((hi[:, None] - above_v) / self.tau)
        if labels is not None:
            lab = labels.long().clamp(0, s.shape[-1] - 1)
            keep = keep.scatter(-1, lab[:, None], 1.0)
        log_keep = keep.clamp_min(1e-30).log()
        lt_r = F.log_softmax(lt + log_keep, -1)
        ls_r = F.log_softmax(ls + log_keep, -1)
        return _kl_terms(lt_r.exp(), lt_r, ls_r)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return reduce_rows(self.rows, student, teacher, temperature=self.temperature, mask=mask, labels=labels,
                           ignore_index=self.ignore_index, reduction=self.reduction, scale_t2=self.scale_t2,
                           name="dac_kl")
