"""Adapters map a student view onto the shape of the teacher view it is compared with.

Each adapter is an `nn.Module` with `forward(x, like)`: `like` is the teacher tensor (only its shape
is read). Layers are built lazily on the first call, so recipes never state channel counts; the
engine runs one batch through the objective before it builds the optimizer, so adapter parameters
train with the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_adapter


class LazyAdapter(nn.Module):
    """Base: builds `self.inner` from (student, teacher) shapes on the first forward."""

    channel_dim: int = -1

    def __init__(self) -> None:
        super().__init__()
        self.inner: nn.Module | None = None

    def build(self, c_in: int, c_out: int) -> nn.Module:
        raise NotImplementedError

    @property
    def materialized(self) -> bool:
        return self.inner is not None

    def _prepare(self, x: torch.Tensor, like: torch.Tensor) -> None:
        if self.inner is None:
            d = self.channel_dim
            self.inner = self.build(x.shape[d], like.shape[d]).to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        self._prepare(x, like)
        assert self.inner is not None
        return self.inner(x)


@register_adapter("identity")
class Identity(nn.Module):
    """No change (the views already agree)."""

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        return x


@register_adapter("linear")
class LinearAdapter(LazyAdapter):
    """A linear map on the last dim: (..., Cs) -> (..., Ct)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.bias = bias

    def build(self, c_in: int, c_out: int) -> nn.Module:
        return nn.Linear(c_in, c_out, bias=self.bias)


@register_adapter("mlp")
class MLPAdapter(LazyAdapter):
    """Linear-GELU-linear on the last dim: (..., Cs) -> (..., Ct); hidden = `hidden_mult * Ct`."""

    def __init__(self, hidden_mult: float = 2.0) -> None:
        super().__init__()
        self.hidden_mult = hidden_mult

    def build(self, c_in: int, c_out: int) -> nn.Module:
        h = max(1, int(round(self.hidden_mult * c_out)))
        return nn.Sequential(nn.Linear(c_in, h), nn.GELU(), nn.Linear(h, c_out))


@register_adapter("conv1x1")
class Conv1x1Adapter(LazyAdapter):
    """1x1 conv (+BN) on channels: (B, Cs, H, W) -> (B, Ct, H', W'); resizes to the teacher's H×W."""

    channel_dim = 1

    def __init__(self, batchnorm: bool = True, resize: bool = True) -> None:
        super().__init__()
        self.batchnorm, self.resize = batchnorm, resize

    def build(self, c_in: int, c_out: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, bias=not self.batchnorm)]
        if self.batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        y = super().forward(x, like)
        if self.resize and y.shape[-2:] != like.shape[-2:]:
            y = F.interpolate(y, size=like.shape[-2:], mode="bilinear", align_corners=False)
        return y


def build_adapter(spec: str | dict | nn.Module | None) -> nn.Module | None:
    """An adapter from a name, `{"name": ..., **params}`, a module, or None."""
    from still.registry import ADAPTERS

    if spec is None or isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        return ADAPTERS.build(spec)
    params = dict(spec)
    return ADAPTERS.build(params.pop("name"), **params)
