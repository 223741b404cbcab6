"""Seed methods MoSE, MST-Distill and TransKD-PEA: losses (value and gradient vs naive formulas),
router load balancing, per-exit weights, schedules, the patch_embed adapter, models and methods."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from still.losses.mixture_losses import MSTRoutedKD, MSTRouter, RouterLoadBalance, load_balance
from still.losses.self_distill import exit_weights, multi_exit_ce, multi_exit_kd
from still.losses.transkd import PatchEmbedAdapter, pea, resample_tokens, stage_weights
from still.methods.mst_distill import paper_milestones
from still.registry import ADAPTERS, LOSSES, METHODS, MODELS
from still.taps import forward_with_views

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (the shared fixture is in conftest.py)."""


def _naive_kl_t2(zs: torch.Tensor, zt: torch.Tensor, t: float) -> torch.Tensor:
    """Mean over rows of T²·Σ_c p_t (log p_t − log p_s), written out."""
    rows = []
    for i in range(zs.shape[0]):
        pt = torch.exp(zt[i] / t) / torch.exp(zt[i] / t).sum()
        ps = torch.exp(zs[i] / t) / torch.exp(zs[i] / t).sum()
        rows.append((pt * (torch.log(pt) - torch.log(ps))).sum())
    return torch.stack(rows).mean() * t * t


def _grad(f, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    f(x).backward()
    return x.grad


# ------------------------------------------------------------------------------ MoSE
def test_exit_weights_are_depth_fractions() -> None:
    assert exit_weights(4, [2, 4, 6, 8], 8) == [0.25, 0.5, 0.75, 1.0]
    assert exit_weights(5, [4, 9, 18, 27, 36], 36) == [4 / 36, 9 / 36, 0.5, 0.75, 1.0]  # the paper's ι
    assert exit_weights(2) == [0.5, 1.0]
    assert sum(exit_weights(3, [1, 2, 3], normalize=True)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="layers"):
        exit_weights(2, [1, 9], 8)
    with pytest.raises(ValueError, match="2 exits but 3"):
        exit_weights(2, [1, 2, 3])


def test_multi_exit_ce_value_and_grad_vs_naive() -> None:
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    y = torch.randint(0, 5, (6,), generator=g)
    layers, depth = [1, 3, 6], 6

    def naive(z: list[torch.Tensor]) -> torch.Tensor:
        tot = 0.0
        for i, zi in zip(layers, z):
            ce = -torch.stack([zi[b, y[b]] - torch.log(torch.exp(zi[b]).sum()) for b in range(6)]).mean()
            tot = tot + (i / depth) * ce
        return tot

    zg = [z.clone().requires_grad_(True) for z in zs]
    zn = [z.clone().requires_grad_(True) for z in zs]
    v = multi_exit_ce(zg, y, layers=layers, depth=depth)
    ref = naive(zn)
    torch.testing.assert_close(v, ref)
    v.backward()
    ref.backward()
    for a, b in zip(zg, zn):
        torch.testing.assert_close(a.grad, b.grad)
    # per-exit weighting: the first exit's gradient is α_1 = 1/6 times the plain CE gradient
    plain = _grad(lambda z: F.cross_entropy(z, y), zs[0])
    torch.testing.assert_close(zg[0].grad, plain * (1 / 6))


def test_multi_exit_kd_value_grad_and_teacher_detached() -> None:
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(4, 7, generator=g, dtype=torch.float64) for _ in range(4)]
    teacher = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    layers, depth, t = [2, 4, 6, 8], 8, 3.0
    zg = [z.clone().requires_grad_(True) for z in zs]
    zn = [z.clone().requires_grad_(True) for z in zs]
    v = multi_exit_kd(zg, teacher, layers=layers, depth=depth, temperature=t)
    ref = sum((i / depth) * _naive_kl_t2(z, teacher.detach(), t) for i, z in zip(layers[:-1], zn[:-1]))
    torch.testing.assert_close(v, ref)
    v.backward()
    ref.backward()
    for a, b in zip(zg[:-1], zn[:-1]):
        torch.testing.assert_close(a.grad, b.grad)
    assert zg[-1].grad is None  # the last exit is not distilled from itself
    assert teacher.grad is None  # no gradient into the teacher side
    # identical exits and teacher give zero
    same = [teacher.detach().clone().requires_grad_(True) for _ in range(3)]
    assert float(multi_exit_kd(same, teacher.detach(), skip_last=False)) == pytest.approx(0.0, abs=1e-12)


