"""Feature and relation losses (fitnets, at, rkd, sp, pkt) against naive float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from still.losses.features import attention_transfer, fitnets
from still.losses.relations import pkt, rkd, similarity_preserving

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _rand(*shape: int, seed: int = 0, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def _check(value: torch.Tensor, ref: torch.Tensor, inp: torch.Tensor, rtol: float = 1e-9) -> None:
    g_val, = torch.autograd.grad(value, inp, retain_graph=True)
    g_ref, = torch.autograd.grad(ref, inp, retain_graph=True)
    assert value.dim() == 0
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(g_val, g_ref, rtol=1e-7, atol=1e-10)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x)


# ----------------------------------------------------------------------------------- FitNets
def test_fitnets_matches_naive_mse() -> None:
    s, t = _rand(3, 5, 4, 3, grad=True), _rand(3, 5, 4, 3, seed=1)
    ref = sum((s[idx] - t[idx]) ** 2 for idx in __import__("itertools").product(*map(range, s.shape))) / s.numel()
    _check(fitnets(s, t), ref, s)
    assert float(fitnets(s, s.detach())) == 0.0
    with pytest.raises(ValueError, match="adapter"):
        fitnets(s, _rand(3, 6, 4, 3))


# ----------------------------------------------------------------------------------- attention transfer
def naive_adaptive_pool(f: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Adaptive average pooling by its definition: bin i covers [floor(i·H/h), ceil((i+1)·H/h))."""
    h, w = f.shape[2:]
    rows = []
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, math.ceil((i + 1) * h / out_h)
        cols = []
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, math.ceil((j + 1) * w / out_w)
            cols.append(f[:, :, r0:r1, c0:c1].mean(dim=(2, 3)))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def naive_at_pair(s: torch.Tensor, t: torch.Tensor, p: float) -> torch.Tensor:
    if s.shape[2] * s.shape[3] > t.shape[2] * t.shape[3]:
        s = naive_adaptive_pool(s, *t.shape[2:])
    elif s.shape[2:] != t.shape[2:]:
        t = naive_adaptive_pool(t, *s.shape[2:])
    total = 0
    for b in range(s.shape[0]):
        qs = [sum(abs(s[b, c, i, j]) ** p for c in range(s.shape[1])) / s.shape[1]
              for i in range(s.shape[2]) for j in range(s.shape[3])]
        qt = [sum(abs(t[b, c, i, j]) ** p for c in range(t.shape[1])) / t.shape[1]
              for i in range(t.shape[2]) for j in range(t.shape[3])]
        ns, nt = _sqrt(sum(q * q for q in qs)), _sqrt(sum(q * q for q in qt))
        total = total + sum((a / ns - b_ / nt) ** 2 for a, b_ in zip(qs, qt))
    return total / (s.shape[0] * s.shape[2] * s.shape[3])


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_at_single_pair_matches_naive(p: float) -> None:
    s, t = _rand(3, 4, 5, 3, grad=True), _rand(3, 6, 5, 3, seed=1)  # channels differ
    _check(attention_transfer(s, t, p=p), naive_at_pair(s, t, p), s)


def test_at_several_pairs_with_pooling_matches_naive() -> None:
    s1, s2 = _rand(3, 4, 6, 6, grad=True), _rand(3, 2, 3, 3, seed=1, grad=True)
    t1, t2 = _rand(3, 7, 3, 3, seed=2), _rand(3, 5, 5, 5, seed=3)  # student larger, then smaller (uneven bins)
    got = attention_transfer([s1, s2], [t1, t2])
    ref = naive_at_pair(s1, t1, 2.0) + naive_at_pair(s2, t2, 2.0)
    for inp in (s1, s2):
        _check(got, ref, inp)


def test_at_analytic_and_errors() -> None:
    s = _rand(2, 3, 4, 4, grad=True)
    assert float(attention_transfer(s, s.detach())) == pytest.approx(0.0, abs=1e-14)
    # attention ignores channel count and a positive scale of the map
    assert float(attention_transfer(s, torch.cat([s, s], 1).detach() * 7)) == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match="1 student"):
        attention_transfer([s], [s, s])
    with pytest.raises(ValueError, match="batch"):
        attention_transfer(s, _rand(3, 3, 4, 4))


