"""Dense seed losses (TransKD HCL/CSF/EA, Chimera SGD, OADP, FarSLIP, MGD, LAD): value and gradient
against naive references written from the formulas in seed_methods.md, plus analytic cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from still.losses.dense import (ShrinkingTopK, SelectiveGlobal, TransKDCSF, gap_l1, hcl, l1_embed, mse_sum,
                                patch_to_patch, pseudo_label_ce, region_similarity, roi_align)
from still.losses.dense_heads import OADPBlock, OADPGlobal, OADPObject, TransKDEA, grid_boxes, seg_ce
from still.losses.relations import rkd
from still.teachers.label_assisted import dual_path_loss, noised_onehot



@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads_match(f_a, f_b, inputs: list[torch.Tensor], atol: float = 1e-8) -> None:
    va, vb = f_a(), f_b()
    assert torch.allclose(va, vb, atol=atol), (float(va), float(vb))
    ga = torch.autograd.grad(va, inputs, allow_unused=True)
    gb = torch.autograd.grad(vb, inputs, allow_unused=True)
    for a, b in zip(ga, gb):
        assert a is not None and b is not None
        assert torch.allclose(a, b, atol=atol)


# ------------------------------------------------------------------------------- roi_align
def _bilinear(f: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Zero-padded bilinear sample of f (C, H, W) at pixel coordinates (y, x) (pixel centres at integers)."""
    c, h, w = f.shape
    y0, x0 = math.floor(y), math.floor(x)
    out = f.new_zeros(c)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out = out + wy * wx * f[:, yy, xx]
    return out


def _roi_naive(feat: torch.Tensor, boxes: torch.Tensor, s: int, scale: float, n: int) -> torch.Tensor:
    b, c = feat.shape[:2]
    out = feat.new_zeros(b, boxes.shape[1], c, s, s)
    for i in range(b):
        for k in range(boxes.shape[1]):
            if (boxes[i, k] < 0).any():
                continue
            x0, y0, x1, y1 = (float(v) * scale - 0.5 for v in boxes[i, k])
            bw, bh = (x1 - x0) / s, (y1 - y0) / s
            for p in range(s):
                for q in range(s):
                    acc = feat.new_zeros(c)
                    for a in range(n):
                        for bb in range(n):
                            acc = acc + _bilinear(feat[i], y0 + (p + (a + 0.5) / n) * bh, x0 + (q + (bb + 0.5) / n) * bw)
                    out[i, k, :, p, q] = acc / n ** 2
    return out


