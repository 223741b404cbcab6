"""Logit losses (ce, kd, dkd, dist, logit_std) against naive float64 references written from the papers."""

from __future__ import annotations

import math

import pytest
import torch

from still.losses.classic import cross_entropy, dist, dkd, hinton_kd, logit_std
from still.registry import LOSSES

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
B, C = 5, 7  # odd shapes on purpose


def _logits(seed: int = 0, b: int = B, c: int = C, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, c, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    return s, t


def _softmax_row(z: list, temp: float = 1.0) -> list:
    m = max(float(v.detach()) for v in z)
    e = [torch.exp((v - m) / temp) for v in z]
    tot = sum(e)
    return [x / tot for x in e]


def _kl(p: list, q: list) -> torch.Tensor:
    return sum(pi * torch.log(pi / qi) for pi, qi in zip(p, q))


def _check(value: torch.Tensor, ref: torch.Tensor, inp: torch.Tensor, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """Same value and the same gradient w.r.t. `inp` as the naive reference."""
    g_val, = torch.autograd.grad(value, inp, retain_graph=True)
    g_ref, = torch.autograd.grad(ref, inp, retain_graph=True)
    assert value.dim() == 0
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(g_val, g_ref, rtol=1e-7, atol=1e-10)


# ----------------------------------------------------------------------------------- cross-entropy
def naive_ce(s: torch.Tensor, y: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    total = 0
    for b in range(s.shape[0]):
        p = _softmax_row(list(s[b]))
        nll = -torch.log(p[int(y[b])])
        smooth = -sum(torch.log(pc) for pc in p) / len(p)
        total = total + (1 - eps) * nll + eps * smooth
    return total / s.shape[0]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_matches_naive(eps: float) -> None:
    s, _ = _logits()
    y = torch.tensor([0, 6, 3, 3, 1])
    _check(cross_entropy(s, y, label_smoothing=eps), naive_ce(s, y, eps), s)


def test_ce_token_logits_and_ignore_index() -> None:
    s, _ = _logits(b=6)
    y = torch.tensor([[0, 2, -100], [6, -100, 5]])
    got = cross_entropy(s.view(2, 3, C), y)
    keep = y.reshape(-1) != -100
    _check(got, naive_ce(s[keep], y.reshape(-1)[keep]), s)


# ----------------------------------------------------------------------------------- Hinton KD
def naive_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    total = 0
    for b in range(s.shape[0]):
        total = total + _kl(_softmax_row(list(t[b]), temp), _softmax_row(list(s[b]), temp))
    return temp * temp * total / s.shape[0]


@pytest.mark.parametrize("temp", [1.0, 4.0, 0.5])
def test_kd_matches_naive(temp: float) -> None:
    s, t = _logits()
    _check(hinton_kd(s, t, temperature=temp), naive_kd(s, t, temp), s)


def test_kd_unscaled_and_gradcheck() -> None:
    s, t = _logits(1, b=3, c=4)
    torch.testing.assert_close(hinton_kd(s, t, 3.0, scale_t2=False) * 9, hinton_kd(s, t, 3.0))
    assert torch.autograd.gradcheck(lambda x: hinton_kd(x, t, 2.0), (s,))


def test_kd_identical_is_zero_and_shift_invariant() -> None:
    s, _ = _logits()
    assert float(hinton_kd(s, s.detach())) == pytest.approx(0.0, abs=1e-12)
    # softmax ignores a per-row shift
    shift = torch.arange(B, dtype=torch.float64).unsqueeze(1) * 3.0
    assert float(hinton_kd(s + shift, s.detach())) == pytest.approx(0.0, abs=1e-12)


def test_kd_high_temperature_limit_is_logit_matching() -> None:
    """T²·KL → (1/(2C))·Σ_c (d_c − mean d)², d = z_s − z_t, as T → ∞ (Hinton et al. §2.1)."""
    s, t = _logits(2)
    d = s.detach() - t
    limit = ((d - d.mean(1, keepdim=True)) ** 2).sum(1).div(2 * C).mean()
    errs = []
    for temp in (10.0, 100.0, 1000.0):
        errs.append(abs(float(hinton_kd(s, t, temp)) - float(limit)) / float(limit))
    assert errs[0] > errs[1] > errs[2]  # converges
    assert errs[2] < 1e-3
    # and its gradient tends to (d - mean d) / C per sample, divided by B
    g, = torch.autograd.grad(hinton_kd(s, t, 1000.0), s)
    torch.testing.assert_close(g, (d - d.mean(1, keepdim=True)) / C / B, rtol=1e-2, atol=1e-4)


def test_kd_teacher_masked_classes_count_zero() -> None:
    """Classes the teacher masks with −inf (p_t = 0) add 0·log(0/p_s) = 0 to the KL, not NaN."""
    s, t = _logits(11)
    t_m = t.clone()
    t_m[:, 2] = float("-inf")
    got = hinton_kd(s, t_m, 2.0)
    total = 0
    for b in range(B):
        pt, ps = _softmax_row(list(t_m[b]), 2.0), _softmax_row(list(s[b]), 2.0)
        total = total + sum(p * torch.log(p / q) for c, (p, q) in enumerate(zip(pt, ps)) if c != 2)
    _check(got, 4.0 * total / B, s)


def test_kd_keeps_float64_and_upcasts_half() -> None:
    s, t = _logits()
    assert hinton_kd(s, t).dtype == torch.float64
    assert hinton_kd(s.detach().half(), t.half()).dtype == torch.float32


# ----------------------------------------------------------------------------------- DKD
def naive_dkd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, temp: float) -> torch.Tensor:
    total = 0
    for b in range(s.shape[0]):
        ps, pt, g = _softmax_row(list(s[b]), temp), _softmax_row(list(t[b]), temp), int(y[b])
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        tckd = _kl(bt, bs)
        hs = [ps[c] / (1 - ps[g]) for c in range(len(ps)) if c != g]
        ht = [pt[c] / (1 - pt[g]) for c in range(len(pt)) if c != g]
        nckd = _kl(ht, hs)
        total = total + alpha * tckd + beta * nckd
    return temp * temp * total / s.shape[0]


@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 3.0)])
def test_dkd_matches_naive(alpha: float, beta: float, temp: float) -> None:
    s, t = _logits(3)
    y = torch.tensor([0, 6, 3, 3, 1])
    _check(dkd(s, t, y, alpha=alpha, beta=beta, temperature=temp), naive_dkd(s, t, y, alpha, beta, temp), s)


