"""One automatic test over every entry of every registry (parametrized at collection time).

What each kind must satisfy:

- every entry: a non-empty one-line description and a callable registered object;
- losses: a `paper=` or description, an `example=` (zero-arg function returning `(args, kwargs)`);
  `LOSSES.build(name)(*args, **kwargs)` is a finite scalar whose backward gives finite gradients that
  reach at least one input or parameter (if no example tensor requires grad, the floating tensors of
  the first argument, the student, are made to). A loss without an `example` fails here, by name;
- schedules: built with defaults, finite floats for steps 0..100 of a 100-step run;
- adapters: built with defaults, map their `example` (or a standard token or feature-map pair) onto the
  shape of `like`, with finite gradients;
- methods: `build_method(name)` with defaults (or the kwargs of their `example`) gives a `MethodSpec`
  whose terms build into an `Objective`;
- datasets, models, teachers, metrics (and any registry added later): description and callable; where
  the entry gives an `example`, the registered object is called on it and must return something.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from still.registry import REGISTRIES, Entry

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _all_entries() -> list[Any]:
    params = []
    for kind, reg in REGISTRIES.items():
        for e in reg.entries():
            params.append(pytest.param(kind, e, id=f"{kind}:{e.name}"))
    return params


ENTRIES = _all_entries()


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _example(kind: str, e: Entry) -> tuple[tuple, dict]:
    ex = e.meta.get("example")
    if ex is None:
        pytest.fail(f"{kind} {e.name!r} ({e.obj.__module__}) has no example=: register it with "
                    "example=<zero-arg function returning (args, kwargs)>")
    out = ex()
    assert isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict), (
        f"{kind} {e.name!r}: example() must return (args: tuple, kwargs: dict), got {type(out).__name__}")
    return tuple(out[0]), out[1]


def _check_grads(what: str, value: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    assert value.requires_grad, f"{what}: the value has no gradient (no example input or parameter reaches it)"
    value.backward()
    with_grad = [t for t in leaves if t.grad is not None]
    assert with_grad, f"{what}: backward reached none of the example's inputs or parameters"
    for t in with_grad:
        assert torch.isfinite(t.grad).all(), f"{what}: non-finite gradient of shape {tuple(t.shape)}"


def check_loss(e: Entry) -> None:
    from still.registry import LOSSES

    assert e.paper or e.description, f"loss {e.name!r} needs paper= or a docstring"
    args, kwargs = _example("loss", e)
    if not any(t.requires_grad for t in _tensors((args, kwargs))) and args:
        # the example did not mark the student: differentiate w.r.t. its floating tensors
        for t in _tensors(args[0]):
            if t.is_floating_point() and t.is_leaf:
                t.requires_grad_(True)
    torch.manual_seed(0)
    fn = LOSSES.build(e.name)
    value = fn(*args, **kwargs)
    assert isinstance(value, torch.Tensor) and value.dim() == 0, (
        f"loss {e.name!r} must return a scalar tensor, got "
        f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    assert math.isfinite(float(value.detach())), f"loss {e.name!r} is {float(value)} on its example"
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad and t.is_leaf]
    if isinstance(fn, nn.Module):
        leaves += [p for p in fn.parameters() if p.requires_grad]
    _check_grads(f"loss {e.name!r}", value, leaves)
    sc = e.meta.get("shape_check", "same")
    assert sc in ("same", "batch", "none"), f"loss {e.name!r}: shape_check={sc!r}"


def check_schedule(e: Entry) -> None:
    from still.registry import SCHEDULES

    sched = SCHEDULES.build(e.name)
    for step in range(101):
        v = sched(step, 100)
        assert isinstance(v, (float, int)) and math.isfinite(v), f"schedule {e.name!r} gives {v!r} at step {step}"


def check_adapter(e: Entry) -> None:
    from still.registry import ADAPTERS

    if "example" in e.meta:
        candidates = [_example("adapter", e)]
    else:
        g = torch.Generator().manual_seed(0)
        candidates = [((torch.randn(2, 5, 3, generator=g, requires_grad=True), torch.randn(2, 5, 6, generator=g)), {}),
                      ((torch.randn(2, 3, 4, 4, generator=g, requires_grad=True), torch.randn(2, 6, 2, 2, generator=g)), {})]
    errors = []
    for args, kwargs in candidates:
        ad = ADAPTERS.build(e.name)
        try:
            y = ad(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - try the next standard shape
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        like = args[1] if len(args) > 1 else kwargs.get("like")
        if e.name != "identity" and isinstance(like, torch.Tensor):
            assert y.shape == like.shape, f"adapter {e.name!r} maps to {tuple(y.shape)}, teacher is {tuple(like.shape)}"
        assert torch.isfinite(y).all()
        leaves = [t for t in _tensors(args) if t.requires_grad] + list(ad.parameters())
        _check_grads(f"adapter {e.name!r}", y.float().pow(2).mean(), leaves)
        return
    pytest.fail(f"adapter {e.name!r} maps none of its examples: {errors}")


def check_method(e: Entry) -> None:
    from still.methods.base import MethodSpec, build_method
    from still.objective import Objective, Term

    kwargs = _example("method", e)[1] if "example" in e.meta else {}
    spec = build_method(e.name, **kwargs)
    assert isinstance(spec, MethodSpec), f"method {e.name!r} returned {type(spec).__name__}, not a MethodSpec"
    terms = spec.build_terms()
    assert terms and all(isinstance(t, Term) for t in terms), f"method {e.name!r} has no terms"
    obj = Objective(terms)
    assert obj.student_views(), f"method {e.name!r} reads no student view"


def check_generic(kind: str, e: Entry) -> None:
    if "example" in e.meta:
        args, kwargs = _example(kind, e)
        out = e.obj(*args, **kwargs)
        assert out is not None, f"{kind} {e.name!r} returned None on its example"


CHECKS = {"losses": check_loss, "schedules": check_schedule, "adapters": check_adapter, "methods": check_method}


@pytest.mark.parametrize("kind,entry", ENTRIES)
def test_registry_entry(kind: str, entry: Entry) -> None:
    assert entry.description.strip(), f"{kind} {entry.name!r} has no description (docstring or description=)"
    assert callable(entry.obj), f"{kind} {entry.name!r} is not callable"
    check = CHECKS.get(kind)
    if check is None:
        check_generic(kind, entry)
    else:
        check(entry)


def test_every_registry_is_populated() -> None:
    for kind in ("losses", "methods", "adapters", "schedules"):
        assert len(REGISTRIES[kind]) > 0, f"registry {kind} is empty"
    assert {"kd", "ce", "dkd", "fitnets", "at", "rkd", "sp", "pkt", "crd", "dist", "logit_std"} <= set(
        REGISTRIES["losses"].names())


def test_missing_example_fails_loudly() -> None:
    """The check above must fail, by name, for a loss registered without an example."""
    from still.registry import Registry

    reg = Registry("loss")

    @reg.register("no_example_loss", paper="x")
    def no_example_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """A loss without an example."""
        return (a - b).pow(2).mean()

    with pytest.raises(pytest.fail.Exception, match="'no_example_loss'.*no example="):
        _example("loss", reg._entries["no_example_loss"])
