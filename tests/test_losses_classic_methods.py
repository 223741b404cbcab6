"""The classic method presets: each builds an objective that runs on real-shaped views and trains."""

from __future__ import annotations

import math

import pytest
import torch

from still.methods.base import build_method
from still.objective import ShapeMismatchError

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
B, C = 6, 5
ZOO = ["kd", "dkd", "fitnets", "at", "rkd", "sp", "pkt", "crd", "dist", "logit_std", "scratch"]
PARAMS = {"crd": {"num_negatives": 32, "num_samples": 40}}


def _views(seed: int = 0) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    student = {"logits": torch.randn(B, C, generator=g, requires_grad=True),
               "feat": torch.randn(B, 3, 4, 4, generator=g, requires_grad=True),
               "embed": torch.randn(B, 7, generator=g, requires_grad=True)}
    teacher = {"logits": torch.randn(B, C, generator=g) * 3, "feat": torch.randn(B, 8, 4, 4, generator=g),
               "embed": torch.randn(B, 11, generator=g)}
    batch = {"y": torch.randint(0, C, (B,), generator=g), "index": torch.randperm(40, generator=g)[:B]}
    return student, teacher, batch


@pytest.mark.parametrize("name", ZOO)
def test_method_objective_runs_and_trains(name: str) -> None:
    spec = build_method(name, **PARAMS.get(name, {}))
    assert spec.student_views.get("logits") == ""
    obj = spec.objective()
    assert "ce" in [t.name for t in obj.terms]
    assert set(obj.student_views()) <= {"logits", "feat", "embed"}
    student, teacher, batch = _views()
    obj.set_progress(50, 100)
    obj.validate(student, teacher, batch)
    out = obj(student, teacher, batch)
    assert set(out) == {t.name for t in obj.terms} | {"total"}
    assert all(math.isfinite(float(v)) for v in out.values())
    out["total"].backward()
    for view in obj.student_views():
        grad = student[view].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, view
    params = list(obj.parameters())
    if name in ("fitnets", "crd"):  # adapter / embedding heads, built lazily, get gradients
        assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params if p.requires_grad)


def test_paper_weights() -> None:
    w = {n: {t.name: t.weight for t in build_method(n).build_terms()} for n in ZOO}
    assert w["kd"] == {"kd": 0.9, "ce": pytest.approx(0.1)}
    assert w["dkd"] == {"dkd": 1.0, "ce": 1.0}
    assert w["fitnets"] == {"hint": 100.0, "ce": 1.0}
    assert w["at"] == {"at": 500.0, "ce": 1.0}
    assert w["sp"] == {"sp": 3000.0, "ce": 1.0}
    assert w["pkt"] == {"pkt": 30000.0, "ce": 1.0}
    assert w["crd"] == {"crd": 0.8, "ce": 1.0}
    assert w["logit_std"] == {"kd": 9.0, "ce": 0.1}
    rkd = build_method("rkd").build_terms()[0]
    assert rkd.loss.keywords == {"distance_weight": 25.0, "angle_weight": 50.0}
    d = build_method("dkd").build_terms()[0]
    assert d.loss.keywords == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0} and d.inputs == {"labels": "y"}


def test_dkd_warmup_schedule() -> None:
    obj = build_method("dkd").objective()
    obj.set_progress(0, 240)
    assert obj.weights()["dkd"] == 0.0
    obj.set_progress(10, 240)
    assert obj.weights()["dkd"] == pytest.approx(0.5)
    obj.set_progress(20, 240)
    assert obj.weights()["dkd"] == pytest.approx(1.0)
    assert build_method("dkd", warmup=0).build_terms()[0].schedule is None


def test_at_several_views_and_fitnets_without_adapter_errors() -> None:
    spec = build_method("at", views=["f1", "f2"])
    t = spec.build_terms()[0]
    assert t.student == ["f1", "f2"] and t.teacher == ["f1", "f2"]
    student, teacher, batch = _views()
    s = {"logits": student["logits"], "f1": torch.randn(B, 2, 8, 8), "f2": torch.randn(B, 3, 4, 4)}
    tv = {"logits": teacher["logits"], "f1": torch.randn(B, 4, 4, 4), "f2": torch.randn(B, 6, 2, 2)}
    assert math.isfinite(float(spec.objective()(s, tv, batch)["total"]))
    bad = build_method("fitnets", adapter=None).objective()
    with pytest.raises(ShapeMismatchError, match="hint"):
        bad.validate(student, teacher, batch)