def test_multi_exit_models_tap_every_exit() -> None:
    m = MODELS.build("multi_exit_mlp", input_shape=(1, 8, 8), depth=6, exit_layers=[2, 4, 6])
    x = torch.randn(3, 1, 8, 8)
    out, v = forward_with_views(m, x, {"e0": "exits.0", "e1": "exits.1", "e2": "exits.2"})
    exits = m.forward_exits(x)
    for j in range(3):
        torch.testing.assert_close(v[f"e{j}"], exits[j])
    torch.testing.assert_close(out, v["e2"])
    # one shared head (each tensor stored once: the state dict is safetensors-saveable)
    assert sum(k.startswith("head.") for k in m.state_dict()) == 2
    assert not any(k.startswith("exits.") and "head" in k for k in m.state_dict())
    # the layer-index embedding shifts the shared head's input per exit
    h = torch.randn(3, 64)
    with torch.no_grad():
        m.exits[1].position.fill_(0.5)
    torch.testing.assert_close(m.exits[1](h, m.head), m.head(h + 0.5))
    with pytest.raises(ValueError, match="end at"):
        MODELS.build("multi_exit_mlp", depth=8, exit_layers=[2, 4])
    c = MODELS.build("multi_exit_cnn", input_shape=(1, 8, 8), channels=(4, 8, 8), exit_layers=[1, 3])
    _, v = forward_with_views(c, x, {"a": "exits.0", "b": "exits.1"})
    assert v["a"].shape == v["b"].shape == (3, 10)


# ------------------------------------------------------------------------------ MST-Distill
def _router(c: int, e: int, seed: int = 0) -> MSTRouter:
    torch.manual_seed(seed)
    return MSTRouter(c, e).double()


def test_routed_kd_value_and_grad_vs_naive() -> None:
    g = torch.Generator().manual_seed(2)
    b, e, c, t = 6, 3, 5, 4.0
    zs = torch.randn(b, c, generator=g, dtype=torch.float64)
    experts = torch.randn(b, e, c, generator=g, dtype=torch.float64) * 2
    for k in (1, 2):
        router = _router(c, e)
        loss = MSTRoutedKD(temperature=t, k=k, router=router)
        w1, b1 = router.fc1.weight.detach(), router.fc1.bias.detach()
        w2, b2 = router.fc2.weight.detach(), router.fc2.bias.detach()

        def naive(z: torch.Tensor) -> torch.Tensor:
            tot = 0.0
            for i in range(b):
                logits = w2 @ (w1 @ z[i] + b1) + b2
                gate = torch.exp(logits) / torch.exp(logits).sum()
                order = sorted(range(e), key=lambda j: -float(gate[j]))[:k]
                for j in order:
                    tot = tot + _naive_kl_t2(z[i:i + 1], experts[i, j:j + 1], t)
            return tot / (b * k)

        torch.testing.assert_close(loss(zs, experts), naive(zs))
        torch.testing.assert_close(_grad(lambda z: loss(z, experts), zs), _grad(naive, zs))
        assert loss.last_indices.shape == (b, k)
        # a list of E (B, C) tensors is the same as the stacked (B, E, C)
        torch.testing.assert_close(loss(zs, list(experts.unbind(1))), loss(zs, experts))
    with pytest.raises(ValueError, match="k=4"):
        MSTRoutedKD(k=4, router=_router(c, e))(zs, experts)


