"""Every registered loss that takes a mask, labels with ignore_index or an attention mask: a batch where
nothing counts gives exactly 0 and a finite, zero gradient (never NaN)."""

from __future__ import annotations

import inspect

import pytest
import torch

from still.registry import LOSSES, _ensure_loaded

_ensure_loaded()
MASK_KEYS = ("mask", "attention_mask", "kd_mask")
LABEL_KEYS = ("labels", "target")


def _maskable() -> list[str]:
    out = []
    for e in LOSSES.entries():
        ps = dict(e.parameters())
        if e.is_class and hasattr(e.obj, "forward"):
            ps.update(inspect.signature(e.obj.forward).parameters)
        if any(k in ps for k in MASK_KEYS) or ("ignore_index" in ps and any(k in ps for k in LABEL_KEYS)):
            out.append(e.name)
    return sorted(out)


def _leaves(x, acc):
    if isinstance(x, torch.Tensor):
        if x.requires_grad and x.is_leaf:
            acc.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _leaves(y, acc)
    elif isinstance(x, dict):
        for y in x.values():
            _leaves(y, acc)
    elif hasattr(x, "_fields"):  # NamedTuple views (LMHeadOutputs)
        for y in x:
            _leaves(y, acc)
    return acc


def _signature(fn):
    return inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn)


@pytest.mark.parametrize("name", _maskable())
def test_all_masked_batch_is_zero_with_zero_gradient(name):
    entry = LOSSES.entry(name)
    args, kwargs = entry.meta["example"]()
    fn = LOSSES.build(name)
    sig = _signature(fn)
    ba = sig.bind_partial(*args, **kwargs)
    a = ba.arguments
    init = entry.parameters()
    ign = a.get("ignore_index", getattr(fn, "ignore_index", None))
    if ign is None:
        p = sig.parameters.get("ignore_index") or init.get("ignore_index")
        ign = p.default if p is not None else None
    done = False
    for k in MASK_KEYS:
        if isinstance(a.get(k), torch.Tensor):
            a[k], done = torch.zeros_like(a[k]), True
    if ign is not None:
        for k in LABEL_KEYS:
            if isinstance(a.get(k), torch.Tensor) and not a[k].is_floating_point():
                a[k], done = torch.full_like(a[k], ign), True
    student = next(iter(a.values()))
    for k in MASK_KEYS:
        if not done and k in sig.parameters and isinstance(student, torch.Tensor):
            a[k], done = torch.zeros(student.shape[:-1], dtype=torch.bool), True
    if not done:
        pytest.skip(f"{name}: its example carries nothing to mask")
    leaves = _leaves((ba.args, ba.kwargs), [])
    if not leaves and isinstance(student, torch.Tensor) and student.is_floating_point():
        a[next(iter(a))] = student = student.detach().requires_grad_()
        leaves = [student]
    out = fn(*ba.args, **ba.kwargs)
    assert torch.isfinite(out).all() and float(out.detach()) == 0.0, f"{name}: {out}"
    if leaves and out.requires_grad:
        for g in torch.autograd.grad(out, leaves, allow_unused=True):
            assert g is None or (torch.isfinite(g).all() and float(g.abs().sum()) == 0.0), name
