"""Tiny teachers and data for the store tests, and a CLI that writes a store (run as a subprocess).

    python tests/scripts/store_writer.py OUT [--rank R --world W] [--sleep S] [--perturb P] [--n N]

`--sleep` pauses after every shard (so a test can SIGKILL the writer mid-run). Everything is seeded
and single-threaded, so any process writes byte-identical shards.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from still.teachers.base import LiveTeacher  # noqa: E402


def load_digits_array() -> "np.ndarray":
    """scikit-learn's bundled digits (1797 x (64 pixels + label)), read from its CSV without importing
    sklearn (a 3 s import on a busy machine; the subprocess tests start several writers)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.submodule_search_locations, "scikit-learn is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    return np.loadtxt(path, delimiter=",")


class Digits(torch.utils.data.Dataset):
    """sklearn digits (8x8 -> 64 features), items {"x", "y", "index"}; `views` > 1 adds seeded noise views
    keyed by `view_id` = 1000 * v + 7 (item i is sample i // views, view i % views)."""

    def __init__(self, n: int = 96, views: int = 1) -> None:
        data = load_digits_array()
        self.x = torch.tensor(data[:n, :64], dtype=torch.float32) / 16.0
        self.y = torch.tensor(data[:n, 64], dtype=torch.long)
        self.views = views

    def __len__(self) -> int:
        return len(self.x) * self.views

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, v = divmod(i, self.views)
        x = self.x[s]
        item = {"y": self.y[s], "index": torch.tensor(s)}
        if self.views > 1:
            vid = 1000 * v + 7
            g = torch.Generator().manual_seed(vid * 100003 + s)
            x = x + 0.1 * torch.randn(x.shape, generator=g)
            item["view_id"] = torch.tensor(vid)
        item["x"] = x
        return item

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.x.numpy().tobytes())
        h.update(str(self.views).encode())
        return h.hexdigest()[:16]


def make_mlp(perturb: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    if perturb:
        with torch.no_grad():
            m[2].bias[0] += perturb
    return m


def make_teacher(perturb: float = 0.0) -> LiveTeacher:
    return LiveTeacher(make_mlp(perturb), {"logits": "", "feat": "1", "logits16": "", "logits8": ""})


STORE_KW = dict(views=["logits", "feat", "logits16", "logits8"], topk={"logits": 3, "logits8": 4},
                quant={"logits8": "int8"}, dtype={"feat": "bfloat16", "logits16": "float16", "logits": "float16",
                                                  "logits8": "float32"},
                shard_size=16, batch_size=8, preprocessing={"scale": 1 / 16})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world", type=int, default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--perturb", type=float, default=0.0)
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--views", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(1)
    from still.teachers.store import write_store

    def on_shard(info: dict) -> None:
        print(f"shard {info['shard']} written", flush=True)
        time.sleep(a.sleep)

    res = write_store(make_teacher(a.perturb), Digits(a.n, a.views), a.out, rank=a.rank, world_size=a.world,
                      on_shard=on_shard, **STORE_KW)
    print("finalized" if res else "partial", flush=True)


if __name__ == "__main__":
    main()
