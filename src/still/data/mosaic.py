"""Fashion-MNIST mosaics: a dense-prediction task built deterministically from the real images.

Each canvas (1, 2·cell, 2·cell) holds up to four Fashion-MNIST items, one per quadrant, each shifted
by a seeded offset inside its cell. `item` < 28 first shrinks every image to item × item (area
averaging), so a smaller canvas (e.g. `cell=16, item=14`: 32 × 32, a quarter of the pixels) keeps
whole items inside a small U-Net's receptive field. Labels:
- `mask` (H, W) int64: the item's class + 1 on the item's pixels (raw intensity > `threshold`), 0 for
  background — 11 classes in all;
- `boxes` (4, 4) float32 `(x0, y0, x1, y1)` tight boxes, `box_labels` (4,) int64 (class + 1; 0 and a
  box of -1 where the quadrant is empty);
- `y` (10,) float32 multi-hot of the classes present.
The same `(split, num_samples, seed)` always gives the same mosaics.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils.data import Dataset

from still.registry import register_dataset, register_metric

NUM_SEG_CLASSES = 11  # background + 10 Fashion-MNIST classes


class MosaicDataset(Dataset):
    """Samples `{"x", "mask", "boxes", "box_labels", "y", "index"}`; see the module docstring."""

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, boxes: torch.Tensor, box_labels: torch.Tensor,
                 meta: dict) -> None:
        self.x, self.mask, self.boxes, self.box_labels = x, mask, boxes, box_labels
        present = torch.zeros(len(x), 10)
        for j in range(box_labels.shape[1]):
            lab = box_labels[:, j]
            ok = lab > 0
            present[ok, (lab[ok] - 1)] = 1.0
        self.y = present
        self.num_classes = NUM_SEG_CLASSES
        self.input_shape = tuple(x.shape[1:])
        self.name = "fmnist_mosaic"
        self.meta = meta
        self._fp: str | None = None

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "mask": self.mask[i], "boxes": self.boxes[i], "box_labels": self.box_labels[i],
                "y": self.y[i], "index": torch.tensor(i, dtype=torch.long)}

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256(repr(sorted(self.meta.items())).encode())
            h.update(self.x.numpy().tobytes())
            h.update(self.mask.numpy().tobytes())
            self._fp = h.hexdigest()[:16]
        return self._fp


def shrink(imgs: np.ndarray, item: int) -> np.ndarray:
    """Images (N, S, S) float32 resized to (N, item, item) by area averaging (unchanged if item == S)."""
    if item == imgs.shape[-1]:
        return imgs
    import torch.nn.functional as F

    return F.interpolate(torch.from_numpy(imgs)[:, None], size=(item, item), mode="area")[:, 0].numpy()


def build_mosaics(images: np.ndarray, labels: np.ndarray, num_samples: int, seed: int, cell: int = 32,
                  p_empty: float = 0.25, threshold: float = 0.1, item: int = 28) -> tuple[torch.Tensor, ...]:
    """Compose `num_samples` mosaics from `images` (N, 28, 28) uint8/float in [0, 1] and `labels` (N,);
    `item` < 28 shrinks the images to item × item first (the seeded draws are the same)."""
    if not 1 <= item <= cell:
        raise ValueError(f"build_mosaics: item={item} must lie in [1, cell={cell}]")
    rng = np.random.default_rng(seed)
    imgs = images.astype(np.float32)
    if imgs.max() > 1.0:
        imgs = imgs / 255.0
    imgs = shrink(imgs, item)
    side = 2 * cell
    xs = np.zeros((num_samples, 1, side, side), np.float32)
    masks = np.zeros((num_samples, side, side), np.int64)
    boxes = -np.ones((num_samples, 4, 4), np.float32)
    blabels = np.zeros((num_samples, 4), np.int64)
    slack = cell - item
    for i in range(num_samples):
        empty = rng.random(4) < p_empty
        if empty.all():
            empty[rng.integers(4)] = False
        for q in range(4):
            if empty[q]:
                continue
            k = int(rng.integers(len(imgs)))
            dy, dx = (int(v) for v in rng.integers(0, slack + 1, size=2))
            y0, x0 = (q // 2) * cell + dy, (q % 2) * cell + dx
            img = imgs[k]
            xs[i, 0, y0 : y0 + item, x0 : x0 + item] = img
            on = img > threshold
            masks[i, y0 : y0 + item, x0 : x0 + item][on] = labels[k] + 1
            if on.any():
                rows, cols = np.where(on)
                boxes[i, q] = (x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1)
                blabels[i, q] = labels[k] + 1
    return torch.from_numpy(xs), torch.from_numpy(masks), torch.from_numpy(boxes), torch.from_numpy(blabels)


@register_dataset("fmnist_mosaic", paper="built here from Fashion-MNIST (Xiao et al. 2017)")
def fmnist_mosaic(split: str = "train", num_samples: int = 4000, seed: int = 0, cell: int = 32,
                  root: str | None = None, normalize: bool = True, item: int = 28) -> MosaicDataset:
    """Fashion-MNIST mosaics for segmentation / detection: x (1, 2·cell, 2·cell) (64 × 64 by default),
    mask in 0..10; `item` < 28 shrinks the items (see the module docstring)."""
    from still.data.vision import FASHION_MNIST_FILES, _find_fashion_mnist, read_idx

    d = _find_fashion_mnist(root, download=False)
    img_f, lab_f = FASHION_MNIST_FILES[split]
    images, labels = read_idx(d / img_f), read_idx(d / lab_f).astype(np.int64)
    # Different seeds for train and test so the two splits never share a canvas.
    x, mask, boxes, blabels = build_mosaics(images, labels, num_samples, seed * 2 + (split == "test"), cell,
                                         item=item)
    if normalize:
        x = (x - 0.2860) / 0.3530
    return MosaicDataset(x, mask, boxes, blabels,
                         {"split": split, "num_samples": num_samples, "seed": seed, "cell": cell,
                          **({"item": item} if item != 28 else {})})


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix (C, C) of integer maps `pred`, `target` of the same shape (rows: target)."""
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou_from_confusion(cm: torch.Tensor) -> float:
    """Mean IoU over the classes that occur in target or prediction."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    valid = union > 0
    return float((inter[valid] / union[valid]).mean()) if valid.any() else 0.0


@register_metric("miou", paper="")
def miou(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean IoU of per-pixel argmax of logits (B, C, H, W) against target (B, H, W)."""
    return miou_from_confusion(confusion(logits.argmax(1), target, logits.shape[1]))
