"""Dense seed methods (issue 6A) on the Fashion-MNIST mosaics: each method's student vs the student
from scratch vs plain KD (`seg_kd`: pixel CE + T²·KL), same data, student and budget; test mIoU
(pixel_miou over 11 classes) as mean ± std over seeds.

Teacher `seg_unet_px` (16-32-64 U-Net), student `seg_unet_small_px` (8-16-32). The teacher is trained
once per run (seed 0, CE) and shared. MGD runs semi-supervised (a quarter of the canvases labelled,
the rest CutMix-mixed pairs): its scratch / KD rows use the same labelled quarter (KD also on the
unlabelled canvases) and its teachers see only the labelled quarter. LAD's teacher is label-assisted
(trained here with dual-path consistency) and needs the label at distillation time.

The budget (`Budget`, the same for every row; no per-method tuning):
- data: 32 × 32 canvases (`cell=16`) of Fashion-MNIST items shrunk 28 → 14 (`item=14`), 4000 train /
  1000 test. The earlier 64 × 64 canvases of 28 × 28 items were beyond the 3-stage U-Nets' effective
  receptive field: students classified pixels by local texture (trousers taken for ankle boots), got
  stuck at 15-40 mIoU depending on the seed, and cost 4× the pixels;
- every run: AdamW (no weight decay), lr 1e-2, 5 % linear warm-up then cosine to 0, batch 16;
  students 4 epochs (1000 steps), teachers 10 epochs (2500; the semi-supervised teachers: 20 epochs of
  the labelled quarter). A constant lr and 150 steps left students mid-way through learning the classes;
- U-Net heads start with a background-logit prior (`bg_bias=2.5`, the others 0): with Adam's
  lr-bounded steps, growing that bias from 0 used up most of a short run;
- OADP / FarSLIP crops are resized to 16 × 16 (about one item, as 32 was on the 64 × 64 canvases).

Used by `benchmarks/seed_methods.py`: `rows(quick, seeds[, budget]) -> list[dict]`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

TASK = "fmnist_mosaic ({side}×{side} canvases of {item}-px items, 11 classes)"
METRIC = "mIoU"

CLAIMS = {
    "transkd_seg": "Cityscapes B2→B0: 55.86 → 68.58 mIoU (TransKD-Base)",
    "transkd_seg_ea": "Cityscapes: 68.98 mIoU with EA (+0.40 over Base)",
    "chimera_sgd": "+0.9 / +1.2 hIoU on two zero-shot benchmarks [A]",
    "oadp": "COCO OV detection 35.6 mAP^N_50, +3.3 over the previous SOTA [A]",
    "farslip": "RS OVSS 35.44 mIoU (ViT-B/16, stage 1); baseline not retrieved",
    "mgd": "Cityscapes 1/16 labels: R18 student +11.5% mIoU [A]",
    "lad": "VOC DeepLabV3-R18: 73.21 → 75.0 mIoU (CIRKD 74.50)",
}


@dataclass
class Budget:
    train: int = 4000
    test: int = 1000
    epochs: int = 4                       # 1000 steps of 16 canvases
    teacher_epochs: int = 10              # 2500 steps
    batch_size: int = 16
    lr: float = 1e-2
    lr_schedule: str = "cosine"           # every run: linear warm-up, then cosine to 0
    warmup: float = 0.05                  # fraction of each run's steps
    cell: int = 16                        # canvas 2·cell = 32 × 32
    item: int = 14                        # Fashion-MNIST items shrunk 28 → 14
    crop_size: int = 16                   # OADP / FarSLIP crops resized to about one cell
    bg_bias: float = 2.5                  # U-Net heads start with a background prior (see dense_tasks)
    max_steps: int | None = None          # caps every run (quick mode)

    def steps(self, n: int, epochs: int, batch_size: int | None = None) -> int:
        return self.max_steps or epochs * max(n // (batch_size or self.batch_size), 1)


QUICK = Budget(train=48, test=16, epochs=1, teacher_epochs=1, batch_size=16, max_steps=2)


class DenseBench:
    def __init__(self, budget: Budget) -> None:
        from still.registry import DATASETS

        self.b = budget
        geo = {"cell": budget.cell, "item": budget.item}
        self.train = DATASETS.build("fmnist_mosaic_seg", split="train", num_samples=budget.train, **geo)
        self.test = DATASETS.build("fmnist_mosaic_seg", split="test", num_samples=budget.test, **geo)
        self.semi = DATASETS.build("fmnist_mosaic_seg", split="train", num_samples=budget.train,
                                   labelled_fraction=0.25, cutmix=True, **geo)
        self.semi_lab = torch.utils.data.Subset(self.semi, torch.nonzero(self.semi.labelled).flatten().tolist())
        self._teachers: dict[str, torch.nn.Module] = {}
        self.runs = 0

    def model(self, name: str, seed: int, **kw: Any) -> torch.nn.Module:
        from still.registry import MODELS

        torch.manual_seed(seed)
        return MODELS.build(name, input_shape=(1, 2 * self.b.cell, 2 * self.b.cell), bg_bias=self.b.bg_bias, **kw)

    @torch.no_grad()
    def miou(self, model: torch.nn.Module, inputs: Any = None) -> float:
        from still.metrics import evaluate

        return evaluate(model, self.test, ["pixel_miou"], batch_size=128, inputs=inputs)["pixel_miou"]

    def teacher(self, kind: str) -> torch.nn.Module:
        from still.methods.dense import fit_segmenter

        if kind not in self._teachers:
            b = self.b
            sched = {"lr_schedule": b.lr_schedule, "warmup": b.warmup, "max_steps": b.max_steps}
            t0 = time.perf_counter()
            if kind == "plain":
                t = fit_segmenter(self.model("seg_unet_px", 0), self.train, b.teacher_epochs, b.batch_size, b.lr,
                                  **sched)
            elif kind == "semi":  # MGD's b2 and the semi-supervised KD teacher: labelled quarter only
                t = fit_segmenter(self.model("seg_unet_px", 0), self.semi_lab, b.teacher_epochs * 2,
                                  min(b.batch_size, len(self.semi_lab)), b.lr, **sched)
            elif kind == "semi2":
                from still.methods.dense_tasks import _bg_prior
                from still.methods.mgd import complementary_teacher

                torch.manual_seed(1)
                t = fit_segmenter(_bg_prior(complementary_teacher(), b.bg_bias), self.semi_lab, b.teacher_epochs * 2,
                                  min(b.batch_size, len(self.semi_lab)), b.lr, seed=1, **sched)
            elif kind == "lad":
                from still.teachers.label_assisted import fit_label_assisted

                t = self.model("seg_unet_lad_px", 0)
                fit_label_assisted(t, self.train, epochs=b.teacher_epochs, batch_size=b.batch_size, lr=b.lr,
                                   max_steps=b.max_steps, lr_schedule=b.lr_schedule, warmup=b.warmup)
            else:
                raise KeyError(kind)
            self._teachers[kind] = t.eval()
            print(f"[dense] teacher {kind}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return self._teachers[kind]

    def fit_with_teacher(self, method: str, seed: int, ready: Any, data: Any = None, **params: Any) -> float:
        """`fit` with a teacher object built by the caller (the method's wrap_teacher is not used)."""
        return self.fit(method, seed, data=data, ready=ready, **params)

    def fit(self, method: str, seed: int, teacher: Any = None, data: Any = None, ready: Any = None,
            **params: Any) -> float:
        from _seed_common import fit
        from still.methods.base import build_method
        from still.teachers.base import LiveTeacher

        spec = build_method(method, **params)
        obj = spec.objective()
        student = self.model("seg_unet_small_px", seed)
        views = {k: v for k, v in spec.student_views.items() if k in obj.student_views()} or {"logits": ""}
        need = obj.teacher_views()
        t = LiveTeacher(teacher, {k: spec.teacher_views[k] for k in need}) if teacher is not None and need else None
        if ready is not None:
            t = ready
        elif spec.wrap_teacher is not None:
            t = spec.wrap_teacher(t, student)
        b = self.b
        data = data if data is not None else self.train
        t0 = time.perf_counter()
        fit(student, obj, data, seed, epochs=b.epochs, batch_size=b.batch_size, lr=b.lr, max_steps=b.max_steps,
            teacher=t, views=views, lr_schedule=b.lr_schedule,
            warmup_steps=b.warmup)
        self.runs += 1
        v = self.miou(student)
        print(f"[dense] {method} seed {seed}: mIoU {v:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        return v


def rows(quick: bool, seeds: list[int], budget: Budget | None = None) -> list[dict[str, Any]]:
    """One dict per method: scratch / kd / method mIoU mean ± std over `seeds`, the paper's claim, a verdict.
    `budget` (default: QUICK if `quick` else Budget()) replaces the module's."""
    bench = DenseBench(budget if budget is not None else QUICK if quick else Budget())
    plain, semi = bench.teacher("plain"), bench.teacher("semi")
    teacher_miou = {"plain": bench.miou(plain), "semi": bench.miou(semi)}
    lad_t = bench.teacher("lad")
    semi2 = bench.teacher("semi2")
    res: dict[str, list[float]] = {}

    def add(key: str, v: float) -> None:
        res.setdefault(key, []).append(v)

    for seed in seeds:
        add("scratch", bench.fit("scratch_seg", seed))
        add("kd", bench.fit("seg_kd", seed, teacher=plain))
        for m in ("transkd_seg", "transkd_seg_ea", "chimera_sgd"):
            add(m, bench.fit(m, seed, teacher=plain))
        crop = {"crop_size": bench.b.crop_size}
        add("oadp", bench.fit("oadp", seed, teacher=plain, warmup=0.1, **crop))
        add("farslip", bench.fit("farslip", seed, **crop))
        add("lad", bench.fit("lad", seed, teacher=lad_t))
        add("scratch_semi", bench.fit("scratch_seg", seed, data=bench.semi))
        add("kd_semi", bench.fit("seg_kd", seed, teacher=semi, data=bench.semi))
        # the MGD teacher pair: b2 = the semi teacher, b3 = the complementary 4-stage U-Net
        from still.methods.mgd import MGDTeacher

        spec_t = MGDTeacher([semi, semi2])
        add("mgd", bench.fit_with_teacher("mgd", seed, spec_t, data=bench.semi))
    from _seed_common import row

    out = []
    for m in ("transkd_seg", "transkd_seg_ea", "chimera_sgd", "oadp", "farslip", "lad", "mgd"):
        sk, kk = ("scratch_semi", "kd_semi") if m == "mgd" else ("scratch", "kd")
        task = TASK.format(side=2 * bench.b.cell, item=bench.b.item)
        out.append(row(m, task + (" 25% labelled" if m == "mgd" else ""), METRIC, res, (sk, kk, m), CLAIMS[m],
                       teacher_miou["semi" if m == "mgd" else "plain"]))
    return out
