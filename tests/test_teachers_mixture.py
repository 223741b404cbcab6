"""Teachers beyond a live model: self-teacher, EMA teacher, mixtures, MST-Distill masked teachers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from still.registry import TEACHERS
from still.taps import forward_with_views
from still.teachers.base import LiveTeacher
from still.teachers.ema import EMATeacher
from still.teachers.mixture import (MaskedTeacher, MaskNet1d, MaskNet2d, MixtureTeacher, confidence_weights,
                                    fit_masknets, specialised_teachers)
from still.teachers.self_teacher import SelfTeacher

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (the shared fixture is in conftest.py)."""


def _mlp(seed: int, d_in: int = 6, h: int = 8, c: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, c))


def _batch(b: int = 5, d_in: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, d_in, generator=g), "y": torch.randint(0, 4, (b,), generator=g)}


# ---------------------------------------------------------------------------- self-teacher
def test_self_teacher_views_are_detached_copies() -> None:
    model = _mlp(0)
    batch = _batch()
    _, sv = forward_with_views(model, batch, {"hid": "1", "logits": ""})
    t = SelfTeacher({"last": "logits", "h": "hid"})
    assert t.uses_student_views
    tv = t.views(batch, ["last", "h"], student_views=sv)
    assert not tv["last"].requires_grad and sv["logits"].requires_grad
    torch.testing.assert_close(tv["last"], sv["logits"].detach())
    # no gradient flows into the "teacher" side: a loss pulling the student to its own detached
    # copy has the gradient of the student side only
    s = sv["logits"]
    loss = ((s - tv["last"] * 2.0) ** 2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    s2 = model(batch["x"])
    ((s2 - (s2.detach() * 2.0)) ** 2).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad)


def test_self_teacher_clone_and_errors() -> None:
    z = torch.randn(3, 4, requires_grad=True)
    t = SelfTeacher(["logits"], clone=True)
    out = t.views({}, ["logits"], student_views={"logits": z})["logits"]
    assert out.data_ptr() != z.data_ptr()
    with pytest.raises(ValueError, match="student_views"):
        t.views({}, ["logits"])
    with pytest.raises(KeyError, match="add 'logits'"):
        t.views({}, ["logits"], student_views={"other": z})
    with pytest.raises(KeyError, match="serves"):
        t.views({}, ["nope"], student_views={"logits": z})
    assert TEACHERS.build("self", views={"a": "b"}).fingerprint() == "self:a=b"


# ---------------------------------------------------------------------------- EMA teacher
def test_ema_update_maths_and_buffers() -> None:
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = EMATeacher(student, {"logits": ""}, decay=0.9)
    theta0 = {n: p.detach().clone() for n, p in ema.model.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 3))  # moves the BN running stats
    ema.after_step(student)
    for n, p in ema.model.named_parameters():
        expected = 0.9 * theta0[n] + 0.1 * dict(student.named_parameters())[n].detach()
        torch.testing.assert_close(p, expected)
        assert not p.requires_grad
    torch.testing.assert_close(ema.model[1].running_mean, student[1].running_mean)  # copied, not averaged
    assert ema.num_updates == 1
    # a second step compounds: θ2 = d·θ1 + (1-d)·s
    theta1 = {n: p.detach().clone() for n, p in ema.model.named_parameters()}
    ema.after_step(student)
    for n, p in ema.model.named_parameters():
        torch.testing.assert_close(p, 0.9 * theta1[n] + 0.1 * dict(student.named_parameters())[n].detach())


def test_ema_views_warmup_and_state_roundtrip() -> None:
    student = _mlp(1)
    ema = EMATeacher(student, {"logits": "", "hid": "1"}, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)  # (1+0)/(10+0)
    batch = _batch()
    v = ema.views(batch, ["logits", "hid"])
    assert not v["logits"].requires_grad and v["hid"].shape == (5, 8)
    torch.testing.assert_close(v["logits"], student(batch["x"]).detach())  # identical at start
    fp0 = ema.fingerprint()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    ema.after_step(student)
    assert ema.fingerprint() != fp0
    sd = ema.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in sd.values())
    other = EMATeacher(_mlp(2), {"logits": ""})
    other.load_state_dict(sd)
    assert other.num_updates == 1
    torch.testing.assert_close(other.model[0].weight, ema.model[0].weight)
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(student, {"logits": ""}, decay=1.0)


