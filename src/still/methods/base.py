"""Methods: named presets that compose terms (and, where a paper needs it, a teacher wrapper).

A method is a registered function `(**params) -> MethodSpec`:

>>> @register_method("kd", paper="Hinton et al. 2015")
... def kd(temperature: float = 4.0, alpha: float = 0.9) -> MethodSpec:
...     return MethodSpec(terms=[
...         {"name": "kd", "loss": "kd", "params": {"temperature": temperature},
...          "student": "logits", "teacher": "logits", "weight": alpha},
...         {"name": "ce", "loss": "ce", "student": "logits", "target": "y", "weight": 1 - alpha}])

Terms name *views*; recipes map view names to taps (`student: {views: {logits: ""}}`), so a
method never hard-codes a module path. Terms are dicts as in recipes (see `build_term`) or `Term`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from still.objective import Objective, Term, build_term


@dataclass
class MethodSpec:
    """What a method contributes to a run."""

    terms: list[Term | dict[str, Any]]
    #: default taps for views the terms use, if the recipe does not give them ({"logits": ""})
    student_views: dict[str, str] = field(default_factory=dict)
    teacher_views: dict[str, str] = field(default_factory=dict)
    #: optional `(teacher, student) -> teacher` (e.g. a mixture, an EMA or a self-teacher)
    wrap_teacher: Callable[..., Any] | None = None
    #: optional `(teacher, student, train_data) -> None`, called once after the teacher is built and
    #: before training (e.g. LELP fits its pseudo-subclass projections on the teacher's embeddings)
    prepare: Callable[..., Any] | None = None
    #: extra notes shown by `still list methods`
    notes: str = ""

    def build_terms(self) -> list[Term]:
        return [t if isinstance(t, Term) else build_term(t) for t in self.terms]

    def objective(self) -> Objective:
        return Objective(self.build_terms())


def build_method(name: str, **params: Any) -> MethodSpec:
    """The MethodSpec of the registered method `name` with `params` (unknown params are an error)."""
    from still.registry import METHODS

    return METHODS.build(name, **params)
