"""Dense divergences vs naive float64 references written here from the papers' formulas.

The references (`REFS`) are also used by tests/test_chunked.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from still.losses import divergences as D
from still.registry import LOSSES

RTOL, ATOL = 5e-4, 1e-5


# ------------------------------------------------------------------------------------------------
# naive references: float64, probabilities first, one token at a time semantics, then a masked mean
# ------------------------------------------------------------------------------------------------
def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ p log(p/q) with 0·log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def _probs(s, t, T):
    return torch.softmax(s.double() / T, -1), torch.softmax(t.double() / T, -1)


def ref_fkl(s, t, T=1.0):
    q, p = _probs(s, t, T)
    return _kl(p, q)


def ref_rkl(s, t, T=1.0):
    q, p = _probs(s, t, T)
    return _kl(q, p)


def ref_jsd(s, t, T=1.0, beta=0.5):
    q, p = _probs(s, t, T)
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def ref_tv(s, t, T=1.0):
    q, p = _probs(s, t, T)
    return 0.5 * (p - q).abs().sum(-1)


def ref_skl(s, t, T=1.0, alpha=0.1):
    q, p = _probs(s, t, T)
    return _kl(p, alpha * p + (1 - alpha) * q)


def ref_srkl(s, t, T=1.0, alpha=0.1):
    q, p = _probs(s, t, T)
    return _kl(q, alpha * q + (1 - alpha) * p)


def ref_sinkhorn_total(s, t, T=2.0, eps=0.1, n_iters=20):
    """SinKD's code (loss.py), plain domain: Σ P·W over the batch (rows of s, t)."""
    ps, pt = _probs(s, t, T)
    W = (ps[:, None, :] - pt[None, :, :]).abs().sum(-1)
    P = torch.exp(-W / eps)
    for _ in range(n_iters):
        P = P / P.sum(1, keepdim=True)
        P = P / P.sum(0, keepdim=True)
    return (P * W).sum()


REFS = {
    "forward_kl": (ref_fkl, {}),
    "reverse_kl": (ref_rkl, {}),
    "jsd": (ref_jsd, {"beta": 0.5}),
    "jsd_b03": (ref_jsd, {"beta": 0.3}),
    "tv": (ref_tv, {}),
    "skew_kl": (ref_skl, {"alpha": 0.1}),
    "skew_rkl": (ref_srkl, {"alpha": 0.1}),
}


def dense_fn(key):
    name = "jsd" if key.startswith("jsd") else key
    return LOSSES.get(name), REFS[key][1]