# ----------------------------------------------------------------------------------- RKD
def _huber(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * x if abs(float(x)) < 1 else abs(x) - 0.5


def naive_rkd(s: torch.Tensor, t: torch.Tensor, wd: float, wa: float) -> torch.Tensor:
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    n = s.shape[0]

    def dist_matrix(e: torch.Tensor) -> list:
        d = [[_sqrt(((e[i] - e[j]) ** 2).sum()) if i != j else e.new_zeros(()) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]

    def angle(e: torch.Tensor, i: int, j: int, k: int) -> torch.Tensor:
        if j == i or k == i:
            return e.new_zeros(())
        u, v = e[j] - e[i], e[k] - e[i]
        return (u * v).sum() / (_sqrt((u * u).sum()) * _sqrt((v * v).sum()))

    ds, dt = dist_matrix(s), dist_matrix(t)
    loss_d = sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    loss_a = sum(_huber(angle(s, i, j, k) - angle(t, i, j, k))
                 for i in range(n) for j in range(n) for k in range(n)) / n**3
    return wd * loss_d + wa * loss_a


@pytest.mark.parametrize("wd,wa", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_matches_naive(wd: float, wa: float) -> None:
    s, t = _rand(5, 3, 2, grad=True), _rand(5, 7, seed=1) * 3  # differing dims, both Huber branches
    _check(rkd(s, t, distance_weight=wd, angle_weight=wa), naive_rkd(s, t, wd, wa), s)


def test_rkd_analytic() -> None:
    s = _rand(4, 6, grad=True)
    assert float(rkd(s, s.detach())) == pytest.approx(0.0, abs=1e-10)
    # distances are normalised by their mean and angles are scale-free: a scaled, shifted,
    # rotated copy of the student is a perfect teacher
    q, _ = torch.linalg.qr(_rand(6, 6, seed=3))
    teacher = (2.5 * s.detach() @ q + 1.0)
    assert float(rkd(s, teacher)) == pytest.approx(0.0, abs=1e-8)
    v = rkd(s, _rand(4, 6, seed=4))
    g, = torch.autograd.grad(v, s)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2"):
        rkd(s[:1], s[:1])


# ----------------------------------------------------------------------------------- SP
def naive_sp(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    n = s.shape[0]

    def gram(e: torch.Tensor) -> list:
        g = [[(e[i] * e[j]).sum() for j in range(n)] for i in range(n)]
        return [[g[i][j] / _sqrt(sum(g[i][k] ** 2 for k in range(n))) for j in range(n)] for i in range(n)]

    gs, gt = gram(s), gram(t)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def test_sp_matches_naive_one_and_several_pairs() -> None:
    s, t = _rand(5, 3, 2, 2, grad=True), _rand(5, 7, seed=1)
    _check(similarity_preserving(s, t), naive_sp(s, t), s)
    s2, t2 = _rand(5, 4, seed=2, grad=True), _rand(5, 9, seed=3)
    got = similarity_preserving([s, s2], [t, t2])
    _check(got, naive_sp(s, t) + naive_sp(s2, t2), s2)


def test_sp_analytic() -> None:
    s = _rand(5, 4, grad=True)
    assert float(similarity_preserving(s, s.detach())) == pytest.approx(0.0, abs=1e-14)
    q, _ = torch.linalg.qr(_rand(4, 4, seed=1))  # an orthogonal map keeps the Gram matrix
    assert float(similarity_preserving(s, (3 * s @ q).detach())) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------- PKT
def naive_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    n = s.shape[0]

    def probs(e: torch.Tensor) -> list:
        norms = [_sqrt((e[i] * e[i]).sum()) + eps for i in range(n)]
        k = [[((e[i] * e[j]).sum() / (norms[i] * norms[j]) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[k[i][j] / sum(k[i]) for j in range(n)] for i in range(n)]

    ps, pt = probs(s), probs(t)
    return sum(pt[i][j] * torch.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def test_pkt_matches_naive() -> None:
    s, t = _rand(5, 3, 2, grad=True), _rand(5, 7, seed=1)
    _check(pkt(s, t), naive_pkt(s, t), s)


def test_pkt_analytic() -> None:
    s = _rand(5, 4, grad=True)
    assert float(pkt(s, s.detach())) == pytest.approx(0.0, abs=1e-14)
    assert float(pkt(s, 4 * s.detach())) == pytest.approx(0.0, abs=1e-12)  # cosine kernel is scale-free
    assert float(pkt(s, _rand(5, 4, seed=2))) > 0
    with pytest.raises(ValueError, match="batch"):
        pkt(s, _rand(4, 4))


@pytest.mark.parametrize("fn", [rkd, similarity_preserving, pkt, attention_transfer, fitnets])
def test_float32_and_half_inputs_run(fn) -> None:  # noqa: ANN001
    s = torch.randn(4, 3, 4, 4, requires_grad=True)
    t = torch.randn(4, 3, 4, 4)
    v = fn(s, t)
    v.backward()
    assert v.dtype == torch.float32 and math.isfinite(float(v)) and torch.isfinite(s.grad).all()
    assert math.isfinite(float(fn(s.detach().bfloat16(), t.bfloat16())))
