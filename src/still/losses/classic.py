"""Classic logit losses: Hinton KD and cross-entropy on labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from still.registry import register_loss


@register_loss("ce", paper="", shape_check="none")
def cross_entropy(student: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of student logits `(B, C)` (or `(B, T, C)`) against integer labels `(B,)`/`(B, T)`."""
    return F.cross_entropy(student.reshape(-1, student.shape[-1]).float(), target.reshape(-1).long(),
                           label_smoothing=label_smoothing, ignore_index=ignore_index)


@register_loss("kd", paper="Hinton et al., Distilling the Knowledge in a Neural Network, 2015")
def hinton_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0,
              scale_t2: bool = True) -> torch.Tensor:
    """KL(p_t^T ‖ p_s^T) on logits `(B, C)`, batch-mean, times T² (so gradients keep their scale)."""
    t = float(temperature)
    log_ps = F.log_softmax(student.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    return kl * (t * t) if scale_t2 else kl
