"""DiSCo (catalog 1.4): multi-teacher score distillation for embedding students.

The student's in-batch score distribution (cosine, self excluded, temperature τ) is matched by KL to
the average of its teachers' distributions (`disco_multi_kl`, `combine="mean_probs"`; the paper
reads precomputed multi-teacher scores, so how they are combined is an [R] choice). The teachers
usually read a rewrite of the student's text (`still.teachers.rewrite.RewriteTeacher`): the rewritten
query for a conversation, the text itself for a document.
"""

from __future__ import annotations

from typing import Sequence

from still.methods.base import MethodSpec
from still.registry import register_method
from still.losses.multi_teacher_scores import DISCO_PAPER


@register_method("disco", paper=DISCO_PAPER)
def disco(teachers: Sequence[str] = ("embedding",), temperature: float = 0.05, combine: str = "mean_probs",
          weights: Sequence[float] | None = None, student: str = "embedding") -> MethodSpec:
    """KL(mean of the teachers' in-batch score distributions ‖ the student's), τ = 0.05, over `teachers` views."""
    views = list(teachers)
    if not views:
        raise ValueError("disco: give at least one teacher view")
    params = {"temperature": temperature, "combine": combine}
    if weights is not None:
        params["weights"] = list(weights)
    return MethodSpec(
        terms=[{"name": "disco", "loss": "disco_multi_kl", "params": params, "student": student,
                "teacher": views if len(views) > 1 else views[0]}],
        student_views={student: ""}, teacher_views={v: "" for v in views},
        notes="teachers read the rewrite (RewriteTeacher); the multi-teacher combination is an [R] default",
    )
