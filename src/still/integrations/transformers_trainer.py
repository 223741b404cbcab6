"""`DistillTrainer`: a `transformers.Trainer` that trains with any still Objective and a teacher.

HF users keep `TrainingArguments`, callbacks, logging and `resume_from_checkpoint`:

>>> from still.integrations.transformers_trainer import DistillTrainer
>>> trainer = DistillTrainer(model=student, args=TrainingArguments("out", max_steps=100),
...                          train_dataset=blocks, teacher=teacher_model)          # default: lm_kd (forward KL + CE)
>>> trainer = DistillTrainer(..., teacher=teacher, method="gkd")                  # any registered method's terms
>>> trainer = DistillTrainer(..., teacher=teacher, objective=my_objective,       # or any Objective, with
...                          student_views={"lm": LM_HEAD, "h3": "model.layers.3"})  # taps for its views
>>> trainer.train(resume_from_checkpoint=True)

The student view tap `LM_HEAD` ("<lm_head>") gives `LMHeadOutputs` (hidden states + head weight, no logits),
so LLM terms run through the chunked engine. A teacher that is an HF causal LM is wrapped in
`CausalLMTeacher`; any other `nn.Module` in `LiveTeacher`; a still `Teacher` (store, mixture, ...) is used
as is. Parameters of the objective (adapters, stateful losses) join the optimizer and are saved in every
checkpoint as `objective.safetensors`. Each term's value is logged beside the Trainer's `loss`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from still.integrations.causal_lm import CausalLMTeacher, lm_head_outputs
from still.objective import Objective
from still.teachers.base import LiveTeacher, Teacher

LM_HEAD = "<lm_head>"
OBJECTIVE_FILE = "objective.safetensors"


def _trainer_base() -> type:
    from transformers import Trainer

    return Trainer


def _as_teacher(teacher: Any, views: Mapping[str, str] | None) -> Teacher:
    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, nn.Module):
        if hasattr(teacher, "get_output_embeddings") and teacher.get_output_embeddings() is not None:
            return CausalLMTeacher(teacher)
        return LiveTeacher(teacher, dict(views or {"logits": ""}))
    raise TypeError(f"DistillTrainer: teacher must be a still Teacher or an nn.Module, not {type(teacher).__name__}")


def student_views_of(model: nn.Module, batch: Mapping[str, Any], views: Mapping[str, str]) -> dict[str, Any]:
    """The student's views for a batch: `LM_HEAD` taps give `LMHeadOutputs`; other taps run one forward."""
    from still.taps import forward_with_views

    out: dict[str, Any] = {}
    fused = [n for n, s in views.items() if s == LM_HEAD]
    other = {n: s for n, s in views.items() if s != LM_HEAD}
    if fused:
        h = lm_head_outputs(model, batch)
        out.update({n: h for n in fused})
    if other:
        _, v = forward_with_views(model, batch, other)
        out.update(v)
    return out


