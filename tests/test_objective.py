"""Objective: weighted sum of named terms, schedules, lazy adapters, and the errors it raises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from still.objective import NonFiniteLossError, Objective, ShapeMismatchError, Term, build_term
from still.registry import LOSSES

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
B, C = 4, 5


def _data(seed: int = 0) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    s = {"logits": torch.randn(B, C, generator=g, requires_grad=True),
         "feat": torch.randn(B, 3, requires_grad=True, generator=g)}
    t = {"logits": torch.randn(B, C, generator=g), "feat": torch.randn(B, 6, generator=g)}
    batch = {"y": torch.randint(0, C, (B,), generator=g), "index": torch.arange(B)}
    return s, t, batch


def test_weighted_sum_and_terms_by_name() -> None:
    s, t, batch = _data()
    obj = Objective([
        Term("kd", LOSSES.build("kd", temperature=2.0), student="logits", teacher="logits", weight=0.7),
        Term("ce", LOSSES.build("ce"), student="logits", target="y", weight=0.3),
        Term("off", LOSSES.build("kd"), student="logits", teacher="logits", weight=0.0),
    ])
    out = obj(s, t, batch)
    kd = LOSSES.get("kd")(s["logits"], t["logits"], temperature=2.0)
    ce = F.cross_entropy(s["logits"], batch["y"])
    assert set(out) == {"kd", "ce", "off", "total"}
    torch.testing.assert_close(out["kd"], kd)  # unweighted values by name
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["total"], 0.7 * kd + 0.3 * ce)  # a zero-weight term is reported, not summed
    assert obj.weights() == {"kd": 0.7, "ce": 0.3, "off": 0.0}
    out["total"].backward()
    assert s["logits"].grad is not None
    assert obj.student_views() == ["logits"] and obj.teacher_views() == ["logits"] and obj.batch_keys() == ["y"]


def test_batch_inputs_reach_the_loss() -> None:
    s, t, batch = _data()
    obj = Objective([build_term({"loss": "dkd", "student": "logits", "teacher": "logits", "inputs": {"labels": "y"}})])
    out = obj(s, t, batch)
    torch.testing.assert_close(out["dkd"], LOSSES.get("dkd")(s["logits"], t["logits"], batch["y"]))
    assert obj.batch_keys() == ["y"]


def test_schedules_are_applied_per_step() -> None:
    s, t, batch = _data()
    obj = Objective([
        Term("kd", LOSSES.build("kd"), student="logits", teacher="logits", weight=2.0,
             schedule={"name": "linear", "start": 1.0, "end": 0.0}),
        Term("ce", LOSSES.build("ce"), student="logits", target="y", schedule="warmup"),
    ])
    kd = LOSSES.get("kd")(s["logits"], t["logits"])
    ce = F.cross_entropy(s["logits"], batch["y"])
    obj.set_progress(0, 100)
    assert obj.weights() == {"kd": 2.0, "ce": 0.0}
    torch.testing.assert_close(obj(s, t, batch)["total"], 2.0 * kd)
    obj.set_progress(25, 100)
    assert obj.weights() == pytest.approx({"kd": 1.5, "ce": 1.0})
    out = obj(s, t, batch, step=75)  # step= also moves the schedule
    assert obj.weights() == pytest.approx({"kd": 0.5, "ce": 1.0})
    torch.testing.assert_close(out["total"], 0.5 * kd + ce)


def test_lazy_adapters_created_by_validate_and_trained() -> None:
    s, t, batch = _data()
    obj = Objective([
        Term("hint", LOSSES.build("fitnets"), student="feat", teacher="feat", adapter="linear", weight=1.0),
        Term("mlp", LOSSES.build("fitnets"), student="feat", teacher="feat",
             adapter={"name": "mlp", "hidden_mult": 1.0}, weight=0.5),
    ])
    assert list(obj.parameters()) == []  # nothing built before a batch is seen
    obj.validate(s, t, batch)
    ad = obj.adapters["hint"]
    assert ad.materialized and ad.inner.weight.shape == (6, 3)
    assert obj.adapters["mlp"].inner[0].weight.shape == (6, 3)  # hidden = 1.0 * 6
    params = list(obj.parameters())
    assert params, "adapter parameters are registered on the objective"
    opt = torch.optim.SGD(params, lr=0.1)
    before = ad.inner.weight.detach().clone()
    out = obj(s, t, batch)
    out["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    assert not torch.equal(before, ad.inner.weight)
    assert "adapters.hint.inner.weight" in obj.state_dict()


def test_list_views_get_one_adapter_each() -> None:
    g = torch.Generator().manual_seed(0)
    s = {"a": torch.randn(B, 2, generator=g), "b": torch.randn(B, 3, generator=g)}
    t = {"a": torch.randn(B, 4, generator=g), "b": torch.randn(B, 7, generator=g)}

    def summed(xs: list, ys: list) -> torch.Tensor:
        return sum(F.mse_loss(x, y) for x, y in zip(xs, ys))

    obj = Objective([Term("multi", summed, student=["a", "b"], teacher=["a", "b"], adapter="linear")])
    obj.validate(s, t, {})
    assert [m.inner.out_features for m in obj.adapters["multi"]] == [4, 7]
    assert math.isfinite(float(obj(s, t, {})["total"]))


def test_shape_mismatch_names_term_and_shapes() -> None:
    s, t, batch = _data()
    obj = Objective([Term("hint", LOSSES.build("fitnets"), student="feat", teacher="feat")])
    with pytest.raises(ShapeMismatchError) as err:
        obj.validate(s, t, batch)
    msg = str(err.value)
    assert "'hint'" in msg and "(4, 3)" in msg and "(4, 6)" in msg and "adapter" in msg
    # a "batch" loss (from the registry's shape_check) accepts differing feature dims
    ok = Objective([Term("rkd", LOSSES.build("rkd"), student="feat", teacher="feat")])
    ok.validate(s, t, batch)
    bad_batch = {"feat": torch.randn(B + 1, 6)}
    with pytest.raises(ShapeMismatchError, match="'rkd'.*\\(5, 6\\)"):
        ok.validate(s, bad_batch, batch)
    # a term can override the check
    Objective([Term("x", lambda a, b: (a.sum() - b.sum()) ** 2, student="feat", teacher="feat",
                    shape_check="none")]).validate(s, t, batch)


def test_duplicate_and_reserved_names_rejected() -> None:
    kd = LOSSES.build("kd")
    with pytest.raises(ValueError, match="duplicate term names: \\['kd'\\]"):
        Objective([Term("kd", kd, "logits", "logits"), Term("kd", kd, "logits", "logits")])
    with pytest.raises(ValueError, match="reserved"):
        Objective([Term("total", kd, "logits", "logits")])
    with pytest.raises(ValueError, match="either a teacher view or a target"):
        Term("both", kd, student="logits", teacher="logits", target="y")


def test_missing_view_and_batch_key_errors() -> None:
    s, t, batch = _data()
    obj = Objective([Term("kd", LOSSES.build("kd"), student="logits", teacher="soft")])
    with pytest.raises(KeyError, match="'kd' needs teacher view\\(s\\) \\['soft'\\].*\\['feat', 'logits'\\]"):
        obj(s, t, batch)
    obj = Objective([Term("kd", LOSSES.build("kd"), student="lgts", teacher="logits")])
    with pytest.raises(KeyError, match="student view\\(s\\) \\['lgts'\\]"):
        obj(s, t, batch)
    obj = Objective([Term("ce", LOSSES.build("ce"), student="logits", target="label")])
    with pytest.raises(KeyError, match="'ce' needs batch key 'label'.*\\['index', 'y'\\]"):
        obj(s, t, batch)
    obj = Objective([Term("dkd", LOSSES.build("dkd"), student="logits", teacher="logits", inputs={"labels": "lbl"})])
    with pytest.raises(KeyError, match="'dkd' needs batch key 'lbl'"):
        obj(s, t, batch)


def test_stateful_loss_gets_progress_and_trains() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))
            self.seen: tuple[int, int] | None = None

        def set_progress(self, step: int, total: int) -> None:
            self.seen = (step, total)

        def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.scale * F.mse_loss(s, t)

    s, t, batch = _data()
    loss = Scaled()
    obj = Objective([Term("sc", loss, student="logits", teacher="logits")])
    obj.set_progress(7, 10)
    assert loss.seen == (7, 10)
    obj(s, t, batch)["total"].backward()
    assert loss.scale.grad is not None and list(obj.parameters()) == [loss.scale]


def test_check_finite_names_the_term() -> None:
    Objective.check_finite({"a": torch.tensor(1.0), "total": torch.tensor(float("nan"))}, step=3)
    with pytest.raises(NonFiniteLossError, match="'hint' is nan at step 12"):
        Objective.check_finite({"a": torch.tensor(1.0), "hint": torch.tensor(float("nan"))}, step=12)
    with pytest.raises(NonFiniteLossError, match="'kd' is inf"):
        Objective.check_finite({"kd": torch.tensor(float("inf"))}, step=0)


def test_build_term_from_dict_and_unknown_names() -> None:
    t = build_term({"loss": "kd", "params": {"temperature": 3.0}, "student": "logits", "teacher": "logits",
                    "weight": 0.5, "schedule": {"name": "cosine"}})
    assert t.name == "kd" and t.weight == 0.5 and t.loss.keywords == {"temperature": 3.0}
    assert t.schedule(0, 10) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="did you mean 'kd'"):
        build_term({"loss": "kdd", "student": "logits", "teacher": "logits"})
    with pytest.raises(TypeError, match="no parameter\\(s\\) 'temp'.*temperature"):
        build_term({"loss": "kd", "params": {"temp": 3.0}, "student": "logits", "teacher": "logits"})
