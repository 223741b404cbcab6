"""Plumbing for the dense seed methods on the Fashion-MNIST mosaics (no edits to the pipeline needed).

- `fmnist_mosaic_seg`: the mosaics with `y` = the pixel mask (B, H, W), so the pipeline's CE baseline,
  teacher training and metrics (which all read `y`) work on segmentation; `labelled_fraction < 1`
  hides the masks of the other samples (y = -100) and, with `cutmix=True`, replaces each unlabelled
  canvas by a CutMix of it and another unlabelled canvas (MGD's u_mix), giving `x0`, `x1`, `cutmix`.
- `seg_unet_px` / `seg_unet_small_px`: the segmentation U-Nets with *pixel-row* logits (B, H, W, K),
  so the classic `ce` and `kd` losses apply per pixel; the channel-first logits stay at tap `head`.
- `pixel_miou`: mean IoU of (B, H, W, K) logits against (B, H, W) masks (ignoring -100).
- `CropTeacher`: encodes each box / block crop of the canvas with a model on its own (OADP's object
  and block embeddings, FarSLIP's local crops), on top of any inner teacher.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from still.data.mosaic import NUM_SEG_CLASSES, confusion, fmnist_mosaic, miou_from_confusion
from still.losses.dense import roi_align
from still.losses.dense_heads import grid_boxes
from still.models.segmentation import UNet
from still.registry import register_dataset, register_metric, register_model
from still.taps import TapSpec, forward_with_views
from still.teachers.base import Teacher

IGNORE = -100


def box_mask(h: int, w: int, rng: np.random.Generator, boxes: int = 3, prop: tuple[float, float] = (0.25, 0.5)) -> np.ndarray:
    """MGD's CutMix mask (h, w) float32: the union of `boxes` boxes of area proportion in `prop`."""
    m = np.zeros((h, w), np.float32)
    for _ in range(boxes):
        area = rng.uniform(*prop) * h * w
        ratio = rng.uniform(0.5, 2.0)
        bh, bw = int(min(h, (area * ratio) ** 0.5)), int(min(w, (area / ratio) ** 0.5))
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        m[y0:y0 + bh, x0:x0 + bw] = 1.0
    return m


class MosaicSeg(Dataset):
    """Mosaic samples with `y` = mask; see the module docstring."""

    def __init__(self, base: Any, labelled: torch.Tensor, cutmix: bool, seed: int) -> None:
        self.base, self.labelled = base, labelled
        self.num_classes, self.input_shape, self.name = NUM_SEG_CLASSES, base.input_shape, "fmnist_mosaic_seg"
        self.cutmix = cutmix and not bool(labelled.all())
        self._mix: dict[int, tuple[int, torch.Tensor]] = {}
        if self.cutmix:
            rng = np.random.default_rng(seed + 7)
            unl = torch.nonzero(~labelled).flatten().tolist()
            partners = rng.permutation(unl) if len(unl) > 1 else unl
            h, w = base.mask.shape[-2:]
            for i, j in zip(unl, partners):
                self._mix[i] = (int(j), torch.from_numpy(box_mask(h, w, rng)))
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = dict(self.base[i])
        s["mask_true"] = s["mask"]
        s["y"] = s["mask"] if bool(self.labelled[i]) else torch.full_like(s["mask"], IGNORE)
        s["labelled"] = self.labelled[i]
        if self.cutmix:
            j, m = self._mix.get(i, (i, torch.zeros(s["mask"].shape)))
            x1 = self.base.x[j]
            s["x0"], s["x1"], s["cutmix"] = s["x"], x1, m[None]
            s["x"] = s["x"] * (1 - m[None]) + x1 * m[None]
        return s

    def fingerprint(self) -> str:
        return f"{self.base.fingerprint()}-seg{int(self.labelled.sum())}-{self.cutmix}-{self.seed}"


@functools.lru_cache(maxsize=8)
def _base(split: str, n: int, seed: int, root: str | None, cell: int = 32, item: int = 28) -> Any:
    return fmnist_mosaic(split, num_samples=n, seed=seed, root=root, cell=cell, item=item)


