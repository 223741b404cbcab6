"""ARRA (2.3): the global visual alignment loss against a naive reference, the mechanism (ordinary
next-token position, causal; the alignment head lives in the objective and is dropped at inference),
the patch tokenizer and the Fréchet distance."""

from __future__ import annotations

import torch

from still import LOSSES, MODELS
from still.losses.arra import ARRAGlobalAlignment
from still.methods.arra import frechet_distance, kmeans, patchify, unpatchify
from still.methods.base import build_method


def naive_gva(align, hidden, f):
    """mean_{b,t} 1 − <A(h_bt), f_b> / (|A(h_bt)| |f_b|), loops."""
    tot, n = 0.0, 0
    fb = f.reshape(f.shape[0], -1)
    for b in range(hidden.shape[0]):
        for t in range(hidden.shape[1]):
            a = align(hidden[b, t])
            tot = tot + 1 - (a * fb[b]).sum() / (a.norm() * fb[b].norm())
            n += 1
    return tot / n


def test_gva_value_and_grad_vs_naive():
    torch.manual_seed(0)
    loss = ARRAGlobalAlignment(hidden=16)
    h = torch.randn(3, 5, 8, requires_grad=True)
    f = torch.randn(3, 6, 1, 1)
    a = loss(h, f)
    b = naive_gva(loss.align, h, f)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga, gb = torch.autograd.grad(a, h)[0], torch.autograd.grad(b, h)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    # the teacher feature is a constant target
    f2 = f.clone().requires_grad_(True)
    loss(h, f2).backward()
    assert f2.grad is None
    # the single-position ablation is the same loss on the last position only
    last = ARRAGlobalAlignment(hidden=16, positions="last")
    last.align = loss.align
    torch.testing.assert_close(last(h, f), naive_gva(loss.align, h[:, -1:], f))


def test_hybrid_position_is_the_ordinary_next_token_state_and_causal(one_thread):
    torch.manual_seed(0)
    m = MODELS.build("ar_transformer_tiny", vocab=16, seq_len=12, dim=32).eval()
    tok = torch.randint(0, 16, (2, 12))
    y = torch.tensor([1, 7])
    from still.taps import forward_with_views

    out, v = forward_with_views(m, {"tokens": tok, "y": y}, {"hidden": "blocks.0"}, inputs=["tokens", "y"])
    assert out.shape == (2, 12, 16) and v["hidden"].shape == (2, 12, 32)  # no extra token: one state per target
    tok2 = tok.clone()
    tok2[:, 5] = (tok2[:, 5] + 1) % 16
    out2, v2 = forward_with_views(m, {"tokens": tok2, "y": y}, {"hidden": "blocks.0"}, inputs=["tokens", "y"])
    # position t sees tokens < t only: changing token 5 leaves positions 0..5 (which predict tokens 0..5) alone
    torch.testing.assert_close(v2["hidden"][:, :6], v["hidden"][:, :6])
    torch.testing.assert_close(out2[:, :6], out[:, :6])
    assert not torch.allclose(v2["hidden"][:, 6:], v["hidden"][:, 6:])
    # the first position is predicted from the class alone
    out3 = m(torch.randint(0, 16, (2, 12)), y)
    torch.testing.assert_close(out3[:, 0], out[:, 0])


def test_alignment_head_lives_in_the_objective_and_is_dropped_at_inference(one_thread):
    from still.engine import TrainConfig, train
    from still.data.base import TensorDataset
    from still.teachers.base import LiveTeacher

    class Toks(TensorDataset):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "tokens": self.tokens[i]}

        def __getitems__(self, idx):
            return [self[i] for i in idx]

    torch.manual_seed(0)
    x = torch.randn(32, 1, 28, 28)
    ds = Toks(x, torch.randint(0, 10, (32,)), 10, "toks")
    ds.tokens = torch.randint(0, 64, (32, 49))
    teacher = MODELS.build("fmnist_cnn").eval()
    student = MODELS.build("ar_transformer_tiny")
    spec = build_method("arra")
    obj = spec.objective()
    train(student, obj, ds, TrainConfig(max_steps=2, batch_size=16, progress=False, log_every=10_000),
          teacher=LiveTeacher(teacher, spec.teacher_views), student_views=spec.student_views,
          student_inputs=["tokens", "y"])
    gva = obj.terms[1].loss
    assert isinstance(gva, ARRAGlobalAlignment) and gva.align is not None
    assert gva.align[-1].out_features == 128  # f_GF = the CNN's pooled 128-d feature
    assert not any("align" in k for k in student.state_dict())
    n_obj = sum(p.numel() for p in obj.parameters())
    assert n_obj == sum(p.numel() for p in gva.align.parameters()) > 0
    gen = student.generate(torch.arange(3), generator=torch.Generator().manual_seed(0))  # no objective needed
    assert gen.shape == (3, 49) and int(gen.max()) < 64


def test_patch_tokens_roundtrip_and_codebook():
    x = torch.randn(3, 1, 28, 28)
    p = patchify(x)
    assert p.shape == (3, 49, 16)
    torch.testing.assert_close(unpatchify(p), x)
    torch.testing.assert_close(p[0, 8], x[0, 0, 4:8, 4:8].reshape(-1))  # raster order: row 1, column 1
    pts = torch.cat([torch.randn(50, 2) * 0.1 + c for c in (torch.tensor([0.0, 0.0]), torch.tensor([5.0, 5.0]))])
    c = kmeans(pts, 2, iters=10)
    assert sorted(round(float(v)) for v in c.sum(1)) == [0, 10]


def test_frechet_distance_vs_scipy():
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 5, generator=g, dtype=torch.float64)
    b = torch.randn(150, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 1
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + float(
        (ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real).trace())
    assert abs(frechet_distance(a, b) - ref) < 1e-6 * max(1.0, abs(ref))
    assert abs(frechet_distance(a, a)) < 1e-8


def test_registered_with_paper():
    from still.registry import METHODS

    assert "ARRA" in LOSSES.entry("arra_gva").paper and "ARRA" in METHODS.entry("arra").paper
