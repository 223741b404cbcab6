"""DiSCo multi-teacher score KL: value and gradient vs a naive loop; one teacher = score_kl; analytic cases."""

from __future__ import annotations

import pytest
import torch

from still.registry import LOSSES


def _naive(s: torch.Tensor, ts: list[torch.Tensor], tau: float, combine: str) -> torch.Tensor:
    B = s.shape[0]

    def cos_rows(x: torch.Tensor, i: int) -> torch.Tensor:
        xn = x / x.norm(dim=1, keepdim=True)
        return torch.stack([xn[i] @ xn[j] for j in range(B) if j != i])

    total = 0.0
    for i in range(B):
        ls = torch.log_softmax(cos_rows(s, i) / tau, 0)
        if combine == "mean_probs":
            pt = sum(torch.softmax(cos_rows(t, i) / tau, 0) for t in ts) / len(ts)
        else:
            pt = torch.softmax(sum(cos_rows(t, i) for t in ts) / len(ts) / tau, 0)
        total = total + (pt * (pt.log() - ls)).sum()
    return total / B


@pytest.mark.parametrize("combine", ["mean_probs", "mean_scores"])
def test_disco_multi_matches_naive_value_and_grad(combine: str) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    ts = [torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g)]
    got = LOSSES.build("disco_multi_kl", temperature=0.2, combine=combine)(s, ts)
    ref = _naive(s, ts, 0.2, combine)
    assert torch.allclose(got, ref, atol=1e-5)
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(ref, s)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_one_teacher_is_score_kl_and_identical_student_is_zero() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g)
    one = LOSSES.build("disco_multi_kl", temperature=0.1)(s, [t])
    ref = LOSSES.build("score_kl", temperature=0.1)(s, t)
    assert torch.allclose(one, ref, atol=1e-6)
    assert LOSSES.build("disco_multi_kl")(t, [t, t]).abs() < 1e-6
    stacked = torch.stack([t, 2 * t])  # (K, B, D): cosine is scale-free, so both teachers agree
    assert LOSSES.build("disco_multi_kl")(t, stacked).abs() < 1e-6
    with pytest.raises(ValueError, match="weights"):
        LOSSES.build("disco_multi_kl", weights=[1.0])(s, [t, t])
    w = LOSSES.build("disco_multi_kl", temperature=0.1, weights=[1.0, 0.0])(s, [t, s])
    assert torch.allclose(w, ref, atol=1e-6)  # a zero-weight teacher does not count
