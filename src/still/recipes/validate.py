"""Deep recipe validation: build the models on CPU, check every tap and view, run one batch.

`validate_recipe(recipe)` catches, before any training: taps that name no module (with the
closest module names), views a term uses that neither side serves, and shape mismatches between
the views a term compares (`Objective.validate` on one real batch of `batch_size` samples).
Models are built untrained (random weights: shapes do not depend on training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from still.recipes.build import (
    build_dataset, build_live_teacher, build_model, build_objective, build_store_teacher,
)
from still.recipes.schema import Recipe, RecipeError


@dataclass
class ValidationReport:
    """What `validate_recipe` checked: view shapes per side and the objective's terms."""

    student_views: dict[str, tuple[int, ...]] = field(default_factory=dict)
    teacher_views: dict[str, tuple[int, ...]] = field(default_factory=dict)
    terms: list[str] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    num_train: int = 0
    num_test: int = 0

    def lines(self) -> list[str]:
        out = [f"data: {self.num_train} train / {self.num_test} test samples"]
        out += [f"student view {k}: {v}" for k, v in self.student_views.items()]
        out += [f"teacher view {k}: {v}" for k, v in self.teacher_views.items()]
        out += [f"term {t}: {self.losses.get(t, float('nan')):.4g} on one batch (untrained models)" for t in self.terms]
        return out


def _check_taps(model: torch.nn.Module, views: dict[str, str], side: str, sources: dict[str, str]) -> None:
    from still.taps import TapError, TapSpec, resolve_module

    for name, tap in views.items():
        where = sources.get(f"{side}.{name}", f"{side}.views.{name}")
        try:
            resolve_module(model, TapSpec.parse(tap).path)
        except TapError as exc:
            raise RecipeError(f"{where}: tap {tap!r}: {exc}") from None


def _shapes(views: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in views.items() if isinstance(v, torch.Tensor)}


def validate_recipe(recipe: Recipe, source: str = "recipe", batch_size: int = 4) -> ValidationReport:
    """Build data, models, teacher and objective of `recipe` cheaply and run one batch; raise RecipeError."""
    from still.objective import ShapeMismatchError
    from still.taps import TapError, forward_with_views

    def fail(msg: str) -> RecipeError:
        return RecipeError(f"{source}: {msg}")

    try:
        train = build_dataset(recipe.data, "train")
        test = build_dataset(recipe.data, recipe.eval.split)
        parts = build_objective(recipe)
        student = build_model(recipe.student.model, "student.model", train)
        _check_taps(student, parts.student_views, "student", parts.sources)
        teacher = None
        need_t = parts.objective.teacher_views()
        if recipe.teacher is not None:
            if recipe.teacher.store is not None:
                teacher = build_store_teacher(recipe, train)
            else:
                t_model = build_model(recipe.teacher.model, "teacher.model", train)
                t_views = {k: v for k, v in parts.teacher_views.items() if k in need_t} or {"logits": ""}
                _check_taps(t_model, t_views, "teacher", parts.sources)
                teacher = build_live_teacher(t_model, recipe.teacher, t_views)
        if parts.wrap_teacher is not None:
            teacher = parts.wrap_teacher(teacher, student)
        if parts.prepare is not None:  # fitted on a few samples here: only shapes matter
            parts.prepare(teacher, student, torch.utils.data.Subset(train, range(min(len(train), 64))))
        if need_t and teacher is None:
            raise RecipeError(f"teacher: the objective's terms use teacher view(s) {need_t} but the recipe has no teacher")
        if teacher is not None:
            served = teacher.available_views() if hasattr(teacher, "available_views") else list(teacher.view_specs)
            missing = [v for v in need_t if v not in served]
            if missing:
                raise RecipeError(
                    f"teacher.views: the objective's terms use teacher view(s) {missing}, but the teacher serves "
                    f"{sorted(served) or 'none'}; add e.g. `teacher: {{views: {{{missing[0]}: <module path>}}}}`"
                )
        n = min(batch_size, len(train))
        if n == 0:
            raise RecipeError("data: the training set is empty")
        batch = next(iter(torch.utils.data.DataLoader(train, batch_size=n, shuffle=False,
                                                      collate_fn=getattr(train, "collate_fn", None))))
        student.train()
        try:
            _, s_views = forward_with_views(student, batch, parts.student_views, inputs=recipe.student.inputs)
        except TapError as exc:
            raise RecipeError(f"student.views: {exc}") from None
        t_out: dict[str, Any] = {}
        if teacher is not None and need_t:
            if getattr(teacher, "uses_student_views", False):
                t_out = teacher.views(batch, need_t, student_views=s_views)
            else:
                t_out = teacher.views(batch, need_t)
        try:
            parts.objective.validate(s_views, t_out, batch)
            with torch.no_grad():
                values = parts.objective(s_views, t_out, batch)
        except ShapeMismatchError as exc:
            raise RecipeError(f"terms: {exc}") from None
        except KeyError as exc:
            raise RecipeError(f"terms: {exc.args[0] if exc.args else exc}") from None
    except RecipeError as exc:
        msg = str(exc)
        raise (exc if msg.startswith(f"{source}:") else fail(msg)) from None
    return ValidationReport(
        student_views=_shapes(s_views), teacher_views=_shapes(t_out),
        terms=[t.name for t in parts.objective.terms],
        losses={k: float(v) for k, v in values.items() if k != "total"},
        num_train=len(train), num_test=len(test),
    )


__all__ = ["validate_recipe", "ValidationReport"]
