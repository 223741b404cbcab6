"""Token-level relation losses: TRG's relationship graph (3.1) and LLaVA-KD's RDist (3.2).

Token inputs are `(B, N, D)` (patch / position tokens) or CNN feature maps `(B, C, H, W)`, which
are read as `H·W` tokens of width `C`. Student and teacher widths may differ: the relation
matrices are `N × N` (or `M × M` over sampled tokens) on both sides.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_loss, register_schedule
from still.schedules import Cosine

TRG_PAPER = "Zhang, Liu, He. Knowledge Distillation via Token-level Relationship Graph (arXiv 2306.12442, 2023)"
LLAVA_KD_PAPER = "Cai et al. LLaVA-KD: A Framework of Distilling Multimodal Large Language Models (ICCV 2025)"


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C); (B, N, D) unchanged."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() != 3:
        raise ValueError(f"expected tokens (B, N, D) or a feature map (B, C, H, W), got shape {tuple(x.shape)}")
    return x


def sample_tokens(s: torch.Tensor, t: torch.Tensor, num: int | None, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (B, N, D) tokens of both models to (B·N, D) and keep the same random `num` of them."""
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    if num is None or num >= s2.shape[0]:
        return s2, t2
    idx = torch.randperm(s2.shape[0], generator=generator, device="cpu")[:num].to(s2.device)
    return s2[idx], t2[idx]


def _ex_tokens() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 5, 6, generator=g, requires_grad=True), torch.randn(3, 5, 4, generator=g)), {}


def _knn_log_affinity(x: torch.Tensor, nbr: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """log A_ij = -‖x_i - x_j‖²/(2σ) on the neighbour sets `nbr` (M, k); σ='auto': mean d² over the set."""
    d2 = (x.unsqueeze(1) - x[nbr]).pow(2).sum(-1)  # (M, k)
    sig = d2.detach().mean().clamp_min(1e-8) if sigma is None else torch.as_tensor(sigma, device=x.device)
    return -d2 / (2.0 * sig)


@register_loss("trg_local", paper=TRG_PAPER, shape_check="batch", example=_ex_tokens)
def trg_local(student: torch.Tensor, teacher: torch.Tensor, k: int = 5, sigma: float | None = None,
              num_tokens: int | None = 256, seed: int | None = None) -> torch.Tensor:
    """TRG local structure: Σ_i KL(softmax_j A^S_ij ‖ softmax_j A^T_ij) over the teacher's kNN graph, mean over i.

    Tokens of both models (B, N, D*) are flattened and the same `num_tokens` are sampled; each token's
    k nearest teacher neighbours (Euclidean, excluding itself) define the graph; A_ij =
    exp(-‖T_i - T_j‖²/(2σ)), row-normalised over the neighbours (a softmax of the log-affinities).
    σ=None sets σ per model to the mean squared neighbour distance, so different widths compare.
    The KL direction (student ‖ teacher) follows the catalog's source; it is an [R] reading.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    s, t = sample_tokens(as_tokens(student).float(), as_tokens(teacher).float(), num_tokens, g)
    m = s.shape[0]
    kk = min(k, m - 1)
    if kk < 1:
        return s.sum() * 0.0
    with torch.no_grad():
        dt = torch.cdist(t, t)
        dt.fill_diagonal_(float("inf"))
        nbr = dt.topk(kk, largest=False).indices  # (M, k)
    log_ps = F.log_softmax(_knn_log_affinity(s, nbr, sigma), -1)
    log_pt = F.log_softmax(_knn_log_affinity(t, nbr, sigma), -1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()


@register_loss("trg_inner", paper=TRG_PAPER, shape_check="batch", example=_ex_tokens)
def trg_inner(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """TRG contextual (intra-image) loss: MSE(softmax(F_t F_tᵀ/√D_t), softmax(F_s F_sᵀ/√D_s)), (B, N, N)."""
    s, t = as_tokens(student).float(), as_tokens(teacher).float()
    cs_s = torch.softmax(s @ s.transpose(1, 2) / math.sqrt(s.shape[-1]), -1)
    cs_t = torch.softmax(t @ t.transpose(1, 2) / math.sqrt(t.shape[-1]), -1)
    return F.mse_loss(cs_s, cs_t)


@register_schedule("dynamic_temperature")
class DynamicTemperature(Cosine):
    """Cosine decay of a temperature from `start` to `end` over the run (TRG's coarse-to-fine τ_g; [R] form)."""

    def __init__(self, start: float = 0.5, end: float = 0.05) -> None:
        super().__init__(start, end)


@register_loss("trg_global", paper=TRG_PAPER, shape_check="batch", example=_ex_tokens)
class TRGGlobal(nn.Module):
    """TRG global alignment: InfoNCE between projected student tokens P(S_i) and teacher tokens T_j.

    The positive of student token i is the teacher token at the same position; the negatives are the
    other sampled tokens. Cosine similarity at temperature τ_g, which decays from `tau_start` to
    `tau_end` (cosine) as training progresses (`set_progress` is called by the Objective).
    P is a linear map sized lazily from the first batch.
    """

    def __init__(self, tau_start: float = 0.5, tau_end: float = 0.05, num_tokens: int | None = 256) -> None:
        super().__init__()
        self.schedule = DynamicTemperature(tau_start, tau_end)
        self.num_tokens = num_tokens
        self.proj: nn.Linear | None = None
        self.tau = tau_start

    def set_progress(self, step: int, total_steps: int) -> None:
        self.tau = self.schedule(step, total_steps)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = sample_tokens(as_tokens(student), as_tokens(teacher).float(), self.num_tokens)
        if self.proj is None:
            self.proj = nn.Linear(s.shape[-1], t.shape[-1]).to(s.device)
        z = F.normalize(self.proj(s.float()), dim=-1)
        logits = z @ F.normalize(t, dim=-1).T / self.tau
        return F.cross_entropy(logits, torch.arange(len(z), device=z.device))


@register_loss("relation_cosine", paper=LLAVA_KD_PAPER, shape_check="batch", example=_ex_tokens)
def relation_cosine(student: torch.Tensor, teacher: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """LLaVA-KD RDist: 1 - cos(vec(R_t), vec(R_s)) with R = Z Zᵀ (B, N, N) per sample, batch mean.

    `normalize=True` L2-normalises tokens first (the released model's image-image cosine matrices).
    """
    s, t = as_tokens(student).float(), as_tokens(teacher).float()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    rs, rt = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
    return (1.0 - F.cosine_similarity(rs.flatten(1), rt.flatten(1), dim=-1)).mean()