def test_roi_align_hand_computed() -> None:
    # f(y, x) = x: bilinear sampling is exact inside, so each output cell is the mean x of its samples.
    feat = torch.arange(4.0).repeat(4, 1)[None, None]
    whole = roi_align(feat, torch.tensor([[[0.0, 0.0, 4.0, 4.0]]]), output_size=1)
    assert whole.shape == (1, 1, 1, 1, 1) and float(whole) == pytest.approx(1.5)  # mean of the 4 pixel centres
    inner = roi_align(feat, torch.tensor([[[1.0, 1.0, 3.0, 3.0]]]), output_size=2)[0, 0, 0]
    # box [0.5, 2.5] after the half-pixel shift; samples at 0.75, 1.25 | 1.75, 2.25
    assert torch.allclose(inner, torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    absent = roi_align(feat, torch.tensor([[[-1.0, -1.0, -1.0, -1.0]]]), output_size=2)
    assert torch.equal(absent, torch.zeros_like(absent))


def test_roi_align_matches_naive_value_and_gradient() -> None:
    feat = torch.randn(2, 3, 5, 7, generator=_g(), requires_grad=True)
    boxes = torch.tensor([[[0.0, 0.0, 12.0, 8.0], [6.0, 2.0, 30.0, 19.0]],   # the second runs past the map
                          [[3.0, 5.0, 9.0, 9.0], [-1.0, -1.0, -1.0, -1.0]]])
    a = lambda: (roi_align(feat, boxes, 3, 0.25, 2) ** 2).sum()  # noqa: E731
    b = lambda: (_roi_naive(feat, boxes, 3, 0.25, 2) ** 2).sum()  # noqa: E731
    _grads_match(a, b, [feat])


# ------------------------------------------------------------------------------- TransKD
def _hcl_naive(s: torch.Tensor, t: torch.Tensor, levels=(4, 2, 1)) -> torch.Tensor:
    h = s.shape[-2]
    total, wsum, w = ((s - t) ** 2).mean(), 1.0, 1.0
    for lvl in levels:
        if lvl >= h:
            continue
        w /= 2
        # adaptive average pooling: bin i spans [floor(i·h/l), ceil((i+1)·h/l))
        lo = [i * h // lvl for i in range(lvl)]
        hi = [-(-(i + 1) * h // lvl) for i in range(lvl)]
        ps = torch.stack([torch.stack([s[..., lo[i]:hi[i], lo[j]:hi[j]].mean((-2, -1)) for j in range(lvl)], -1)
                          for i in range(lvl)], -2)
        pt = torch.stack([torch.stack([t[..., lo[i]:hi[i], lo[j]:hi[j]].mean((-2, -1)) for j in range(lvl)], -1)
                          for i in range(lvl)], -2)
        total = total + w * ((ps - pt) ** 2).mean()
        wsum += w
    return total / wsum


@pytest.mark.parametrize("h", [8, 4, 3, 1])
def test_hcl_value_and_gradient(h: int) -> None:
    s = torch.randn(2, 3, h, h, generator=_g(h), requires_grad=True)
    t = torch.randn(2, 3, h, h, generator=_g(h + 10))
    _grads_match(lambda: hcl(s, t), lambda: _hcl_naive(s, t), [s])
    # lists of stages are summed
    assert torch.allclose(hcl([s, s], [t, t]), 2 * hcl(s, t))


def test_transkd_csf_fuses_deep_to_shallow_and_matches_naive() -> None:
    s = [torch.randn(2, 4, 8, 8, generator=_g(1), requires_grad=True), torch.randn(2, 6, 4, 4, generator=_g(2), requires_grad=True)]
    t = [torch.randn(2, 5, 8, 8, generator=_g(3)), torch.randn(2, 7, 4, 4, generator=_g(4))]
    m = TransKDCSF(mid=8).double().eval()
    loss = m(s, t)
    # naive: deepest stage is reduce → out; the shallow one is SK(reduce(s0), up(reduce(s1))) → out
    x1 = m.reduce[1](s[1])
    x0 = m.reduce[0](s[0])
    up = F.interpolate(x1, size=(8, 8), mode="nearest")
    sk = m.fuse[0]
    z = sk.fc((x0 + up).mean((2, 3)))
    a = torch.stack([sk.heads[0](z), sk.heads[1](z)]).softmax(0)
    f0 = x0 * a[0][..., None, None] + up * a[1][..., None, None]
    naive = _hcl_naive(m.out[0](f0), t[0]) + _hcl_naive(m.out[1](x1), t[1])
    _grads_match(lambda: m(s, t), lambda: naive, s)
    assert torch.allclose(loss, naive)
    # the cross fusion: the deep student stage reaches the shallow stage's term
    g = torch.autograd.grad(_hcl_naive(m.fused(s, t)[0], t[0]), s[1])[0]
    assert g.abs().sum() > 0


def test_transkd_ea_mix_and_gradients() -> None:
    e = [torch.randn(2, 3, 8, 8, generator=_g(1), requires_grad=True), torch.randn(2, 4, 4, 4, generator=_g(2), requires_grad=True)]
    x = [torch.randn(2, 5, 8, 8, generator=_g(3), requires_grad=True), torch.randn(2, 6, 4, 4, generator=_g(4))]
    t = [torch.randn(2, 7, 8, 8, generator=_g(5)), torch.randn(2, 9, 4, 4, generator=_g(6))]
    m = TransKDEA(weights=[0.5, 1.0]).double().eval()
    v = m(e + x, t)
    assert torch.allclose(m.mix.detach(), torch.tensor([0.1, 0.2, 0.3, 0.4]))  # 0.1·(i+1), i over 2n slots
    e0 = m.mix[0] * m.proj[0](e[0])
    e1 = m.mix[1] * m.proj[1](e[1]) + m.mix[3] * m.ea[1](x[0])  # the assistant runs on the previous stage map
    naive = 0.5 * ((e0 - t[0]) ** 2).mean() + 1.0 * ((e1 - t[1]) ** 2).mean()
    _grads_match(lambda: m(e + x, t), lambda: naive, [e[0], e[1], x[0]])
    assert torch.allclose(v, naive)
    gm = torch.autograd.grad(m(e + x, t), m.mix)[0]
    assert gm[[0, 1, 3]].abs().min() > 0 and gm[2] == 0  # the mixing weights learn (stage 0 has no assistant)


# ---------------------------------------------------------------------------- Chimera SGD
def test_shrinking_topk_schedule_values() -> None:
    s = ShrinkingTopK(0.5, 0.1)
    assert [round(s(k, 100), 6) for k in (0, 25, 50, 100, 150)] == [0.5, 0.4, 0.3, 0.1, 0.1]
    from still.registry import SCHEDULES

    assert SCHEDULES.build("shrinking_topk", start=0.4, end=0.2)(50, 100) == pytest.approx(0.3)


def test_selective_global_matches_naive_and_shrinks() -> None:
    s = torch.randn(2, 3, 4, 5, generator=_g(), requires_grad=True)
    t = torch.randn(2, 6, generator=_g(1))
    m = SelectiveGlobal(0.5, 0.1).double()
    m(s, t)  # builds the projection
    w, b = m.proj.weight[:, :, 0, 0], m.proj.bias

    def naive() -> torch.Tensor:
        total = 0.0
        n = 20
        k = math.ceil(m.fraction * n)
        for i in range(2):
            f = [w @ s[i, :, p // 5, p % 5] + b for p in range(n)]
            sims = torch.stack([F.cosine_similarity(fi, t[i], dim=0) for fi in f])
            top = sorted(range(n), key=lambda p: -sims[p].item())[:k]
            mean = torch.stack([f[p] for p in top]).mean(0)
            total = total + 1 - F.cosine_similarity(mean, t[i], dim=0)
        return total / 2

    for step in (0, 60, 100):
        m.set_progress(step, 100)
        _grads_match(lambda: m(s, t), naive, [s])
    m.set_progress(100, 100)
    assert m.fraction == pytest.approx(0.1)
    # a teacher map is averaged into its global embedding
    tm = t[:, :, None, None].expand(2, 6, 3, 3)
    assert torch.allclose(m(s, tm), m(s, t))


# -------------------------------------------------------------------------------- OADP
def test_l1_embed_and_mse_sum_naive() -> None:
    s = torch.randn(2, 3, 4, generator=_g(), requires_grad=True)
    t = torch.randn(2, 3, 4, generator=_g(1))
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])

    def l1() -> torch.Tensor:
        tot, cnt = 0.0, 0
        for i in range(2):
            for k in range(3):
                if mask[i, k]:
                    tot = tot + (s[i, k] / s[i, k].norm() - t[i, k] / t[i, k].norm()).abs().sum()
                    cnt += 1
        return tot / cnt

    _grads_match(lambda: l1_embed(s, t, mask=mask), l1, [s])
    g = s[:, 0]
    _grads_match(lambda: mse_sum(g, t[:, 0]),
                 lambda: sum(((g[i] / g[i].norm() - t[i, 0] / t[i, 0].norm()) ** 2).sum() for i in range(2)) / 2, [s])


def test_oadp_heads_match_naive() -> None:
    feat = torch.randn(2, 3, 4, 4, generator=_g(), requires_grad=True)
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [-1.0, -1.0, -1.0, -1.0]], [[4.0, 2.0, 16.0, 12.0], [0.0, 0.0, 6.0, 6.0]]])
    t_obj = torch.randn(2, 2, 5, generator=_g(1))
    obj = OADPObject(spatial_scale=0.25).double()
    obj(feat, t_obj, boxes)
    pooled = _roi_naive(feat, boxes, 2, 0.25, 2).mean((-2, -1))
    _grads_match(lambda: obj(feat, t_obj, boxes),
                 lambda: l1_embed(obj.proj(pooled), t_obj, mask=(boxes >= 0).all(-1)), [feat])
    # absent boxes do not count: changing their teacher embedding changes nothing
    t2 = t_obj.clone()
    t2[0, 1] = 100.0
    assert torch.allclose(obj(feat, t_obj, boxes), obj(feat, t2, boxes))

    t_blk = torch.randn(2, 4, 5, generator=_g(2))
    blk = OADPBlock(rkd_weight=0.5).double()
    blk(feat, t_blk)
    cells = torch.stack([feat[:, :, (k // 2) * 2:(k // 2) * 2 + 2, (k % 2) * 2:(k % 2) * 2 + 2].mean((-2, -1)) for k in range(4)], 1)
    e = blk.proj(cells)
    ref = lambda: l1_embed(e, t_blk) + 0.5 * rkd(F.normalize(e, dim=-1).reshape(8, 5), F.normalize(t_blk, dim=-1).reshape(8, 5))  # noqa: E731
    _grads_match(lambda: blk(feat, t_blk), ref, [feat])
    assert torch.allclose(grid_boxes(1, 2, 4, 6)[0], torch.tensor([[0, 0, 3, 2], [3, 0, 6, 2], [0, 2, 3, 4], [3, 2, 6, 4.0]]))

    t_g = torch.randn(2, 5, generator=_g(3))
    glb = OADPGlobal().double()
    glb(feat, t_g)
    _grads_match(lambda: glb(feat, t_g), lambda: mse_sum(glb.proj(feat.mean((2, 3))), t_g), [feat])


# ------------------------------------------------------------------------------ FarSLIP
def test_patch_to_patch_naive_and_perfect_match() -> None:
    feat = torch.randn(2, 3, 4, 4, generator=_g(), requires_grad=True)
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 16.0, 16.0]], [[-1.0, -1, -1, -1], [0.0, 4.0, 12.0, 16.0]]])
    t = torch.randn(2, 2, 3, generator=_g(1))

    def naive() -> torch.Tensor:
        pooled = _roi_naive(feat, boxes, 2, 0.25, 2).mean((-2, -1))
        terms = [1 - F.cosine_similarity(pooled[i, k], t[i, k], dim=0) for i in range(2) for k in range(2)
                 if (boxes[i, k] >= 0).all()]
        return sum(terms) / len(terms)

    _grads_match(lambda: patch_to_patch(feat, t, boxes, spatial_scale=0.25), naive, [feat])
    # a teacher equal to the pooled student patches (up to scale) gives 0
    same = 3 * roi_align(feat, boxes, 2, 0.25).mean((-2, -1)).detach()
    assert patch_to_patch(feat, same, boxes, spatial_scale=0.25).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------- MGD
def test_region_similarity_naive() -> None:
    s = torch.randn(2, 3, 6, 6, generator=_g(), requires_grad=True)
    t = torch.randn(2, 5, 6, 6, generator=_g(1))  # channel widths may differ: only the g²×g² relation is compared

    def sim(x: torch.Tensor) -> torch.Tensor:
        cells = [x[:, :, (k // 3) * 2:(k // 3) * 2 + 2, (k % 3) * 2:(k % 3) * 2 + 2].mean((-2, -1)) for k in range(9)]
        return torch.stack([torch.stack([F.cosine_similarity(a, b, dim=1) for b in cells], -1) for a in cells], -2)

    _grads_match(lambda: region_similarity(s, t, grid=3), lambda: ((sim(s) - sim(t)) ** 2).mean(), [s])


def test_gap_l1_and_pseudo_label_ce_naive() -> None:
    s = torch.randn(2, 4, 3, 5, generator=_g(), requires_grad=True)
    t = torch.randn(2, 4, 3, 5, generator=_g(1))
    _grads_match(lambda: gap_l1(s, t),
                 lambda: sum((s[i, c].mean() - t[i, c].mean()).abs() for i in range(2) for c in range(4)) / 2, [s])

    def ce() -> torch.Tensor:
        terms = [-torch.log_softmax(s[i, :, y, x], 0)[int(t[i, :, y, x].argmax())] for i in range(2)
                 for y in range(3) for x in range(5)]
        return sum(terms) / len(terms)

    _grads_match(lambda: pseudo_label_ce(s, t), ce, [s])


def test_seg_ce_ignores_and_survives_unlabelled_batches() -> None:
    s = torch.randn(2, 3, 2, 2, generator=_g(), requires_grad=True)
    y = torch.tensor([[[0, 1], [-100, 2]], [[-100, -100], [1, 1]]])
    valid = [(i, a, b) for i in range(2) for a in range(2) for b in range(2) if y[i, a, b] >= 0]
    _grads_match(lambda: seg_ce(s, y),
                 lambda: sum(-torch.log_softmax(s[i, :, a, b], 0)[int(y[i, a, b])] for i, a, b in valid) / len(valid), [s])
    none = seg_ce(s, torch.full_like(y, -100))
    assert none.item() == 0.0 and torch.autograd.grad(none, s)[0].abs().sum() == 0


# ---------------------------------------------------------------------------------- LAD
def test_noised_onehot() -> None:
    m = torch.randint(0, 5, (3, 16, 16), generator=_g())
    m[0, 0, 0] = -100
    clean = noised_onehot(m, 5, 0.0)
    assert clean.shape == (3, 5, 16, 16) and clean[0, :, 0, 0].sum() == 0
    assert torch.equal(clean.argmax(1)[m >= 0], m[m >= 0])
    noisy = noised_onehot(m, 5, 1.0, torch.Generator().manual_seed(1))
    kept = (noisy.argmax(1) == m)[m >= 0].double().mean()
    assert 0.1 < float(kept) < 0.3  # every label redrawn uniformly: ~1/K stay the same
    half = noised_onehot(m, 5, 0.5, torch.Generator().manual_seed(2))
    assert 0.5 < float((half.argmax(1) == m)[m >= 0].double().mean()) < 0.7  # 0.5 + 0.5/K
    assert torch.allclose(half.sum(1)[m >= 0], torch.ones(()))


def test_dual_path_loss_naive() -> None:
    a = torch.randn(2, 3, 2, 2, generator=_g(), requires_grad=True)
    b = torch.randn(2, 3, 2, 2, generator=_g(1), requires_grad=True)
    y = torch.randint(0, 3, (2, 2, 2), generator=_g(2))

    def naive() -> torch.Tensor:
        px = [(i, p, q) for i in range(2) for p in range(2) for q in range(2)]
        ce = sum(-torch.log_softmax(z[i, :, p, q], 0)[int(y[i, p, q])] for z in (a, b) for i, p, q in px) / len(px)
        return ce + 0.7 * ((a.softmax(1) - b.softmax(1)) ** 2).mean()

    _grads_match(lambda: dual_path_loss(a, b, y, 0.7), naive, [a, b])
