"""What the seed-method parts (`benchmarks/_seed_*.py`) share: one training call, one row format, one verdict.

A part module exposes `Budget` (a dataclass), `QUICK` (a tiny Budget) and
`rows(quick, seeds, budget=None) -> list[dict]`; `benchmarks/seed_methods.py` runs the parts and writes
the one table. A row holds `method, task, metric, scratch_mean/std, kd_mean/std, method_mean/std,
paper_claim, verdict, seeds, teacher` and optionally `fmt` ("raw": not a percentage), `lower_better`,
and `scratch_column` / `kd_column` (what those baselines are for that row).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def fit(model: torch.nn.Module, objective: Any, data: Any, seed: int, *, epochs: int, batch_size: int, lr: float,
        max_steps: int | None = None, teacher: Any = None, views: dict[str, str] | None = None,
        inputs: Sequence[str] | None = None, lr_schedule: str = "constant", warmup_steps: float = 0
        ) -> torch.nn.Module:
    """Train `model` on `data` with `still.engine.train` (quiet, no eval) and return it in eval mode."""
    from still.engine import TrainConfig, train

    cfg = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=min(batch_size, len(data)), lr=lr, seed=seed,
                      lr_schedule=lr_schedule, warmup_steps=warmup_steps, progress=False, eval_every_epochs=None,
                      log_every=10_000)
    train(model, objective, data, cfg, teacher=teacher, student_views=views or {"logits": ""}, student_inputs=inputs)
    return model.eval()


def verdict(scratch: tuple[float, float], kd: tuple[float, float], method: tuple[float, float], n: int,
            lower_better: bool = False, scratch_name: str = "scratch", kd_name: str = "plain KD") -> str:
    """"beats X" when the means differ by more than the two stds together, in the metric's good direction."""
    if n < 2:
        return "no verdict (1 seed)"
    sign = -1.0 if lower_better else 1.0
    mm, ms = method

    def cmp(ref: tuple[float, float], name: str) -> str:
        d = sign * (mm - ref[0])
        if d > ref[1] + ms:
            return f"beats {name}"
        return f"below {name}" if d < -(ref[1] + ms) else f"ties {name} (within std)"

    return f"{cmp(kd, kd_name)}; {cmp(scratch, scratch_name)}"


def row(method: str, task: str, metric: str, res: dict[str, list[float]], keys: tuple[str, str, str], claim: str,
        teacher: float | None, **extra: Any) -> dict[str, Any]:
    """One table row from per-seed results `res[key]`; `keys` = (scratch, plain KD, method) result keys."""
    from still.bench import mean_std

    (sm, ss), (km, ks), (mm, ms) = (mean_std(res[k]) for k in keys)
    n = len(res[keys[2]])
    names = {"scratch_name": extra.get("scratch_column") or "scratch", "kd_name": extra.get("kd_column") or "plain KD"}
    return {"method": method, "task": task, "metric": metric, "scratch_mean": sm, "scratch_std": ss, "kd_mean": km,
            "kd_std": ks, "method_mean": mm, "method_std": ms, "paper_claim": claim, "seeds": n, "teacher": teacher,
            "verdict": verdict((sm, ss), (km, ks), (mm, ms), n, bool(extra.get("lower_better")), **names), **extra}
