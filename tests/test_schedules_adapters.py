"""Schedules at known steps, and the adapters' output shapes and lazy construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from still.adapters import Conv1x1Adapter, Identity, LinearAdapter, MLPAdapter, build_adapter
from still.registry import ADAPTERS, SCHEDULES
from still.schedules import build_schedule


def _at(spec: dict | str, steps: list[int], total: int = 100) -> list[float]:
    sched = build_schedule(spec)
    return [sched(s, total) for s in steps]


def test_constant() -> None:
    assert _at("constant", [0, 50, 100]) == [1.0, 1.0, 1.0]
    assert _at({"name": "constant", "value": 0.3}, [0, 7, 1000]) == [0.3, 0.3, 0.3]


def test_linear() -> None:
    assert _at("linear", [0, 25, 50, 100, 150]) == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    spec = {"name": "linear", "start": 0.0, "end": 2.0, "begin": 10, "until": 30}
    assert _at(spec, [0, 10, 20, 30, 99]) == pytest.approx([0.0, 0.0, 1.0, 2.0, 2.0])


def test_cosine() -> None:
    got = _at("cosine", [0, 25, 50, 75, 100])
    ref = [0.5 * (1 + math.cos(math.pi * f)) for f in (0, 0.25, 0.5, 0.75, 1.0)]
    assert got == pytest.approx(ref)
    assert got[1] == pytest.approx(0.8535534, abs=1e-6)
    spec = {"name": "cosine", "start": 0.1, "end": 1.0, "begin": 20, "until": 40}
    assert _at(spec, [0, 20, 30, 40, 80]) == pytest.approx([0.1, 0.1, 0.55, 1.0, 1.0])


def test_step() -> None:
    assert _at("step", [0, 49, 50, 99]) == pytest.approx([1.0, 1.0, 0.1, 0.1])
    spec = {"name": "step", "milestones": [30, 60], "gamma": 0.5, "value": 2.0}
    assert _at(spec, [0, 29, 30, 59, 60, 500]) == pytest.approx([2.0, 2.0, 1.0, 1.0, 0.5, 0.5])
    frac = {"name": "step", "milestones": [0.25, 0.75], "gamma": 0.1}
    assert _at(frac, [24, 25, 74, 75], total=100) == pytest.approx([1.0, 0.1, 0.1, 0.01])
    assert _at(frac, [49, 50], total=200) == pytest.approx([1.0, 0.1])


def test_warmup() -> None:
    assert _at("warmup", [0, 5, 10, 50]) == pytest.approx([0.0, 0.5, 1.0, 1.0])  # 10 % of 100 steps
    assert _at({"name": "warmup", "steps": 20, "value": 3.0}, [0, 10, 20, 21]) == pytest.approx([0.0, 1.5, 3.0, 3.0])
    assert _at({"name": "warmup", "steps": 0}, [0, 1]) == [1.0, 1.0]


def test_build_schedule_forms() -> None:
    assert build_schedule(None) is None

    def fn(step: int, total: int) -> float:
        return step / total

    assert build_schedule(fn) is fn
    with pytest.raises(KeyError, match="did you mean 'cosine'"):
        build_schedule("cosin")
    with pytest.raises(TypeError, match="no parameter"):
        build_schedule({"name": "linear", "slope": 1})
    assert set(SCHEDULES.names()) >= {"constant", "linear", "cosine", "step", "warmup"}


# ----------------------------------------------------------------------------------- adapters
def test_identity() -> None:
    x = torch.randn(2, 3)
    assert build_adapter("identity")(x, torch.randn(2, 9)) is x
    assert isinstance(ADAPTERS.build("identity"), Identity)


@pytest.mark.parametrize("shape,like,out", [((4, 3), (4, 7), (4, 7)), ((2, 5, 3), (2, 5, 8), (2, 5, 8)),
                                            ((1, 1), (1, 1), (1, 1))])
def test_linear_shapes(shape: tuple, like: tuple, out: tuple) -> None:
    ad = LinearAdapter()
    assert not ad.materialized and list(ad.parameters()) == []
    y = ad(torch.randn(*shape), torch.randn(*like))
    assert y.shape == out and ad.materialized
    assert ad.inner.weight.shape == (like[-1], shape[-1])
    assert LinearAdapter(bias=False).build(3, 4).bias is None


def test_mlp_shapes_and_hidden() -> None:
    ad = build_adapter({"name": "mlp", "hidden_mult": 1.5})
    assert isinstance(ad, MLPAdapter)
    y = ad(torch.randn(3, 5, 4), torch.randn(3, 5, 6))
    assert y.shape == (3, 5, 6)
    assert ad.inner[0].out_features == 9 and ad.inner[2].out_features == 6


def test_conv1x1_shapes_resize_and_bn() -> None:
    x = torch.randn(2, 3, 8, 8)
    ad = build_adapter("conv1x1")
    assert isinstance(ad, Conv1x1Adapter)
    assert ad(x, torch.randn(2, 5, 4, 4)).shape == (2, 5, 4, 4)  # channels mapped, resized to the teacher's
    assert isinstance(ad.inner[1], nn.BatchNorm2d) and ad.inner[0].bias is None
    keep = Conv1x1Adapter(batchnorm=False, resize=False)
    assert keep(x, torch.randn(2, 6, 4, 4)).shape == (2, 6, 8, 8)
    assert len(keep.inner) == 1 and keep.inner[0].bias is not None
    up = Conv1x1Adapter()
    assert up(torch.randn(2, 3, 3, 5), torch.randn(2, 4, 6, 10)).shape == (2, 4, 6, 10)


def test_adapter_built_once_on_input_dtype_and_trains() -> None:
    ad = LinearAdapter()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    like = torch.randn(4, 2, dtype=torch.float64)
    y = ad(x, like)
    inner = ad.inner
    assert y.dtype == torch.float64 and inner.weight.dtype == torch.float64
    ad(x, like).sum().backward()
    assert ad.inner is inner and inner.weight.grad is not None and x.grad is not None


def test_build_adapter_forms() -> None:
    assert build_adapter(None) is None
    m = nn.Linear(2, 2)
    assert build_adapter(m) is m
    with pytest.raises(KeyError, match="did you mean 'linear'"):
        build_adapter("lineer")
    assert set(ADAPTERS.names()) >= {"identity", "linear", "mlp", "conv1x1"}