def test_routed_kd_top1_of_identical_experts_is_plain_kd() -> None:
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    v = MSTRoutedKD()(zs, torch.stack([zt, zt, zt], 1))
    torch.testing.assert_close(v, LOSSES.get("kd")(zs, zt, temperature=4.0))
    soft = MSTRoutedKD(routing="soft")(zs, torch.stack([zt, zt], 1))  # Σ g_e z = z
    torch.testing.assert_close(soft, LOSSES.get("kd")(zs, zt, temperature=4.0))


def test_load_balance_value_grad_and_minimum_at_uniform() -> None:
    g = torch.Generator().manual_seed(4)
    probs = F.softmax(torch.randn(8, 4, generator=g, dtype=torch.float64), -1)

    def naive_kl(p: torch.Tensor) -> torch.Tensor:
        e = p.shape[1]
        avg = [sum(p[b, j] for b in range(p.shape[0])) / p.shape[0] for j in range(e)]
        return sum((1 / e) * (math.log(1 / e) - torch.log(a)) for a in avg) / e

    def naive_cv(p: torch.Tensor) -> torch.Tensor:
        imp = p.sum(0)
        mean = imp.mean()
        return torch.sqrt(((imp - mean) ** 2).sum() / (imp.numel() - 1)) / mean

    torch.testing.assert_close(load_balance(probs, "kl"), naive_kl(probs))
    torch.testing.assert_close(_grad(lambda p: load_balance(p, "kl"), probs), _grad(naive_kl, probs))
    torch.testing.assert_close(load_balance(probs, "cv"), naive_cv(probs))
    torch.testing.assert_close(_grad(lambda p: load_balance(p, "cv"), probs), _grad(naive_cv, probs))
    uniform = torch.full((8, 4), 0.25, dtype=torch.float64)
    for mode in ("kl", "cv"):
        assert float(load_balance(uniform, mode)) == pytest.approx(0.0, abs=1e-12)
        assert float(load_balance(probs, mode)) > 0
        # a uniform *load* is enough: half the samples on expert 0, half on expert 1
        split = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4, dtype=torch.float64).clamp_min(1e-12)
        assert float(load_balance(split, mode)) == pytest.approx(0.0, abs=1e-9)
        skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8, dtype=torch.float64)
        more = torch.tensor([[0.9, 0.04, 0.03, 0.03]] * 8, dtype=torch.float64)
        assert 0 < float(load_balance(skewed, mode)) < float(load_balance(more, mode))