@register_dataset("fmnist_mosaic_seg", paper="built here from Fashion-MNIST (Xiao et al. 2017)")
def fmnist_mosaic_seg(split: str = "train", num_samples: int = 2000, seed: int = 0, subset: int | None = None,
                      labelled_fraction: float = 1.0, cutmix: bool = False, root: str | None = None,
                      cell: int = 32, item: int = 28) -> MosaicSeg:
    """Mosaics (1, 2·cell, 2·cell) (64 × 64 by default) with y = mask in 0..10; the test split is always
    fully labelled. `cell`, `item`: see `still.data.mosaic` (e.g. cell=16, item=14 gives 32 × 32)."""
    n = min(num_samples, subset) if subset else num_samples
    base = _base(split, n, seed, root, cell, item)
    lab = torch.ones(n, dtype=torch.bool)
    if split == "train" and labelled_fraction < 1.0:
        k = max(1, int(round(labelled_fraction * n)))
        perm = torch.from_numpy(np.random.default_rng(seed + 3).permutation(n)[:k])
        lab = torch.zeros(n, dtype=torch.bool)
        lab[perm] = True
    return MosaicSeg(base, lab, cutmix and split == "train", seed)


class PixelUNet(UNet):
    """A UNet whose output is pixel-row logits (B, H, W, K); tap `head` keeps (B, K, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 2, 3, 1)


def _bg_prior(model: PixelUNet, bg_bias: float) -> PixelUNet:
    """Start the head's background logit at `bg_bias` (the others at 0): a class-prior initialisation
    (background covers ~3/4 of a mosaic), so the first steps need not spend Adam's lr-bounded updates on
    growing that bias. 0 leaves PyTorch's default initialisation untouched."""
    if bg_bias:
        with torch.no_grad():
            model.head.bias.zero_()
            model.head.bias[0] = float(bg_bias)
    return model


@register_model("seg_unet_px")
def seg_unet_px(num_classes: int = NUM_SEG_CLASSES, input_shape: Sequence[int] = (1, 64, 64),
                channels: Sequence[int] = (16, 32, 64), bg_bias: float = 0.0) -> PixelUNet:
    """Segmentation teacher (16-32-64 U-Net) with pixel-row logits (B, H, W, K); `bg_bias`: see `_bg_prior`."""
    return _bg_prior(PixelUNet(channels, num_classes, int(input_shape[0])), bg_bias)


@register_model("seg_unet_small_px")
def seg_unet_small_px(num_classes: int = NUM_SEG_CLASSES, input_shape: Sequence[int] = (1, 64, 64),
                      channels: Sequence[int] = (8, 16, 32), bg_bias: float = 0.0) -> PixelUNet:
    """Segmentation student (8-16-32 U-Net) with pixel-row logits (B, H, W, K); `bg_bias`: see `_bg_prior`."""
    return _bg_prior(PixelUNet(channels, num_classes, int(input_shape[0])), bg_bias)


class LabelInputUNet(PixelUNet):
    """LAD's teacher body: a PixelUNet over image ⊕ one-hot label (1 + K channels). Called on the image
    alone (e.g. to measure it), the label channels are zeros: the teacher without its privileged input."""

    def __init__(self, channels: Sequence[int], num_classes: int, image_channels: int = 1) -> None:
        super().__init__(channels, num_classes, image_channels + num_classes)
        self.image_channels = image_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.image_channels:
            k = self.encoder[0][0].in_channels - self.image_channels
            x = torch.cat([x, x.new_zeros(x.shape[0], k, *x.shape[2:])], 1)
        return super().forward(x)


@register_model("seg_unet_lad_px")
def seg_unet_lad_px(num_classes: int = NUM_SEG_CLASSES, input_shape: Sequence[int] = (1, 64, 64),
                    channels: Sequence[int] = (16, 32, 64), bg_bias: float = 0.0) -> LabelInputUNet:
    """LAD teacher: 16-32-64 U-Net over image ⊕ noised one-hot label (1 + K input channels)."""
    return _bg_prior(LabelInputUNet(channels, num_classes, int(input_shape[0])), bg_bias)


