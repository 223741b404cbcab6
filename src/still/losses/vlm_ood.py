"""OOD-VLM distillation (catalog 2.6): text-anchored classification + image-embedding MSE + InfoNCE.

Li et al. distil a CLIP teacher into a small image encoder with (flags of their `example_scripts.sh`):
- `--clip-align-image-classification`: CE of the student image embedding, projected to the teacher's
  space, against the **teacher's text embeddings** of the class prompts: logits = s·cos(v_i, t_c);
- `--clip-align-image-mse`: MSE(student image embedding, teacher image embedding);
- `--clip-align-image-contrastive`: InfoNCE between student and teacher image embeddings in the batch;
- `--clip-filter-out-wrong-alignment`: samples the teacher misclassifies are dropped.

Shapes: student image embedding `v (B, D)`, teacher image embedding `v* (B, D)`, class text embeddings
`text (C, D)`, teacher logits `(B, C)`, labels `(B,)`. Embeddings are L2-normalised inside (CLIP's are
used normalised; the MSE is Σ_d over the unit vectors, i.e. 2 − 2·cos, an [R] choice); unit weights [R].
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from still.losses.embedding import teacher_infonce
from still.registry import register_loss

OOD_VLM_PAPER = ("Li et al. Distilling Large Vision-Language Model with Out-of-Distribution Generalizability "
                 "(ICCV 2023)")


def teacher_correct(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the teacher's argmax equals the label (the filter keeps these samples)."""
    return teacher_logits.argmax(-1) == labels.to(teacher_logits.device)


def _ex_ce() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(4, 8, generator=g)), {
        "labels": torch.tensor([0, 1, 2, 3, 0, 1])}


@register_loss("text_anchored_ce", paper=OOD_VLM_PAPER, shape_check="none", example=_ex_ce)
def text_anchored_ce(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: float = 30.0,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """CE over classes of scale·cos(image_i, text_c): `(B, D), (C, D), (B,) -> ()`; `mask` (B,) keeps samples."""
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(f"text_anchored_ce: need image (B, D) and text (C, D); got {tuple(image.shape)}, "
                         f"{tuple(text.shape)}")
    logits = scale * F.normalize(image.float(), dim=1) @ F.normalize(text.float().to(image.device), dim=1).t()
    labels = labels.to(image.device)
    if mask is not None:
        logits, labels = logits[mask], labels[mask]
        if len(labels) == 0:
            return image.sum() * 0.0
    return F.cross_entropy(logits, labels)


def _ex_pair() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g)), {}


@register_loss("image_embed_mse", paper=OOD_VLM_PAPER, example=_ex_pair)
def image_embed_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i ‖v̂_i − v̂*_i‖² over L2-normalised embeddings: `(B, D), (B, D) -> ()`; `mask` (B,) keeps rows."""
    d = (F.normalize(student.float(), dim=1) - F.normalize(teacher.float().to(student.device), dim=1)).pow(2).sum(1)
    if mask is not None:
        if not bool(mask.any()):
            return student.sum() * 0.0
        d = d[mask]
    return d.mean()


def _ex_ood() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 8, generator=g, requires_grad=True)
    t = [torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)]
    return (s, t), {"labels": torch.tensor([0, 1, 2, 3, 0, 1]), "filter_wrong": True}


@register_loss("ood_vlm", paper=OOD_VLM_PAPER, shape_check="none", example=_ex_ood)
def ood_vlm(student: torch.Tensor, teacher: Sequence[torch.Tensor], labels: torch.Tensor, w_ce: float = 1.0,
            w_mse: float = 1.0, w_contrastive: float = 1.0, scale: float = 30.0, temperature: float = 0.05,
            filter_wrong: bool = False) -> torch.Tensor:
    """w_ce·CE(text-anchored) + w_mse·MSE(v, v*) + w_contrastive·InfoNCE(v, v*) [on teacher-correct samples].

    student `v (B, D)`; teacher `[v* (B, D), text (C, D), teacher_logits (B, C)]`; labels `(B,)`.
    The text embeddings are the teacher's (its text tower on the class prompts).
    """
    if len(teacher) != 3:
        raise ValueError("ood_vlm: teacher must be [image_embedding (B, D), text (C, D), logits (B, C)]")
    tv, text, tlog = teacher
    mask = teacher_correct(tlog, labels) if filter_wrong else None
    loss = student.sum() * 0.0
    if w_ce:
        loss = loss + w_ce * text_anchored_ce(student, text, labels, scale=scale, mask=mask)
    if w_mse:
        loss = loss + w_mse * image_embed_mse(student, tv, mask=mask)
    if w_contrastive:
        s, t = (student, tv) if mask is None else (student[mask], tv[mask])
        if len(s) >= 2:
            loss = loss + w_contrastive * teacher_infonce(s, t.to(s.device), temperature=temperature)
    return loss