def test_dkd_reformulates_kd() -> None:
    """DKD paper eq. (4): KD = TCKD + (1 − p_t^gt)·NCKD, per sample."""
    s, t = _logits(4, b=1)
    for label in range(C):
        y = torch.tensor([label])
        pt_gt = float(torch.softmax(t / 4.0, -1)[0, label])
        torch.testing.assert_close(dkd(s, t, y, alpha=1.0, beta=1 - pt_gt, temperature=4.0),
                                   hinton_kd(s, t, 4.0), rtol=1e-10, atol=1e-12)


def test_dkd_identical_zero_two_classes_and_errors() -> None:
    s, _ = _logits()
    y = torch.tensor([0, 6, 3, 3, 1])
    assert float(dkd(s, s.detach(), y)) == pytest.approx(0.0, abs=1e-12)
    s2, t2 = _logits(5, c=2)  # one non-target class: NCKD is 0, TCKD is the full KD
    y2 = torch.tensor([0, 1, 1, 0, 1])
    torch.testing.assert_close(dkd(s2, t2, y2, alpha=1.0, beta=5.0, temperature=2.0), hinton_kd(s2, t2, 2.0))
    with pytest.raises(ValueError, match="labels"):
        dkd(s, s, torch.tensor([0, 1]))


def test_dkd_token_logits_ignore_index() -> None:
    s, t = _logits(10, b=6)
    y = torch.tensor([[0, -100, 3], [6, 2, -100]])
    keep = y.reshape(-1) != -100
    got = dkd(s.view(2, 3, C), t.view(2, 3, C), y)
    _check(got, naive_dkd(s[keep], t[keep], y.reshape(-1)[keep], 1.0, 8.0, 4.0), s)
    none = dkd(s, t, torch.full((6,), -100))
    assert float(none) == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="labels must lie in"):
        dkd(s, t, torch.tensor([0, 1, 2, 3, 4, 7]))


