"""End-to-end mechanism tests of the classification seed methods (issue 6B) through the engine.

DHO with 1 % and 10 % labels (semi-supervised data, the labelled-only CE, the dual heads and the
inference-mix search), LELP's prepare / fit_data path, TRG's dynamic temperature over a real run,
LLaVA-KD's relation term pulling the student's token relations toward the teacher's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from still.engine import TrainConfig, train
from still.methods.base import build_method
from still.registry import DATASETS, LOSSES, MODELS
from still.teachers.base import LiveTeacher


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (the shared fixture is in conftest.py)."""


def _cfg(steps: int, bs: int = 32, lr: float = 3e-3) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=bs, lr=lr, progress=False, eval_every_epochs=None,
                       log_every=10_000, seed=0)


def _fit_ce(model: torch.nn.Module, data, steps: int) -> torch.nn.Module:
    train(model, build_method("scratch").objective(), data, _cfg(steps), teacher=None,
          student_views={"logits": ""})
    return model.eval()


@torch.no_grad()
def _acc(model: torch.nn.Module, data) -> float:
    model.eval()
    return float((model(data.x).argmax(-1) == data.y).float().mean())


# ------------------------------------------------------------------------------------------- DHO
def test_ce_labelled_matches_naive_and_is_zero_without_labels() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=g, requires_grad=True)
    y = torch.tensor([1, -100, 3, 0, -100, 2])
    got = LOSSES.build("ce_labelled")(z, y)
    keep = y != -100
    ref = -(z[keep].log_softmax(-1).gather(1, y[keep, None])).mean()
    assert torch.allclose(got, ref, atol=1e-6)
    g1, = torch.autograd.grad(got, z)
    g2, = torch.autograd.grad(ref, z)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert g1[~keep].abs().max() == 0  # unlabelled rows get no CE gradient
    none = LOSSES.build("ce_labelled")(z, torch.full((6,), -100))
    assert none.item() == 0.0 and math.isfinite(none.item())
    assert torch.isnan(F.cross_entropy(z, torch.full((6,), -100)))  # why `ce` is not used here


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_semi_supervised_stratified_and_balanced(fraction: float) -> None:
    ds = DATASETS.build("semi_supervised", base="digits", label_fraction=fraction, seed=3)
    base = DATASETS.build("digits", split="train")
    lab = ds.y != -100
    assert int(lab.sum()) == sum(max(1, round(fraction * int((base.y == c).sum()))) for c in range(10))
    assert set(ds.y[lab].tolist()) == set(range(10))  # every class keeps a label, even at 1 %
    assert torch.equal(ds.y[lab], base.y[lab])  # kept labels are the true ones
    bal = DATASETS.build("semi_supervised", base="digits", label_fraction=fraction, seed=3, balance=True)
    n_lab, n_unl = int((bal.y != -100).sum()), int((bal.y == -100).sum())
    assert n_unl == int((~lab).sum()) and n_lab <= n_unl < n_lab + 2 * int(lab.sum())
    assert torch.equal(bal.labelled, bal.y != -100)
    test = DATASETS.build("semi_supervised", base="digits", split="test", label_fraction=fraction)
    assert (test.y >= 0).all()  # the test split stays labelled


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_dho_end_to_end_semi_supervised(fraction: float) -> None:
    """Teacher on the labelled part only; the DHO student trains without NaN on mostly unlabelled batches
    (unbalanced data: many batches hold no label), its kd head follows the teacher, and the validated
    mix is at least as good as either head alone on the validation data."""
    torch.manual_seed(0)
    semi = DATASETS.build("semi_supervised", base="digits", label_fraction=fraction, seed=0)
    test = DATASETS.build("digits", split="test")
    lab = semi.y != -100
    labelled = type(semi)(semi.x[lab], semi.y[lab], 10, "lab", {})
    teacher = MODELS.build("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[64])
    train(teacher, build_method("scratch").objective(), labelled, _cfg(60, bs=min(32, len(labelled))),
          teacher=None, student_views={"logits": ""})
    teacher.eval()
    spec = build_method("dho", temperature=2.0)
    student = MODELS.build("dual_head", backbone="mlp", backbone_params={"hidden": [32]}, num_classes=10,
                           input_shape=(1, 8, 8))
    kd0 = None
    with torch.no_grad():
        kd0 = F.kl_div(student.heads(test.x)[1].log_softmax(-1), teacher(test.x).softmax(-1), reduction="batchmean")
    obj = spec.objective()
    t = LiveTeacher(teacher, {"logits": ""})
    train(student, obj, semi, _cfg(120), teacher=t, student_views=spec.student_views)
    student.eval()
    with torch.no_grad():
        ce_l, kd_l = student.heads(test.x)
        kd1 = F.kl_div(kd_l.log_softmax(-1), teacher(test.x).softmax(-1), reduction="batchmean")
    assert torch.isfinite(ce_l).all() and kd1 < 0.5 * kd0  # the kd head learned the teacher
    from still.losses.teacher_shaping import dho_mix, dho_select_mix

    val_x, val_y = test.x[:200], test.y[:200]
    a, b, acc = dho_select_mix(student, val_x, val_y)
    with torch.no_grad():
        ce_v, kd_v = student.heads(val_x)
    acc_ce = float((ce_v.argmax(-1) == val_y).float().mean())
    acc_kd = float((kd_v.argmax(-1) == val_y).float().mean())
    assert acc >= max(acc_ce, acc_kd) - 1e-9 and (student.alpha, student.beta) == (a, b)
    with torch.no_grad():
        assert torch.allclose(student(val_x).exp(), dho_mix(ce_v, kd_v, a, b), atol=1e-5)
    assert _acc(student, test) > 0.3  # far above chance (0.1) even at 1 % labels


# ------------------------------------------------------------------------------------------ LELP
def test_lelp_prepare_and_fit_data_paths_train_a_subclass_student() -> None:
    data_spec = {"name": "class_subset", "params": {"base": "digits", "groups": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}}
    data = DATASETS.build("class_subset", split="train", **data_spec["params"])
    teacher = _fit_ce(MODELS.build("mlp", num_classes=2, input_shape=(1, 8, 8), hidden=[64]), data, 150)
    base = LiveTeacher(teacher, {"logits": "", "subclass_logits": ""})
    spec = build_method("lelp", subclasses=3, embed="hidden")
    wrapped = spec.wrap_teacher(base, None)
    with pytest.raises(RuntimeError, match="prepare"):
        wrapped.views({"x": data.x[:4]}, ["subclass_logits"])
    spec.prepare(wrapped, None, data)
    out = wrapped.views({"x": data.x[:8]}, ["subclass_logits", "logits"])["subclass_logits"]
    assert out.shape == (8, 6)
    # the same fit through fit_data (for callers that do not run prepare)
    w2 = build_method("lelp", subclasses=3, embed="hidden", fit_data=data_spec).wrap_teacher(base, None)
    out2 = w2.views({"x": data.x[:8]}, ["subclass_logits"])["subclass_logits"]
    assert torch.allclose(out, out2, atol=1e-5)
    # on the training data, each class's offsets average to 0: subclass logits centre on the class logit
    with torch.no_grad():
        v = wrapped.views({"x": data.x}, ["subclass_logits", "logits"])
        sub = v["subclass_logits"].view(-1, 2, 3)
        # the subclass probabilities sum back to the teacher's class probabilities
        torch.testing.assert_close(sub.flatten(1).softmax(-1).view(-1, 2, 3).sum(-1), v["logits"].softmax(-1),
                                   atol=1e-5, rtol=0)
        assert sub.softmax(-1).std(0).mean() > 0.05  # and the subclass split varies across samples
    student = MODELS.build("subclass_student", backbone="mlp", backbone_params={"hidden": [16]}, num_classes=2,
                           subclasses=3, input_shape=(1, 8, 8))
    train(student, spec.objective(), data, _cfg(80), teacher=wrapped, student_views=spec.student_views)
    test = DATASETS.build("class_subset", split="test", **data_spec["params"])
    assert _acc(student, test) > 0.75  # no label is used: the class comes from the subclass targets


# ------------------------------------------------------------------------------------ TRG / LLaVA
def test_trg_dynamic_temperature_follows_the_run() -> None:
    data = DATASETS.build("digits", split="train")
    teacher = _fit_ce(MODELS.build("small_cnn", num_classes=10, input_shape=(1, 8, 8)), data, 20)
    spec = build_method("trg", num_tokens=64, tau_start=0.5, tau_end=0.05)
    obj = spec.objective()
    student = MODELS.build("small_cnn", num_classes=10, input_shape=(1, 8, 8), channels=[8, 8])
    t = LiveTeacher(teacher, {"logits": "", "tokens": "features.1"})
    glob = next(term.loss for term in obj.terms if term.name == "global")
    assert glob.tau == 0.5
    seen: list[torch.Tensor] = []
    orig = glob.forward

    def spy(s: torch.Tensor, te: torch.Tensor) -> torch.Tensor:
        if glob.proj is not None and not seen:
            seen.append(glob.proj.weight.detach().clone())  # the lazy projector as first built
        return orig(s, te)

    glob.forward = spy  # type: ignore[method-assign]
    train(student, obj, data, _cfg(10), teacher=t, student_views={"logits": "", "tokens": "features.1"})
    sched = LOSSES.get("trg_global")(0.5, 0.05).schedule
    assert glob.tau == pytest.approx(sched(9, 10)) and glob.tau < 0.07  # decayed toward tau_end
    assert [round(sched(s, 10), 4) for s in (0, 5, 10)] == [0.5, 0.275, 0.05]
    assert seen and not torch.equal(seen[0], glob.proj.weight.detach())  # the lazy projector is optimised


def test_llava_relation_term_aligns_token_relations() -> None:
    data = DATASETS.build("digits", split="train")
    teacher = _fit_ce(MODELS.build("small_cnn", num_classes=10, input_shape=(1, 8, 8)), data, 20)
    rel = LOSSES.build("relation_cosine", normalize=True)
    student = MODELS.build("small_cnn", num_classes=10, input_shape=(1, 8, 8), channels=[8, 8])

    def gap() -> float:
        from still.taps import Taps

        with torch.no_grad(), Taps(student, {"f": "features.1"}) as ts, Taps(teacher, {"f": "features.1"}) as tt:
            student(data.x[:128]), teacher(data.x[:128])
            return float(rel(ts.views["f"], tt.views["f"]))

    before = gap()
    spec = build_method("llava_kd")
    t = LiveTeacher(teacher, {"logits": "", "tokens": "features.1"})
    train(student, spec.objective(), data, _cfg(40), teacher=t, student_views={"logits": "", "tokens": "features.1"})
    student.eval()
    assert gap() < 0.7 * before
