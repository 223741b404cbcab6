"""The classic method zoo as presets: each paper's loss plus cross-entropy on labels, with its weights.

Views: `logits` (default tap "": the model's output), `feat` (a feature map, e.g. a stage's output)
and `embed` (the penultimate, pooled features). Only `logits` has a default tap; a recipe maps the
feature views to modules (`student: {views: {logits: "", feat: layer3, embed: "fc@input"}}`).
"""

from __future__ import annotations

from typing import Any, Sequence

from still.methods.base import MethodSpec
from still.registry import register_method

_LOGITS = {"logits": ""}


def _ce(labels: str, weight: float = 1.0) -> dict[str, Any]:
    return {"name": "ce", "loss": "ce", "student": "logits", "target": labels, "weight": weight}


def _spec(terms: list[dict[str, Any]], notes: str = "") -> MethodSpec:
    return MethodSpec(terms=terms, student_views=dict(_LOGITS), teacher_views=dict(_LOGITS), notes=notes)


def _ref(views: str | Sequence[str]) -> str | list[str]:
    views = [views] if isinstance(views, str) else list(views)
    return views[0] if len(views) == 1 else views


@register_method("kd", paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (2015)")
def kd(temperature: float = 4.0, alpha: float = 0.9, labels: str = "y") -> MethodSpec:
    """Soft-target KL (T² scaled) weighted alpha, plus (1 - alpha) cross-entropy on labels."""
    return _spec([
        {"name": "kd", "loss": "kd", "params": {"temperature": temperature},
         "student": "logits", "teacher": "logits", "weight": alpha},
        _ce(labels, 1.0 - alpha),
    ])


@register_method("scratch", paper="")
def scratch(labels: str = "y") -> MethodSpec:
    """No teacher: cross-entropy on labels only (the from-scratch baseline)."""
    return MethodSpec(terms=[_ce(labels)], student_views=dict(_LOGITS))


@register_method("dkd", paper="Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation (CVPR 2022)")
def dkd(alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: float = 20 / 240,
        ce_weight: float = 1.0, labels: str = "y") -> MethodSpec:
    """CE + DKD (α TCKD + β NCKD at T), the DKD weight warmed up linearly over `warmup` of the run.

    Defaults are the paper's CIFAR-100 setting (α = 1, β = 8, T = 4, 20 of 240 epochs of warm-up;
    ImageNet uses β = 0.5). `warmup` is a fraction of the run (< 1) or a number of steps; 0 disables it.
    """
    term: dict[str, Any] = {"name": "dkd", "loss": "dkd",
                            "params": {"alpha": alpha, "beta": beta, "temperature": temperature},
                            "student": "logits", "teacher": "logits", "inputs": {"labels": labels}}
    if warmup:
        term["schedule"] = {"name": "warmup", "steps": warmup}
    return _spec([term, _ce(labels, ce_weight)])


@register_method("fitnets", paper="Romero et al. FitNets: Hints for Thin Deep Nets (ICLR 2015)")
def fitnets(hint_weight: float = 100.0, adapter: str | dict | None = "conv1x1", view: str = "feat",
            labels: str = "y") -> MethodSpec:
    """CE + hint MSE between the adapted student `feat` and the teacher `feat` (weight 100).

    The adapter is the paper's regressor (`conv1x1` for `(B, C, H, W)` maps, `linear` for `(B, D)`).
    One-stage training with the hint weight of the CRD paper's benchmark (RepDistiller), not the paper's
    two-stage hint pre-training.
    """
    return _spec([
        {"name": "hint", "loss": "fitnets", "student": view, "teacher": view, "adapter": adapter,
         "weight": hint_weight},
        _ce(labels),
    ], notes='needs view feat on both sides (a stage output, e.g. layer2 / features.1)')


@register_method("at", paper="Zagoruyko, Komodakis. Paying More Attention to Attention (ICLR 2017)")
def at(beta: float = 1000.0, p: float = 2.0, views: Sequence[str] = ("feat",), labels: str = "y") -> MethodSpec:
    """CE + (β/2)·Σ_pairs attention-transfer distance, β = 1000 as in the paper.

    `views` names one or several feature-map views (one per stage), taken from both models.
    The distance is a mean over H·W of squared differences of unit-norm maps, so it scales like 1/(H·W):
    β = 1000 suits the paper's 8×8 to 32×32 maps; on tiny maps (2×2, 4×4) lower it (digits, 4×4→2×2:
    β = 1000 hurt accuracy, β = 20 matched training from scratch).
    """
    ref = _ref(views)
    return _spec([
        {"name": "at", "loss": "at", "params": {"p": p}, "student": ref, "teacher": ref, "weight": beta / 2},
        _ce(labels),
    ], notes='needs feature-map views (B, C, H, W) on both sides, named by `views`')


@register_method("rkd", paper="Park, Kim, Lu, Cho. Relational Knowledge Distillation (CVPR 2019)")
def rkd(distance_weight: float = 25.0, angle_weight: float = 50.0, weight: float = 1.0, view: str = "embed",
        labels: str = "y") -> MethodSpec:
    """CE + RKD (distance 25 + angle 50, the paper's weights) on the penultimate `embed` features."""
    return _spec([
        {"name": "rkd", "loss": "rkd", "params": {"distance_weight": distance_weight, "angle_weight": angle_weight},
         "student": view, "teacher": view, "weight": weight},
        _ce(labels),
    ], notes='needs view embed on both sides (penultimate features, e.g. "classifier@input")')


@register_method("sp", paper="Tung, Mori. Similarity-Preserving Knowledge Distillation (ICCV 2019)")
def sp(gamma: float = 3000.0, views: Sequence[str] = ("feat",), labels: str = "y") -> MethodSpec:
    """CE + γ·SP on the feature map(s) `feat` (γ = 3000, the paper's CIFAR-10 weight)."""
    ref = _ref(views)
    return _spec([
        {"name": "sp", "loss": "sp", "student": ref, "teacher": ref, "weight": gamma},
        _ce(labels),
    ], notes='needs view feat on both sides (last feature map before pooling)')


@register_method("pkt", paper="Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer (ECCV 2018)")
def pkt(weight: float = 30000.0, view: str = "embed", labels: str = "y") -> MethodSpec:
    """CE + PKT on the `embed` features, weight 30000 as in the CRD paper's benchmark (RepDistiller)."""
    return _spec([
        {"name": "pkt", "loss": "pkt", "student": view, "teacher": view, "weight": weight},
        _ce(labels),
    ], notes='needs view embed on both sides (penultimate features)')


@register_method("crd", paper="Tian, Krishnan, Isola. Contrastive Representation Distillation (ICLR 2020)")
def crd(weight: float = 0.8, feat_dim: int = 128, num_negatives: int = 16384, nce_t: float = 0.07,
        momentum: float = 0.5, num_samples: int | None = None, view: str = "embed", index: str = "index",
        labels: str = "y") -> MethodSpec:
    """CE + 0.8·CRD on the `embed` features, memory bank keyed by the batch's `index` (paper defaults)."""
    return _spec([
        {"name": "crd", "loss": "crd",
         "params": {"feat_dim": feat_dim, "num_negatives": num_negatives, "nce_t": nce_t,
                    "momentum": momentum, "num_samples": num_samples},
         "student": view, "teacher": view, "inputs": {"index": index}, "weight": weight},
        _ce(labels),
    ], notes='needs view embed on both sides and batch key index (sample id); set num_samples to the data set size')


@register_method("dist", paper="Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher (NeurIPS 2022)")
def dist(beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, weight: float = 1.0,
         labels: str = "y") -> MethodSpec:
    """CE + DIST (inter- and intra-class Pearson relations), the paper's β = γ = τ = 1 and unit weights."""
    return _spec([
        {"name": "dist", "loss": "dist", "params": {"beta": beta, "gamma": gamma, "temperature": temperature},
         "student": "logits", "teacher": "logits", "weight": weight},
        _ce(labels),
    ])


@register_method("logit_std", paper="Sun et al. Logit Standardization in Knowledge Distillation (CVPR 2024)")
def logit_std(temperature: float = 2.0, kd_weight: float = 9.0, ce_weight: float = 0.1,
              labels: str = "y") -> MethodSpec:
    """0.1·CE + 9·KD on z-scored logits at base temperature 2 (the authors' CIFAR-100 setting)."""
    return _spec([
        {"name": "kd", "loss": "logit_std", "params": {"temperature": temperature},
         "student": "logits", "teacher": "logits", "weight": kd_weight},
        _ce(labels, ce_weight),
    ])
