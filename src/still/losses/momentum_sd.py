"""DINO-style momentum self-distillation losses for MMC (catalog 5.3) and CMD (catalog 5.4).

Both papers are RECONSTRUCTED FROM THE ABSTRACT (catalog tags [A + R]): no code, no full text read.
- `dino_ce(student, teacher, center)`: H(p_t, p_s) = −Σ_k softmax((t − c)/τ_t)_k · log softmax(s/τ_s)_k,
  student `(B, K)` or `(B, N, K)` (N tokens each matched to the same teacher row), teacher `(B, K)`,
  mean over B (and N). The teacher side is a constant (no gradient).
- `dino` (stateful): the same with the centre c (K,) kept as an EMA of the teacher's batch means,
  c ← m·c + (1 − m)·mean_b t_b, updated after the loss in training mode (DINO's centring, m = 0.9).
- `masked_patch_mse`: MMC's masked image modelling term, MSE between the predicted and the true pixels
  of the masked patches only (SimMIM/MAE-style pixel targets: an [R] reading of "masked image modelling").
- `cmd_inter_student`: CMD's inter-level term inside the student: the student's own image-level
  distribution (stop-gradient, sharpened) as the target of its region-level one.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_loss

DINO_PAPER = "Caron et al. Emerging Properties in Self-Supervised Vision Transformers (DINO, ICCV 2021)"
MMC_PAPER = "Masked Momentum Contrastive Learning for Zero-shot Semantic Understanding (2023); reconstructed " \
            "from the abstract"
CMD_PAPER = "Cross-Level Multi-Instance Distillation for Self-Supervised Fine-Grained Visual Categorization " \
            "(2023); reconstructed from the abstract"


def dino_ce(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor | None = None,
            student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """−Σ_k softmax((t − c)/τ_t) log softmax(s/τ_s): `(B, K) | (B, N, K), (B, K) -> ()`, mean over B (and N)."""
    t = teacher.detach().float().to(student.device)
    if center is not None:
        t = t - center.to(t.device)
    pt = F.softmax(t / teacher_temp, dim=-1)
    if student.dim() == 3:
        pt = pt.unsqueeze(1)
    elif student.dim() != 2:
        raise ValueError(f"dino_ce: student must be (B, K) or (B, N, K), got {tuple(student.shape)}")
    if student.shape[0] != t.shape[0] or student.shape[-1] != t.shape[-1]:
        raise ValueError(f"dino_ce: student {tuple(student.shape)} vs teacher {tuple(t.shape)}")
    return -(pt * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1).mean()


def _ex() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, 6, generator=g, requires_grad=True), torch.randn(4, 6, generator=g)), {}


@register_loss("dino", paper=DINO_PAPER, shape_check="none", example=_ex)
class DINOLoss(nn.Module):
    """`dino_ce` with an EMA centre of the teacher outputs (updated after each training-mode call)."""

    def __init__(self, student_temp: float = 0.1, teacher_temp: float = 0.04, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.teacher_temp, self.m = student_temp, teacher_temp, center_momentum
        self.register_buffer("center", torch.zeros(0))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = teacher.detach().float()
        center = self.center if self.center.numel() else torch.zeros(t.shape[-1], device=t.device)
        loss = dino_ce(student, t, center, self.student_temp, self.teacher_temp)
        if self.training and torch.is_grad_enabled():  # not during the engine's no-grad validation pass
            with torch.no_grad():
                self.center = center.mul(self.m).add_(t.mean(0), alpha=1.0 - self.m)
        return loss

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = prefix + "center"
        if key in state_dict:  # the centre's size is known only once a batch has been seen
            self.center = torch.zeros_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _ex_inter() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    return ([torch.randn(4, 6, generator=g, requires_grad=True), torch.randn(4, 6, generator=g, requires_grad=True)],
            ), {}


@register_loss("cmd_inter_student", paper=CMD_PAPER, shape_check="none", example=_ex_inter)
def cmd_inter_student(student: Sequence[torch.Tensor], student_temp: float = 0.1, teacher_temp: float = 0.04
                      ) -> torch.Tensor:
    """student = [region logits (B, K), image logits (B, K)]: H(softmax(sg(image)/τ_t), softmax(region/τ_s))."""
    region, image = student
    return dino_ce(region, image.detach(), None, student_temp, teacher_temp)


def _ex_mim() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(2, 4)
    mask[:, :2] = 1
    return ([torch.randn(2, 4, 4, generator=g, requires_grad=True), mask], torch.randn(2, 1, 4, 4, generator=g)), \
        {"patch": 2}


@register_loss("masked_patch_mse", paper=MMC_PAPER, shape_check="none", example=_ex_mim)
def masked_patch_mse(student: Sequence[torch.Tensor], target: torch.Tensor, patch: int = 7) -> torch.Tensor:
    """student = [recon (B, N, C·p²), mask (B, N)], target image (B, C, H, W): mean over masked patches and
    pixels of (recon − patch)², raster-order p×p patches; 0 when nothing is masked."""
    recon, mask = student
    b, c, h, w = target.shape
    tgt = target.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    tgt = tgt.reshape(b, (h // patch) * (w // patch), c * patch * patch).to(recon.device, recon.dtype)
    if tgt.shape != recon.shape:
        raise ValueError(f"masked_patch_mse: recon {tuple(recon.shape)} vs target patches {tuple(tgt.shape)}")
    m = mask.to(recon.device).float()
    if float(m.sum()) == 0:
        return recon.sum() * 0.0
    return ((recon - tgt).pow(2).mean(-1) * m).sum() / m.sum()
