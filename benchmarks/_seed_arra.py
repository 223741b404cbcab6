"""ARRA (catalog 2.3) at toy scale: a class-conditional autoregressive transformer over 49 k-means patch
tokens of Fashion-MNIST (4×4 patches, K = 64), with and without the global visual alignment; mean ± std over seeds.

- teacher (the "foundation encoder"): the classification part's `fmnist_cnn`, trained with CE on the
  56.5k pool images (`_seed_cls.ClsBench.teacher("pool")`, cached), frozen; f_GF is its
  global-average-pooled feature (128-d; the CNN has no [CLS]);
- scratch: next-token CE only (the paper's "w/o alignment");
- "plain KD" column: the same alignment on one fixed position only (the last: a <REP>-style token, the
  paper's weaker ablation; there is no teacher over tokens to distil logits from);
- arra: L_AR + 1·(1 − cos(A_φ(h_t), f_GF)) at every next-token position t, hidden states of layer 1 of 2.
Metrics (lower is better): held-out NLL in nats/token, and the Fréchet distance between 500 generated
samples (50 per class, temperature 1) and the quantised test images in the teacher's pooled feature space
(an FID proxy: the paper's headline is FID).

Used by `benchmarks/seed_methods.py` (`--parts arra` runs this part alone): `rows(quick, seeds)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CLAIM = "ImageNet FID LlamaGen-111M 5.47 → 5.08, -343M 4.33 → 3.61; MIMIC-CXR 7.11 → 5.30 [P]"


@dataclass
class Budget:
    train: int = 2500
    test: int = 1000
    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    per_class: int = 50
    fit_images: int = 1000
    max_steps: int | None = None


QUICK = Budget(train=128, test=64, epochs=1, batch_size=32, per_class=3, fit_images=64,
               max_steps=3)


def results(b: Budget, seeds: list[int]) -> dict[str, list[float]]:
    from _seed_common import fit
    from still.methods.arra import generated_fd, token_nll
    from still.methods.base import build_method
    from still.registry import DATASETS, MODELS
    from still.teachers.base import LiveTeacher

    tr = DATASETS.build("fmnist_tokens", split="train", subset=b.train, fit_images=b.fit_images)
    te = DATASETS.build("fmnist_tokens", split="test", subset=b.test, fit_images=b.fit_images)
    import _seed_cls

    cls = _seed_cls.ClsBench(_seed_cls.QUICK if b.max_steps else _seed_cls.Budget())
    teacher = cls.teacher("pool")
    with torch.no_grad():
        t_acc = float((teacher(te.x).argmax(-1) == te.y).float().mean())
    res: dict[str, list[float]] = {"teacher_acc": [t_acc]}
    variants = {"scratch": build_method("ar_scratch"), "kd": build_method("arra", positions="last"),
                "arra": build_method("arra")}
    for seed in seeds:
        for name, spec in variants.items():
            torch.manual_seed(seed)
            st = MODELS.build("ar_transformer_tiny")
            t = LiveTeacher(teacher, spec.teacher_views) if spec.teacher_views else None
            fit(st, spec.objective(), tr, seed, epochs=b.epochs, batch_size=b.batch_size, lr=b.lr, max_steps=b.max_steps,
                teacher=t, views=spec.student_views, inputs=["tokens", "y"])
            res.setdefault(f"{name}_nll", []).append(token_nll(st, te))
            res.setdefault(f"{name}_fd", []).append(generated_fd(st, teacher, te, per_class=b.per_class, seed=seed))
    return res


def rows(quick: bool, seeds: list[int], budget: Budget | None = None) -> list[dict[str, Any]]:
    from _seed_common import row

    b = budget or (QUICK if quick else Budget())
    res = results(b, seeds)
    task = f"fmnist_tokens (49 patch tokens, K=64), {b.train} train"
    out = [row("arra", task, metric, res, (f"scratch_{k}", f"kd_{k}", f"arra_{k}"), CLAIM, None,
               teacher_acc=res["teacher_acc"][0], fmt="raw", lower_better=True, scratch_column="no alignment",
               kd_column="single-token alignment")
           for k, metric in (("nll", "held-out NLL (nats/token)"), ("fd", "Fréchet distance, teacher CNN features"))]
    return out
