"""A teacher that reads a privileged rewrite of each text: DiSCo's teachers score the LLM-rewritten
query while the student reads the raw conversation (Lupart et al., SIGIR 2025; catalog 1.4).

`RewriteTeacher(inner, rewrites)` answers `views(batch, names)` with `inner.views` of the batch whose
texts were replaced by their rewrites; texts without one pass through unchanged (documents are their
own rewrite). Any text teacher fits as `inner`: an `STTeacher`, a `CallableTeacher`, a `TeacherGroup`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Sequence

import torch

from still.losses.multi_teacher_scores import DISCO_PAPER
from still.registry import register_teacher
from still.teachers.base import Teacher


class RewriteTeacher(Teacher):
    """`inner` on `rewrite(text)` for every text of `batch[text_key]` (a Mapping or a `str -> str` function)."""

    def __init__(self, inner: Teacher, rewrites: Mapping[str, str] | Callable[[str], str], text_key: str = "text"
                 ) -> None:
        self.inner, self.text_key = inner, text_key
        self.rewrites = rewrites
        self.view_specs = dict(inner.view_specs)

    def rewrite(self, texts: Sequence[str]) -> list[str]:
        if callable(self.rewrites):
            return [self.rewrites(t) for t in texts]
        return [self.rewrites.get(t, t) for t in texts]

    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        if self.text_key not in batch:
            raise KeyError(f"RewriteTeacher reads texts from batch[{self.text_key!r}]; the batch has {sorted(batch)}")
        return self.inner.views({**batch, self.text_key: self.rewrite(batch[self.text_key])}, names)

    def fingerprint(self) -> str:
        if callable(self.rewrites):
            what = getattr(self.rewrites, "__qualname__", type(self.rewrites).__name__)
        else:
            what = repr(sorted(self.rewrites.items()))
        return "rewrite:" + self.inner.fingerprint() + ":" + hashlib.sha256(what.encode()).hexdigest()[:16]

    def to(self, device: torch.device | str) -> "RewriteTeacher":
        self.inner.to(device)
        return self


@register_teacher("rewrite", paper=DISCO_PAPER)
def rewrite_teacher(inner: Teacher, rewrites: Mapping[str, str] | Callable[[str], str],
                    text_key: str = "text") -> RewriteTeacher:
    """A text teacher that reads each text's rewrite (DiSCo: the teacher scores the rewritten query)."""
    return RewriteTeacher(inner, rewrites, text_key)


__all__ = ["RewriteTeacher", "DISCO_PAPER"]
