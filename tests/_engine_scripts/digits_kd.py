"""A small KD run (synthetic digits-shaped data, or sklearn digits), used by the engine tests as a subprocess (SIGKILL, DDP) and in-process.

    python digits_kd.py OUT_DIR [--resume] [--batch-size 16] [--steps 60] [--step-delay 0.05]
    torchrun --standalone --nproc_per_node 2 digits_kd.py OUT_DIR --batch-size 16

Prints nothing special; the tests read OUT_DIR/metrics.jsonl and OUT_DIR/checkpoints/.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from typing import Any

import torch
from torch import nn

from still import LiveTeacher, Objective, Term
from still.engine import InMemoryDataset, TrainConfig, train


def digits() -> InMemoryDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return InMemoryDataset(x=torch.tensor(d.data, dtype=torch.float32) / 16.0, y=torch.tensor(d.target))


def synthetic(n: int = 768, seed: int = 1234) -> InMemoryDataset:
    """Digits-shaped random data (64 features, 10 classes, labels from a fixed random linear map);
    subprocess tests use it to skip importing scikit-learn (seconds on a busy machine)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 64, generator=g)
    y = (x @ torch.randn(64, 10, generator=g)).argmax(-1)
    return InMemoryDataset(x=x, y=y)


def models(seed: int = 0, dropout: float = 0.1) -> tuple[nn.Module, nn.Module]:
    """(teacher, student): tiny MLPs with a fixed init; the teacher is random but fixed (enough for KD maths)."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 10))
    for m in (teacher, student):
        for p in m.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return teacher, student


def objective(adapter: bool = True) -> Objective:
    """KD + CE, plus a hint term through a lazy linear adapter (so objective parameters train too).

    Losses and the adapter are imported directly (not through the registries), so this script only
    depends on the classic losses module.
    """
    from still.adapters import LinearAdapter
    from still.losses.classic import cross_entropy, hinton_kd

    terms = [
        Term("kd", partial(hinton_kd, temperature=2.0), student="logits", teacher="logits", weight=0.8,
             shape_check="same"),
        Term("ce", cross_entropy, student="logits", target="y", weight=0.2, shape_check="none"),
    ]
    if adapter:  # student hidden (B, 32) -> teacher hidden (B, 96) through a lazily built nn.Linear
        terms.append(Term("hint", mse, student="hidden", teacher="hidden", adapter=LinearAdapter(), weight=0.1,
                          shape_check="same"))
    return Objective(terms)


def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error of `(B, D)` views."""
    return ((s - t) ** 2).mean()


class SlowCollate:
    """Default collate plus a sleep: slows a run down (for the SIGKILL test) without touching its maths."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, samples: Any) -> Any:
        from still.engine.data import collate

        time.sleep(self.delay)
        return collate(samples)


def run(out_dir: str | None, resume: bool = False, batch_size: int = 32, steps: int = 40, step_delay: float = 0.0,
        log_every: int = 1, checkpoint_every: int | None = 5, grad_accum: int = 1, seed: int = 0, dropout: float = 0.1,
        data: str = "synthetic", eval_every: int | None = None) -> Any:
    """Train the KD run of this script; returns the TrainResult.

    With `eval_every`, the eval metric is the accuracy on the first 256 samples on rank 0 and 1 - that on
    other ranks: a stand-in for an eval_fn whose figures differ between processes. The engine must follow
    the main process's (else the ranks disagree on when to write `best`, and its collectives hang).
    """
    torch.set_num_threads(1)
    teacher_model, student = models(seed, dropout)
    ds = digits() if data == "digits" else synthetic()
    rank = int(os.environ.get("RANK", "0"))

    def eval_fn(m: nn.Module) -> dict[str, float]:
        x, y = ds.tensors["x"][:256], ds.tensors["y"][:256]
        acc = float((m(x).argmax(-1) == y).float().mean())
        return {"accuracy": acc if rank == 0 else 1.0 - acc}

    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=3e-3, optimizer="adamw", weight_decay=0.01,
                      lr_schedule="cosine", warmup_steps=3, log_every=log_every, checkpoint_every=checkpoint_every,
                      grad_accum=grad_accum, clip_grad_norm=5.0, seed=seed, progress=False, eval_every=eval_every)
    return train(student, objective(), ds, cfg, eval_fn=eval_fn if eval_every else None,
                 teacher=LiveTeacher(teacher_model, {"logits": "", "hidden": "1"}),
                 student_views={"logits": "", "hidden": "1"},
                 out_dir=out_dir, resume=resume, collate_fn=SlowCollate(step_delay) if step_delay else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--step-delay", type=float, default=0.0)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--data", choices=["synthetic", "digits"], default="synthetic")
    ap.add_argument("--eval-every", type=int, default=None)
    a = ap.parse_args()
    run(a.out_dir, a.resume, a.batch_size, a.steps, a.step_delay, dropout=a.dropout, data=a.data,
        eval_every=a.eval_every)


if __name__ == "__main__":
    main()
