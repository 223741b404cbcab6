"""EMA teacher: an exponential moving average of the student, updated after every optimizer step.

θ_ema ← d·θ_ema + (1 − d)·θ_student after each step (Mean Teacher, BYOL, DINO, DeGLA, FarSLIP).
Buffers (BatchNorm running stats) are copied, not averaged, unless `average_buffers=True`.
With `warmup=True` the decay used at update t is min(d, (1 + t) / (10 + t)) (Tarvainen & Valpola),
so early averages are not dominated by the random init.

The engine calls `after_step(student)` after every optimizer step; views come from the EMA copy
through taps, in `eval()` mode and under `no_grad`, like any live teacher.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from still.registry import register_teacher
from still.taps import TapSpec, forward_with_views, resolve_module, unwrap_model
from still.teachers.base import Teacher, weights_fingerprint


class EMATeacher(Teacher):
    """An EMA copy of `student` serving views by taps.

    `student`: the model being trained (copied once here; pass the unwrapped model or a DDP one).
    `views`: view name -> tap on the (copied) model. `decay` d in [0, 1).
    """

    def __init__(self, student: nn.Module, views: Mapping[str, str | TapSpec], decay: float = 0.99,
                 warmup: bool = False, average_buffers: bool = False, inputs: Any = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMATeacher: decay must be in [0, 1), got {decay}")
        self.model = copy.deepcopy(unwrap_model(student)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.view_specs = {n: TapSpec.parse(s) for n, s in views.items()}
        for s in self.view_specs.values():
            resolve_module(self.model, s.path)
        self.decay, self.warmup, self.average_buffers = float(decay), warmup, average_buffers
        self.inputs = inputs
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.warmup:
            t = self.num_updates
            return min(self.decay, (1.0 + t) / (10.0 + t))
        return self.decay

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        """θ_ema ← d·θ_ema + (1 − d)·θ_student; buffers copied (or averaged)."""
        d = self.current_decay()
        src = unwrap_model(student)
        sp = dict(src.named_parameters())
        for name, p in self.model.named_parameters():
            if name not in sp:
                raise KeyError(f"EMATeacher.after_step: student has no parameter {name!r} (architecture changed?)")
            p.mul_(d).add_(sp[name].detach().to(p.device, p.dtype), alpha=1.0 - d)
        sb = dict(src.named_buffers())
        for name, b in self.model.named_buffers():
            if name not in sb:
                continue
            new = sb[name].detach().to(b.device)
            if self.average_buffers and b.is_floating_point():
                b.mul_(d).add_(new.to(b.dtype), alpha=1.0 - d)
            else:
                b.copy_(new)
        self.num_updates += 1

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        self.model.eval()
        _, v = forward_with_views(self.model, batch, {n: self.view_specs[n] for n in names},
                                  inputs=self.inputs, detach=True)
        return v

    def fingerprint(self) -> str:
        # The EMA weights change every step, so this is recomputed (not cached).
        return f"ema{self.decay}:{weights_fingerprint(self.model)}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """EMA weights (`model.<name>`) + the update count, flat tensors (the engine saves them with safetensors)."""
        sd = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        sd["num_updates"] = torch.tensor(self.num_updates, dtype=torch.long)
        return sd

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        self.num_updates = int(state.get("num_updates", torch.tensor(0)))

    def to(self, device: torch.device | str) -> "EMATeacher":
        self.model.to(device)
        return self


@register_teacher("ema", paper="Tarvainen, Valpola. Mean teachers are better role models (NeurIPS 2017)")
def ema_teacher(student: nn.Module, views: Mapping[str, str], decay: float = 0.99, warmup: bool = False,
                average_buffers: bool = False) -> EMATeacher:
    """An exponential moving average of the student, updated after every optimizer step."""
    return EMATeacher(student, views, decay=decay, warmup=warmup, average_buffers=average_buffers)


__all__ = ["EMATeacher"]
