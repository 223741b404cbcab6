"""OOD-VLM distillation preset (catalog 2.6): text-anchored CE + image MSE + image InfoNCE to a VLM teacher.

Use `text_anchored_cnn` for teacher and student (taps `proj` = image embedding in the text space,
`text_out` = the class-prompt text embeddings, "" = the cos logits). Open-vocabulary use: after
training, `student.set_classes(names)` puts any class prompts (e.g. held-out ones) in the head.
"""

from __future__ import annotations

from still.losses.vlm_ood import OOD_VLM_PAPER
from still.methods.base import MethodSpec
from still.registry import register_method

STUDENT_VIEWS = {"image": "proj"}
TEACHER_VIEWS = {"image": "proj", "text": "text_out", "logits": ""}


@register_method("ood_vlm", paper=OOD_VLM_PAPER)
def ood_vlm(w_ce: float = 1.0, w_mse: float = 1.0, w_contrastive: float = 1.0, scale: float = 30.0,
            temperature: float = 0.05, filter_wrong: bool = False, labels: str = "y") -> MethodSpec:
    """CE(scale·cos(v, text*)) + MSE(v̂, v̂*) + InfoNCE(v, v*; τ), unit weights [R]; `filter_wrong` drops
    the samples the teacher misclassifies (the paper's --clip-filter-out-wrong-alignment)."""
    return MethodSpec(
        terms=[{"name": "ood_vlm", "loss": "ood_vlm",
                "params": {"w_ce": w_ce, "w_mse": w_mse, "w_contrastive": w_contrastive, "scale": scale,
                           "temperature": temperature, "filter_wrong": filter_wrong},
                "student": "image", "teacher": ["image", "text", "logits"], "inputs": {"labels": labels}}],
        student_views=dict(STUDENT_VIEWS), teacher_views=dict(TEACHER_VIEWS),
        notes="student and teacher: text_anchored_cnn (MiniLM class-prompt head); weights are [R] defaults",
    )
