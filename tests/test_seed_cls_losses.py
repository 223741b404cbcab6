"""TRG, LLaVA-KD relation, DHO, LELP and DeGLA losses against naive references from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from still import LOSSES, MODELS, LiveTeacher
from still.losses.teacher_shaping import (
    dho_mix,
    dho_select_mix,
    fit_lelp,
    lelp_logits,
    null_space_projector,
)
from still.losses.tokens import DynamicTemperature, as_tokens, trg_inner, trg_local, relation_cosine

torch.manual_seed(0)


def _grad_close(f_a, f_b, *inputs, rtol=1e-5, atol=1e-7):
    a = f_a(*inputs)
    ga = torch.autograd.grad(a, inputs[0])[0]
    b = f_b(*inputs)
    gb = torch.autograd.grad(b, inputs[0])[0]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(ga.double(), gb.double(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------- TRG
def naive_trg_local(s, t, k):
    """Loops: kNN of each token in the teacher (excluding itself), σ = mean d² per model."""
    m = s.shape[0]
    nbrs = []
    for i in range(m):
        d = [((t[i] - t[j]) ** 2).sum() if j != i else torch.tensor(float("inf"), dtype=t.dtype) for j in range(m)]
        nbrs.append(sorted(range(m), key=lambda j: float(d[j]))[:k])
    def d2(x):
        return torch.stack([torch.stack([((x[i] - x[j]) ** 2).sum() for j in nbrs[i]]) for i in range(m)])
    ds, dt = d2(s), d2(t)
    ls, lt = -ds / (2 * ds.detach().mean()), -dt / (2 * dt.mean())
    total = 0.0
    for i in range(m):
        ps, pt = torch.softmax(ls[i], 0), torch.softmax(lt[i], 0)
        total = total + (ps * (ps.log() - pt.log())).sum()
    return total / m


def test_trg_local_matches_naive_value_and_grad():
    s = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, 3, dtype=torch.float64)
    f_still = lambda s_, t_: trg_local(s_, t_, k=4, num_tokens=None).double()
    f_naive = lambda s_, t_: naive_trg_local(s_.reshape(-1, 5), t_.reshape(-1, 3), 4)
    _grad_close(f_still, f_naive, s, t, rtol=1e-4, atol=1e-6)


def test_trg_local_zero_for_identical_tokens_and_feature_maps():
    t = torch.randn(3, 4, 2, 2)
    assert float(trg_local(t, t, k=3, num_tokens=None)) == pytest.approx(0.0, abs=1e-6)
    assert as_tokens(t).shape == (3, 4, 4)


def test_trg_inner_matches_naive():
    s = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 3, dtype=torch.float64)

    def naive(s_, t_):
        out = 0.0
        for b in range(2):
            cs = torch.softmax(s_[b] @ s_[b].T / math.sqrt(6), -1)
            ct = torch.softmax(t_[b] @ t_[b].T / math.sqrt(3), -1)
            out = out + ((cs - ct) ** 2).sum()
        return out / (2 * 4 * 4)

    _grad_close(lambda a, b: trg_inner(a, b).double(), naive, s, t)


def test_trg_global_infonce_and_dynamic_temperature():
    sched = DynamicTemperature(0.5, 0.05)
    assert sched(0, 100) == pytest.approx(0.5) and sched(100, 100) == pytest.approx(0.05)
    assert sched(50, 100) == pytest.approx(0.275)
    assert all(sched(i, 100) >= sched(i + 1, 100) for i in range(100))
    loss = LOSSES.build("trg_global", tau_start=0.1, tau_end=0.1, num_tokens=None)
    s = torch.randn(2, 3, 4)
    t = torch.randn(2, 3, 5)
    value = loss(s, t)
    z = torch.nn.functional.normalize(loss.proj(s.reshape(-1, 4)), dim=-1)
    tt = torch.nn.functional.normalize(t.reshape(-1, 5), dim=-1)
    ref = 0.0
    for i in range(6):
        logits = torch.stack([(z[i] * tt[j]).sum() / 0.1 for j in range(6)])
        ref = ref - torch.log_softmax(logits, 0)[i]
    assert float(value) == pytest.approx(float(ref / 6), rel=1e-5)
    loss.set_progress(10, 10)
    assert loss.tau == pytest.approx(0.1)


def test_relation_cosine_matches_naive_and_is_zero_for_scaled_copy():
    s = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 7, dtype=torch.float64)

    def naive(s_, t_):
        out = 0.0
        for b in range(3):
            rs, rt = (s_[b] @ s_[b].T).flatten(), (t_[b] @ t_[b].T).flatten()
            out = out + 1 - (rs @ rt) / (rs.norm() * rt.norm())
        return out / 3

    _grad_close(lambda a, b: relation_cosine(a, b).double(), naive, s, t)
    x = torch.randn(2, 5, 4)
    assert float(relation_cosine(3 * x, x)) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------- DHO
def test_dho_mix_and_grid_search_pick_the_better_head():
    ce = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    kd = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    p = dho_mix(ce, kd, 0.25, 1.0)
    ref = 0.75 * ce.softmax(-1) + 0.25 * kd.softmax(-1)
    torch.testing.assert_close(p, ref)
    model = MODELS.build("dual_head", backbone="mlp", backbone_params={"hidden": [4]}, num_classes=3,
                         input_shape=(1, 2, 2))
    x = torch.randn(40, 1, 2, 2)
    with torch.no_grad():  # make kd_head the oracle of labels y = argmax kd_head, ce_head useless
        model.ce_head.weight.zero_()
        model.ce_head.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    y = model.heads(x)[1].argmax(-1)
    alpha, beta, acc = dho_select_mix(model, x, y)
    assert acc == 1.0 and alpha > 0.5
    assert torch.allclose(model(x).exp().sum(-1), torch.ones(40), atol=1e-5)


# --------------------------------------------------------------------------------- LELP
def test_lelp_null_space_rotation_and_class_sums():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 12, generator=g)
    y = torch.randint(0, 3, (300,), generator=g)
    w = torch.randn(3, 12, generator=g)
    p = null_space_projector(w)
    assert torch.allclose(p @ w.double().T, torch.zeros(12, 3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(p @ p, p, atol=1e-10)  # a projector
    fit = fit_lelp(h, y, w, subclasses=4, seed=1)
    for c in range(3):
        b = fit["basis"][c].double()
        torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        assert torch.allclose(w.double() @ b, torch.zeros(3, 4, dtype=torch.float64), atol=1e-4)
    z = h @ w.T
    sub = lelp_logits(h, z, fit, centre=False)
    assert sub.shape == (300, 12)
    # Naive: z_{c,s} = z_c + ((h P - mean_c) V_c R_c)_s / scale
    c, s, i = 2, 3, 17
    off = [float(((h[i].double() @ p - fit["mean"][c].double()) @ fit["basis"][c, :, k].double()) / fit["scale"])
           for k in range(4)]
    ref = float(z[i, c]) + off[s]
    assert float(sub[i, c * 4 + s]) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    # centred (default): z_c + o_s - log Σ_k e^{o_k}, so the subclass softmax sums back to the class softmax
    cen = lelp_logits(h, z, fit)
    assert float(cen[i, c * 4 + s]) == pytest.approx(ref - math.log(sum(math.exp(o) for o in off)), rel=1e-4, abs=1e-4)
    torch.testing.assert_close(cen.softmax(-1).view(300, 3, 4).sum(-1), z.softmax(-1), atol=1e-5, rtol=0)


def test_lelp_teacher_and_subclass_student():
    from still.methods.base import build_method

    torch.manual_seed(0)
    data = [{"x": torch.randn(1, 4, 4), "y": torch.tensor(i % 2), "index": torch.tensor(i)} for i in range(64)]
    teacher_model = MODELS.build("small_cnn", num_classes=2, input_shape=(1, 4, 4))
    spec = build_method("lelp", subclasses=3)
    teacher = spec.wrap_teacher(LiveTeacher(teacher_model, {"logits": ""}))
    with pytest.raises(RuntimeError, match="fit"):
        teacher.views({"x": data[0]["x"][None]}, ["subclass_logits"])
    spec.prepare(teacher, None, data)
    student = MODELS.build("subclass_student", backbone="mlp", num_classes=2, subclasses=3, input_shape=(1, 4, 4))
    x = torch.stack([d["x"] for d in data[:8]])
    v = teacher.views({"x": x}, ["subclass_logits", "logits"])
    assert v["subclass_logits"].shape == (8, 6)
    probs = student(x).exp()
    sub = student.base(x).softmax(-1).view(8, 2, 3).sum(-1)
    torch.testing.assert_close(probs, sub)


# -------------------------------------------------------------------------------- DeGLA
def test_degla_terms_match_naive():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    neg = torch.randn(4, 2, 5, generator=g, dtype=torch.float64)
    tau = 0.1
    n = lambda x: x / x.norm(dim=-1, keepdim=True)

    def naive_base(v_, t_):
        vn, tn, nn_ = n(v_), n(t_), n(neg)
        i2t = t2i = 0.0
        for i in range(4):
            num = torch.exp(vn[i] @ tn[i] / tau)
            den = sum(torch.exp(vn[i] @ tn[j] / tau) for j in range(4)) + sum(
                torch.exp(vn[i] @ nn_[i, k] / tau) for k in range(2))
            i2t = i2t - torch.log(num / den)
            den2 = sum(torch.exp(tn[i] @ vn[j] / tau) for j in range(4))
            t2i = t2i - torch.log(torch.exp(tn[i] @ vn[i] / tau) / den2)
        return 0.5 * (i2t + t2i) / 4

    def naive_igc(v_, t_):
        vn, tn, nn_ = n(v_), n(t_), n(neg)
        out = 0.0
        for i in range(4):
            pos = torch.exp(vn[i] @ tn[i] / tau)
            out = out - torch.log(pos / (pos + sum(torch.exp(vn[i] @ nn_[i, k] / tau) for k in range(2))))
        return out / 4

    _grad_close(lambda a, b: LOSSES.build("degla_base", tau=tau)(a, b, negatives=neg).double(), naive_base, v, t)
    _grad_close(lambda a, b: LOSSES.build("degla_igc", tau=tau)(a, b, neg).double(), naive_igc, v, t)
    anchor = LOSSES.get("ema_anchor")
    assert float(anchor(v, 2 * v)) == pytest.approx(0.0, abs=1e-12)
    ref = ((n(v) - n(t)) ** 2).sum(-1).mean()
    assert float(anchor(v, t)) == pytest.approx(float(ref), rel=1e-6)
