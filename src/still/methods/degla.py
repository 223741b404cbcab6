"""DeGLA (5.2) end to end: a compositional caption task, a tiny dual encoder, the combined loss and the preset.

Task `fmnist_captions`: an image is two Fashion-MNIST items side by side, x (1, 28, 56); its caption
is the token triple `[a, LEFT_OF, b]` (a, b the left and right classes, LEFT_OF = 10); the
rule-generated hard negatives (K = 2) are the swapped caption `[b, LEFT_OF, a]` and a replaced one
`[a, LEFT_OF, c]` (c ∉ {a, b}). Samples: `{"x", "text" (3,), "neg" (K, 3), "y" = 0, "index"}`.

Model `dual_encoder_tiny`: `forward(x, text, neg)` returns the cosine logits (B, 1 + K) of each image
against its caption and its negatives (so `accuracy` with y = 0 is the compositional accuracy: the
true caption beats every negative); taps `image_out` (B, D), `text_out` (B, D), `neg_out` (B, K, D).

Method `degla`: L = L_base(hard negatives) + 0.1·L_IGC + 0.1·L_TGC + 0.005·L_Distill, with an
EMA copy of the student (decay 0.9996) as the anchor teacher (the `EMATeacher` of
still.teachers.ema, updated by the engine after every step). Fine-tune from a pretrained encoder
(the anchor is the point: the EMA starts at the pretrained weights).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from still.data.base import TensorDataset
from still.losses.self_distill_ema import DEGLA_PAPER, degla_base, degla_igc, degla_tgc, ema_anchor
from still.methods.base import MethodSpec
from still.registry import DATASETS, register_dataset, register_loss, register_method, register_model

LEFT_OF = 10
VOCAB = 11


class CaptionDataset(TensorDataset):
    """TensorDataset with per-sample caption tokens `text` (N, 3) and negatives `neg` (N, K, 3)."""

    def __init__(self, x: torch.Tensor, text: torch.Tensor, neg: torch.Tensor, name: str,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__(x, torch.zeros(len(x), dtype=torch.long), 1 + neg.shape[1], name, meta)
        self.text, self.neg = text.long(), neg.long()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "text": self.text[i], "neg": self.neg[i]}

    def __getitems__(self, idx: list[int]) -> list[dict[str, torch.Tensor]]:
        out = super().__getitems__(idx)
        for d, i in zip(out, idx):
            d["text"], d["neg"] = self.text[i], self.neg[i]
        return out


@register_dataset("fmnist_captions", paper=DEGLA_PAPER)
def fmnist_captions(split: str = "train", num_samples: int = 2000, seed: int = 0, base: str = "fashion_mnist",
                    base_params: dict[str, Any] | None = None) -> CaptionDataset:
    """Two-item images with `[a, LEFT_OF, b]` captions and swapped / replaced hard negatives (see module doc)."""
    ds = DATASETS.build(base, split=split, **dict(base_params or {}))
    rng = np.random.default_rng(seed + (0 if split == "train" else 10_000))
    i = rng.integers(0, len(ds), size=num_samples)
    j = rng.integers(0, len(ds), size=num_samples)
    a, b = ds.y[i], ds.y[j]
    same = a == b
    while bool(same.any()):  # two different classes per image
        j[same.numpy()] = rng.integers(0, len(ds), size=int(same.sum()))
        b = ds.y[j]
        same = a == b
    c = torch.from_numpy(rng.integers(0, ds.num_classes, size=num_samples))
    bad = (c == a) | (c == b)
    while bool(bad.any()):
        c[bad] = torch.from_numpy(rng.integers(0, ds.num_classes, size=int(bad.sum())))
        bad = (c == a) | (c == b)
    rel = torch.full_like(a, LEFT_OF)
    text = torch.stack([a, rel, b], 1)
    neg = torch.stack([torch.stack([b, rel, a], 1), torch.stack([a, rel, c], 1)], 1)
    x = torch.cat([ds.x[i], ds.x[j]], dim=-1)  # (N, 1, 28, 56)
    return CaptionDataset(x, text, neg, "fmnist_captions", {"split": split, "seed": seed, "n": num_samples})


class DualEncoderTiny(nn.Module):
    """Image CNN and position-aware token encoder into a shared D-d space; forward → (B, 1 + K) logits."""

    def __init__(self, dim: int = 32, channels: Sequence[int] = (16, 32), in_channels: int = 1,
                 scale: float = 10.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for co in channels:
            layers += [nn.Conv2d(c, co, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = co
        self.image = nn.Sequential(*layers, nn.AdaptiveAvgPool2d((1, 2)), nn.Flatten(), nn.Linear(2 * c, dim))
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(3, dim) * 0.1)
        self.text = nn.Sequential(nn.Flatten(), nn.Linear(3 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.image_out, self.text_out, self.neg_out = nn.Identity(), nn.Identity(), nn.Identity()
        self.scale = scale

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., 3) token ids → (..., D)."""
        lead = tokens.shape[:-1]
        h = self.text(self.tok(tokens.reshape(-1, 3)) + self.pos)
        return h.view(*lead, -1)

    def forward(self, x: torch.Tensor, text: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        v = self.image_out(self.image(x))
        t = self.text_out(self.encode_text(text))
        n = self.neg_out(self.encode_text(neg))
        cands = F.normalize(torch.cat([t.unsqueeze(1), n], 1), dim=-1)  # (B, 1+K, D)
        return self.scale * torch.einsum("bd,bkd->bk", F.normalize(v, dim=-1), cands)


@register_model("dual_encoder_tiny", paper=DEGLA_PAPER)
def dual_encoder_tiny(num_classes: int = 3, input_shape: Sequence[int] = (1, 28, 56), dim: int = 32,
                      channels: Sequence[int] = (16, 32)) -> DualEncoderTiny:
    """A ~30k-parameter CLIP-like dual encoder for `fmnist_captions` (num_classes is 1 + K, unused)."""
    return DualEncoderTiny(dim, channels, int(input_shape[0]))


def _ex_degla() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(4, 6, generator=g, requires_grad=True), torch.randn(4, 6, generator=g, requires_grad=True),
         torch.randn(4, 2, 6, generator=g, requires_grad=True)]
    t = [torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, 2, 6, generator=g)]
    return (s, t), {}


