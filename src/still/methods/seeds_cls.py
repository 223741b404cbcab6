"""Seed methods on classification and token features: TRG, LLaVA-KD relation, DHO, LELP.

Each preset names views; the recipe maps them to taps (e.g. `tokens: features.1` on a CNN, whose
feature map is read as H·W tokens).
"""

from __future__ import annotations

from typing import Any

from still.losses.teacher_shaping import DHO_PAPER, LELP_PAPER, LELPTeacher
from still.losses.tokens import LLAVA_KD_PAPER, TRG_PAPER
from still.methods.base import MethodSpec
from still.registry import register_method


@register_method("trg", paper=TRG_PAPER)
def trg(temperature: float = 4.0, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0, k: int = 5,
        num_tokens: int = 256, tau_start: float = 0.5, tau_end: float = 0.05, labels: str = "y") -> MethodSpec:
    """L = CE + KD(logits) + α·L_inner + β·L_local(kNN graph) + γ·L_global(InfoNCE, dynamic τ) on `tokens`."""
    return MethodSpec(
        terms=[
            {"name": "ce", "loss": "ce", "student": "logits", "target": labels},
            {"name": "kd", "loss": "kd", "params": {"temperature": temperature},
             "student": "logits", "teacher": "logits"},
            {"name": "inner", "loss": "trg_inner", "student": "tokens", "teacher": "tokens", "weight": alpha},
            {"name": "local", "loss": "trg_local", "params": {"k": k, "num_tokens": num_tokens},
             "student": "tokens", "teacher": "tokens", "weight": beta},
            {"name": "global", "loss": "trg_global",
             "params": {"tau_start": tau_start, "tau_end": tau_end, "num_tokens": num_tokens},
             "student": "tokens", "teacher": "tokens", "weight": gamma},
        ],
        student_views={"logits": ""}, teacher_views={"logits": ""},
        notes="the (α, β, γ, k, σ) of the paper were not retrieved; unit weights are an [R] default",
    )


@register_method("llava_kd", paper=LLAVA_KD_PAPER)
def llava_kd(temperature: float = 1.0, labels: str = "y", normalize: bool = True) -> MethodSpec:
    """L = CE + KL(logits, T=1) + RDist (1 - cos of token relation matrices), unit weights (DFT stage)."""
    return MethodSpec(
        terms=[
            {"name": "ce", "loss": "ce", "student": "logits", "target": labels},
            {"name": "resp", "loss": "kd", "params": {"temperature": temperature, "scale_t2": False},
             "student": "logits", "teacher": "logits"},
            {"name": "rela", "loss": "relation_cosine", "params": {"normalize": normalize},
             "student": "tokens", "teacher": "tokens"},
        ],
        student_views={"logits": ""}, teacher_views={"logits": ""},
    )


@register_method("dho", paper=DHO_PAPER)
def dho(temperature: float = 2.0, labels: str = "y") -> MethodSpec:
    """0.5·CE(ce_head, y) on labelled samples + 0.5·T²·KL(teacher ‖ kd_head) on all, T = 2.

    Unlabelled samples carry label -100 (ignored by CE). Use the `dual_head` student; after
    training, `still.losses.teacher_shaping.dho_select_mix` picks the inference mix α, β.
    """
    return MethodSpec(
        terms=[
            {"name": "ce", "loss": "ce_labelled", "student": "ce_logits", "target": labels, "weight": 0.5},
            {"name": "kd", "loss": "kd", "params": {"temperature": temperature},
             "student": "kd_logits", "teacher": "logits", "weight": 0.5},
        ],
        student_views={"ce_logits": "ce_head", "kd_logits": "kd_head"},
        teacher_views={"logits": ""},
    )


@register_method("lelp", paper=LELP_PAPER)
def lelp(subclasses: int = 5, beta: float = 1.0, embed: str = "embed", head: str = "classifier",
         seed: int = 0, fit_data: dict[str, Any] | None = None) -> MethodSpec:
    """Soft cross-entropy on S·C pseudo-subclass targets from the teacher's null-space PCA; α = 0 (no CE).

    Use the `subclass_student` model (its `base` output is the S·C subclass logits). The
    pseudo-subclasses are fitted on the training data by the `prepare` hook; where the caller does
    not run `prepare`, `fit_data` (a dataset spec `{name, params}`, normally the recipe's `data` with
    `split: train`) lets `wrap_teacher` fit them itself.
    """

    def wrap(teacher: Any, student: Any = None, **_: Any) -> LELPTeacher:
        if "embed" not in teacher.view_specs or "logits" not in teacher.view_specs:
            from still.teachers.base import LiveTeacher

            specs = {k: str(v) for k, v in teacher.view_specs.items() if k != "subclass_logits"}
            specs = {"logits": "", **specs, "embed": embed}
            teacher = LiveTeacher(teacher.model, specs, inputs=getattr(teacher, "inputs", None))
        out = LELPTeacher(teacher, subclasses=subclasses, embed_view="embed", head=head, seed=seed)
        if fit_data is not None:
            from still.registry import DATASETS

            params = {"split": "train", **dict(fit_data.get("params") or {})}
            out.fit(DATASETS.build(fit_data["name"], **params))
        return out

    def prepare(teacher: Any, student: Any = None, train_data: Any = None, **_: Any) -> None:
        if isinstance(teacher, LELPTeacher) and teacher.fitted is None:
            if train_data is None:
                raise ValueError("lelp needs the training data to fit its pseudo-subclasses")
            teacher.fit(train_data)

    return MethodSpec(
        terms=[{"name": "lelp", "loss": "kd", "params": {"temperature": beta},
                "student": "subclass_logits", "teacher": "subclass_logits"}],
        student_views={"subclass_logits": "base"},
        # a placeholder tap: the pipeline builds a live teacher for the views the terms read, then
        # `wrap_teacher` replaces it by the LELPTeacher that really serves `subclass_logits`
        teacher_views={"logits": "", "subclass_logits": ""},
        wrap_teacher=wrap,
        prepare=prepare,
    )
