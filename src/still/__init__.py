"""still: knowledge distillation for PyTorch.

Taps capture views of any model by module path; losses are registered plain functions; an
objective is a weighted sum of named terms; teachers (live, cached, mixture, self) share one
interface; the engine, recipes and CLI are thin layers over the same API.
"""

from still.registry import (
    ADAPTERS,
    DATASETS,
    LOSSES,
    METHODS,
    METRICS,
    MODELS,
    SCHEDULES,
    TEACHERS,
    register_adapter,
    register_dataset,
    register_loss,
    register_method,
    register_metric,
    register_model,
    register_schedule,
    register_teacher,
)
from still.taps import Taps, TapSpec, forward_with_views
from still.objective import Objective, Term, build_term
from still.teachers.base import LiveTeacher, Teacher

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS", "DATASETS", "LOSSES", "METHODS", "METRICS", "MODELS", "SCHEDULES", "TEACHERS",
    "register_adapter", "register_dataset", "register_loss", "register_method", "register_metric",
    "register_model", "register_schedule", "register_teacher",
    "Taps", "TapSpec", "forward_with_views", "Objective", "Term", "build_term", "LiveTeacher", "Teacher",
]
