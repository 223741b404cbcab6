"""The student as its own teacher: detached copies of the student's own views.

Self-distillation (MoSE's deep→shallow exits, Born-Again-style last-layer targets) needs no
second model: the teacher signal for a shallow exit is the student's deepest exit, *detached* so
no gradient flows into the "teacher" side. The engine calls a teacher whose
`uses_student_views` is True as `teacher.views(batch, names, student_views=...)` with the views
the student produced on this batch.

>>> teacher = SelfTeacher({"last": "exit3"})         # teacher view "last" = student view "exit3"
>>> teacher.views(batch, ["last"], student_views={"exit3": z})["last"].requires_grad
False
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from still.registry import register_teacher
from still.teachers.base import Teacher


class SelfTeacher(Teacher):
    """Serves teacher view `name` as `student_views[views[name]].detach()`.

    `views`: teacher view name -> student view name (a name mapped to itself if given as a list).
    Tensors are detached (and cloned when `clone=True`, so an in-place op on the student side
    cannot change the target). Nested lists/tuples of tensors are detached element-wise.
    """

    uses_student_views = True

    def __init__(self, views: Mapping[str, str] | Sequence[str], clone: bool = False) -> None:
        self.view_specs = dict(views) if isinstance(views, Mapping) else {n: n for n in views}
        if not self.view_specs:
            raise ValueError("SelfTeacher needs at least one view (teacher name -> student view name)")
        self.clone = clone

    def _detach(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            v = v.detach()
            return v.clone() if self.clone else v
        if isinstance(v, (list, tuple)):
            return type(v)(self._detach(x) for x in v)
        return v

    def views(self, batch: Mapping[str, Any], names: Sequence[str],
              student_views: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        self._check_names(names)
        if student_views is None:
            raise ValueError(
                "SelfTeacher.views needs student_views=... (the student's views on this batch); the engine "
                "passes them to teachers with uses_student_views = True"
            )
        out = {}
        for n in names:
            src = self.view_specs[n]
            if src not in student_views:
                raise KeyError(
                    f"SelfTeacher: teacher view {n!r} copies student view {src!r}, but the student produced "
                    f"{sorted(student_views)}; add {src!r} to the student's views"
                )
            out[n] = self._detach(student_views[src])
        return out

    def fingerprint(self) -> str:
        return "self:" + ",".join(f"{k}={v}" for k, v in sorted(self.view_specs.items()))


@register_teacher("self", paper="")
def self_teacher(views: Mapping[str, str] | Sequence[str], clone: bool = False) -> SelfTeacher:
    """The student as its own teacher: detached copies of named student views."""
    return SelfTeacher(views, clone=clone)


__all__ = ["SelfTeacher"]