# ----------------------------------------------------------------------------------- DIST
def _pearson(a: list, b: list) -> torch.Tensor:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = torch.sqrt(sum((x - ma) ** 2 for x in a))
    vb = torch.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (va * vb + 1e-8)


def naive_dist(s: torch.Tensor, t: torch.Tensor, beta: float, gamma: float, temp: float) -> torch.Tensor:
    ys = [_softmax_row(list(s[b]), temp) for b in range(s.shape[0])]
    yt = [_softmax_row(list(t[b]), temp) for b in range(t.shape[0])]
    nb, nc = len(ys), len(ys[0])
    inter = 1 - sum(_pearson(ys[b], yt[b]) for b in range(nb)) / nb
    intra = 1 - sum(_pearson([ys[b][c] for b in range(nb)], [yt[b][c] for b in range(nb)]) for c in range(nc)) / nc
    return temp * temp * (beta * inter + gamma * intra)


@pytest.mark.parametrize("beta,gamma,temp", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_naive(beta: float, gamma: float, temp: float) -> None:
    s, t = _logits(6)
    _check(dist(s, t, beta, gamma, temp), naive_dist(s, t, beta, gamma, temp), s)


def test_dist_identical_is_zero_and_scale_free() -> None:
    s, t = _logits(7)
    assert float(dist(s, s.detach())) == pytest.approx(0.0, abs=1e-6)
    # Pearson correlation is unchanged when every probability row is scaled: inter-class part of
    # dist(s, t) equals the same computation on 3·softmax, checked through the naive formula
    ys, yt = torch.softmax(s.detach(), -1), torch.softmax(t, -1)
    inter = 1 - sum(_pearson(list(ys[b]), list(3 * yt[b])) for b in range(B)) / B
    torch.testing.assert_close(dist(s, t, beta=1.0, gamma=0.0).detach(), inter, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------------- logit standardisation
def _zscore_row(z: list) -> list:
    n = len(z)
    m = sum(z) / n
    sd = torch.sqrt(sum((v - m) ** 2 for v in z) / (n - 1))
    return [(v - m) / (sd + 1e-7) for v in z]


def naive_logit_std(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    total = 0
    for b in range(s.shape[0]):
        ps = _softmax_row(_zscore_row(list(s[b])), temp)
        pt = _softmax_row(_zscore_row(list(t[b])), temp)
        total = total + _kl(pt, ps)
    return temp * temp * total / s.shape[0]


@pytest.mark.parametrize("temp", [2.0, 1.0, 3.5])
def test_logit_std_matches_naive(temp: float) -> None:
    s, t = _logits(8)
    _check(logit_std(s, t, temperature=temp), naive_logit_std(s, t, temp), s)


def test_logit_std_invariances() -> None:
    s, t = _logits(9)
    base = logit_std(s, t)
    # a positive scale and a shift of either side's logits change nothing (up to eps)
    torch.testing.assert_close(logit_std(3.0 * s + 5.0, t), base, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(logit_std(s, 0.25 * t - 2.0), base, rtol=1e-6, atol=1e-8)
    assert float(logit_std(s, (2 * s + 1).detach())) == pytest.approx(0.0, abs=1e-10)
    # unlike plain KD, where a scaled teacher is not a match
    assert float(hinton_kd(s, (2 * s).detach())) > 1e-3


# ----------------------------------------------------------------------------------- registry wiring
@pytest.mark.parametrize("name", ["ce", "kd", "dkd", "dist", "logit_std"])
def test_logit_losses_registered_with_paper_and_example(name: str) -> None:
    e = LOSSES.entry(name)
    assert callable(e.meta["example"]) and e.description
    assert name == "ce" or e.paper
    args, kwargs = e.meta["example"]()
    v = LOSSES.build(name)(*args, **kwargs)
    assert v.dim() == 0 and math.isfinite(float(v))
