"""Hinton KD as a method: KL at temperature T on logits plus cross-entropy on labels."""

from __future__ import annotations

from still.methods.base import MethodSpec
from still.registry import register_method


@register_method("kd", paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (2015)")
def kd(temperature: float = 4.0, alpha: float = 0.9, labels: str = "y") -> MethodSpec:
    """Soft-target KL (T² scaled) weighted alpha, plus (1 - alpha) cross-entropy on labels."""
    return MethodSpec(
        terms=[
            {"name": "kd", "loss": "kd", "params": {"temperature": temperature},
             "student": "logits", "teacher": "logits", "weight": alpha},
            {"name": "ce", "loss": "ce", "student": "logits", "target": labels, "weight": 1.0 - alpha},
        ],
        student_views={"logits": ""},
        teacher_views={"logits": ""},
    )


@register_method("scratch", paper="")
def scratch(labels: str = "y") -> MethodSpec:
    """No teacher: cross-entropy on labels only (the from-scratch baseline)."""
    return MethodSpec(terms=[{"name": "ce", "loss": "ce", "student": "logits", "target": labels}],
                      student_views={"logits": ""})
