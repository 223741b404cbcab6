"""MMC / CMD (5.3, 5.4; reconstructed from the abstract) and plain DINO: the centred sharpened CE against a
naive reference, the centre's EMA update, gated-attention MIL pooling against its formula, MMC's masking
(student only), and one training step of each preset with its EMA teacher."""

from __future__ import annotations

import math

import pytest
import torch

from still import LOSSES, MODELS
from still.losses.momentum_sd import DINOLoss, cmd_inter_student, dino_ce, masked_patch_mse
from still.methods.base import build_method


def naive_dino(s, t, c, ts, tt):
    """Loops over rows (and tokens): −Σ_k p_t,k log p_s,k with p_t = softmax((t − c)/τ_t), p_s = softmax(s/τ_s)."""
    tot, n = 0.0, 0
    rows = s if s.dim() == 3 else s.unsqueeze(1)
    for b in range(rows.shape[0]):
        z = [math.exp((float(t[b, k]) - float(c[k])) / tt) for k in range(t.shape[1])]
        pt = [v / sum(z) for v in z]
        for i in range(rows.shape[1]):
            lse = torch.logsumexp(rows[b, i] / ts, 0)
            tot = tot - sum(pt[k] * (rows[b, i, k] / ts - lse) for k in range(t.shape[1]))
            n += 1
    return tot / n


@pytest.mark.parametrize("tokens", [False, True])
def test_dino_ce_value_and_grad(tokens):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) if tokens else torch.randn(3, 5, generator=g,
                                                                                         dtype=torch.float64)
    s.requires_grad_(True)
    t, c = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    a = dino_ce(s, t, c, 0.1, 0.04)
    b = naive_dino(s, t, c, 0.1, 0.04)
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    ga, gb = torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0]
    torch.testing.assert_close(ga.double(), gb.double(), rtol=1e-4, atol=1e-6)


def test_dino_centre_is_an_ema_of_teacher_means_and_used_before_update():
    loss = DINOLoss(center_momentum=0.9)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g, requires_grad=True)
    t1, t2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    with torch.no_grad():  # a no-grad pass (the engine's validation) leaves the centre alone
        loss(s, t1)
    assert loss.center.numel() == 0
    v1 = loss(s, t1)
    torch.testing.assert_close(v1, dino_ce(s, t1, torch.zeros(6)))  # first call: centre 0
    c1 = 0.1 * t1.mean(0)
    torch.testing.assert_close(loss.center, c1)
    v2 = loss(s, t2)
    torch.testing.assert_close(v2, dino_ce(s, t2, c1))
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * t2.mean(0))
    fresh = DINOLoss()
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(fresh.center, loss.center)


def test_cmd_inter_student_stops_gradient_on_the_image_level():
    g = torch.Generator().manual_seed(2)
    reg, img = torch.randn(4, 6, generator=g, requires_grad=True), torch.randn(4, 6, generator=g, requires_grad=True)
    v = cmd_inter_student([reg, img])
    torch.testing.assert_close(v, dino_ce(reg, img, None))
    gr, gi = torch.autograd.grad(v, [reg, img], allow_unused=True)
    assert gr is not None and (gi is None or torch.all(gi == 0))


def test_masked_patch_mse_vs_naive_and_mask_view(one_thread):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 4, 6, generator=g)
    recon = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.float)
    tot, n = 0.0, 0
    for b in range(2):
        for k in range(6):
            if mask[b, k]:
                r, c = divmod(k, 3)
                tot = tot + ((recon[b, k] - x[b, 0, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1)) ** 2).mean()
                n += 1
    a = masked_patch_mse([recon, mask], x, patch=2)
    torch.testing.assert_close(a, tot / n)
    ga, gb = torch.autograd.grad(a, recon)[0], torch.autograd.grad(tot / n, recon)[0]
    torch.testing.assert_close(ga, gb)
    assert float(masked_patch_mse([recon, torch.zeros(2, 6)], x, patch=2).detach()) == 0.0
    # the model's mask view is the mask it applied (training mode only)
    from still.taps import forward_with_views

    torch.manual_seed(0)
    m = MODELS.build("ssl_vit_tiny", mask_ratio=0.5).train()
    _, v = forward_with_views(m, torch.randn(3, 1, 28, 28), {"mask": "mask_out", "recon": "recon_out"})
    assert v["mask"].shape == (3, 16) and 0 < float(v["mask"].sum()) < 48 and v["recon"].shape == (3, 16, 49)
    m.eval()
    _, v = forward_with_views(m, torch.randn(3, 1, 28, 28), {"mask": "mask_out"})
    assert float(v["mask"].sum()) == 0


def test_gated_attention_mil_formula():
    from still.models.ssl_vit import GatedAttentionMIL

    torch.manual_seed(0)
    mil = GatedAttentionMIL(8, hidden=5)
    h = torch.randn(2, 7, 8)
    z = mil(h)
    for b in range(2):
        sc = torch.stack([mil.w(torch.tanh(mil.v(h[b, k])) * torch.sigmoid(mil.u(h[b, k])))[0] for k in range(7)])
        a = torch.softmax(sc, 0)
        torch.testing.assert_close(z[b], (a[:, None] * h[b]).sum(0))


def test_mmc_masks_the_student_only(one_thread):
    torch.manual_seed(0)
    m = MODELS.build("ssl_vit_tiny", mask_ratio=0.5)
    x = torch.randn(4, 1, 28, 28)
    m.eval()
    e1, e2 = m.encode(x)[0], m.encode(x)[0]
    torch.testing.assert_close(e1, e2)  # eval (the EMA teacher): the full image, deterministic
    m.train()
    torch.manual_seed(1)
    e3 = m.encode(x)[0]
    assert not torch.allclose(e1, e3)


@pytest.mark.parametrize("method,kw,inputs", [("dino_sd", {}, {"x": "region"}), ("mmc", {"mask_ratio": 0.5}, ["x"]),
                                              ("cmd", {"pool": "mil"}, ["x", "region"])])
def test_presets_train_with_an_ema_teacher(method, kw, inputs, one_thread):
    from still.engine import TrainConfig, train
    from still.methods.momentum_sd import RegionDataset

    torch.manual_seed(0)
    ds = RegionDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)), 10, "r")
    st = MODELS.build("ssl_vit_tiny", **kw)
    spec = build_method(method)
    teacher = spec.wrap_teacher(None, st)
    before = [p.clone() for p in teacher.model.parameters()]
    obj = spec.objective()
    train(st, obj, ds, TrainConfig(max_steps=2, batch_size=16, progress=False, log_every=10_000), teacher=teacher,
          student_views=spec.student_views, student_inputs=inputs)
    assert teacher.num_updates == 2
    sp = dict(st.named_parameters())
    moved = [n for (n, p), b in zip(teacher.model.named_parameters(), before) if not torch.equal(p, b)]
    assert moved and all(not torch.equal(dict(teacher.model.named_parameters())[n], sp[n]) for n in moved[:3])
    centres = [t.loss.center for t in obj.terms if isinstance(t.loss, DINOLoss)]
    assert centres and all(c.shape == (64,) and torch.isfinite(c).all() and c.abs().sum() > 0 for c in centres)


def test_registered_as_reconstructed():
    from still.registry import METHODS

    for n in ("mmc", "cmd"):
        assert "reconstructed from the abstract" in METHODS.entry(n).paper
    assert "reconstructed from the abstract" in LOSSES.entry("cmd_inter_student").paper
