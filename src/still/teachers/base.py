"""The teacher interface: every source of teacher signal answers `views(batch, names)`.

A live model, a recorded store, a mixture of teachers, an EMA copy or the student itself all
serve named views (`{"logits": (B, C), "layer3": (B, C, H, W)}`) the same way, so an objective
never knows which one it is talking to.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from still.taps import TapSpec, Taps, call_model, forward_with_views, resolve_module


class Teacher(ABC):
    """Source of teacher views. Subclasses implement `views` and `fingerprint`."""

    #: view name -> tap (for model-backed teachers) or recorded name (for stores)
    view_specs: dict[str, Any]

    @abstractmethod
    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named views for this batch, detached: `{name: tensor}`."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable hash of what determines this teacher's outputs (its weights, its store)."""

    def available_views(self) -> list[str]:
        return sorted(self.view_specs)

    def to(self, device: torch.device | str) -> "Teacher":
        return self

    def _check_names(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.view_specs]
        if missing:
            raise KeyError(
                f"{type(self).__name__} has no view(s) {missing}; it serves {self.available_views()}"
            )


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter and buffer names, shapes, dtypes and values (16 hex chars)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class LiveTeacher(Teacher):
    """A frozen model run on every batch: always `eval()`, no gradients, views taken by taps.

    >>> teacher = LiveTeacher(cnn, {"logits": "", "feat": "features.3"})
    >>> teacher.views(batch, ["logits"])["logits"].shape     # (B, C)
    """

    def __init__(self, model: nn.Module, views: Mapping[str, str | TapSpec], inputs: Any = None) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.view_specs = {n: TapSpec.parse(s) for n, s in views.items()}
        for n, s in self.view_specs.items():
            resolve_module(self.model, s.path)  # unknown taps fail here, not mid-run
        self.inputs = inputs
        self._fp: str | None = None

    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        specs = self.view_specs
        try:
            wanted = {n: specs[n] for n in names}
        except KeyError:
            self._check_names(names)
            raise
        if self.model.training:  # someone called .train() on the wrapped model
            self.model.eval()
        with torch.no_grad():
            _, v = forward_with_views(self.model, batch, wanted, inputs=self.inputs, detach=True)
        return v

    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = weights_fingerprint(self.model)
        return self._fp

    def to(self, device: torch.device | str) -> "LiveTeacher":
        self.model.to(device)
        return self


__all__ = ["Teacher", "LiveTeacher", "weights_fingerprint", "Taps", "call_model"]
