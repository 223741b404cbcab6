"""MMC (catalog 5.3) and CMD (catalog 5.4), both RECONSTRUCTED FROM THE ABSTRACT, as momentum
self-distillation pretraining of a tiny ViT (`ssl_vit_tiny`, 16 patches, d = 64) on unlabelled
Fashion-MNIST; representation quality = kNN accuracy (k = 20, cosine, majority vote) of the pooled
embedding on the test split with the training images as the memory. Mean ± std over seeds.

Columns: scratch = the same encoder untrained (random init, same seed); "plain KD" = plain DINO
(student on a random region crop, EMA teacher on the whole image, centring, CLS pooling); method =
MMC (50 % masked student, MIM + global + global→local + contrast) or CMD (gated-attention MIL
pooling, intra- and inter-level terms). Same data, epochs, batch, lr, EMA decay (0.99) and
temperatures (0.1 / 0.04) for all.

Used by `benchmarks/seed_methods.py` (`--parts ssl` runs this part alone): `rows(quick, seeds)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CLAIMS = {"mmc": "top-tier zero-shot segmentation across data sets, no numbers [A]",
          "cmd": "CUB / Cars / Aircraft: up to +10.14% over contemporary, +19.78% over SSL SOTA (top-1, Rank-1) [A]"}


@dataclass
class Budget:
    train: int = 2000
    test: int = 1000
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    max_steps: int | None = None


QUICK = Budget(train=128, test=64, epochs=1, batch_size=32, max_steps=3)


@torch.no_grad()
def embed(model: Any, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.encode(x[i:i + 512])[0] for i in range(0, len(x), 512)])


def knn_accuracy(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20) -> float:
    """Cosine kNN: majority vote of the k nearest training embeddings (ties: lowest class)."""
    a = torch.nn.functional.normalize(train_z, dim=1)
    b = torch.nn.functional.normalize(test_z, dim=1)
    idx = (b @ a.t()).topk(min(k, len(a)), dim=1).indices
    votes = torch.zeros(len(b), int(train_y.max()) + 1).scatter_add_(1, train_y[idx], torch.ones(idx.shape))
    return float((votes.argmax(1) == test_y).float().mean())


def results(b: Budget, seeds: list[int]) -> dict[str, list[float]]:
    from _seed_common import fit
    from still.methods.base import build_method
    from still.registry import DATASETS, MODELS

    tr = DATASETS.build("fmnist_regions", split="train", subset=b.train)
    te = DATASETS.build("fashion_mnist", split="test", subset=b.test)
    variants = {"dino": ("dino_sd", {}, {"x": "region"}), "mmc": ("mmc", {"mask_ratio": 0.5}, ["x"]),
                "cmd": ("cmd", {"pool": "mil"}, ["x", "region"])}
    res: dict[str, list[float]] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        st = MODELS.build("ssl_vit_tiny")
        res.setdefault("scratch", []).append(knn_accuracy(embed(st, tr.x), tr.y, embed(st, te.x), te.y))
        for name, (method, kw, inputs) in variants.items():
            torch.manual_seed(seed)
            st = MODELS.build("ssl_vit_tiny", **kw)
            spec = build_method(method)
            fit(st, spec.objective(), tr, seed, epochs=b.epochs, batch_size=b.batch_size, lr=b.lr,
                max_steps=b.max_steps, teacher=spec.wrap_teacher(None, st), views=spec.student_views, inputs=inputs)
            res.setdefault(name, []).append(knn_accuracy(embed(st, tr.x), tr.y, embed(st, te.x), te.y))
    return res


def rows(quick: bool, seeds: list[int], budget: Budget | None = None) -> list[dict[str, Any]]:
    from _seed_common import row

    b = budget or (QUICK if quick else Budget())
    res = results(b, seeds)
    task = f"Fashion-MNIST {b.train} unlabelled, kNN probe (reconstructed from the abstract)"
    out = [row(m, task, "kNN accuracy", res, ("scratch", "dino", m), CLAIMS[m], None, kd_column="plain DINO",
               scratch_column="untrained encoder") for m in ("mmc", "cmd")]
    return out
