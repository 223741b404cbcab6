"""Chunked fused-linear engine vs the dense divergences vs the naive float64 references (tests/test_divergences.py)."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

from still.losses import divergences as D
from still.losses.chunked import chunked_distill_loss, default_chunk_size, densify_topk
from still.losses.llm_span import LMDistillLoss
from still.objective import Objective, Term
from still.registry import LOSSES
from test_divergences import REFS, masked_mean, ref_sinkhorn_total, ref_sparse

RTOL, ATOL = 5e-4, 1e-5
N, HS, HT, V = 37, 12, 20, 123  # N not a multiple of the chunk (8), V odd


def _setup(seed=0, n=N, v=V, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, HS, generator=g)
    ws = torch.randn(v, HS, generator=g) * 0.6
    bs = torch.randn(v, generator=g) * 0.3 if bias else None
    ht = torch.randn(n, HT, generator=g)
    wt = torch.randn(v, HT, generator=g) * 0.6
    bt = torch.randn(v, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 6, 20, n - 1]] = -100
    leaves = [x.to(dtype).requires_grad_() for x in (hs, ws)] + ([bs.to(dtype).requires_grad_()] if bias else [None])
    return leaves, (ht.to(dtype), wt.to(dtype), bt.to(dtype)), labels


def _grads(loss, leaves):
    return torch.autograd.grad(loss, [x for x in leaves if x is not None])


def _logits(h, w, b):
    z = h @ w.t()
    return z + b if b is not None else z


DENSE_KEYS = list(REFS)


CASES = [(k, True) for k in DENSE_KEYS] + [(k, False) for k in ("forward_kl", "reverse_kl", "jsd_b03")]


@pytest.mark.parametrize("key,fused", CASES)
def test_chunked_vs_dense_vs_naive(key, fused):
    """fused=True: closed-form chunk gradients where they exist; False: autograd of the row function."""
    (hs, ws, bs), (ht, wt, bt), labels = _setup()
    name = "jsd" if key.startswith("jsd") else key
    params = REFS[key][1]
    T = 2.0
    loss = chunked_distill_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=labels, divergence=name,
                                divergence_params=params, temperature=T, chunk_size=8, use_fused=fused)
    g_chunk = _grads(loss, (hs, ws, bs))
    zs, zt = _logits(hs, ws, bs), _logits(ht, wt, bt)
    dense = LOSSES.get(name)(zs, zt, labels=labels, temperature=T, **params)
    g_dense = _grads(dense, (hs, ws, bs))
    ref_fn = REFS[key][0]
    leaves64 = [x.detach().double().requires_grad_() for x in (hs, ws, bs)]
    naive = masked_mean(ref_fn(_logits(*leaves64), zt.detach().double(), T, **params), labels != -100)
    g_naive = torch.autograd.grad(naive, leaves64)
    torch.testing.assert_close(loss, dense, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss.double(), naive, rtol=RTOL, atol=ATOL)
    for a, b, c in zip(g_chunk, g_dense, g_naive):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(a.double(), c, rtol=RTOL, atol=ATOL)
    assert g_chunk[0][0].abs().max() == 0  # an ignored token's hidden state gets no gradient


def test_ce_in_the_same_pass_and_t2_scaling():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(1)
    loss = chunked_distill_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=labels, divergence="jsd",
                                divergence_params={"beta": 0.3}, temperature=3.0, scale_t2=True, kd_weight=0.7,
                                ce_weight=0.3, chunk_size=5)
    zs, zt = _logits(hs, ws, bs), _logits(ht, wt, bt)
    want = 0.7 * 9.0 * D.jsd(zs, zt, labels=labels, beta=0.3, temperature=3.0) + 0.3 * F.cross_entropy(zs, labels)
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=ATOL)
    for a, b in zip(_grads(loss, (hs, ws, bs)), _grads(want, (hs, ws, bs))):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_chunking_never_changes_the_value_and_global_normalisation():
    (hs, ws, bs), (ht, wt, _), labels = _setup(2)
    vals = [chunked_distill_loss(hs, ws, ht, wt, labels=labels, chunk_size=c) for c in (1, 7, 16, 1000)]
    for v in vals[1:]:
        torch.testing.assert_close(v, vals[0], rtol=1e-6, atol=1e-7)
    n_valid = int((labels != -100).sum())
    a = chunked_distill_loss(hs[:17], ws, ht[:17], wt, labels=labels[:17], num_valid=n_valid)
    b = chunked_distill_loss(hs[17:], ws, ht[17:], wt, labels=labels[17:], num_valid=torch.tensor(n_valid))
    torch.testing.assert_close(a + b, vals[0], rtol=1e-6, atol=1e-7)  # gradient accumulation / DDP stays exact


@pytest.mark.parametrize("missing", D.MISSING_POLICIES)
def test_topk_teacher_chunked_vs_dense_vs_naive(missing):
    (hs, ws, bs), (ht, wt, bt), labels = _setup(3)
    top = torch.log_softmax(_logits(ht, wt, bt), -1).topk(7, -1)
    loss = chunked_distill_loss(hs, ws, student_bias=bs, teacher_topk=(top.indices, top.values), labels=labels,
                                divergence="sparse_topk_kl", divergence_params={"missing": missing}, chunk_size=6)
    zs = _logits(hs, ws, bs)
    dense = D.sparse_topk_kl(zs, (top.indices, top.values), labels=labels, missing=missing)
    leaves64 = [x.detach().double().requires_grad_() for x in (hs, ws, bs)]
    naive = masked_mean(ref_sparse(_logits(*leaves64), top.indices, top.values, missing, V), labels != -100)
    torch.testing.assert_close(loss, dense, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss.double(), naive, rtol=RTOL, atol=ATOL)
    for a, b, c in zip(_grads(loss, (hs, ws, bs)), _grads(dense, (hs, ws, bs)), torch.autograd.grad(naive, leaves64)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(a.double(), c, rtol=RTOL, atol=ATOL)


def test_sinkhorn_chunk_is_the_ot_group():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(4)
    loss = chunked_distill_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=labels, divergence="sinkhorn",
                                divergence_params={"group_size": 8}, temperature=2.0)
    zs, zt = _logits(hs, ws, bs), _logits(ht, wt, bt)
    dense = D.sinkhorn(zs, zt, labels=labels, group_size=8)
    v = labels != -100
    leaves64 = [x.detach().double().requires_grad_() for x in (hs, ws, bs)]
    s64, t64 = _logits(*leaves64)[v], zt.detach().double()[v]
    naive = sum(ref_sinkhorn_total(s64[a:a + 8], t64[a:a + 8]) for a in range(0, len(s64), 8)) / v.sum()
    torch.testing.assert_close(loss, dense, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss.double(), naive, rtol=RTOL, atol=ATOL)
    for a, b, c in zip(_grads(loss, (hs, ws, bs)), _grads(dense, (hs, ws, bs)), torch.autograd.grad(naive, leaves64)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(a.double(), c, rtol=RTOL, atol=ATOL)


def test_dac_kl_module_trains_through_the_chunked_engine():
    torch.manual_seed(0)
    mod = D.DACKL(top_k=8, hidden=16, tau=0.05)
    with torch.no_grad():
        mod.net[2].weight.normal_(0, 1.0)
        mod.net[2].bias.copy_(torch.tensor([-1.0, 0.5]))
    (hs, ws, bs), (ht, wt, bt), labels = _setup(5)
    loss = chunked_distill_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=labels, divergence=mod,
                                chunk_size=8)
    params = [hs, ws, bs, *mod.parameters()]
    got = torch.autograd.grad(loss, params)
    dense = mod(_logits(hs, ws, bs), _logits(ht, wt, bt), labels=labels)
    want = torch.autograd.grad(dense, params)
    torch.testing.assert_close(loss, dense, rtol=RTOL, atol=ATOL)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert got[3].abs().sum() > 0


def test_cached_teacher_logits_with_extreme_and_minus_inf_entries():
    (hs, ws, _), (ht, wt, bt), labels = _setup(6, bias=False)
    zt = _logits(ht, wt, bt).detach()
    zt[1, :10] = float("-inf")
    zt[2, 3], zt[3, 4] = 1e4, -1e4
    bs = torch.zeros(V)
    bs[-3:] = float("-inf")  # banned student tokens (and the teacher bans them too)
    zt[:, -3:] = float("-inf")
    bs.requires_grad_()
    labels = labels.clamp_max(V - 4)  # the CE target is never a banned token
    for div, fused in [(d, True) for d in ["forward_kl", "reverse_kl", "jsd", "tv", "skew_kl", "skew_rkl"]] + \
            [(d, False) for d in ["forward_kl", "reverse_kl", "jsd"]]:
        loss = chunked_distill_loss(hs, ws, student_bias=bs, teacher_logits=zt, labels=labels, divergence=div,
                                    chunk_size=8, ce_weight=0.5, use_fused=fused)
        gs = _grads(loss, (hs, ws, bs))
        dense = LOSSES.get(div)(_logits(hs, ws, bs), zt, labels=labels) + 0.5 * F.cross_entropy(_logits(hs, ws, bs), labels)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in gs), div
        if torch.isfinite(dense):
            torch.testing.assert_close(loss, dense, rtol=RTOL, atol=ATOL)
        else:  # reverse KLs: the teacher bans tokens the student likes, a truly infinite divergence
            assert div in ("reverse_kl", "skew_rkl") and loss > 1e25
        assert (gs[2][-3:] == 0).all()


def test_all_masked_gives_zero_loss_and_zero_grads():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(7)
    for kw in ({"labels": torch.full_like(labels, -100)}, {"mask": torch.zeros(N, dtype=torch.bool)}):
        bs.data[:2] = float("-inf")  # a banned token must not turn 0 into NaN
        loss = chunked_distill_loss(hs, ws, ht, wt, student_bias=bs, ce_weight=0.5,
                                    **({"labels": labels} | kw))
        gs = _grads(loss, (hs, ws, bs))
        assert loss.item() == 0.0 and all(torch.isfinite(g).all() and (g == 0).all() for g in gs)


def test_bf16():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(8, dtype=torch.bfloat16)
    loss = chunked_distill_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=labels, divergence="jsd",
                                chunk_size=8, ce_weight=0.2)
    gs = _grads(loss, (hs, ws, bs))
    assert loss.dtype == torch.float32 and [g.dtype for g in gs] == [torch.bfloat16] * 3
    f32 = [x.detach().float().requires_grad_() for x in (hs, ws, bs)]
    zs = _logits(*f32)
    want = D.jsd(zs, _logits(ht, wt, bt).float(), labels=labels) + 0.2 * F.cross_entropy(zs, labels)
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-3)
    for a, b in zip(gs, torch.autograd.grad(want, f32)):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-3)
    # mixed precision (autocast-style): bf16 hidden states, fp32 head -> GEMMs in bf16, grads in each leaf's dtype
    ws32 = ws.detach().float().requires_grad_()
    mixed = chunked_distill_loss(hs, ws32, ht, wt.float(), labels=labels, divergence="jsd", chunk_size=8)
    g_h, g_w = torch.autograd.grad(mixed, [hs, ws32])
    assert g_h.dtype == torch.bfloat16 and g_w.dtype == torch.float32
    torch.testing.assert_close(mixed, chunked_distill_loss(hs, ws, ht, wt, labels=labels, divergence="jsd", chunk_size=8))


def test_softcap_matches_dense():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(9)
    loss = chunked_distill_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=labels, temperature=1.5,
                                student_softcap=3.0, teacher_softcap=4.0, ce_weight=0.5, chunk_size=8)
    zs = torch.tanh(_logits(hs, ws, bs) / 3.0) * 3.0
    zt = torch.tanh(_logits(ht, wt, bt) / 4.0) * 4.0
    want = D.forward_kl(zs, zt, labels=labels, temperature=1.5) + 0.5 * F.cross_entropy(zs, labels)
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=ATOL)
    for a, b in zip(_grads(loss, (hs, ws, bs)), _grads(want, (hs, ws, bs))):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_no_grad_forward_and_teacher_gets_no_gradient():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(10)
    wt.requires_grad_()
    with torch.no_grad():
        v = chunked_distill_loss(hs, ws, ht, wt, labels=labels)
    assert not v.requires_grad
    loss = chunked_distill_loss(hs, ws, ht, wt, labels=labels)
    loss.backward()
    assert wt.grad is None and ws.grad is not None
    torch.testing.assert_close(v, loss.detach())


def test_errors_are_clear():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(11)
    with pytest.raises(ValueError, match="exactly one teacher"):
        chunked_distill_loss(hs, ws, labels=labels)
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_distill_loss(hs, ws, ht, wt[:-1], labels=labels)
    with pytest.raises(ValueError, match="teacher_topk"):
        chunked_distill_loss(hs, ws, ht, wt, divergence="sparse_topk_kl")
    with pytest.raises(TypeError, match="beta"):
        chunked_distill_loss(hs, ws, ht, wt, divergence="forward_kl", divergence_params={"beta": 0.5})
    with pytest.raises(ValueError, match="labels"):
        chunked_distill_loss(hs, ws, ht, wt, ce_weight=1.0)
    assert default_chunk_size(32768, 10_000) == 256 and default_chunk_size(131072, 10_000) == 128
    assert default_chunk_size(123, 5) == 5


HeadOut = namedtuple("HeadOut", "hidden weight bias softcap")


def test_objective_term_with_head_views_and_bound_heads():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(12)
    B, T = 1, N
    student_head, teacher_head = torch.nn.Linear(HS, V), torch.nn.Linear(HT, V)
    s_view = HeadOut(hs.reshape(B, T, HS), student_head.weight, student_head.bias, None)
    t_view = HeadOut(ht.reshape(B, T, HT), teacher_head.weight, teacher_head.bias, None)
    loss = LOSSES.build("chunked_kd", divergence="jsd", divergence_params={"beta": 0.5}, ce_weight=0.1)
    obj = Objective([Term("kd", loss, student="lm", teacher="lm", inputs={"labels": "labels"})])
    out = obj({"lm": s_view}, {"lm": t_view}, {"labels": labels.reshape(B, T)})
    out["total"].backward()
    zs, zt = student_head(hs), teacher_head(ht)
    want = D.jsd(zs, zt, labels=labels) + 0.1 * F.cross_entropy(zs, labels)
    torch.testing.assert_close(out["kd"], want, rtol=RTOL, atol=ATOL)
    assert student_head.weight.grad is not None and teacher_head.weight.grad is None
    # the same with plain hidden-state views and heads bound once; cached logits; DAC-KL as a trainable sub-module
    bound = LMDistillLoss(divergence="jsd", divergence_params={"beta": 0.5}, ce_weight=0.1).bind(student_head, teacher_head)
    torch.testing.assert_close(bound(hs[None], ht[None], labels=labels[None]), want)
    cached = LMDistillLoss(divergence="jsd", divergence_params={"beta": 0.5}, ce_weight=0.1).bind(student_head)
    torch.testing.assert_close(cached(hs[None], zt[None].detach(), labels=labels[None]), want)
    dac = LMDistillLoss(divergence="dac_kl", divergence_params={"top_k": 4}).bind(student_head, teacher_head)
    assert len(list(Objective([Term("dac", dac, student="h", teacher="h")]).parameters())) == 4
    with pytest.raises(RuntimeError, match="bind"):
        LMDistillLoss()(hs[None], ht[None])


def test_padded_vocab_rows():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(13)
    pad_s = torch.cat([ws.detach(), torch.randn(5, HS)]).requires_grad_()
    pad_t = torch.cat([wt, torch.randn(9, HT)])
    loss = LMDistillLoss(vocab_rows=V)(hs[None], ht[None], labels=labels[None], student_head=pad_s, teacher_head=pad_t)
    want = D.forward_kl(hs @ ws.t(), ht @ wt.t(), labels=labels)
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=ATOL)
    (g,) = torch.autograd.grad(loss, pad_s)
    assert (g[V:] == 0).all()


def test_kd_mask_ce_only_and_densified_topk_teacher():
    (hs, ws, bs), (ht, wt, bt), labels = _setup(14)
    zt = _logits(ht, wt, bt)
    km = torch.rand(N, generator=torch.Generator().manual_seed(1)) > 0.4
    loss = chunked_distill_loss(hs, ws, student_bias=bs, teacher_logits=zt, labels=labels, kd_mask=km, ce_weight=0.5,
                                divergence="jsd", chunk_size=8)
    zs = _logits(hs, ws, bs)
    want = D.jsd(zs, zt, labels=labels, mask=km) + 0.5 * F.cross_entropy(zs, labels)  # KD on km, CE on all valid
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=ATOL)
    for a, b in zip(_grads(loss, (hs, ws, bs)), _grads(want, (hs, ws, bs))):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    ce_only = chunked_distill_loss(hs, ws, student_bias=bs, labels=labels, kd_weight=0.0, ce_weight=1.0, chunk_size=8)
    torch.testing.assert_close(ce_only, F.cross_entropy(zs, labels), rtol=RTOL, atol=ATOL)
    top = torch.log_softmax(zt, -1).topk(9, -1)
    for missing in ("uniform", "renormalise"):  # forward KL from a densified top-k == the sparse formula
        dense_fkl = chunked_distill_loss(hs, ws, student_bias=bs, teacher_topk=(top.indices, top.values),
                                         labels=labels, topk_missing=missing, chunk_size=8)
        sparse = D.sparse_topk_kl(_logits(hs, ws, bs), (top.indices, top.values), labels=labels, missing=missing)
        torch.testing.assert_close(dense_fkl, sparse, rtol=RTOL, atol=ATOL)
        for a, b in zip(_grads(dense_fkl, (hs, ws, bs)), _grads(sparse, (hs, ws, bs))):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    t_dense = densify_topk(top.indices, top.values, V, "uniform")
    assert torch.allclose(t_dense.exp().sum(-1), torch.ones(N), atol=1e-5)
    jsd_topk = chunked_distill_loss(hs, ws, student_bias=bs, teacher_topk={"indices": top.indices, "values": top.values},
                                    labels=labels, divergence="jsd", chunk_size=8)
    torch.testing.assert_close(jsd_topk, D.jsd(zs, t_dense, labels=labels), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="drop"):
        chunked_distill_loss(hs, ws, teacher_topk=(top.indices, top.values), topk_missing="drop")


@pytest.mark.parametrize("fused", [True, False])
def test_kd_vocab_ce_over_extra_rows_and_tempered_topk(fused):
    """KD on the first K logits, CE on all V (a sub-vocab student's UNK row); a densified top-k teacher is
    tempered like teacher logits; value and gradient vs the dense path written out."""
    (hs, ws, bs), (ht, wt, bt), labels = _setup(15)
    K, T = V - 4, 2.0
    zs, zt = _logits(hs, ws, bs), _logits(ht, wt[:K], bt[:K])
    loss = chunked_distill_loss(hs, ws, ht, wt[:K], student_bias=bs, teacher_bias=bt[:K], labels=labels, kd_vocab=K,
                                divergence="jsd", divergence_params={"beta": 0.3}, temperature=T, ce_weight=0.4,
                                chunk_size=8, use_fused=fused)
    want = D.jsd(zs[:, :K], zt, labels=labels, beta=0.3, temperature=T) + 0.4 * F.cross_entropy(zs, labels)
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=ATOL)
    for a, b in zip(_grads(loss, (hs, ws, bs)), _grads(want, (hs, ws, bs))):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    top = torch.log_softmax(_logits(ht, wt, bt), -1).topk(9, -1)  # over V ids; KD over the first K
    topk = {"indices": top.indices, "values": top.values, "vocab_size": V}
    loss = chunked_distill_loss(hs, ws, student_bias=bs, teacher_topk=topk, labels=labels, kd_vocab=K,
                                divergence="reverse_kl", temperature=T, chunk_size=8, use_fused=fused)
    t_dense = densify_topk(top.indices, top.values, V, "uniform")[:, :K]
    want = D.reverse_kl(_logits(hs, ws, bs)[:, :K], t_dense, labels=labels, temperature=T)
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=ATOL)
    for a, b in zip(_grads(loss, (hs, ws, bs)), _grads(want, (hs, ws, bs))):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="kd_vocab"):
        chunked_distill_loss(hs, ws, ht, wt, kd_vocab=V + 1)
    with pytest.raises(ValueError, match="smaller than kd_vocab"):
        chunked_distill_loss(hs, ws, teacher_topk={**topk, "vocab_size": K - 1}, kd_vocab=K, divergence="jsd")
