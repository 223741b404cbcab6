"""Evaluation metrics (registered in METRICS) and the eval function the engine calls.

A metric is a function `(logits (N, C), targets (N,)) -> float`, registered with
`@register_metric(name)`. `evaluate(model, dataset, ["accuracy", "top5"])` runs the model over a
data set in batches and returns `{"accuracy": 0.91, "top5": 0.99}`; `make_eval_fn(...)` wraps that
as the `(student) -> dict` callable `still.engine.train` takes.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_metric


@register_metric("accuracy")
def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of logits `(N, C)` against integer labels `(N,)`."""
    return float((logits.argmax(-1) == targets).float().mean())


@register_metric("top5")
def top5(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-5 accuracy (top-k with k = min(5, C)) of logits `(N, C)` against labels `(N,)`."""
    k = min(5, logits.shape[-1])
    hit = (logits.topk(k, dim=-1).indices == targets[:, None]).any(-1)
    return float(hit.float().mean())


@register_metric("nll")
def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood (cross-entropy) of logits `(N, C)` against labels `(N,)`."""
    return float(F.cross_entropy(logits.float(), targets.long()))


@register_metric("ece")
def ece(logits: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017): Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|, 15 equal-width bins."""
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.float().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return float(total)


@register_metric("macro_f1")
def macro_f1(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Macro-averaged F1 over the classes present in targets or predictions."""
    pred = logits.argmax(-1)
    classes = torch.unique(torch.cat([pred, targets]))
    f1s = []
    for c in classes:
        tp = ((pred == c) & (targets == c)).sum().float()
        fp = ((pred == c) & (targets != c)).sum().float()
        fn = ((pred != c) & (targets == c)).sum().float()
        denom = 2 * tp + fp + fn
        f1s.append(float(2 * tp / denom) if denom > 0 else 0.0)
    return sum(f1s) / max(len(f1s), 1)


def _loader(dataset: Any, batch_size: int, collate_fn: Callable | None = None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Any, batch_size: int = 512, inputs: Any = None,
    collate_fn: Callable | None = None, target_key: str = "y", output_key: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits `(N, C)` and targets `(N,)` of `model` on `dataset` (eval mode, restored after)."""
    from still.taps import call_model, select

    was_training = model.training
    model.eval()
    dev = _device(model)
    outs, tgts = [], []
    try:
        for batch in _loader(dataset, batch_size, collate_fn):
            batch = _to(batch, dev)
            out = call_model(model, batch, inputs)
            if output_key is not None:
                out = select(out, (output_key,), str(output_key))
            elif not isinstance(out, torch.Tensor):
                out = out["logits"] if isinstance(out, Mapping) or hasattr(out, "logits") else out[0]
            outs.append(out.detach().float().cpu())
            tgts.append(batch[target_key].detach().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs), torch.cat(tgts)


def evaluate(
    model: nn.Module, dataset: Any, metrics: Sequence[str] = ("accuracy",), batch_size: int = 512,
    inputs: Any = None, collate_fn: Callable | None = None, target_key: str = "y",
) -> dict[str, float]:
    """`{metric: value}` of `model` on `dataset` for the registered `metrics`."""
    from still.registry import METRICS

    logits, targets = predict(model, dataset, batch_size, inputs, collate_fn, target_key)
    return {m: float(METRICS.build(m)(logits, targets)) for m in metrics}


def make_eval_fn(
    dataset: Any, metrics: Sequence[str] = ("accuracy",), batch_size: int = 512, inputs: Any = None,
    collate_fn: Callable | None = None, target_key: str = "y",
) -> Callable[[nn.Module], dict[str, float]]:
    """The `(student) -> {metric: value}` callable that `still.engine.train(eval_fn=...)` takes."""

    def eval_fn(model: nn.Module) -> dict[str, float]:
        return evaluate(model, dataset, metrics, batch_size, inputs, collate_fn, target_key)

    return eval_fn


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of `model`."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latency_per_sample(
    model: nn.Module, sample: Mapping[str, Any], inputs: Any = None, repeats: int = 50, warmup: int = 10
) -> float:
    """Median seconds of one forward pass at batch size 1 (eval mode, after `warmup` calls).

    `sample` is one collated batch of size 1 (`{"x": (1, ...)}`).
    """
    from still.taps import call_model

    was_training = model.training
    model.eval()
    sample = _to(sample, _device(model))
    try:
        for _ in range(warmup):
            call_model(model, sample, inputs)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call_model(model, sample, inputs)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return statistics.median(times)


__all__ = ["accuracy", "top5", "nll", "ece", "macro_f1", "predict", "evaluate", "make_eval_fn",
           "count_parameters", "latency_per_sample"]
