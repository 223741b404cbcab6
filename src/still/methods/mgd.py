"""MGD (Qin et al., ECCV 2022): complementary teachers with cross pseudo-labels on CutMix-mixed
unlabelled pairs, image-level GAP L1 and region-level self-similarity, for semi-supervised
segmentation. The data is `fmnist_mosaic_seg(labelled_fraction=..., cutmix=True)` (x = u_mix,
x0/x1/cutmix for the pair); the teacher is `MGDTeacher` over two frozen, differently built U-Nets.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from still.losses.dense import MGD_PAPER
from still.taps import forward_with_views
from still.teachers.base import Teacher, weights_fingerprint


def _cf(x: torch.Tensor, k: int) -> torch.Tensor:
    return x if x.shape[1] == k else x.permute(0, 3, 1, 2)


class MGDTeacher(Teacher):
    """Two frozen teachers b2 (`t1_*`) and b3 (`t2_*`).

    Views per teacher j ∈ {1, 2}: `t{j}_seg` logits (B, K, H, W) on x (= u_mix), `t{j}_feat` the map at
    `feat_tap` on x, `t{j}_pl` the pseudo-label logits mix_M(logits(x0), logits(x1)) =
    (1 − M)·logits(x0) + M·logits(x1) (MGD's pseudo-label before the argmax; x0 = x1 = x and M = 0 when
    the batch has no CutMix pair).
    """

    def __init__(self, teachers: Sequence[nn.Module], num_classes: int = 11, feat_tap: str = "encoder.2",
                 head_tap: str = "head") -> None:
        if len(teachers) != 2:
            raise ValueError(f"MGDTeacher: needs 2 complementary teachers, got {len(teachers)}")
        self.models = [t.eval() for t in teachers]
        for m in self.models:
            for p in m.parameters():
                p.requires_grad_(False)
        self.k, self.feat_tap, self.head_tap = num_classes, feat_tap, head_tap
        self.view_specs = {f"t{j}_{v}": v for j in (1, 2) for v in ("seg", "feat", "pl")}

    def _run(self, m: nn.Module, x: torch.Tensor, feat: bool) -> dict[str, torch.Tensor]:
        views = {"seg": self.head_tap, **({"feat": self.feat_tap} if feat else {})}
        _, v = forward_with_views(m, {"x": x}, views, detach=True)
        return v

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        out: dict[str, torch.Tensor] = {}
        for j, m in zip((1, 2), self.models):
            m.eval()
            mine = [n for n in names if n.startswith(f"t{j}_")]
            if not mine:
                continue
            if f"t{j}_seg" in mine or f"t{j}_feat" in mine:
                v = self._run(m, batch["x"], f"t{j}_feat" in mine)
                out[f"t{j}_seg"] = v["seg"]
                if "feat" in v:
                    out[f"t{j}_feat"] = v["feat"]
            if f"t{j}_pl" in mine:
                if "x0" in batch:
                    z0, z1 = self._run(m, batch["x0"], False)["seg"], self._run(m, batch["x1"], False)["seg"]
                    mm = batch["cutmix"].to(z0.dtype)
                    out[f"t{j}_pl"] = z0 * (1 - mm) + z1 * mm
                else:
                    out[f"t{j}_pl"] = out.get(f"t{j}_seg", self._run(m, batch["x"], False)["seg"])
        return {n: out[n] for n in names}

    def fingerprint(self) -> str:
        return "mgd:" + ":".join(weights_fingerprint(m) for m in self.models)

    def to(self, device: torch.device | str) -> "MGDTeacher":
        for m in self.models:
            m.to(device)
        return self


def complementary_teacher(num_classes: int = 11, in_channels: int = 1) -> nn.Module:
    """MGD's second teacher b3: a deeper, narrower 4-stage U-Net (12-24-48-96) than the 3-stage 16-32-64
    first teacher: different depth and receptive field (the paper pairs WideResNet-34 and ResNet-101)."""
    from still.methods.dense_tasks import PixelUNet

    return PixelUNet((12, 24, 48, 96), num_classes, in_channels)


__all__ = ["MGDTeacher", "complementary_teacher", "MGD_PAPER"]