def masked_mean(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    v = valid.reshape(-1)
    return rows.reshape(-1)[v].sum() / max(int(v.sum()), 1)


def _data(shape=(3, 7, 123), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, generator=g) * scale).requires_grad_()
    t = torch.randn(*shape, generator=g) * scale
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    flat = labels.view(-1)
    flat[[1, flat.numel() // 2, flat.numel() - 1]] = -100  # a few ignored tokens wherever the shape
    return s, t, labels


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(REFS))
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_dense_matches_reference_value_and_grad(key, T):
    s, t, labels = _data()
    fn, kw = dense_fn(key)
    ref, _ = REFS[key]
    out = fn(s, t, temperature=T, labels=labels, **kw)
    (g,) = torch.autograd.grad(out, s)
    s64 = s.detach().double().requires_grad_()
    want = masked_mean(ref(s64, t.double(), T, **kw), labels != -100)
    (g64,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(out.double(), want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g.double(), g64, rtol=RTOL, atol=ATOL)
    assert g.reshape(-1, s.shape[-1])[1].abs().max() == 0  # ignored token: no gradient


@pytest.mark.parametrize("key", list(REFS))
def test_reductions_mask_and_t2(key):
    s, t, labels = _data(seed=1)
    fn, kw = dense_fn(key)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    valid = mask & (labels != -100)
    rows = fn(s, t, mask=mask, labels=labels, reduction="none", **kw)
    assert rows.shape == (3, 7) and (rows[~valid] == 0).all()
    total = fn(s, t, mask=mask, labels=labels, reduction="sum", **kw)
    mean = fn(s, t, mask=mask, labels=labels, **kw)
    torch.testing.assert_close(total, rows.sum())
    torch.testing.assert_close(mean, rows.sum() / valid.sum())
    torch.testing.assert_close(fn(s, t, temperature=2.0, scale_t2=True, **kw), 4 * fn(s, t, temperature=2.0, **kw))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tv", "skew_kl", "skew_rkl", "sinkhorn", "dac_kl"])
def test_all_masked_is_zero_with_zero_grad(name):
    s, t, labels = _data(shape=(2, 3, 9))
    fn = LOSSES.build(name)
    out = fn(s, t, labels=torch.full_like(labels, -100))
    (g,) = torch.autograd.grad(out, s)
    assert out.item() == 0.0 and torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tv", "skew_kl", "skew_rkl", "dac_kl"])
def test_identical_distributions_give_zero(name):
    s, _, labels = _data(shape=(4, 5, 17))
    fn = LOSSES.build(name)
    out = fn(s, s.detach().clone(), labels=labels)
    assert abs(out.item()) < 1e-6
    if name != "tv":  # |x| has a kink at 0; every smooth divergence has a stationary point here
        (g,) = torch.autograd.grad(out, s)
        assert g.abs().max() < 1e-5


def _kl_log(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) from log-probs (exact for extreme logits), 0 where p = 0, +inf where q = 0 < p."""
    return torch.where(lp > -math.inf, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)


def ref_log(key, s, t):
    """Log-space float64 references for the extreme-logit test (the probability forms underflow)."""
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    mix = lambda a, la, b, lb: torch.logaddexp(la + math.log(a), lb + math.log(b))  # noqa: E731
    if key == "forward_kl":
        return _kl_log(lt, ls)
    if key == "reverse_kl":
        return _kl_log(ls, lt)
    if key.startswith("jsd"):
        b = REFS[key][1]["beta"]
        m = mix(b, lt, 1 - b, ls)
        return b * _kl_log(lt, m) + (1 - b) * _kl_log(ls, m)
    if key == "tv":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    if key == "skew_kl":
        return _kl_log(lt, mix(0.1, lt, 0.9, ls))
    return _kl_log(ls, mix(0.1, ls, 0.9, lt))


@pytest.mark.parametrize("key", list(REFS))
def test_extreme_and_minus_inf_logits(key):
    s = torch.zeros(2, 4, 31)
    t = torch.zeros(2, 4, 31)
    labels = torch.zeros(2, 4, dtype=torch.long)
    labels[0, 3] = -100
    s[0, 0, :3], s[0, 1, 5] = 1e4, -1e4  # ±1e4 logits
    t[0, 0, 3], t[1, 2, 7:] = -1e4, 1e4
    t[0, 2, :] = torch.linspace(-1e4, 1e4, 31)
    s[1, 0, 10:20] = t[1, 0, 10:20] = float("-inf")  # a banned sub-vocabulary on both sides
    t[1, 1, :5] = float("-inf")  # the teacher bans tokens the student still likes (reverse KL: +inf)
    s[1, 3, 3:] = float("-inf")  # the student bans tokens the teacher likes (forward KL: +inf)
    s.requires_grad_()
    fn, kw = dense_fn(key)
    rows = fn(s, t, labels=labels, reduction="none", **kw)
    out = fn(s, t, labels=labels, **kw)
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(rows).all() and torch.isfinite(g).all(), "no NaN/inf, even where the divergence is infinite"
    want = ref_log(key, s.detach(), t).masked_fill(labels == -100, 0.0)
    fin = torch.isfinite(want)
    torch.testing.assert_close(rows.double()[fin], want[fin], rtol=RTOL, atol=ATOL)
    assert (rows[~fin] > 1e25).all()  # an infinite divergence shows as a huge finite value
    assert (g[1, 0, 10:20] == 0).all()  # banned logits get no gradient


def test_bf16_inputs_computed_in_fp32():
    s, t, labels = _data(shape=(3, 5, 257), seed=4)
    sb, tb = s.detach().bfloat16().requires_grad_(), t.bfloat16()
    out = D.jsd(sb, tb, labels=labels)
    (g,) = torch.autograd.grad(out, sb)
    assert out.dtype == torch.float32 and g.dtype == torch.bfloat16
    want = masked_mean(ref_jsd(sb.detach().float(), tb.float()), labels != -100)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# JSD(β): limits and TRL
# ------------------------------------------------------------------------------------------------
def test_jsd_limits():
    s, t, labels = _data(shape=(4, 6, 41), seed=5, scale=1.0)
    s = s.detach()
    fkl, rkl = D.forward_kl(s, t), D.reverse_kl(s, t)
    assert D.jsd(s, t, beta=0.0).item() == pytest.approx(fkl.item(), rel=1e-6)
    assert D.jsd(s, t, beta=1.0).item() == pytest.approx(rkl.item(), rel=1e-6)
    e = 1e-3
    assert (D.jsd(s, t, beta=e) / e).item() == pytest.approx(fkl.item(), rel=2e-2)  # JSD(β)/β → KL(p_t‖p_s)
    assert (D.jsd(s, t, beta=1 - e) / e).item() == pytest.approx(rkl.item(), rel=2e-2)
    half = D.jsd(s, t, beta=0.5)
    assert half.item() == pytest.approx(D.jsd(t, s, beta=0.5).item(), rel=1e-5)  # symmetric
    assert 0 < half.item() <= math.log(2)
    far = D.jsd(torch.tensor([[1e4, 0.0]]), torch.tensor([[0.0, 1e4]]), beta=0.5)  # disjoint supports
    assert far.item() == pytest.approx(math.log(2), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd_loss(beta):
    trl_gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="trl is not installed (extra: bench)")
    s, t, labels = _data(shape=(3, 9, 101), seed=6)
    want = trl_gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.7)
    (gw,) = torch.autograd.grad(want, s)
    got = D.jsd(s, t, labels=labels, beta=beta, temperature=1.7)
    (gg,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gg, gw, rtol=RTOL, atol=ATOL)


def test_skew_alpha_zero_is_plain_kl():
    s, t, _ = _data(shape=(2, 3, 13), seed=7)
    torch.testing.assert_close(D.skew_kl(s, t, alpha=0.0), D.forward_kl(s, t))
    torch.testing.assert_close(D.skew_rkl(s, t, alpha=0.0), D.reverse_kl(s, t))
    with pytest.raises(ValueError, match="alpha"):
        D.skew_kl(s, t, alpha=1.0)


# ------------------------------------------------------------------------------------------------
# Sinkhorn (SinKD)
# ------------------------------------------------------------------------------------------------
def test_sinkhorn_matches_paper_code_value_and_grad():
    s, t, labels = _data(shape=(2, 6, 23), seed=8, scale=1.5)
    valid = labels != -100
    out = D.sinkhorn(s, t, labels=labels, reduction="sum")  # paper defaults T=2, eps=0.1, 20 iterations
    (g,) = torch.autograd.grad(out, s)
    s64 = s.detach().double().requires_grad_()
    want = ref_sinkhorn_total(s64.reshape(-1, 23)[valid.reshape(-1)], t.double().reshape(-1, 23)[valid.reshape(-1)])
    (g64,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(out.double(), want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g.double(), g64, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(D.sinkhorn(s, t, labels=labels), out / valid.sum())


def test_sinkhorn_against_pot_exact_and_entropic_ot():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(7, 11, generator=g) * 2, torch.randn(7, 11, generator=g) * 2
    ps, pt = torch.softmax(s.double() / 2, -1), torch.softmax(t.double() / 2, -1)
    C = torch.cdist(ps, pt, p=1).numpy()
    a = b = [1 / 7] * 7
    entropic = ot.sinkhorn2(a, b, C, reg=0.1, numItermax=10000, stopThr=1e-12)
    ours = D.sinkhorn(s, t, eps=0.1, n_iters=200)  # mean = Σ P·C / M = OT cost with uniform 1/M marginals
    assert ours.item() == pytest.approx(float(entropic), rel=1e-4)
    exact = ot.emd2(a, b, C)
    sharp = D.sinkhorn(s, t, eps=0.01, n_iters=300)  # exp(-C/0.01) underflows in fp32; the log domain does not
    assert float(exact) - 1e-6 <= sharp.item() <= float(exact) + 0.005
    assert ours.item() >= float(exact) - 1e-6


def test_sinkhorn_group_size_splits_the_ot_batch():
    s, t, _ = _data(shape=(10, 13), seed=10)
    whole = D.sinkhorn(s, t, reduction="sum")
    parts = D.sinkhorn(s[:4], t[:4], reduction="sum") + D.sinkhorn(s[4:8], t[4:8], reduction="sum") + \
        D.sinkhorn(s[8:], t[8:], reduction="sum")
    torch.testing.assert_close(D.sinkhorn(s, t, group_size=4, reduction="sum"), parts)
    assert not torch.allclose(whole, parts)


# ------------------------------------------------------------------------------------------------
# sparse top-k teacher
# ------------------------------------------------------------------------------------------------
def ref_sparse(s, ids, lp, missing, V):
    """Densify the teacher per the policy and take KL(p_t ‖ p_s) (drop: Σ over the top-k only)."""
    q = torch.softmax(s.double(), -1)
    p_top = lp.double().exp()
    if missing == "drop":
        qk = q.gather(-1, ids)
        return (p_top * (p_top.log() - qk.log())).sum(-1)
    if missing == "renormalise":
        p = torch.zeros_like(q).scatter(-1, ids, p_top / p_top.sum(-1, keepdim=True))
    else:
        rest = (1 - p_top.sum(-1, keepdim=True)) / (V - ids.shape[-1])
        p = rest.expand_as(q).clone().scatter(-1, ids, p_top)
    return _kl(p, q)


@pytest.mark.parametrize("missing", D.MISSING_POLICIES)
def test_sparse_topk_against_densified_reference(missing):
    s, t, labels = _data(shape=(3, 5, 37), seed=11)
    top = torch.log_softmax(t, -1).topk(6, -1)
    out = D.sparse_topk_kl(s, (top.indices, top.values), labels=labels, missing=missing)
    (g,) = torch.autograd.grad(out, s)
    s64 = s.detach().double().requires_grad_()
    want = masked_mean(ref_sparse(s64, top.indices, top.values, missing, 37), labels != -100)
    (g64,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(out.double(), want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g.double(), g64, rtol=RTOL, atol=ATOL)
    dict_form = D.sparse_topk_kl(s, {"indices": top.indices, "values": top.values}, labels=labels, missing=missing)
    torch.testing.assert_close(dict_form, out)


def test_sparse_full_k_equals_dense_kl_and_bad_policy_raises():
    s, t, _ = _data(shape=(4, 19), seed=12)
    full = torch.log_softmax(t, -1).topk(19, -1)
    for missing in D.MISSING_POLICIES:
        torch.testing.assert_close(D.sparse_topk_kl(s, (full.indices, full.values), missing=missing),
                                   D.forward_kl(s, t), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="missing"):
        D.sparse_topk_kl(s, (full.indices, full.values), missing="zero")


# ------------------------------------------------------------------------------------------------
# DAC-KL
# ------------------------------------------------------------------------------------------------
def ref_dac(mod: D.DACKL, s, t, labels):
    """Row by row: sort the teacher, mass intervals, soft keep mask, renormalise both, KL."""
    out = []
    for i in range(s.shape[0]):
        p, q = torch.softmax(t[i].double(), -1), torch.softmax(s[i].double(), -1)
        ps, order = p.sort(descending=True)
        lo, hi = mod.bounds(ps[None].float())
        upto = torch.cumsum(ps, 0)
        c = torch.zeros_like(p).scatter(0, order, upto)
        a = torch.zeros_like(p).scatter(0, order, upto - ps)
        keep = torch.sigmoid((c - lo.double()) / mod.tau) * torch.sigmoid((hi.double() - a) / mod.tau)
        if labels is not None:
            keep = keep.clone()
            keep[labels[i]] = 1.0
        pk, qk = p * keep, q * keep
        out.append(_kl(pk / pk.sum(), qk / qk.sum()))
    return torch.stack(out)


def test_dac_kl_matches_reference_including_subnetwork_grads():
    torch.manual_seed(0)
    mod = D.DACKL(top_k=8, hidden=16, tau=0.05)
    with torch.no_grad():
        mod.net[2].weight.normal_(0, 1.0)
        mod.net[2].bias.copy_(torch.tensor([-1.0, 0.5]))  # a real clipping slice, not the near-KL start
    s, t, labels = _data(shape=(2, 4, 29), seed=13)
    out = mod(s, t, labels=labels)
    grads = torch.autograd.grad(out, [s, *mod.parameters()])
    v = (labels != -100).reshape(-1)
    s64 = s.detach().double().requires_grad_()
    want = ref_dac(mod, s64.reshape(-1, 29)[v], t.reshape(-1, 29)[v], labels.reshape(-1)[v]).sum() / v.sum()
    want_g = torch.autograd.grad(want, [s64, *mod.parameters()])
    torch.testing.assert_close(out.double(), want, rtol=RTOL, atol=ATOL)
    for a, b in zip(grads, want_g):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-5)
    assert grads[1].abs().sum() > 0  # the sub-network learns


def test_dac_kl_with_open_bounds_is_forward_kl():
    mod = D.DACKL(top_k=4, tau=1e-4)
    with torch.no_grad():
        mod.net[2].weight.zero_()
        mod.net[2].bias.copy_(torch.tensor([-40.0, 40.0]))  # l → 0, u → 1: almost nothing is clipped
    s, t, labels = _data(shape=(3, 4, 21), seed=14, scale=1.0)
    # the soft upper edge still halves the last ~τ of tail mass, hence the 1% tolerance
    torch.testing.assert_close(mod(s, t, labels=labels), D.forward_kl(s, t, labels=labels), rtol=1e-2, atol=1e-6)
    assert D.DACKL()(s, t, labels=labels).item() == pytest.approx(D.forward_kl(s, t, labels=labels).item(), rel=0.1)


def test_registry_examples_and_errors():
    for name in ["forward_kl", "reverse_kl", "jsd", "tv", "skew_kl", "skew_rkl", "sinkhorn", "sparse_topk_kl", "dac_kl"]:
        e = LOSSES.entry(name)
        assert e.paper
        args, kw = e.meta["example"]()
        out = LOSSES.build(name)(*args, **kw)
        assert out.dim() == 0 and torch.isfinite(out)
    s, t, _ = _data(shape=(2, 5))
    with pytest.raises(ValueError, match="differ"):
        D.forward_kl(s, t[:, :4])
    with pytest.raises(ValueError, match="reduction"):
        D.forward_kl(s, t, reduction="batchmean")
    with pytest.raises(KeyError, match="known"):
        D.get_divergence("kl")


@pytest.mark.parametrize("name,kw", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
                                     ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})])
def test_fused_gradients_equal_autograd_of_rows(name, kw):
    """The chunked engine's closed forms are exactly the derivatives of the row functions."""
    g = torch.Generator().manual_seed(15)
    s, t = torch.randn(6, 29, generator=g) * 3, torch.randn(6, 29, generator=g) * 3
    s[1, 2:6] = t[1, 2:6] = D.NEG_FLOOR  # -inf on both sides, as prepared by prepare_logits
    t[2, :3] = D.NEG_FLOOR
    div = D.get_divergence(name)
    leaf = s.clone().requires_grad_()
    rows = div.rows(leaf, t, **kw)
    (g_auto,) = torch.autograd.grad(rows.sum(), leaf)
    rows_f, g_f = div.fused(s.clone(), t.clone(), **kw)
    torch.testing.assert_close(rows_f, rows.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_f, g_auto, rtol=1e-5, atol=1e-6)