# ---------------------------------------------------------------------------- mixtures
def test_mixture_mean_stack_members() -> None:
    a, b = _mlp(0), _mlp(1)
    mix = MixtureTeacher([LiveTeacher(a, {"logits": ""}), LiveTeacher(b, {"logits": ""})], combine="mean")
    batch = _batch()
    v = mix.views(batch, ["logits", "logits_experts", "logits_1"])
    za, zb = a(batch["x"]).detach(), b(batch["x"]).detach()
    torch.testing.assert_close(v["logits"], (za + zb) / 2)
    torch.testing.assert_close(v["logits_experts"], torch.stack([za, zb], 1))
    torch.testing.assert_close(v["logits_1"], zb)
    assert v["logits_experts"].shape == (5, 2, 4)
    assert mix.fingerprint() != MixtureTeacher([LiveTeacher(b, {"logits": ""}), LiveTeacher(a, {"logits": ""})]
                                               ).fingerprint()


def test_mixture_confidence_weighted_naive() -> None:
    a, b, c = _mlp(0), _mlp(1), _mlp(2)
    members = [LiveTeacher(m, {"logits": "", "hid": "1"}) for m in (a, b, c)]
    mix = MixtureTeacher(members, combine="confidence", temperature=2.0)
    batch = _batch(b=7)
    v = mix.views(batch, ["logits", "hid"])
    zs = [m(batch["x"]).detach() for m in (a, b, c)]
    hs = [m[1](m[0](batch["x"])).detach() for m in (a, b, c)]
    for i in range(7):  # naive, per sample
        conf = [F.softmax(z[i] / 2.0, -1).max() for z in zs]
        w = [x / sum(conf) for x in conf]
        torch.testing.assert_close(v["logits"][i], sum(wi * z[i] for wi, z in zip(w, zs)))
        torch.testing.assert_close(v["hid"][i], sum(wi * h[i] for wi, h in zip(w, hs)))
    w = confidence_weights(torch.stack(zs, 1), 2.0)
    torch.testing.assert_close(w.sum(1), torch.ones(7))


def test_mixture_errors_and_student_views_passthrough() -> None:
    with pytest.raises(ValueError, match="combine"):
        MixtureTeacher([LiveTeacher(_mlp(0), {"logits": ""})], combine="vote")
    with pytest.raises(ValueError, match="share no view"):
        MixtureTeacher([LiveTeacher(_mlp(0), {"a": ""}), LiveTeacher(_mlp(1), {"b": ""})])
    z = torch.randn(5, 4, requires_grad=True)
    live = _mlp(0)
    mix = MixtureTeacher([SelfTeacher({"logits": "logits"}), LiveTeacher(live, {"logits": ""})])
    assert mix.uses_student_views
    v = mix.views(_batch(), ["logits_0"], student_views={"logits": z})
    torch.testing.assert_close(v["logits_0"], z.detach())


# ---------------------------------------------------------------------------- MST masked teachers
def test_masknets_shapes_and_range() -> None:
    m1 = MaskNet1d(12, heads=3)
    assert m1.h == 12 // 6 * 3
    out = m1(torch.randn(4, 12))
    assert out.shape == (4, 12) and bool(((out > 0) & (out < 1)).all())
    m2 = MaskNet2d(6, heads=3)
    assert m2(torch.randn(4, 6, 5, 5)).shape == (4, 6)


