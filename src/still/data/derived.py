"""Data sets derived from a registered one: few-class subsets and semi-supervised label masks.

- `class_subset`: keeps `classes` (relabelled 0..k-1), or merges classes into `groups`
  (e.g. Fashion-MNIST tops vs shoes vs rest) for few-class problems (LELP).
- `semi_supervised`: keeps the label of a seeded, class-stratified `label_fraction` of the training
  samples and sets the rest to -100, which the `ce` loss ignores (DHO, MGD); test splits stay labelled.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from still.data.base import TensorDataset
from still.registry import DATASETS, register_dataset

IGNORE_LABEL = -100


@register_dataset("class_subset")
def class_subset(base: str = "fashion_mnist", split: str = "train", classes: Sequence[int] | None = None,
                 groups: Sequence[Sequence[int]] | None = None, base_params: dict[str, Any] | None = None
                 ) -> TensorDataset:
    """A few-class view of `base`: `classes` kept and relabelled, or `groups` of classes merged."""
    ds = DATASETS.build(base, split=split, **dict(base_params or {}))
    if (classes is None) == (groups is None):
        raise ValueError("class_subset: give exactly one of `classes` or `groups`")
    groups = [[c] for c in classes] if classes is not None else [list(g) for g in groups]  # type: ignore[union-attr]
    mapping = torch.full((int(ds.y.max()) + 1,), -1, dtype=torch.long)
    for new, olds in enumerate(groups):
        for c in olds:
            mapping[c] = new
    y = mapping[ds.y]
    keep = y >= 0
    return TensorDataset(ds.x[keep], y[keep], len(groups), f"{ds.name}_subset",
                         {**ds.meta, "groups": [list(map(int, g)) for g in groups]})


@register_dataset("semi_supervised")
def semi_supervised(base: str = "fashion_mnist", split: str = "train", label_fraction: float = 0.1, seed: int = 0,
                    base_params: dict[str, Any] | None = None) -> TensorDataset:
    """`base` with only a stratified `label_fraction` of training labels kept (the rest -100)."""
    ds = DATASETS.build(base, split=split, **dict(base_params or {}))
    if split != "train":
        return ds
    if not 0 < label_fraction <= 1:
        raise ValueError(f"semi_supervised: label_fraction must be in (0, 1], got {label_fraction}")
    rng = np.random.default_rng(seed)
    y = ds.y.clone()
    keep = np.zeros(len(y), dtype=bool)
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.y.numpy() == c)
        n = max(1, int(round(label_fraction * len(idx))))
        keep[rng.choice(idx, size=n, replace=False)] = True
    y[torch.from_numpy(~keep)] = IGNORE_LABEL
    out = TensorDataset(ds.x, y, ds.num_classes, f"{ds.name}_semi",
                        {**ds.meta, "label_fraction": label_fraction, "label_seed": seed})
    out.labelled = torch.from_numpy(keep)  # type: ignore[attr-defined]
    return out
