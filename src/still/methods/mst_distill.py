"""MST-Distill (Li et al., ACM MM 2025) as a method: routed mixture of specialised teachers.

Stage 3 of the paper is the objective here (see `still.losses.mixture_losses`)::

    L = w_task·CE(z_s, y) + w_kl·s_kl(t)·RoutedKD(z_s, experts) + w_lb·s_lb(t)·LB(GateNet(z_s))

with the paper's schedules as registered `step` schedules scaled to the run: the code multiplies
w_lb by 0.9 after every epoch e with e % 10 == 0 and w_kl by 0.5 after every e % 30 == 0 (both fire
after epoch 0) over 100 epochs, so the milestones are the fractions (e + 1)/100 of the run.

The teacher side is a `MixtureTeacher(combine="stack")` serving `logits_experts` (B, E, C). Given a
single live teacher, `wrap_teacher` makes the paper's specialised teachers from it: one
`MaskedTeacher` per layer in `mask_layers` (a MaskNet on that layer). `prepare` runs the paper's
stage 2 (`fit_masknets`: each masked teacher is pulled toward the student, lr 1e-4, T = 4) after an
optional short stage 1 (`stage1_epochs` of CE + KD from the unmasked teacher; the paper co-trains
teacher, auxiliary teacher and student there, still keeps the teacher frozen). A ready
`MixtureTeacher` (or a list of teachers) is used as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from still.losses.mixture_losses import MSTRoutedKD, RouterLoadBalance
from still.methods.base import MethodSpec
from still.objective import Term
from still.registry import LOSSES, register_method
from still.teachers.base import LiveTeacher, Teacher
from still.teachers.mixture import MaskedTeacher, MixtureTeacher, fit_masknets

MST_PAPER = ("Li et al. MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation "
             "(ACM MM 2025)")


def paper_milestones(every: int, paper_epochs: int = 100) -> list[float]:
    """Fractions of the run where the code's `w *= gamma if epoch % every == 0` takes effect: (e+1)/E."""
    return [(e + 1) / paper_epochs for e in range(0, paper_epochs, every) if e + 1 < paper_epochs]


@dataclass
class MSTMethodSpec(MethodSpec):
    """A MethodSpec whose terms share one router; `build_terms` makes a fresh router each call."""

    make_terms: Callable[[], list[Term]] | None = None

    def build_terms(self) -> list[Term]:
        assert self.make_terms is not None
        return self.make_terms() + [t if isinstance(t, Term) else _build(t) for t in self.terms]


def _build(spec: dict) -> Term:
    from still.objective import build_term

    return build_term(spec)


def _loader(data: Any, batch_size: int, seed: int = 0) -> Callable[[], Any]:
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    return lambda: DataLoader(data, batch_size=batch_size, shuffle=True, generator=g)


def stage1_student(student: torch.nn.Module, teacher: Teacher, batches: Callable[[], Any], epochs: int,
                   lr: float = 1e-3, temperature: float = 4.0, labels: str = "y") -> None:
    """A short warm-up of the student: CE + KD from the (unmasked) teacher's logits, teacher frozen."""
    import torch.nn.functional as F
    from still.taps import call_model

    opt = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    for _ in range(epochs):
        for batch in batches():
            zt = teacher.views(batch, ["logits"])["logits"]
            zs = call_model(student, batch)
            t = temperature
            kd = F.kl_div(F.log_softmax(zs / t, -1), F.softmax(zt / t, -1), reduction="batchmean") * t * t
            loss = F.cross_entropy(zs, batch[labels]) + kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@register_method("mst_distill", paper=MST_PAPER)
def mst_distill(k: int = 1, temperature: float = 4.0, w_task: float = 1.0, w_kl: float = 1.0, w_lb: float = 1.0,
                lb_mode: str = "kl", routing: str = "topk", kl_every: int = 30, kl_gamma: float = 0.5,
                lb_every: int = 10, lb_gamma: float = 0.9, paper_epochs: int = 100,
                mask_layers: Sequence[str] = (), mask_heads: int = 3, mask_epochs: int = 1, mask_lr: float = 1e-4,
                stage1_epochs: int = 0, prep_batch_size: int = 128, labels: str = "y",
                experts_view: str = "logits_experts") -> MSTMethodSpec:
    """Routed mixture of specialised teachers: top-k GateNet routing + load balancing, paper schedules."""
    kl_sched = {"name": "step", "milestones": paper_milestones(kl_every, paper_epochs), "gamma": kl_gamma}
    lb_sched = {"name": "step", "milestones": paper_milestones(lb_every, paper_epochs), "gamma": lb_gamma}

    def make_terms() -> list[Term]:
        kd = MSTRoutedKD(temperature=temperature, k=k, routing=routing)
        lb = RouterLoadBalance(mode=lb_mode, router=kd.router)
        kd.registry_name, lb.registry_name = "mst_routed_kd", "mst_load_balance"
        return [
            Term("ce", LOSSES.build("ce"), student="logits", target=labels, weight=w_task),
            Term("mst_kd", kd, student="logits", teacher=experts_view, weight=w_kl, schedule=kl_sched,
                 shape_check="batch"),
            Term("mst_lb", lb, student="logits", teacher=experts_view, weight=w_lb, schedule=lb_sched,
                 shape_check="batch"),
        ]

    def wrap_teacher(teacher: Any, student: Any = None) -> MixtureTeacher:
        if isinstance(teacher, MixtureTeacher):
            return teacher
        if isinstance(teacher, (list, tuple)):
            return MixtureTeacher(list(teacher), combine="stack")
        if not mask_layers:
            raise ValueError("mst_distill: give mask_layers (teacher layers for the specialised MaskNet "
                             "teachers) or a MixtureTeacher / list of teachers")
        if not isinstance(teacher, LiveTeacher):
            raise TypeError(f"mst_distill: mask_layers needs a live teacher (a model), got {type(teacher).__name__}")
        experts = [MaskedTeacher(teacher.model, {"logits": ""}, layer, heads=mask_heads, inputs=teacher.inputs)
                   for layer in mask_layers]
        mix = MixtureTeacher(experts, combine="stack")
        mix.base = teacher  # type: ignore[attr-defined]  # the unmasked teacher, for stage 1
        return mix

    def prepare(teacher: Any, student: Any, train_data: Any) -> None:
        members = [m for m in getattr(teacher, "members", []) if isinstance(m, MaskedTeacher)]
        batches = _loader(train_data, prep_batch_size)
        if stage1_epochs > 0:
            base = getattr(teacher, "base", None) or MixtureTeacher(getattr(teacher, "members", [teacher]))
            stage1_student(student, base, batches, stage1_epochs, temperature=temperature, labels=labels)
        if members and mask_epochs > 0:
            fit_masknets(members, student, batches, epochs=mask_epochs, lr=mask_lr, temperature=temperature)

    return MSTMethodSpec(
        terms=[],
        make_terms=make_terms,
        student_views={"logits": ""},
        # The base teacher's logits under the experts' name: a pipeline builds the live teacher for the views
        # the terms read, then `wrap_teacher` replaces it by the mixture that really serves (B, E, C).
        teacher_views={"logits": "", experts_view: ""},
        wrap_teacher=wrap_teacher,
        prepare=prepare,
        notes="teacher: a MixtureTeacher (stack) or one live teacher + mask_layers (MaskNet-specialised copies); "
              "the GateNet router trains with the student inside the mst_kd loss module",
    )
