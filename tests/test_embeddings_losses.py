"""Embedding losses against naive float64 references written from the formulas (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from still.losses.embedding import (
    embedding_cosine, embedding_mse, embedding_relation, multi_teacher_terms, score_kl, teacher_infonce,
)
from still.objective import Objective
from still.registry import LOSSES

NAMES = ["embedding_mse", "embedding_cosine", "embedding_relation", "score_kl", "teacher_infonce"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def naive_mse(s, t):
    b, d = s.shape
    return sum((s[i, k] - t[i, k]) ** 2 for i in range(b) for k in range(d)) / (b * d)


def naive_cosine(s, t):
    return sum(1 - _cos(s[i], t[i]) for i in range(s.shape[0])) / s.shape[0]


def naive_relation(s, t):
    b = s.shape[0]
    tot = sum((_cos(s[i], s[j]) - _cos(t[i], t[j])) ** 2 for i in range(b) for j in range(b) if i != j)
    return tot / (b * (b - 1))


def naive_score_kl(s, t, tau):
    b = s.shape[0]
    tot = 0.0
    for i in range(b):
        cs = torch.stack([_cos(s[i], s[j]) / tau for j in range(b) if j != i])
        ct = torch.stack([_cos(t[i], t[j]) / tau for j in range(b) if j != i])
        pt = torch.exp(ct) / torch.exp(ct).sum()
        ps = torch.exp(cs) / torch.exp(cs).sum()
        tot = tot + (pt * torch.log(pt / ps)).sum()
    return tot / b


def naive_pair_kl(q_s, d_s, q_t, d_t, tau):
    tot = 0.0
    for i in range(q_s.shape[0]):
        cs = torch.stack([_cos(q_s[i], d_s[j]) / tau for j in range(d_s.shape[0])])
        ct = torch.stack([_cos(q_t[i], d_t[j]) / tau for j in range(d_t.shape[0])])
        pt, ps = torch.softmax(ct, 0), torch.softmax(cs, 0)
        tot = tot + (pt * (pt.log() - ps.log())).sum()
    return tot / q_s.shape[0]


def naive_infonce(s, t, tau):
    b = s.shape[0]
    tot = 0.0
    for i in range(b):
        logits = torch.stack([_cos(s[i], t[j]) / tau for j in range(b)])
        tot = tot - (logits[i] - torch.log(torch.exp(logits).sum()))
    return tot / b


def _pair(b: int, ds: int, dt: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, ds, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, dt, generator=g, dtype=torch.float64)
    return s, t


CASES = [
    ("mse", embedding_mse, naive_mse, {}, True),
    ("cosine", embedding_cosine, naive_cosine, {}, True),
    ("relation", embedding_relation, naive_relation, {}, False),
    ("score_kl", lambda s, t: score_kl(s, t, temperature=0.3), lambda s, t: naive_score_kl(s, t, 0.3), {}, False),
    ("infonce", lambda s, t: teacher_infonce(s, t, temperature=0.2), lambda s, t: naive_infonce(s, t, 0.2), {}, True),
]


@pytest.mark.parametrize("name,fn,ref,kw,same", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("b,ds,dt", [(5, 4, 7), (2, 1, 3), (7, 6, 6)])
def test_value_and_gradient_match_naive(name, fn, ref, kw, same, b, ds, dt):
    dt = ds if same else dt
    s, t = _pair(b, ds, dt, seed=b * 10 + ds)
    got = fn(s, t)
    want = ref(s, t)
    assert got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    (g1,) = torch.autograd.grad(got, s)
    (g2,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_score_kl_query_candidate_pairs_match_naive():
    g = torch.Generator().manual_seed(3)
    qs, ds_ = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True), torch.randn(6, 5, generator=g, dtype=torch.float64)
    qt, dt = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    got = score_kl([qs, ds_], [qt, dt], temperature=0.5)
    want = naive_pair_kl(qs, ds_, qt, dt, 0.5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, qs)[0], torch.autograd.grad(want, qs)[0])


def test_score_kl_teacher_temperature_differs():
    s, t = _pair(5, 3, 4)
    a = score_kl(s, t, temperature=0.2, teacher_temperature=0.05)
    assert not torch.isclose(a, score_kl(s, t, temperature=0.2))


def test_analytic_cases():
    s, _ = _pair(6, 5, 5)
    x = s.detach()
    assert embedding_mse(x, x) == 0
    assert abs(float(embedding_cosine(x, 3.0 * x))) < 1e-12
    # relation and score-KL only see cosines: a rotation plus zero padding to another width changes nothing
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    rot = torch.cat([x @ q, torch.zeros(6, 3, dtype=torch.float64)], 1)
    assert abs(float(embedding_relation(x, rot))) < 1e-12
    assert abs(float(score_kl(x, rot))) < 1e-9
    # InfoNCE of identical embeddings everywhere is log(B); of orthonormal pairs at small τ, ≈ 0
    same = torch.ones(4, 3, dtype=torch.float64)
    assert math.isclose(float(teacher_infonce(same, same)), math.log(4), rel_tol=1e-12)
    eye = torch.eye(4, dtype=torch.float64)
    assert float(teacher_infonce(eye, eye, temperature=0.01)) < 1e-30
    sym = teacher_infonce(x, rot[:, :5], temperature=0.5, symmetric=True)
    assert sym > 0


def test_errors_name_the_problem():
    s, t = _pair(4, 3, 5)
    with pytest.raises(ValueError, match="adapter"):
        embedding_mse(s, t)
    with pytest.raises(ValueError, match="batch"):
        embedding_relation(s, t[:3])
    with pytest.raises(ValueError, match="at least 2"):
        embedding_relation(s[:1], t[:1])


def test_registered_with_examples_and_papers():
    for n in NAMES:
        e = LOSSES.entry(n)
        args, kwargs = e.meta["example"]()
        v = LOSSES.build(n)(*args, **kwargs)
        assert v.shape == () and torch.isfinite(v)
        v.backward()
        assert torch.isfinite(args[0].grad).all()
    assert LOSSES.entry("score_kl").paper.startswith("Lupart")
    assert LOSSES.entry("embedding_relation").meta["shape_check"] == "batch"


def test_multi_teacher_terms_one_head_per_teacher():
    torch.manual_seed(0)
    obj = Objective(multi_teacher_terms({"minilm": 1.0, "mpnet": 0.5}, relation_weight=0.1))
    s = torch.randn(6, 4, requires_grad=True)
    tv = {"minilm": torch.randn(6, 3), "mpnet": torch.randn(6, 8)}
    obj.validate({"embedding": s}, tv, {})
    heads = {k: v.inner for k, v in obj.adapters.items()}
    assert heads["embedding_cosine_minilm"].weight.shape == (3, 4)
    assert heads["embedding_cosine_mpnet"].weight.shape == (8, 4)
    out = obj({"embedding": s}, tv, {})
    want = (out["embedding_cosine_minilm"] + 0.5 * out["embedding_cosine_mpnet"]
            + 0.1 * out["relation_minilm"] + 0.05 * out["relation_mpnet"])
    torch.testing.assert_close(out["total"], want)
    # each head's value is the cosine loss of its own projection
    proj = heads["embedding_cosine_mpnet"](s)
    torch.testing.assert_close(out["embedding_cosine_mpnet"], embedding_cosine(proj, tv["mpnet"]))
    out["total"].backward()
    assert s.grad is not None and all(p.grad is not None for p in obj.parameters())
    with pytest.raises(ValueError, match="at least one"):
        multi_teacher_terms({})
