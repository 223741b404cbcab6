"""DeGLA end to end: the caption task's rule negatives, the combined loss vs a naive formula, the EMA anchor."""

from __future__ import annotations

import copy

import pytest
import torch

from still.engine import TrainConfig, train
from still.methods.base import build_method
from still.methods.degla import LEFT_OF, DeGLALoss
from still.registry import DATASETS, MODELS


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (the shared fixture is in conftest.py)."""


def test_captions_and_rule_negatives() -> None:
    ds = DATASETS.build("fmnist_captions", split="test", num_samples=200)
    a, r, b = ds.text.unbind(1)
    assert (r == LEFT_OF).all() and (a != b).all()
    swap, repl = ds.neg[:, 0], ds.neg[:, 1]
    assert torch.equal(swap, torch.stack([b, r, a], 1))  # order swapped: same bag of words
    assert (repl[:, 0] == a).all() and (repl[:, 2] != a).all() and (repl[:, 2] != b).all()
    s = ds[3]
    assert s["x"].shape == (1, 28, 56) and s["text"].shape == (3,) and s["neg"].shape == (2, 3) and s["y"] == 0


def _nce(pos: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Naive -log e^pos / (e^pos + Σ e^others), rows mean."""
    return (-pos + torch.log(pos.exp() + others.exp().sum(-1))).mean()


def test_degla_loss_matches_naive_formula_value_and_grad() -> None:
    g = torch.Generator().manual_seed(0)
    B, K, D, tau = 5, 2, 6, 0.07
    v, t, n = (torch.randn(B, D, generator=g, requires_grad=True), torch.randn(B, D, generator=g, requires_grad=True),
               torch.randn(B, K, D, generator=g, requires_grad=True))
    tv, tt, tn = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, K, D, generator=g)
    got = DeGLALoss(tau=tau)([v, t, n], [tv, tt, tn])
    nz = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    vv, ttt, nn_ = nz(v), nz(t), nz(n)
    sim = vv @ ttt.T / tau
    hn = (vv.unsqueeze(1) * nn_).sum(-1) / tau
    eye = torch.eye(B, dtype=torch.bool)
    # L_base: I→T over all texts + the image's negatives; T→I over all images
    i2t = _nce(sim.diag(), torch.cat([sim.masked_fill(eye, -float("inf")), hn], 1))
    t2i = _nce(sim.diag(), sim.T.masked_fill(eye, -float("inf")))
    base = 0.5 * (i2t + t2i)
    igc = _nce(sim.diag(), hn)
    tgc = _nce((ttt * nz(tt)).sum(-1) / tau, (ttt.unsqueeze(1) * nn_).sum(-1) / tau)
    dist = ((vv - nz(tv)) ** 2).sum(-1).mean() + (((ttt - nz(tt)) ** 2).sum(-1)
                                                  + ((nn_ - nz(tn)) ** 2).sum(-1).sum(-1)).mean()
    ref = base + 0.1 * igc + 0.1 * tgc + 0.005 * dist
    assert torch.allclose(got, ref, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, [v, t, n]), torch.autograd.grad(ref, [v, t, n])):
        assert torch.allclose(a, b, atol=1e-5)


def test_degla_ema_anchor_end_to_end() -> None:
    """The engine updates the EMA anchor after every step; at decay 0.9996 it stays at the starting weights
    while the student moves; the fine-tuned model still ranks the true caption above the rule negatives."""
    tr = DATASETS.build("fmnist_captions", split="train", num_samples=256)
    torch.manual_seed(0)
    model = MODELS.build("dual_encoder_tiny")
    spec = build_method("degla", decay=0.9)
    start = copy.deepcopy(model.state_dict())
    ema = spec.wrap_teacher(None, model)
    cfg = TrainConfig(max_steps=6, batch_size=32, lr=3e-3, progress=False, eval_every_epochs=None, log_every=10_000)
    train(model, spec.objective(), tr, cfg, teacher=ema, student_views=spec.student_views,
          student_inputs=["x", "text", "neg"])
    assert ema.num_updates == 6
    k = "text.1.weight"
    w0, ws, we = start[k], model.state_dict()[k], ema.model.state_dict()[k]
    # an EMA at d = 0.9 over 6 steps keeps ≥ 0.9^6 ≈ 0.53 of the start: between start and student
    assert (we - w0).norm() < (ws - w0).norm() and (we - w0).norm() > 0
    out = ema.views({"x": tr.x[:4], "text": tr.text[:4], "neg": tr.neg[:4]}, ["image", "text", "neg"])
    assert out["neg"].shape == (4, 2, 32) and not out["image"].requires_grad
    with pytest.raises(ValueError, match="student"):
        spec.wrap_teacher(None, None)