def test_training_with_load_balance_spreads_the_load() -> None:
    torch.manual_seed(0)
    b, c, e = 64, 10, 4
    zs = torch.randn(b, c) * 3
    experts = torch.randn(b, e, c)
    kd = MSTRoutedKD()
    lb = RouterLoadBalance(router=kd.router)
    kd(zs, experts)  # builds the router
    with torch.no_grad():
        kd.router.fc2.bias.copy_(torch.tensor([6.0, 0.0, 0.0, 0.0]))  # everything routed to expert 0

    def shares() -> torch.Tensor:
        kd(zs, experts)
        return torch.bincount(kd.last_indices.view(-1), minlength=e).float() / b

    assert float(shares()[0]) == 1.0
    start = float(lb(zs, experts))
    opt = torch.optim.Adam(kd.parameters(), lr=0.1)  # the router's parameters live in the kd module
    assert not list(lb.parameters())  # referenced, not registered twice
    for _ in range(60):
        loss = kd(zs, experts) + lb(zs, experts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = shares()
    assert float(lb(zs, experts)) < start / 10
    assert float(s.max()) < 0.6 and int((s > 0).sum()) >= 3


def test_paper_schedules_match_the_code_loop() -> None:
    spec = METHODS.build("mst_distill")
    obj = spec.objective()
    w_kl, w_lb = 1.0, 1.0
    total = 100  # one step per paper epoch
    for epoch in range(total):
        obj.set_progress(epoch, total)
        w = obj.weights()
        assert w["mst_kd"] == pytest.approx(w_kl) and w["mst_lb"] == pytest.approx(w_lb), epoch
        w_lb *= 0.9 if epoch % 10 == 0 else 1  # the paper's code, end of epoch
        w_kl *= 0.5 if epoch % 30 == 0 else 1
    assert paper_milestones(30) == [0.01, 0.31, 0.61, 0.91]
    # scaled to a run of another length: the same fractions
    obj.set_progress(50, 1000)
    assert obj.weights()["mst_kd"] == pytest.approx(0.5) and obj.weights()["mst_lb"] == pytest.approx(0.9)


def test_mst_objective_holds_the_router_once_and_trains_it() -> None:
    spec = METHODS.build("mst_distill")
    obj = spec.objective()
    zs = torch.randn(5, 6, requires_grad=True)
    tv = {"logits_experts": torch.randn(5, 3, 6)}
    obj.validate({"logits": zs}, tv, {"y": torch.randint(0, 6, (5,))})
    keys = list(obj.state_dict())
    assert keys and all(k.startswith("losses.mst_kd.router.") for k in keys)
    out = obj({"logits": zs}, tv, {"y": torch.randint(0, 6, (5,))})
    out["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.parameters())  # via the LB term
    assert zs.grad is not None
    assert spec.objective().losses["mst_kd"].router is not obj.losses["mst_kd"].router  # fresh per objective


# ------------------------------------------------------------------------------ TransKD PEA
def test_pea_value_and_grad_vs_naive() -> None:
    g = torch.Generator().manual_seed(5)
    s = [torch.randn(2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    t = [torch.randn(2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    w = stage_weights(3, None)
    assert w == [0.1, 0.5, 1.0] and stage_weights(4, None) == [0.1, 0.1, 0.5, 1.0]

    def naive(xs: list[torch.Tensor]) -> torch.Tensor:
        return sum(wi * ((a - b) ** 2).sum() / a.numel() for wi, a, b in zip(w, xs, t))

    sg = [x.clone().requires_grad_(True) for x in s]
    sn = [x.clone().requires_grad_(True) for x in s]
    v, ref = pea(sg, t), naive(sn)
    torch.testing.assert_close(v, ref)
    v.backward()
    ref.backward()
    for a, b in zip(sg, sn):
        torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="weight"):
        pea(s, t, weights=[1.0])


def test_patch_embed_adapter_shapes_and_resampling() -> None:
    ad = ADAPTERS.build("patch_embed")
    x = torch.randn(2, 16, 8)
    like = torch.randn(2, 4, 12)
    y = ad(x, like)
    assert y.shape == (2, 4, 12)
    lin = ad.inner
    assert isinstance(lin, torch.nn.Linear) and (lin.in_features, lin.out_features) == (8, 12)
    # 4x4 -> 2x2 bilinear (align_corners=False) is the mean of each 2x2 block, after the Linear
    z = lin(x).transpose(1, 2).reshape(2, 12, 4, 4)
    blocks = z.reshape(2, 12, 2, 2, 2, 2).mean((3, 5)).reshape(2, 12, 4).transpose(1, 2)
    torch.testing.assert_close(y, blocks)
    # equal token counts: just the Linear
    torch.testing.assert_close(ad(x, torch.randn(2, 16, 12)), lin(x))
    # non-square counts: linear on the token axis; a ramp stays a ramp (6 -> 3 samples at 2i + 0.5)
    ramp = torch.arange(6.0).reshape(1, 6, 1)
    torch.testing.assert_close(resample_tokens(ramp, 3), torch.tensor([0.5, 2.5, 4.5]).reshape(1, 3, 1))
    # upsampling 2x2 -> 4x4, and a CLS token kept apart
    cls = torch.cat([torch.full((1, 1, 3), 7.0), torch.ones(1, 4, 3)], 1)
    up = resample_tokens(cls, 17, cls_token=True)
    assert up.shape == (1, 17, 3) and float(up[0, 0, 0]) == 7.0 and torch.allclose(up[:, 1:], torch.ones(1, 16, 3))
    with pytest.raises(ValueError, match="tokens"):
        ad(torch.randn(2, 3, 4, 4), like)


def test_vit_models_tap_stages_and_patch_embeddings() -> None:
    t = MODELS.build("vit_tiny", input_shape=(1, 8, 8))
    s = MODELS.build("vit_nano", input_shape=(1, 8, 8), first_stride=4)
    taps = {"pe0": "stages.0.patch_embed", "pe1": "stages.1.patch_embed", "m0": "stages.0", "m1": "stages.1"}
    x = torch.randn(3, 1, 8, 8)
    out_t, vt = forward_with_views(t, x, taps)
    out_s, vs = forward_with_views(s, x, taps)
    assert out_t.shape == out_s.shape == (3, 10)
    assert vt["pe0"].shape == (3, 16, 32) and vt["m0"].shape == (3, 32, 4, 4) and vt["pe1"].shape == (3, 4, 64)
    assert vs["pe0"].shape == (3, 4, 16) and vs["m0"].shape == (3, 16, 2, 2)  # coarser patches: N differs
    ad = PatchEmbedAdapter()
    assert ad(vs["pe0"], vt["pe0"]).shape == vt["pe0"].shape
    f = MODELS.build("vit_tiny", input_shape=(1, 28, 28))
    pe = forward_with_views(f, torch.randn(2, 1, 28, 28), {"pe0": "stages.0.patch_embed"})[1]["pe0"]
    assert pe.shape == (2, 49, 32)  # Fashion-MNIST: 7x7 tokens


# ------------------------------------------------------------------------------ short end-to-end runs
def _run(spec, student, teacher, data, steps: int = 20) -> list[float]:
    from still.engine import TrainConfig, train

    res = train(student, spec.objective(), data, TrainConfig(max_steps=steps, batch_size=32, lr=3e-3, progress=False,
                                                             log_every=5, eval_every_epochs=None),
                teacher=teacher, student_views=spec.student_views)
    return [r["total"] for r in res.history if r.get("split") == "train"]


@pytest.fixture(scope="module")
def digits():
    from still.registry import DATASETS

    torch.manual_seed(0)
    return DATASETS.build("digits", split="train", subset=512)


def test_mose_end_to_end_reduces_loss(digits) -> None:
    spec = METHODS.build("mose", exit_layers=[2, 4, 6, 8])
    student = MODELS.build("multi_exit_mlp", input_shape=(1, 8, 8), width=32)
    totals = _run(spec, student, spec.wrap_teacher(None, student), digits)
    assert totals[-1] < 0.7 * totals[0]


def test_mst_distill_end_to_end_with_masked_teachers(digits) -> None:
    from still.teachers.base import LiveTeacher

    torch.manual_seed(0)
    tmodel = MODELS.build("small_cnn", input_shape=(1, 8, 8))
    spec = METHODS.build("mst_distill", mask_layers=["embed", "features.1"], mask_epochs=1, stage1_epochs=0)
    teacher = spec.wrap_teacher(LiveTeacher(tmodel, {"logits": ""}), None)
    student = MODELS.build("mlp", input_shape=(1, 8, 8), hidden=[32])
    spec.prepare(teacher, student, digits)
    assert all(m.masknet is not None for m in teacher.members) and len(teacher) == 2
    totals = _run(spec, student, teacher, digits)
    assert totals[-1] < totals[0]


def test_transkd_pea_end_to_end_reduces_loss(digits) -> None:
    from still.teachers.base import LiveTeacher

    torch.manual_seed(0)
    spec = METHODS.build("transkd_pea")
    tmodel = MODELS.build("vit_tiny", input_shape=(1, 8, 8))
    student = MODELS.build("vit_nano", input_shape=(1, 8, 8))
    totals = _run(spec, student, LiveTeacher(tmodel, spec.teacher_views), digits)
    assert totals[-1] < 0.8 * totals[0]
