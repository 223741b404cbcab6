"""lm_kd and span_kd: value and gradient against naive references written from the formulas."""

from __future__ import annotations

import pytest
import torch

from still.integrations.causal_lm import LMHeadOutputs, VocabMismatchError, topk_logits
from still.losses.llm_span import lm_kd, span_kd, topk_to_logprobs, word_span_ids


def _val(x: torch.Tensor | float) -> float:
    """A scalar's value as a float, detached first (no requires_grad-to-scalar warning)."""
    return x.detach().item() if isinstance(x, torch.Tensor) else float(x)


def _topk_case(seed: int, T: int, V: int, k: int, missing: str = "uniform"):
    """A fused-student / top-k-teacher set-up (B=2, H=4): the generator (for further draws), student hidden
    states `h` and head `w` (both requiring grad), the teacher's top-k ids and log-probs `(B, T, k)` and
    their densified log-probs `(B, T, V)`."""
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 4
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    lp = torch.log_softmax(torch.randn(B, T, V, generator=g), -1)
    vals, idx = lp.topk(k, -1)
    dense = topk_to_logprobs(idx.reshape(-1, k), vals.reshape(-1, k), V, missing).view(B, T, V)
    return g, h, w, idx, vals, dense


def _naive_div(name: str, zs: torch.Tensor, zt: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """One row, straight from the definitions (float64)."""
    ps, pt = torch.softmax(zs.double(), -1), torch.softmax(zt.double(), -1)

    def kl(p, q):
        keep = p > 0
        return (p[keep] * (p[keep].log() - q[keep].log())).sum()

    if name == "forward_kl":
        return kl(pt, ps)
    if name == "reverse_kl":
        return kl(ps, pt)
    if name == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    if name == "tvd":
        return 0.5 * (pt - ps).abs().sum()
    if name == "skew_kl":
        return kl(pt, alpha * pt + (1 - alpha) * ps)
    raise KeyError(name)


def _naive_lm_kd(zs, zt, labels, div, ce_weight, kd_rows, temperature=1.0, **kw):
    """Shifted next-token KD + CE, mean over valid positions (loops over positions)."""
    B, T, _ = zs.shape
    kd, ce, n = 0.0, 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            if labels[b, t + 1] == -100:
                continue
            n += 1
            kd = kd + _naive_div(div, zs[b, t, :kd_rows] / temperature, zt[b, t, :kd_rows] / temperature, **kw)
            ce = ce - torch.log_softmax(zs[b, t].double(), -1)[labels[b, t + 1]]
    return (kd + ce_weight * ce) / max(n, 1)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"])
@pytest.mark.parametrize("fused", [False, True])
def test_lm_kd_matches_naive_value_and_grad(div, fused):
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 7, 5, 13  # odd shapes; chunk 3 does not divide 14 positions
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(V + 1, H, generator=g).requires_grad_()  # one extra student row (a sub-vocab UNK)
    th, tw = torch.randn(B, T, 4, generator=g), torch.randn(V, 4, generator=g)
    labels = torch.randint(0, V + 1, (B, T), generator=g)
    labels[0, 3] = labels[1, 6] = -100
    student = LMHeadOutputs(h, w) if fused else h @ w.t()
    teacher = LMHeadOutputs(th, tw) if fused else th @ tw.t()
    got = lm_kd(student, teacher, labels=labels, divergence=div, ce_weight=0.3, kd_rows=V, chunk_size=3,
                temperature=2.0)
    ref = _naive_lm_kd(h @ w.t(), th @ tw.t(), labels, div, 0.3, V, temperature=2.0)
    assert _val(got) == pytest.approx(_val(ref), rel=5e-4, abs=1e-5)
    g1 = torch.autograd.grad(got, [h, w])
    g2 = torch.autograd.grad(ref, [h, w])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b.float(), rtol=5e-4, atol=1e-5)


def test_lm_kd_all_masked_is_zero_without_nan():
    h = torch.randn(2, 4, 3, requires_grad=True)
    w = torch.randn(6, 3, requires_grad=True)
    out = lm_kd(LMHeadOutputs(h, w), LMHeadOutputs(torch.randn(2, 4, 3), torch.randn(6, 3)),
                labels=torch.full((2, 4), -100), ce_weight=0.5)
    out.backward()
    assert _val(out) == 0.0 and torch.isfinite(h.grad).all() and _val(h.grad.abs().sum()) == 0.0


def test_lm_kd_identical_distributions_give_zero_kd():
    z = torch.randn(2, 5, 9)
    assert _val(lm_kd(z, z.clone(), divergence="jsd")) == pytest.approx(0.0, abs=1e-6)


def test_lm_kd_refuses_misaligned_vocabularies():
    with pytest.raises(VocabMismatchError, match="kd_rows"):
        lm_kd(torch.randn(1, 3, 10), torch.randn(1, 3, 12))
    # explicit alignment works: the first 10 rows of both
    assert torch.isfinite(lm_kd(torch.randn(1, 3, 10), torch.randn(1, 3, 12), kd_rows=10))


