"""MoSE / ModularStarEncoder hierarchical self-distillation as a method.

The student is multi-exit (e.g. `multi_exit_mlp`, exits tapped at `exits.<j>`); the teacher is the
student itself (`SelfTeacher`: the last exit's logits, detached). Terms:

- `exits_ce`: Σ_i α_i·CE(z_i, y), α_i = layer_i / depth: the paper's loss (deeper exits weigh more);
- `exits_kd` (weight `kd_weight`): Σ_{i<last} α_i·T²·KL(softmax(z_last/T) ‖ softmax(z_i/T)), every
  exit distilled from the last layer with the same α_i. The paper has no explicit divergence
  (`kd_weight=0` is the paper's loss exactly); still adds it as the explicit deep→shallow signal.

With the paper's *shared* exit head the explicit KD also trains that head to map shallow features to
the deep exit's softened output, which can cost accuracy at every exit; with one head per exit
(`multi_exit_mlp(shared_head=False)`) it is the BYOT-style form. `benchmarks/seed_core.py` measures both.
"""

from __future__ import annotations

from typing import Any, Sequence

from still.methods.base import MethodSpec
from still.registry import register_method
from still.teachers.self_teacher import SelfTeacher

MOSE_PAPER = "Gurioli et al. ModularStarEncoder / MoSE: Modular Self-distillation Encoders (AAAI 2026)"


@register_method("mose", paper=MOSE_PAPER)
def mose(exit_layers: Sequence[int] = (2, 4, 6, 8), depth: int | None = None, kd_weight: float = 1.0,
         ce_weight: float = 1.0, temperature: float = 4.0, labels: str = "y", view_prefix: str = "exit",
         normalize: bool = False) -> MethodSpec:
    """Multi-exit self-distillation: α_i-weighted CE at every exit + KD of every exit from the last (self-teacher)."""
    layers = [int(i) for i in exit_layers]
    d = int(depth) if depth is not None else max(layers)
    names = [f"{view_prefix}{j}" for j in range(len(layers))]
    params: dict[str, Any] = {"layers": layers, "depth": d, "normalize": normalize}
    terms: list[dict[str, Any]] = [
        {"name": "exits_ce", "loss": "multi_exit_ce", "params": params, "student": names, "target": labels,
         "weight": ce_weight},
    ]
    if kd_weight:
        terms.append({"name": "exits_kd", "loss": "multi_exit_kd", "params": {**params, "temperature": temperature},
                      "student": names, "teacher": "last_exit", "weight": kd_weight})
    last = names[-1]

    def wrap_teacher(teacher: Any = None, student: Any = None) -> SelfTeacher:
        # Any configured teacher is ignored: MoSE's teacher is the student's own last exit.
        return SelfTeacher({"last_exit": last})

    return MethodSpec(
        terms=terms,
        student_views={**{n: f"exits.{j}" for j, n in enumerate(names)}, "logits": ""},
        teacher_views={},
        wrap_teacher=wrap_teacher,
        notes="teacher = the student itself (SelfTeacher on the last exit); needs a multi-exit student "
              "(multi_exit_mlp / multi_exit_cnn); kd_weight=0 is the paper's loss exactly",
    )
