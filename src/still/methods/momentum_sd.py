"""Momentum self-distillation presets: plain DINO, MMC (catalog 5.3) and CMD (catalog 5.4).

MMC and CMD are RECONSTRUCTED FROM THE ABSTRACT (no code found, full texts not read; catalog [A + R]).
The teacher is always an EMA copy of the student (`still.teachers.ema.EMATeacher`, updated by the
engine after every step), built by `wrap_teacher`; the centring is the `dino` loss's.

- `dino_sd`: the student sees a random region crop (`region`), the EMA teacher the whole image;
  H(centred teacher, student) on the image-level head logits.
- `mmc`: the student sees the image with a fraction of its patches masked (`ssl_vit_tiny(mask_ratio=…)`
  masks in training mode; the EMA copy, in eval mode, sees the full image). Terms: global
  H(t_img, s_img) + momentum global→local H(t_img, s_patch) for every patch token + global contrast
  (InfoNCE between the student's and the teacher's pooled embeddings) + MIM (the student's pixel head
  reconstructs its masked patches: `masked_patch_mse`, target the batch's `x`).
- `cmd`: student and teacher use gated-attention MIL pooling (`ssl_vit_tiny(pool="mil")`) and see the
  image and a region crop. Intra-level: H(t_img, s_img) + H(t_reg, s_reg); inter-level: inside the
  teacher, its image-level distribution supervises the student's region (H(t_img, s_reg)); inside the
  student, its own stop-gradient image-level distribution supervises its region (`cmd_inter_student`).

Data `fmnist_regions`: Fashion-MNIST samples plus `region`, a random crop (12–20 px side) resized to 28×28,
drawn afresh at every access (torch's RNG, which the engine seeds).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from still.data.base import TensorDataset
from still.losses.momentum_sd import CMD_PAPER, DINO_PAPER, MMC_PAPER
from still.methods.base import MethodSpec
from still.registry import DATASETS, register_dataset, register_method


def random_region(x: torch.Tensor, low: int = 12, high: int = 20) -> torch.Tensor:
    """(C, H, W) → a random square crop of side in [low, high], resized back to (C, H, W) (bilinear)."""
    _, h, w = x.shape
    s = int(torch.randint(low, high + 1, ()))
    i, j = int(torch.randint(0, h - s + 1, ())), int(torch.randint(0, w - s + 1, ()))
    return F.interpolate(x[None, :, i:i + s, j:j + s], size=(h, w), mode="bilinear", align_corners=False)[0]


class RegionDataset(TensorDataset):
    """TensorDataset whose samples also hold `region`: a fresh random crop of `x` (see module doc)."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d = super().__getitem__(i)
        d["region"] = random_region(d["x"])
        return d

    def __getitems__(self, idx: list[int]) -> list[dict[str, torch.Tensor]]:
        out = super().__getitems__(idx)
        for d in out:
            d["region"] = random_region(d["x"])
        return out


@register_dataset("fmnist_regions", paper=CMD_PAPER)
def fmnist_regions(split: str = "train", subset: int | None = None, subset_seed: int = 0,
                   base: str = "fashion_mnist") -> RegionDataset:
    """`base` (x, y, index) + a random region crop per access."""
    ds = DATASETS.build(base, split=split).subset(subset, subset_seed)
    return RegionDataset(ds.x, ds.y, ds.num_classes, f"{ds.name}_regions", dict(ds.meta))


def _ema(views: dict[str, str], decay: float, inputs: Any):
    from still.teachers.ema import EMATeacher

    def wrap(teacher: Any = None, student: Any = None, **_: Any) -> EMATeacher:
        if student is None:
            raise ValueError("momentum self-distillation: the EMA teacher needs the student model")
        return EMATeacher(student, views, decay=decay, inputs=inputs)

    return wrap


def _dino(name: str, student: Any, teacher: str, st: float, tt: float, weight: float = 1.0) -> dict[str, Any]:
    return {"name": name, "loss": "dino", "params": {"student_temp": st, "teacher_temp": tt},
            "student": student, "teacher": teacher, "weight": weight}


@register_method("dino_sd", paper=DINO_PAPER)
def dino_sd(decay: float = 0.99, student_temp: float = 0.1, teacher_temp: float = 0.04) -> MethodSpec:
    """Plain DINO: student on `region`, EMA teacher on `x`, centred sharpened CE on the head logits."""
    return MethodSpec(terms=[_dino("dino", "img", "img", student_temp, teacher_temp)],
                      student_views={"img": "img_out"}, teacher_views={"img": "img_out"},
                      wrap_teacher=_ema({"img": "img_out"}, decay, ["x"]),
                      notes="student: ssl_vit_tiny called with inputs {x: region}")


@register_method("mmc", paper=MMC_PAPER)
def mmc(decay: float = 0.99, student_temp: float = 0.1, teacher_temp: float = 0.04, w_local: float = 1.0,
        w_contrast: float = 1.0, contrast_temp: float = 0.1, w_mim: float = 1.0, patch: int = 7) -> MethodSpec:
    """MMC (reconstructed from the abstract): masked student; MIM + global + global→local momentum SD + contrast."""
    views = {"img": "img_out", "patch": "patch_out", "embed": "embed_out", "recon": "recon_out", "mask": "mask_out"}
    return MethodSpec(
        terms=[_dino("global", "img", "img", student_temp, teacher_temp),
               _dino("local", "patch", "img", student_temp, teacher_temp, w_local),
               {"name": "contrast", "loss": "teacher_infonce", "params": {"temperature": contrast_temp},
                "student": "embed", "teacher": "embed", "weight": w_contrast},
               {"name": "mim", "loss": "masked_patch_mse", "params": {"patch": patch},
                "student": ["recon", "mask"], "target": "x", "weight": w_mim}],
        student_views=dict(views), teacher_views={"img": "img_out", "embed": "embed_out"},
        wrap_teacher=_ema({"img": "img_out", "embed": "embed_out"}, decay, ["x"]),
        notes="reconstructed from the abstract; student: ssl_vit_tiny(mask_ratio>0)",
    )


@register_method("cmd", paper=CMD_PAPER)
def cmd(decay: float = 0.99, student_temp: float = 0.1, teacher_temp: float = 0.04, w_inter: float = 1.0
        ) -> MethodSpec:
    """CMD (reconstructed from the abstract): MIL-pooled ViT; intra-level (img↔img, reg↔reg) + inter-level terms."""
    views = {"img": "img_out", "reg": "reg_out"}
    return MethodSpec(
        terms=[_dino("intra_img", "img", "img", student_temp, teacher_temp),
               _dino("intra_reg", "reg", "reg", student_temp, teacher_temp),
               _dino("inter_teacher", "reg", "img", student_temp, teacher_temp, w_inter),
               {"name": "inter_student", "loss": "cmd_inter_student",
                "params": {"student_temp": student_temp, "teacher_temp": teacher_temp},
                "student": ["reg", "img"], "weight": w_inter}],
        student_views=dict(views), teacher_views=dict(views),
        wrap_teacher=_ema(dict(views), decay, ["x", "region"]),
        notes="reconstructed from the abstract; student: ssl_vit_tiny(pool='mil') called with inputs [x, region]",
    )
