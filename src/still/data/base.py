"""In-memory data sets of dict samples, with a content fingerprint."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class TensorDataset(Dataset):
    """Samples `{"x": x[i], "y": y[i], "index": i}` from in-memory tensors.

    `x`: (N, *input_shape) float32; `y`: (N,) int64. `index` is the sample id within this split
    (stable across runs: the teacher store and CRD's memory bank key on it).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, name: str,
                 meta: dict[str, Any] | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"{name}: {len(x)} inputs but {len(y)} labels")
        self.x, self.y = x.contiguous(), y.long().contiguous()
        self.num_classes = int(num_classes)
        self.input_shape = tuple(self.x.shape[1:])
        self.name = name
        self.meta = dict(meta or {})
        self._fp: str | None = None

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i, dtype=torch.long)}

    def __getitems__(self, idx: list[int]) -> list[dict[str, torch.Tensor]]:
        # Batched fetch (used by DataLoader when present): one gather instead of len(idx) calls.
        t = torch.as_tensor(idx, dtype=torch.long)
        xs, ys = self.x[t], self.y[t]
        return [{"x": xs[j], "y": ys[j], "index": t[j]} for j in range(len(idx))]

    def fingerprint(self) -> str:
        """sha256 of the inputs, labels and the loader's parameters (16 hex chars)."""
        if self._fp is None:
            h = hashlib.sha256(self.name.encode())
            h.update(repr(sorted(self.meta.items())).encode())
            h.update(self.x.numpy().tobytes())
            h.update(self.y.numpy().tobytes())
            self._fp = h.hexdigest()[:16]
        return self._fp

    def subset(self, n: int | None, seed: int = 0) -> TensorDataset:
        """The first `n` samples of a seeded permutation (stratification is not attempted)."""
        if n is None or n >= len(self):
            return self
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(self))[:n])
        return TensorDataset(self.x[perm], self.y[perm], self.num_classes, self.name,
                             {**self.meta, "subset": n, "subset_seed": seed})
