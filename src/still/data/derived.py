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
                 groups: Sequence[Sequence[int]] | None = None, base_params: dict[str, Any] | None = None,
                 subset: int | None = None, subset_seed: int = 0) -> TensorDataset:
    """A few-class view of `base`: `classes` kept and relabelled, or `groups` of classes merged.

    `subset` keeps a seeded random `subset` of the derived samples (after the class selection).
    """
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
    out = TensorDataset(ds.x[keep], y[keep], len(groups), f"{ds.name}_subset",
                        {**ds.meta, "groups": [list(map(int, g)) for g in groups]})
    return out.subset(subset, subset_seed)


@register_dataset("semi_supervised")
def semi_supervised(base: str = "fashion_mnist", split: str = "train", label_fraction: float = 0.1, seed: int = 0,
                    base_params: dict[str, Any] | None = None, subset: int | None = None, subset_seed: int = 0,
                    balance: bool = False) -> TensorDataset:
    """`base` with only a stratified `label_fraction` of training labels kept (the rest -100).

    `subset` first keeps a seeded random `subset` of `base`'s samples (both splits). `balance=True`
    repeats the labelled samples until they are about as many as the unlabelled ones, so that a
    shuffled batch nearly always holds labelled samples (with 1 % labels and batches of 64, most
    batches would have none, and a plain mean CE over an all-ignored batch is NaN); the repeats are
    marked in `labelled` too.
    """
    ds = DATASETS.build(base, split=split, **dict(base_params or {})).subset(subset, subset_seed)
    if split != "train":
        return ds
    if not 0 < label_fraction <= 1:
        raise ValueError(f"semi_supervised: label_fraction must be in (0, 1], got {label_fraction}")
    rng = np.random.default_rng(seed)
    y = ds.y.clone()
    keep = np.zeros(len(y), dtype=bool)
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.y.numpy() == c)
        if len(idx) == 0:
            continue
        n = max(1, int(round(label_fraction * len(idx))))
        keep[rng.choice(idx, size=n, replace=False)] = True
    y[torch.from_numpy(~keep)] = IGNORE_LABEL
    x, lab = ds.x, torch.from_numpy(keep)
    n_lab, n_unl = int(keep.sum()), int((~keep).sum())
    if balance and 0 < n_lab < n_unl:
        reps = n_unl // n_lab - 1
        idx = torch.from_numpy(np.flatnonzero(keep)).repeat(reps)
        x, y = torch.cat([x, x[idx]]), torch.cat([y, y[idx]])
        lab = torch.cat([lab, torch.ones(len(idx), dtype=torch.bool)])
    out = TensorDataset(x, y, ds.num_classes, f"{ds.name}_semi",
                        {**ds.meta, "label_fraction": label_fraction, "label_seed": seed, "balance": balance})
    out.labelled = lab  # type: ignore[attr-defined]
    return out