def test_masked_teacher_hook_multiplies_layer() -> None:
    model = _mlp(0)
    t = MaskedTeacher(model, {"logits": ""}, layer="1")
    batch = _batch()
    mn = t.materialize(batch)
    with torch.no_grad():
        h = model[1](model[0](batch["x"]))
        expected = model[2](h * mn(h))
    v = t.views(batch, ["logits"])
    torch.testing.assert_close(v["logits"], expected)
    torch.testing.assert_close(model(batch["x"]), model[2](h))  # the hook is gone afterwards
    assert len(model[1]._forward_hooks) == 0


def test_fit_masknets_moves_teacher_toward_student() -> None:
    torch.manual_seed(0)
    teacher, student = _mlp(0), _mlp(5)
    batches = [_batch(b=16, seed=s) for s in range(4)]
    ts = specialised_teachers([teacher], [["1"]])
    ts[0].materialize(batches[0])

    def kl() -> float:
        tot = 0.0
        for b in batches:
            zt = ts[0].views(b, ["logits"])["logits"]
            zs = student(b["x"]).detach()
            tot += float(F.kl_div(F.log_softmax(zt / 4, -1), F.softmax(zs / 4, -1), reduction="batchmean"))
        return tot

    w0 = copy.deepcopy(teacher.state_dict())
    before = kl()
    hist = fit_masknets(ts, student, lambda: batches, epochs=8, lr=2e-2)
    assert kl() < before and hist[-1] < hist[0]
    for k, v in teacher.state_dict().items():  # the teacher's own weights never change
        torch.testing.assert_close(v, w0[k])
    assert not any(p.requires_grad for p in ts[0].masknet.parameters())


def test_masked_mixture_state_roundtrip() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    batch = {"x": torch.randn(2, 1, 4, 4)}
    mix = MixtureTeacher(specialised_teachers([model], [["0", "2"]]), combine="stack")
    for m in mix.members:
        m.materialize(batch)
    sd = mix.state_dict()
    assert sd and all(k.split(".")[0] in ("0", "1") for k in sd)
    other = MixtureTeacher(specialised_teachers([model], [["0", "2"]]), combine="stack")
    other.load_state_dict(sd)  # MaskNets rebuilt from the saved shapes
    assert isinstance(other.members[0].masknet, MaskNet2d) and isinstance(other.members[1].masknet, MaskNet1d)
    torch.testing.assert_close(other.views(batch, ["logits_experts"])["logits_experts"],
                               mix.views(batch, ["logits_experts"])["logits_experts"])


def test_engine_calls_ema_after_step_and_self_teacher() -> None:
    from still.engine import TrainConfig, train
    from still.objective import Objective, Term
    from still.registry import LOSSES

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(6, generator=g), "y": torch.tensor(i % 4), "index": torch.tensor(i)} for i in range(64)]
    student = _mlp(3)
    ema = EMATeacher(student, {"logits": ""}, decay=0.5)
    w0 = ema.model[0].weight.detach().clone()
    obj = Objective([Term("kd", LOSSES.build("kd"), student="logits", teacher="logits"),
                     Term("ce", LOSSES.build("ce"), student="logits", target="y")])
    cfg = TrainConfig(max_steps=5, batch_size=16, lr=1e-2, progress=False, eval_every_epochs=None)
    train(student, obj, data, cfg, teacher=ema, student_views={"logits": ""})
    assert ema.num_updates == 5 and not torch.equal(ema.model[0].weight, w0)
    # the EMA lags the student: strictly between the start and the student's weights
    assert 0 < float((ema.model[0].weight - w0).norm()) < float((student[0].weight.detach() - w0).norm())
    # a self-teacher through the engine: the student views reach views(..., student_views=)
    seen = []

    class Spy(SelfTeacher):
        def views(self, batch, names, student_views=None):
            seen.append(sorted(student_views))
            return super().views(batch, names, student_views=student_views)

    obj2 = Objective([Term("self_kd", LOSSES.build("kd"), student="logits", teacher="last")])
    train(_mlp(4), obj2, data, cfg, teacher=Spy({"last": "logits"}), student_views={"logits": ""})
    assert seen and seen[-1] == ["logits"]