def test_kd_mask_limits_kd_to_generated_positions():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(1, 6, 7, generator=g), torch.randn(1, 6, 7, generator=g)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.bool)  # targets 3..5 → predicting positions 2..4
    got = lm_kd(zs, zt, kd_mask=mask)
    ref = sum(_naive_div("forward_kl", zs[0, t], zt[0, t]) for t in (2, 3, 4)) / 3
    assert _val(got) == pytest.approx(_val(ref), rel=1e-5)


@pytest.mark.parametrize("missing", ["uniform", "renormalize"])
def test_topk_teacher_fused_equals_dense_reconstruction(missing):
    B, T, V = 2, 5, 11
    _, h, w, idx, vals, dense = _topk_case(4, T, V, k=4, missing=missing)
    # reconstruction: top-k kept exactly; the rest uniform (or dropped and renormalised)
    if missing == "uniform":
        assert torch.allclose(dense.exp().sum(-1), torch.ones(B, T), atol=1e-5)
        assert torch.allclose(dense.gather(-1, idx), vals)
    got = lm_kd(LMHeadOutputs(h, w), topk_logits(idx, vals, V), missing=missing)
    ref = sum(_naive_div("forward_kl", (h @ w.t())[b, t], dense[b, t]) for b in range(B) for t in range(T - 1)) / (B * (T - 1))
    assert _val(got) == pytest.approx(_val(ref), rel=5e-4)
    gh = torch.autograd.grad(got, h)[0]
    gr = torch.autograd.grad(ref, h)[0]
    torch.testing.assert_close(gh, gr.float(), rtol=5e-4, atol=1e-5)


def _naive_span(zs, zt, spans):
    ps, pt = torch.softmax(zs.double(), -1), torch.softmax(zt.double(), -1)
    tot, n = 0.0, 0
    for b in range(zs.shape[0]):
        for i in range(zs.shape[1] - 1):
            if spans[b, i] == spans[b, i + 1]:
                tot = tot + ((ps[b, i] * ps[b, i + 1] - pt[b, i] * pt[b, i + 1]) ** 2).sum()
                n += 1
    return tot / max(n, 1)


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_span_kd_matches_naive(chunk):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 7, 3, generator=g, requires_grad=True)
    w = torch.randn(9, 3, generator=g, requires_grad=True)
    th, tw = torch.randn(2, 7, 4, generator=g), torch.randn(9, 4, generator=g)
    spans = torch.tensor([[1, 1, 2, 2, 2, 3, 3], [4, 5, 5, 6, 6, 6, 6]])  # row ends never pair across rows
    got = span_kd(LMHeadOutputs(h, w), LMHeadOutputs(th, tw), spans, chunk_size=chunk)
    ref = _naive_span(h @ w.t(), th @ tw.t(), spans)
    assert _val(got) == pytest.approx(_val(ref), rel=5e-4)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(ref, [h, w])):
        torch.testing.assert_close(a, b.float(), rtol=5e-4, atol=1e-6)
    dense = span_kd(h @ w.t(), th @ tw.t(), spans)
    assert _val(dense) == pytest.approx(_val(ref), rel=5e-4)
    mixed = span_kd(LMHeadOutputs(h, w), th @ tw.t(), spans, chunk_size=chunk)  # fused student, cached teacher
    assert _val(mixed) == pytest.approx(_val(ref), rel=5e-4)


@pytest.mark.parametrize("div", ["jsd", "reverse_kl", "tvd"])
def test_topk_teacher_other_divergences_tempered_like_logits(div):
    """A top-k teacher with a divergence other than forward KL: densified (missing mass uniform), then
    treated as teacher logits (1/T applies), fused student (engine) == dense student == naive."""
    B, T, V = 2, 6, 13
    g, h, w, idx, vals, dense_t = _topk_case(6, T, V, k=5)
    labels = torch.randint(0, V, (B, T), generator=g)
    got = lm_kd(LMHeadOutputs(h, w), topk_logits(idx, vals, V), labels=labels, divergence=div, temperature=2.0,
                ce_weight=0.2, chunk_size=4)
    ref = _naive_lm_kd(h @ w.t(), dense_t, labels, div, 0.2, V, temperature=2.0)
    assert _val(got) == pytest.approx(_val(ref), rel=5e-4, abs=1e-6)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(ref, [h, w])):
        torch.testing.assert_close(a, b.float(), rtol=5e-4, atol=1e-5)
    flat = lm_kd(h @ w.t(), topk_logits(idx, vals, V), labels=labels, divergence=div, temperature=2.0, ce_weight=0.2)
    assert _val(flat) == pytest.approx(_val(ref), rel=5e-4, abs=1e-6)


def test_word_span_ids():
    starts = torch.zeros(10, dtype=torch.bool)
    starts[[0, 5]] = True
    ids = torch.tensor([[1, 2, 5, 3, 5, 0]])
    assert word_span_ids(ids, starts).tolist() == [[1, 1, 2, 2, 3, 4]]