class _DistillMixin:
    """The still part of `DistillTrainer` (kept separate so transformers is imported lazily)."""

    def _still_init(self, teacher: Any, objective: Objective | None, method: str | None,
                    method_params: Mapping[str, Any] | None, student_views: Mapping[str, str] | None,
                    teacher_views: Mapping[str, str] | None) -> None:
        from still.methods.base import build_method

        if objective is None:
            spec = build_method(method or "lm_kd", **dict(method_params or {}))
            objective = spec.objective()
            student_views = student_views or spec.student_views
            teacher_views = teacher_views or spec.teacher_views
        self.objective = objective
        self.student_view_specs = dict(student_views or {n: LM_HEAD for n in objective.student_views()})
        missing = [n for n in objective.student_views() if n not in self.student_view_specs]
        if missing:
            raise KeyError(f"DistillTrainer: no tap for student view(s) {missing}; pass student_views")
        self.teacher = _as_teacher(teacher, teacher_views)
        self._term_sums: dict[str, float] = {}
        self._term_count = 0

    # -- loss -----------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        max_steps = max(int(getattr(self.state, "max_steps", 0) or 0), 1)
        step = int(self.state.global_step)
        if model.training and step != getattr(self, "_still_last_step", None):
            # the Trainer zeroes only the model's grads after each optimizer step: clear the objective's
            # (adapters, stateful losses) at the first micro-batch of every step, or they would accumulate
            self.objective.zero_grad(set_to_none=True)
            self._still_last_step = step
        self.objective.set_progress(step, max_steps)
        self.objective.to(next(model.parameters()).device)
        s_views = student_views_of(model, inputs, self.student_view_specs)
        names = self.objective.teacher_views()
        t_views = self.teacher.views(inputs, names) if names else {}
        out = self.objective(s_views, t_views, inputs)
        if model.training:
            for k, v in out.items():
                if k != "total":
                    self._term_sums[k] = self._term_sums.get(k, 0.0) + float(v.detach())
            self._term_count += 1
        return (out["total"], out) if return_outputs else out["total"]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._term_count and "loss" in logs:
            for k, v in self._term_sums.items():
                logs[f"still/{k}"] = v / self._term_count
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # -- optimizer: the objective's own parameters train with the student -----------------------------
    def _materialise_objective(self) -> None:
        """One batch through student, teacher and `objective.validate` (as still's engine does), so lazy
        adapters exist before the optimizer is built and shape errors surface before any training."""
        ds = getattr(self, "train_dataset", None)
        if ds is None or getattr(self, "_still_validated", False):
            return
        batch = self.data_collator([ds[i] for i in range(min(2, len(ds)))])
        batch = self._prepare_inputs(batch)
        # fork_rng: the pass (and the adapters' init) must not shift the Trainer's RNG stream, so a resumed run
        # (where it happens at another point) sees the same data order and dropout as an uninterrupted one
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            s_views = student_views_of(self.model, batch, self.student_view_specs)
            names = self.objective.teacher_views()
            t_views = self.teacher.views(batch, names) if names else {}
            self.objective.to(next(self.model.parameters()).device)
            self.objective.validate(s_views, t_views, batch)
        self._still_validated = True

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        self._materialise_objective()
        opt = super().create_optimizer(*([model] if model is not None else []))  # type: ignore[misc]
        extra = [p for p in self.objective.parameters() if p.requires_grad]
        if extra and not getattr(self, "_still_group_added", False):
            opt.add_param_group({"params": extra, "weight_decay": 0.0})
            self._still_group_added = True
        return opt

    # -- checkpoints ----------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        sd = {k: v.detach().cpu().contiguous() for k, v in self.objective.state_dict().items()}
        if sd:
            from safetensors.torch import save_file

            save_file(sd, os.path.join(output_dir or self.args.output_dir, OBJECTIVE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        self._materialise_objective()  # lazy adapters must exist before their weights are loaded
        path = os.path.join(resume_from_checkpoint, OBJECTIVE_FILE)
        if os.path.exists(path):
            from safetensors.torch import load_file

            missing, unexpected = self.objective.load_state_dict(load_file(path), strict=False)
            if unexpected:
                raise KeyError(f"{path}: objective weights {unexpected} do not match this objective")


def DistillTrainer(*args: Any, teacher: Any, objective: Objective | None = None, method: str | None = None,
                   method_params: Mapping[str, Any] | None = None, student_views: Mapping[str, str] | None = None,
                   teacher_views: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
    """A `transformers.Trainer` (subclass instance) whose loss is a still objective with a teacher.

    `*args, **kwargs` go to `transformers.Trainer` (model, args, train_dataset, data_collator, callbacks,
    ...). `objective` (or the terms of `method` with `method_params`; default "lm_kd") is the loss;
    `student_views` maps the objective's student views to taps (`LM_HEAD` for the fused lm-head).
    """
    cls = distill_trainer_class()
    return cls(*args, teacher=teacher, objective=objective, method=method, method_params=method_params,
               student_views=student_views, teacher_views=teacher_views, **kwargs)


_CLASS: type | None = None


def distill_trainer_class() -> type:
    """The `transformers.Trainer` subclass itself (built on first use, so importing still stays light)."""
    global _CLASS
    if _CLASS is None:
        base = _trainer_base()

        def __init__(self: Any, *args: Any, teacher: Any, objective: Objective | None = None, method: str | None = None,
                     method_params: Mapping[str, Any] | None = None, student_views: Mapping[str, str] | None = None,
                     teacher_views: Mapping[str, str] | None = None, **kwargs: Any) -> None:
            self._still_init(teacher, objective, method, method_params, student_views, teacher_views)
            base.__init__(self, *args, **kwargs)

        _CLASS = type("StillDistillTrainer", (_DistillMixin, base), {"__init__": __init__,
                                                                      "__doc__": DistillTrainer.__doc__})
    return _CLASS