@register_loss("degla", paper=DEGLA_PAPER, shape_check="none", example=_ex_degla)
class DeGLALoss(nn.Module):
    """L_base(v, t, neg) + w_igc·IGC(v, t, neg) + w_tgc·TGC(t, t*, neg) + w_distill·(‖v−v*‖² + ‖t−t*‖² + Σ‖n−n*‖²).

    student = [v (B, D), t (B, D), neg (B, K, D)], teacher = the EMA model's [v*, t*, neg*].
    `negatives=False` drops the hard negatives from L_base (plain CLIP); the weights default to the paper's.
    """

    def __init__(self, tau: float = 0.07, w_igc: float = 0.1, w_tgc: float = 0.1, w_distill: float = 0.005,
                 negatives: bool = True) -> None:
        super().__init__()
        self.tau, self.w_igc, self.w_tgc, self.w_distill, self.negatives = tau, w_igc, w_tgc, w_distill, negatives

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor] | None = None
                ) -> torch.Tensor:
        v, t, n = student
        loss = degla_base(v, t, n if self.negatives else None, tau=self.tau)
        if self.w_igc:
            loss = loss + self.w_igc * degla_igc(v, t, n, tau=self.tau)
        if teacher is not None:
            tv, tt, tn = teacher
            if self.w_tgc:
                loss = loss + self.w_tgc * degla_tgc(t, tt, n, tau=self.tau)
            if self.w_distill:
                loss = loss + self.w_distill * (ema_anchor(v, tv) + ema_anchor(t, tt, n, tn))
        return loss


VIEWS = {"image": "image_out", "text": "text_out", "neg": "neg_out"}


@register_method("degla", paper=DEGLA_PAPER)
def degla(decay: float = 0.9996, tau: float = 0.07, w_igc: float = 0.1, w_tgc: float = 0.1,
          w_distill: float = 0.005) -> MethodSpec:
    """DeGLA fine-tuning: hard-negative CLIP + IGC + TGC + EMA-anchor distillation (EMA of the student)."""
    from still.teachers.ema import EMATeacher

    def wrap(teacher: Any, student: Any = None, **_: Any) -> EMATeacher:
        if student is None:
            raise ValueError("degla: the EMA anchor teacher needs the student model")
        return EMATeacher(student, VIEWS, decay=decay, inputs=["x", "text", "neg"])

    return MethodSpec(
        terms=[{"name": "degla", "loss": "degla",
                "params": {"tau": tau, "w_igc": w_igc, "w_tgc": w_tgc, "w_distill": w_distill},
                "student": ["image", "text", "neg"], "teacher": ["image", "text", "neg"]}],
        student_views=dict(VIEWS), teacher_views=dict(VIEWS), wrap_teacher=wrap,
        notes="student: dual_encoder_tiny with inputs [x, text, neg]; the teacher is the student's EMA",
    )


@register_method("negclip", paper="Yuksekgonul et al. When and why VLMs behave like bags-of-words (ICLR 2023)")
def negclip(tau: float = 0.07) -> MethodSpec:
    """Hard-negative CLIP fine-tuning without an anchor (DeGLA's L_base alone): the baseline DeGLA improves on."""
    return MethodSpec(
        terms=[{"name": "negclip", "loss": "degla",
                "params": {"tau": tau, "w_igc": 0.0, "w_tgc": 0.0, "w_distill": 0.0},
                "student": ["image", "text", "neg"]}],
        student_views=dict(VIEWS))


@register_method("clip", paper="Radford et al. Learning Transferable Visual Models (ICML 2021)")
def clip(tau: float = 0.07) -> MethodSpec:
    """Plain symmetric InfoNCE over in-batch pairs (no hard negatives): the pretraining objective."""
    return MethodSpec(
        terms=[{"name": "clip", "loss": "degla",
                "params": {"tau": tau, "w_igc": 0.0, "w_tgc": 0.0, "w_distill": 0.0, "negatives": False},
                "student": ["image", "text", "neg"]}],
        student_views=dict(VIEWS))
