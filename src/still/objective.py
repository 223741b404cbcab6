"""The objective: a weighted sum of named terms, usable alone in any training loop.

>>> obj = Objective([
...     Term("kd", LOSSES.build("kd", temperature=4.0), student="logits", teacher="logits", weight=0.9),
...     Term("ce", LOSSES.build("ce"), student="logits", target="y", weight=0.1),
... ])
>>> out = obj(student_views, teacher_views, batch)   # {"kd": ..., "ce": ..., "total": ...}
>>> out["total"].backward()

Each value in the result is the term's *unweighted* loss; `total` is Σ weight·schedule(step)·loss.
`obj.weights()` gives the effective weights at the current step, so a log shows both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from still.registry import LOSSES
from still.schedules import Schedule, build_schedule
from still.adapters import build_adapter

ViewRef = str | Sequence[str] | None


class ShapeMismatchError(ValueError):
    """Two views a term compares have incompatible shapes."""


class NonFiniteLossError(FloatingPointError):
    """A term produced NaN or inf."""


@dataclass
class Term:
    """One named loss term.

    `student`/`teacher` name views (a list of names passes a list of tensors); `target` names a
    batch key instead of a teacher view; `inputs` maps extra loss kwargs to batch keys
    (e.g. `{"labels": "y"}`); `adapter` maps the student view to the teacher's shape.
    `shape_check` is "same" (student and teacher views must match after the adapter), "batch"
    (only the leading dim), or "none".
    """

    name: str
    loss: Callable[..., torch.Tensor]
    student: ViewRef = None
    teacher: ViewRef = None
    target: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    schedule: Schedule | str | dict | None = None
    adapter: nn.Module | str | dict | None = None
    shape_check: str | None = None

    def __post_init__(self) -> None:
        self.schedule = build_schedule(self.schedule)
        if self.teacher is not None and self.target is not None:
            raise ValueError(f"term {self.name!r}: give either a teacher view or a target, not both")


def _as_list(ref: ViewRef) -> list[str]:
    if ref is None:
        return []
    return [ref] if isinstance(ref, str) else list(ref)


def _pick(views: Mapping[str, Any], ref: ViewRef, side: str, term: str) -> Any:
    if type(ref) is str and ref in views:  # the common case, on the hot path
        return views[ref]
    names = _as_list(ref)
    missing = [n for n in names if n not in views]
    if missing:
        raise KeyError(
            f"term {term!r} needs {side} view(s) {missing}, but the {side} gave {sorted(views)}"
        )
    vals = [views[n] for n in names]
    return vals[0] if isinstance(ref, str) else vals


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else [_shape(v) for v in x]


class Objective(nn.Module):
    """Σ_i w_i(step) · loss_i(adapter_i(student[a_i]), teacher[b_i] or batch[target_i], **batch[inputs_i])."""

    def __init__(self, terms: Sequence[Term]) -> None:
        super().__init__()
        names = [t.name for t in terms]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate term names: {sorted(dup)}")
        if "total" in names:
            raise ValueError("'total' is reserved for the sum of the terms")
        self.terms = list(terms)
        # Stateful losses and adapters are submodules, so their parameters train with the student.
        self.losses = nn.ModuleDict({t.name: t.loss for t in terms if isinstance(t.loss, nn.Module)})
        adapters = {}
        for t in self.terms:
            if t.adapter is None:
                continue
            n = len(_as_list(t.student))
            if isinstance(t.student, str) or n == 1:
                adapters[t.name] = build_adapter(t.adapter)
            else:
                adapters[t.name] = nn.ModuleList([build_adapter(t.adapter) for _ in range(n)])
        self.adapters = nn.ModuleDict(adapters)
        self.step = 0
        self.total_steps = 1
        self._validated = False

    # -- what the engine needs to know -------------------------------------------------------
    def student_views(self) -> list[str]:
        return sorted({n for t in self.terms for n in _as_list(t.student)})

    def teacher_views(self) -> list[str]:
        return sorted({n for t in self.terms for n in _as_list(t.teacher)})

    def batch_keys(self) -> list[str]:
        keys = {t.target for t in self.terms if t.target} | {v for t in self.terms for v in t.inputs.values()}
        return sorted(keys)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Tell schedules (and losses that have their own) where training is."""
        # plain attributes: written straight into __dict__, skipping nn.Module.__setattr__ (called every step)
        d = self.__dict__
        d["step"], d["total_steps"] = int(step), max(int(total_steps), 1)
        for m in self._modules["losses"].values():
            if hasattr(m, "set_progress"):
                m.set_progress(d["step"], d["total_steps"])

    def weights(self) -> dict[str, float]:
        """Effective weight of every term at the current step."""
        out = {}
        for t in self.terms:
            s = t.schedule(self.step, self.total_steps) if t.schedule is not None else 1.0
            out[t.name] = float(t.weight) * float(s)
        return out

    # -- the sum ---------------------------------------------------------------------------
    def _adapt(self, t: Term, s: Any, tv: Any) -> Any:
        adapters = self._modules["adapters"]
        if t.name not in adapters:
            return s
        ad = adapters[t.name]
        if isinstance(ad, nn.ModuleList):
            like = tv if isinstance(tv, (list, tuple)) else [tv] * len(s)
            return [a(x, y) for a, x, y in zip(ad, s, like)]
        return ad(s, tv)

    def _check_shapes(self, t: Term, s: Any, tv: Any) -> None:
        mode = t.shape_check
        if mode is None:
            reg = getattr(t.loss, "registry_name", None)
            mode = LOSSES.entry(reg).meta.get("shape_check", "same") if reg in LOSSES else "same"
        if mode == "none" or tv is None:
            return
        pairs = list(zip(s, tv)) if isinstance(s, list) and isinstance(tv, list) else [(s, tv)]
        for a, b in pairs:
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                continue
            ok = a.shape == b.shape if mode == "same" else a.shape[:1] == b.shape[:1]
            if not ok:
                raise ShapeMismatchError(
                    f"term {t.name!r}: student view {t.student!r} has shape {tuple(a.shape)} but teacher view "
                    f"{t.teacher!r} has shape {tuple(b.shape)}"
                    + ("" if t.adapter else "; add an adapter (linear, conv1x1, mlp) to the term")
                )

    def forward(
        self,
        student_views: Mapping[str, Any],
        teacher_views: Mapping[str, Any] | None = None,
        batch: Mapping[str, Any] | None = None,
        step: int | None = None,
    ) -> dict[str, torch.Tensor]:
        if step is not None:
            self.set_progress(step, self.total_steps)
        teacher_views = teacher_views or {}
        batch = batch or {}
        weights = self.weights()
        out: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for t in self.terms:
            s = _pick(student_views, t.student, "student", t.name) if t.student is not None else None
            if t.teacher is not None:
                tv = _pick(teacher_views, t.teacher, "teacher", t.name)
            elif t.target is not None:
                if t.target not in batch:
                    raise KeyError(f"term {t.name!r} needs batch key {t.target!r}; the batch has {sorted(batch)}")
                tv = batch[t.target]
            else:
                tv = None
            extra = {}
            for kw, key in t.inputs.items():
                if key not in batch:
                    raise KeyError(f"term {t.name!r} needs batch key {key!r}; the batch has {sorted(batch)}")
                extra[kw] = batch[key]
            if s is not None and t.teacher is not None:
                s = self._adapt(t, s, tv)
                if not self._validated:
                    self._check_shapes(t, s, tv)
            args = [a for a in (s, tv) if a is not None] if t.teacher is not None or t.target is not None else (
                [s] if s is not None else []
            )
            value = t.loss(*args, **extra)
            out[t.name] = value
            w = weights[t.name]
            if w != 0.0:
                contrib = value * w
                total = contrib if total is None else total + contrib
        if total is None:
            ref = next(iter(out.values()), None)
            total = torch.zeros((), device=ref.device if isinstance(ref, torch.Tensor) else None)
        out["total"] = total
        if not self._validated:
            self.__dict__["_validated"] = True
        return out

    def validate(self, student_views: Mapping[str, Any], teacher_views: Mapping[str, Any], batch: Mapping) -> None:
        """Run once on a real batch: materialises lazy adapters and raises on shape mismatches."""
        self._validated = False
        with torch.no_grad():
            self.forward(student_views, teacher_views, batch)

    @staticmethod
    def check_finite(values: Mapping[str, torch.Tensor], step: int) -> None:
        """Raise NonFiniteLossError naming the first term that is NaN or inf."""
        for name, v in values.items():
            if name == "total":
                continue
            f = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            if not math.isfinite(f):
                raise NonFiniteLossError(f"loss term {name!r} is {f} at step {step}")


def build_term(spec: Mapping[str, Any]) -> Term:
    """A Term from a plain dict, as in a recipe: `{name, loss, params, student, teacher|target, ...}`."""
    spec = dict(spec)
    loss_name = spec.pop("loss")
    params = spec.pop("params", None) or {}
    loss = LOSSES.build(loss_name, **params)
    spec.setdefault("name", loss_name)
    return Term(loss=loss, **spec)
