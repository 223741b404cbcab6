"""ARRA (catalog 2.3) end to end at toy scale: patch tokens of Fashion-MNIST, the method preset, the metrics.

Data `fmnist_tokens`: each 28×28 image is cut into 7×7 = 49 patches of 4×4 pixels, quantised to the
nearest of K codes of a k-means codebook fitted (seeded) on training patches; samples
`{"x" (1, 28, 28), "tokens" (49,), "y", "index"}`. `decode(tokens)` maps tokens back to images.
Method `arra`: L = CE(next token) + λ·(1 − cos(A_φ(h_t), f_GF)) at every position, f_GF = the frozen
teacher CNN's pooled feature of the image (the paper's CLIP/BioMedCLIP [CLS]; our CNN has no CLS, so
its global average pool stands in). Metrics: held-out NLL (nats/token) and the Fréchet distance of
generated samples in the teacher CNN's pooled feature space (an FID proxy).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from still.data.base import TensorDataset
from still.losses.arra import ARRA_PAPER
from still.methods.base import MethodSpec
from still.registry import DATASETS, register_dataset, register_method

PATCH = 4


def patchify(x: torch.Tensor, p: int = PATCH) -> torch.Tensor:
    """(N, 1, H, W) → (N, (H/p)·(W/p), p·p) raster-order patches."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(patches: torch.Tensor, hw: int = 28, p: int = PATCH) -> torch.Tensor:
    """Inverse of `patchify` for one channel: (N, L, p·p) → (N, 1, hw, hw)."""
    n, g = patches.shape[0], hw // p
    return patches.reshape(n, g, g, 1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, 1, hw, hw)


def kmeans(v: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """(N, D) → (k, D) centroids (k-means++-lite: seeded random init, Lloyd iterations)."""
    g = torch.Generator().manual_seed(seed)
    c = v[torch.randperm(len(v), generator=g)[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(v, c).argmin(1)
        s = torch.zeros_like(c).index_add_(0, a, v)
        cnt = torch.bincount(a, minlength=k).float().unsqueeze(1)
        empty = cnt.squeeze(1) == 0
        c = torch.where(empty.unsqueeze(1), v[torch.randint(len(v), (k,), generator=g)], s / cnt.clamp(min=1))
    return c


@lru_cache(maxsize=4)
def _codebook(base: str, codes: int, fit_images: int, seed: int) -> torch.Tensor:
    ds = DATASETS.build(base, split="train")
    idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(ds))[:fit_images])
    return kmeans(patchify(ds.x[idx]).reshape(-1, PATCH * PATCH), codes, seed=seed)


class TokenDataset(TensorDataset):
    """TensorDataset with per-sample `tokens` (N, L) and the `codebook` (K, p·p) that decodes them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor, codebook: torch.Tensor,
                 meta: dict[str, Any]) -> None:
        super().__init__(x, y, 10, "fmnist_tokens", meta)
        self.tokens, self.codebook = tokens.long(), codebook

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) tokens → (N, 1, 28, 28) images (normalised pixel space, like `x`)."""
        return unpatchify(self.codebook[tokens])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "tokens": self.tokens[i]}

    def __getitems__(self, idx: list[int]) -> list[dict[str, torch.Tensor]]:
        out = super().__getitems__(idx)
        for d, i in zip(out, idx):
            d["tokens"] = self.tokens[i]
        return out


@register_dataset("fmnist_tokens", paper=ARRA_PAPER)
def fmnist_tokens(split: str = "train", subset: int | None = None, subset_seed: int = 0, codes: int = 64,
                  fit_images: int = 1000, seed: int = 0, base: str = "fashion_mnist") -> TokenDataset:
    """Fashion-MNIST as 49 tokens of 4×4 patches quantised by a K-code k-means codebook (fitted on train)."""
    ds = DATASETS.build(base, split=split).subset(subset, subset_seed)
    cb = _codebook(base, codes, fit_images, seed)
    tokens = torch.cat([torch.cdist(patchify(ds.x[i:i + 1024]).reshape(-1, PATCH * PATCH), cb).argmin(1)
                        .view(-1, 49) for i in range(0, len(ds), 1024)])
    return TokenDataset(ds.x, ds.y, tokens, cb, {"split": split, "codes": codes, "seed": seed, "n": len(ds)})


@torch.no_grad()
def token_nll(model: torch.nn.Module, data: TokenDataset, batch: int = 512) -> float:
    """Held-out negative log-likelihood, nats per token."""
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(data), batch):
        t, y = data.tokens[i:i + batch], data.y[i:i + batch]
        logits = model(t, y)
        tot += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                                       reduction="sum"))
        n += t.numel()
    return tot / n


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D) (the FID formula)."""
    a, b = a.double(), b.double()
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(ca cb) via the eigenvalues of sqrt(ca) cb sqrt(ca) (symmetric PSD)
    w, v = torch.linalg.eigh(ca)
    sa = (v * w.clamp(min=0).sqrt()) @ v.T
    ev = torch.linalg.eigvalsh(sa @ cb @ sa).clamp(min=0)
    return float((ma - mb).pow(2).sum() + ca.trace() + cb.trace() - 2 * ev.sqrt().sum())


@torch.no_grad()
def generated_fd(model: Any, teacher: torch.nn.Module, reference: TokenDataset, per_class: int = 100,
                 seed: int = 0, tap: str = "pool") -> float:
    """Fréchet distance, in the teacher's `tap` feature space, of `per_class`·10 class-conditional samples
    vs the reference set's quantised reconstructions (so the codebook's own error is not counted)."""
    from still.taps import forward_with_views

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(per_class)
    gen = reference.decode(model.generate(y, generator=g))

    def feats(x: torch.Tensor) -> torch.Tensor:
        teacher.eval()
        return torch.cat([forward_with_views(teacher, x[i:i + 512], {"f": tap})[1]["f"].flatten(1)
                          for i in range(0, len(x), 512)])

    return frechet_distance(feats(gen), feats(reference.decode(reference.tokens)))


@register_method("arra", paper=ARRA_PAPER)
def arra(lam: float = 1.0, hidden: int = 128, positions: str = "all", tokens: str = "tokens") -> MethodSpec:
    """L_AR (next-token CE on `tokens`) + λ·L_GVA (1 − cos(A_φ(h_t), f_GF)) on the `hidden` view.

    Student: `ar_transformer_tiny` called with [tokens, y]; `hidden` taps a middle layer (`blocks.0`).
    Teacher: the frozen image encoder with view `global` (e.g. `pool` of `fmnist_cnn`), called on `x`.
    """
    return MethodSpec(
        terms=[{"name": "ar", "loss": "ce", "student": "logits", "target": tokens},
               {"name": "gva", "loss": "arra_gva", "params": {"hidden": hidden, "positions": positions},
                "student": "hidden", "teacher": "global", "weight": lam}],
        student_views={"logits": "", "hidden": "blocks.0"}, teacher_views={"global": "pool"},
        notes="student inputs [tokens, y]; A_φ lives in the objective (dropped at inference)",
    )


@register_method("ar_scratch", paper="")
def ar_scratch(tokens: str = "tokens") -> MethodSpec:
    """Next-token CE only (ARRA's baseline without alignment)."""
    return MethodSpec(terms=[{"name": "ar", "loss": "ce", "student": "logits", "target": tokens}],
                      student_views={"logits": ""})
