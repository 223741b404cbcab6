"""OOD-VLM distillation (catalog 2.6) on Fashion-MNIST with held-out classes: the method's student vs the
same student from scratch vs plain KD, same data, student and budget; mean ± std over seeds.

Setup: 8 seen classes (all but Pullover = 2 and Ankle boot = 9). The "VLM" teacher is `text_anchored_cnn`
(32-64-128 CNN, 256-d embedding projected to the 384-d MiniLM text space; head = the real MiniLM
embeddings of "a photo of a {name}.") trained with CE on a disjoint pool of seen-class images (the
paper's large pretrained teacher saw more data than the student: by default every seen-class training
image outside the students' subset, ~46k; trained once and cached under `$STILL_CACHE/bench/models`). Every student is the same
`text_anchored_cnn` 8-16-32 with the same text head:
- scratch: CE through the text head (text-anchored, no teacher);
- plain KD: T = 4, α = 0.9 KL on the text-head logits + 0.1 CE;
- ood_vlm: text-anchored CE + MSE + InfoNCE to the teacher's image embedding (unit weights);
- ood_vlm_filter: the same, samples the teacher misclassifies dropped.
Metrics: in-distribution accuracy (seen-class test images, 8-way), zero-shot OOD accuracy on the
held-out classes' test images through their text embeddings, 2-way (among the held-out prompts) and
10-way (among all prompts: generalized zero-shot).

Used by `benchmarks/seed_methods.py` (`--parts ood` runs this part alone): `rows(quick, seeds)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SEEN = [0, 1, 3, 4, 5, 6, 7, 8]
UNSEEN = [2, 9]
CLAIMS = {
    "ood_vlm": "significant zero-/few-shot open-vocabulary OOD gains over KD baselines (numbers not retrieved) [A]",
}


@dataclass
class Budget:
    train: int = 2000
    teacher_train: int | None = None   # None: every training image outside the students' subset
    test: int = 2000
    epochs: int = 15
    teacher_epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    max_steps: int | None = None
    lr_schedule: str = "cosine"


QUICK = Budget(train=256, teacher_train=256, test=256, epochs=1, teacher_epochs=1, batch_size=32, max_steps=4)


def _fit(model: torch.nn.Module, objective: Any, data: Any, b: Budget, seed: int, teacher: Any = None,
         views: dict[str, str] | None = None, epochs: int | None = None, batch_size: int | None = None,
         lr: float | None = None) -> torch.nn.Module:
    from _seed_common import fit

    return fit(model, objective, data, seed, epochs=epochs or b.epochs, batch_size=batch_size or b.batch_size,
               lr=lr or b.lr, max_steps=b.max_steps, teacher=teacher, views=views, lr_schedule=b.lr_schedule)


def _subset(ds: Any, classes: list[int], idx: torch.Tensor | None = None) -> Any:
    """Samples of `ds` (restricted to `idx`) whose class is in `classes`, relabelled 0..k-1."""
    from still.data.base import TensorDataset

    x, y = (ds.x, ds.y) if idx is None else (ds.x[idx], ds.y[idx])
    mapping = torch.full((10,), -1, dtype=torch.long)
    mapping[torch.tensor(classes)] = torch.arange(len(classes))
    keep = mapping[y] >= 0
    return TensorDataset(x[keep], mapping[y][keep], len(classes), "fashion_mnist_classes", {"classes": classes})


@torch.no_grad()
def scores(model: Any, id_test: Any, ood_test: Any) -> dict[str, float]:
    """ID 8-way accuracy, OOD 2-way (held-out prompts) and 10-way (all prompts) zero-shot accuracy."""
    from still.models.text_anchored import class_text_embeddings, fashion_mnist_prompts

    model.eval()
    head = model.text.clone()
    pred = lambda data: torch.cat([model(data.x[i:i + 512]).argmax(-1) for i in range(0, len(data), 512)])  # noqa: E731
    out = {"id": float((pred(id_test) == id_test.y).float().mean())}
    model.set_text(class_text_embeddings(fashion_mnist_prompts(UNSEEN)))
    out["ood2"] = float((pred(ood_test) == ood_test.y).float().mean())
    model.set_text(class_text_embeddings(fashion_mnist_prompts()))
    out["ood10"] = float((pred(ood_test) == torch.tensor(UNSEEN)[ood_test.y]).float().mean())
    model.set_text(head)
    return out


def results(b: Budget, seeds: list[int]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """{variant_metric: [per seed]} for scratch / kd / ood_vlm / ood_vlm_filter, and the teacher's scores."""
    import numpy as np

    from still.methods.base import build_method
    from still.registry import DATASETS, MODELS
    from still.teachers.base import LiveTeacher

    full = DATASETS.build("fashion_mnist", split="train")
    test = DATASETS.build("fashion_mnist", split="test")
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(full)))
    train = _subset(full, SEEN, perm[: b.train * 10 // 8])
    first_pool = b.train * 10 // 8 if b.teacher_train is None else len(full) - b.teacher_train * 10 // 8
    pool = _subset(full, SEEN, perm[first_pool:])
    tperm = torch.from_numpy(np.random.default_rng(1).permutation(len(test)))
    id_test = _subset(test, SEEN, tperm[: b.test * 10 // 8])
    ood_test = _subset(test, UNSEEN, tperm[: b.test * 5] if b.max_steps else None)

    def model(seed: int, big: bool = False) -> torch.nn.Module:
        torch.manual_seed(seed)
        kw = {"channels": [32, 64, 128], "embed_dim": 256} if big else {}
        return MODELS.build("text_anchored_cnn", num_classes=len(SEEN), classes=SEEN, **kw)

    from still.bench import cached_model

    key = {"part": "seed_ood", "n": len(pool), "train": b.train, "epochs": b.teacher_epochs, "batch": 128, "lr": 2e-3,
           "schedule": b.lr_schedule, "max_steps": b.max_steps, "first": float(pool.x[:64].sum())}
    teacher, info = cached_model(key, lambda: model(0, big=True), lambda m: _fit(
        m, build_method("scratch").objective(), pool, b, 0, epochs=b.teacher_epochs, batch_size=128, lr=2e-3),
        name="seed_ood_teacher")
    t_scores = scores(teacher, id_test, ood_test)
    t_scores["source"] = info["source"]
    tviews = {"image": "proj", "text": "text_out", "logits": ""}
    res: dict[str, list[float]] = {}
    kd = build_method("kd", temperature=4.0, alpha=0.9)
    for seed in seeds:
        runs = {
            "scratch": (build_method("scratch"), None),
            "kd": (kd, LiveTeacher(teacher, {"logits": ""})),
            "ood_vlm": (build_method("ood_vlm"), LiveTeacher(teacher, tviews)),
            "ood_vlm_filter": (build_method("ood_vlm", filter_wrong=True), LiveTeacher(teacher, tviews)),
        }
        for name, (spec, t) in runs.items():
            views = spec.student_views or {"logits": ""}
            st = _fit(model(seed), spec.objective(), train, b, seed, t, views)
            for k, v in scores(st, id_test, ood_test).items():
                res.setdefault(f"{name}_{k}", []).append(v)
    return res, t_scores


def rows(quick: bool, seeds: list[int], budget: Budget | None = None) -> list[dict[str, Any]]:
    """One row per (method variant, metric): scratch / kd / method mean ± std, the claim, a verdict."""
    from _seed_common import row

    b = budget or (QUICK if quick else Budget())
    res, t_scores = results(b, seeds)
    tasks = {"id": f"Fashion-MNIST 8 seen classes ({b.train} train): in-distribution, 8-way",
             "ood2": "held-out Pullover / Ankle boot, zero-shot via text, 2-way",
             "ood10": "held-out Pullover / Ankle boot, zero-shot via text, among all 10 prompts"}
    out = [row(m, task, "accuracy", res, (f"scratch_{k}", f"kd_{k}", f"{m}_{k}"), CLAIMS["ood_vlm"], t_scores[k],
               teacher_source=t_scores["source"]) for m in ("ood_vlm", "ood_vlm_filter") for k, task in tasks.items()]
    return out