@register_metric("pixel_miou")
def pixel_miou(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean IoU of pixel-row logits (B, H, W, K) (or (B, K, H, W) if target is (B, H, W) and dim 1 is K)
    against masks (B, H, W); pixels labelled -100 are ignored."""
    if logits.dim() == 4 and logits.shape[1:3] != target.shape[1:3]:
        logits = logits.permute(0, 2, 3, 1)
    pred, k = logits.argmax(-1), logits.shape[-1]
    keep = target != IGNORE
    return miou_from_confusion(confusion(pred[keep], target[keep], k))


# ------------------------------------------------------------------------------ crop teacher
def crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crops of x (B, C, H, W) at boxes (B, K, 4) → (B·K, C, size, size) (absent boxes → 0)."""
    r = roi_align(x, boxes, output_size=size, spatial_scale=1.0, sampling=1)  # (B, K, C, S, S)
    return r.flatten(0, 1)


class CropTeacher(Teacher):
    """Serves crop embeddings of a model on top of an optional inner teacher.

    Views: `obj_emb` (B, K, D): each box of `batch[box_key]` cropped, resized to `crop_size` and
    encoded on its own, tap `tap` average-pooled (0 for absent boxes); `block_emb` (B, g², D): the
    same for the g×g blocks of the canvas; `global_emb` (B, D): the whole canvas. Other view names
    go to `inner`. `model_fn()` returns the model to run (an EMA teacher's moving copy, say);
    `after_step` is forwarded to `inner` (so an EMA inner teacher keeps updating).
    """

    CROP_VIEWS = ("obj_emb", "block_emb", "global_emb")

    def __init__(self, model_fn: Any, tap: str, inner: Teacher | None = None, crop_size: int = 32,
                 blocks: int = 2, box_key: str = "boxes", input_key: str = "x") -> None:
        self.model_fn, self.tap, self.inner = model_fn, TapSpec.parse(tap), inner
        self.crop_size, self.blocks, self.box_key, self.input_key = crop_size, blocks, box_key, input_key
        self.view_specs = {**(inner.view_specs if inner is not None else {}), **{v: tap for v in self.CROP_VIEWS}}

    def _encode(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        _, v = forward_with_views(model, {"x": x}, {"e": self.tap}, detach=True)
        e = v["e"]
        return e.float().mean((2, 3)) if e.dim() == 4 else e.float().mean(1) if e.dim() == 3 else e.float()

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        out: dict[str, torch.Tensor] = {}
        inner = [n for n in names if n not in self.CROP_VIEWS]
        if inner:
            assert self.inner is not None
            out.update(self.inner.views(batch, inner))
        model = self.model_fn()
        was = model.training
        model.eval()
        x = batch[self.input_key]
        b, _, h, w = x.shape
        try:
            for name in names:
                if name == "global_emb":
                    out[name] = self._encode(model, x)
                elif name in ("obj_emb", "block_emb"):
                    boxes = batch[self.box_key] if name == "obj_emb" else grid_boxes(b, self.blocks, h, w, x.device)
                    e = self._encode(model, crop(x, boxes.to(x.dtype), self.crop_size)).view(b, boxes.shape[1], -1)
                    out[name] = e * (boxes >= 0).all(-1, keepdim=True).to(e.dtype)
        finally:
            model.train(was)
        return out

    def after_step(self, student: nn.Module) -> None:
        fn = getattr(self.inner, "after_step", None)
        if fn is not None:
            fn(student)

    def fingerprint(self) -> str:
        from still.teachers.base import weights_fingerprint

        return f"crops:{weights_fingerprint(self.model_fn())}"

    def to(self, device: torch.device | str) -> "CropTeacher":
        if self.inner is not None:
            self.inner.to(device)
        self.model_fn().to(device)
        return self
