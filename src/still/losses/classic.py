"""Classic logit losses: cross-entropy, Hinton KD, DKD, DIST and KD with logit standardisation.

Every loss takes logits `(B, C)` (token logits `(B, T, C)` are flattened to `(B·T, C)`), keeps
float64 inputs in float64 (half precision is computed in float32), and returns a scalar averaged
over the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from still.registry import register_loss


def _f(x: torch.Tensor) -> torch.Tensor:
    """Compute dtype: float32 for half/bfloat16/integer inputs, float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Logits as rows: `(..., C) -> (N, C)`."""
    return _f(x).reshape(-1, x.shape[-1])


def _logits_example(classes: int = 7, batch: int = 5) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(batch, classes, generator=g, requires_grad=True)
    t = torch.randn(batch, classes, generator=g) * 2
    return (s, t), {}


def _ce_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(5, 7, generator=g, requires_grad=True), torch.randint(0, 7, (5,), generator=g)), {}


def _labelled_example() -> tuple[tuple, dict]:
    (s, t), _ = _logits_example()
    return (s, t), {"labels": torch.tensor([0, 3, 6, 2, 2])}


@register_loss("ce", paper="", shape_check="none", example=_ce_example)
def cross_entropy(student: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of student logits `(B, C)` (or `(B, T, C)`) against integer labels `(B,)`/`(B, T)`,
    mean over the labels that are not `ignore_index` (0 with a zero gradient when every label is ignored)."""
    y = target.reshape(-1).long()
    total = F.cross_entropy(_rows(student), y, label_smoothing=label_smoothing, ignore_index=ignore_index,
                            reduction="sum")
    return total / (y != ignore_index).sum().clamp_min(1)


def _kl_mean(log_pt: torch.Tensor, log_ps: torch.Tensor) -> torch.Tensor:
    """mean over rows of Σ_c p_t (log p_t − log p_s), for `(N, C)` log-probabilities (a scalar).

    The teacher's log-probabilities are clamped at the dtype's lowest finite value, so classes it masks
    with −inf logits add 0 (not NaN). The student side is not clamped (that would cost a differentiable
    op on the hot path): student logits must be finite.
    """
    low = torch.finfo(log_pt.dtype).min
    return F.kl_div(log_ps, log_pt.clamp(min=low), reduction="batchmean", log_target=True)


@register_loss("kd", paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (2015)",
               example=_logits_example)
def hinton_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0,
              scale_t2: bool = True) -> torch.Tensor:
    """KL(p_t^T ‖ p_s^T) on logits `(B, C)`, batch-mean, times T² (so gradients keep their scale)."""
    t = float(temperature)
    log_ps = F.log_softmax(_rows(student) / t, dim=-1)
    log_pt = F.log_softmax(_rows(teacher) / t, dim=-1)
    kl = _kl_mean(log_pt, log_ps)
    return kl * (t * t) if scale_t2 else kl


def _split_target(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(N, C)` logits -> (log p_gt (N,), log(1 - p_gt) (N,), non-target logits (N, C-1))."""
    n, c = z.shape
    mask = F.one_hot(labels, c).bool()
    lse = torch.logsumexp(z, dim=-1)
    z_other = z[~mask].view(n, c - 1)
    log_p_gt = z[mask] - lse
    log_p_other = torch.logsumexp(z_other, dim=-1) - lse
    return log_p_gt, log_p_other, z_other


@register_loss("dkd", paper="Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation (CVPR 2022)",
               example=_labelled_example)
def dkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0, ignore_index: int = -100) -> torch.Tensor:
    """Decoupled KD: α·TCKD + β·NCKD, each a T²-scaled KL, batch-mean.

    TCKD is the KL between the binary (target, all non-targets) distributions of teacher and
    student; NCKD the KL between their distributions over the non-target classes only.
    `student`, `teacher`: logits `(B, C)` (or `(B, T, C)`) with C ≥ 2; `labels`: `(B,)` (or `(B, T)`) int64
    (term `inputs={"labels": "y"}`); rows labelled `ignore_index` are left out of the mean.
    """
    t = float(temperature)
    zs, zt = _rows(student) / t, _rows(teacher) / t
    y = labels.reshape(-1).long().to(zs.device)
    if y.shape[0] != zs.shape[0]:
        raise ValueError(f"dkd: {zs.shape[0]} logit rows but {y.shape[0]} labels")
    keep = y != ignore_index
    if not bool(keep.all()):
        if not bool(keep.any()):
            return zs.sum() * 0.0
        zs, zt, y = zs[keep], zt[keep], y[keep]
    if int(y.min()) < 0 or int(y.max()) >= zs.shape[1]:
        raise ValueError(f"dkd: labels must lie in [0, {zs.shape[1]}) (or be {ignore_index}); got "
                         f"{int(y.min())}..{int(y.max())}")
    s_gt, s_other, s_nt = _split_target(zs, y)
    t_gt, t_other, t_nt = _split_target(zt, y)
    log_bt = torch.stack([t_gt, t_other], dim=-1)
    log_bs = torch.stack([s_gt, s_other], dim=-1)
    tckd = _kl_mean(log_bt, log_bs)
    nckd = _kl_mean(F.log_softmax(t_nt, -1), F.log_softmax(s_nt, -1))
    return (alpha * tckd + beta * nckd) * (t * t)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of matching rows: `(N, D), (N, D) -> (N,)`."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


@register_loss("dist", paper="Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher (NeurIPS 2022)",
               example=_logits_example)
def dist(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
         temperature: float = 1.0) -> torch.Tensor:
    """DIST: β·T²·(1 − mean inter-class Pearson) + γ·T²·(1 − mean intra-class Pearson).

    Inter-class: correlation of each sample's class probabilities (rows of `(B, C)`); intra-class:
    correlation of each class's probabilities across the batch (columns). Logits `(B, C)`.
    Defaults are the paper's (β = γ = τ = 1; its CIFAR-100 runs use β = γ = 2, τ = 4).
    """
    t = float(temperature)
    ys = F.softmax(_rows(student) / t, dim=-1)
    yt = F.softmax(_rows(teacher) / t, dim=-1)
    inter = 1.0 - _pearson_rows(ys, yt).mean()
    intra = 1.0 - _pearson_rows(ys.t(), yt.t()).mean()
    return (t * t) * (beta * inter + gamma * intra)


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Standardise each row of logits `(N, C)`: (z − mean) / (std + eps), std unbiased as in the paper's code."""
    return (logits - logits.mean(-1, keepdim=True)) / (logits.std(-1, keepdim=True) + eps)


@register_loss("logit_std", paper="Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation (CVPR 2024)",
               example=_logits_example)
def logit_std(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0,
              eps: float = 1e-7) -> torch.Tensor:
    """KD on z-scored logits: T²·KL(softmax(ẑ_t/T) ‖ softmax(ẑ_s/T)), batch-mean; logits `(B, C)`, C ≥ 2.

    `temperature` is the paper's base temperature (2 in its CIFAR-100 runs). Invariant to a shift and
    a positive scale of either side's logits.
    """
    t = float(temperature)
    log_ps = F.log_softmax(zscore(_rows(student), eps) / t, dim=-1)
    log_pt = F.log_softmax(zscore(_rows(teacher), eps) / t, dim=-1)
    return _kl_mean(log_pt, log_ps) * (t * t)


__all__: list[Any] = ["cross_entropy", "hinton_kd", "dkd", "dist", "logit_std", "zscore"]
