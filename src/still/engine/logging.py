"""Where the engine's records go: metrics.jsonl, TensorBoard, MLflow, and the progress bar.

Every sink has `log(record)` and `close()`; a record is a flat dict such as
`{"split": "train", "step": 10, "epoch": 0.4, "loss/kd": 1.2, "weight/kd": 0.9, "total": 1.1,
"lr": 1e-3, "samples_per_s": 5e3}` or `{"split": "eval", "step": 10, "accuracy": 0.93}`.
Only the main process builds sinks. `LossWindow` holds the loss values between two logs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from still.objective import NonFiniteLossError, Objective

METRICS_FILE = "metrics.jsonl"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the file strictly valid
    return v


class JsonlLogger:
    """Appends one JSON object per record to `out_dir/metrics.jsonl` (flushed per record)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: Mapping[str, Any]) -> None:
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """All records of `out_dir/metrics.jsonl` (an empty list when there is none)."""
    p = Path(out_dir) / METRICS_FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(out_dir: str | Path, last_step: int) -> list[dict[str, Any]]:
    """Keep only records with `step <= last_step` (on resume: drop what the checkpoint doesn't cover)."""
    p = Path(out_dir) / METRICS_FILE
    kept = [r for r in read_metrics(out_dir) if int(r.get("step", 0)) <= last_step]
    if p.is_file():
        tmp = p.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(p)
    return kept


class TensorBoardLogger:
    """Scalars to `out_dir/tensorboard` as `train/<key>` and `eval/<key>`."""

    def __init__(self, out_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("TrainConfig(tensorboard=True) needs the `tensorboard` package: "
                              "pip install tensorboard") from e
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, record: Mapping[str, Any]) -> None:
        split, step = record.get("split", "train"), int(record.get("step", 0))
        for k, v in _scalars(record):
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MLflowLogger:
    """Metrics to the active (or a new) MLflow run; keys prefixed `eval.` for evaluations."""

    def __init__(self, out_dir: str | Path | None, params: Mapping[str, Any] | None = None) -> None:
        try:
            import mlflow
        except ImportError as e:
            raise ImportError("TrainConfig(mlflow=True) needs the `mlflow` package, which is not "
                              "installed: pip install mlflow (or set mlflow=False)") from e
        self.mlflow = mlflow
        self._own_run = mlflow.active_run() is None
        if self._own_run:
            mlflow.start_run(run_name=Path(out_dir).name if out_dir else None)
        if params:
            mlflow.log_params({k: v for k, v in params.items() if v is not None})

    def log(self, record: Mapping[str, Any]) -> None:
        prefix = "eval." if record.get("split") == "eval" else ""
        metrics = {prefix + k.replace("/", "."): v for k, v in _scalars(record)}
        self.mlflow.log_metrics(metrics, step=int(record.get("step", 0)))

    def close(self) -> None:
        if self._own_run:
            self.mlflow.end_run()


def _scalars(record: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    for k, v in record.items():
        if k in ("split", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        yield k, float(v)


class Progress:
    """A tqdm bar over optimizer steps showing the latest loss terms; silent when disabled."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self._shown = initial

    def update(self, step: int, terms: Mapping[str, float] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self._shown)
        self._shown = step
        if terms:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Loggers:
    """Fans a record out to every sink."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks

    def log(self, record: Mapping[str, Any]) -> None:
        for s in self.sinks:
            s.log(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def build_loggers(out_dir: str | Path | None, *, tensorboard: bool, mlflow: bool,
                  params: Mapping[str, Any] | None = None) -> Loggers:
    """The sinks a run asked for. TensorBoard needs an `out_dir`; metrics.jsonl is written whenever one is given."""
    sinks: list[Any] = []
    if out_dir is not None:
        sinks.append(JsonlLogger(out_dir))
        if tensorboard:
            sinks.append(TensorBoardLogger(out_dir))
    elif tensorboard:
        raise ValueError("TrainConfig(tensorboard=True) needs an out_dir to write the event files to")
    if mlflow:
        sinks.append(MLflowLogger(out_dir, params))
    return Loggers(sinks)


class LossWindow:
    """The loss values of the steps since the last log, kept on the device (no host sync per step).

    `values[s][m]` is the list `[term_1, ..., term_k, total]` of 0-d tensors (unweighted term values) of
    micro-batch `m` of step `s`. `matrix()` stacks them once per log into `(steps, k + 1)`.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names  # term names, then "total"
        self.values: list[list[list[torch.Tensor]]] = []
        self.steps: list[int] = []
        self.lr = 0.0
        self.grad_norm: torch.Tensor | None = None
        self.t0 = time.perf_counter()

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, values: list[list[torch.Tensor]], lr: float, grad_norm: torch.Tensor | None) -> None:
        self.values.append(values)
        self.steps.append(step)
        self.lr, self.grad_norm = lr, grad_norm

    def matrix(self, accelerator: Any) -> torch.Tensor:
        """`(steps, k + 1)` float32: micro-batch means, averaged over processes (one collective)."""
        micro = {len(step) for step in self.values}
        flat = [v for step in self.values for m in step for v in m]
        if len(micro) == 1 and all(v.dim() == 0 and v.dtype == torch.float32 for v in flat):
            # the usual case: one stack and one mean for the whole window
            w = torch.stack(flat).view(len(self.values), micro.pop(), -1).mean(1)
        else:
            rows = [torch.stack([torch.stack([v.float().reshape(()) for v in m]) for m in step]).mean(0)
                    for step in self.values]
            w = torch.stack(rows)
        return accelerator.reduce(w, reduction="mean") if accelerator.num_processes > 1 else w

    def check(self, w: torch.Tensor, last_checkpoint: Path | None, out_dir: Path | None) -> None:
        """Raise NonFiniteLossError naming the first term and step that is not finite."""
        finite = torch.isfinite(w).all(dim=1)
        if bool(finite.all()):
            return
        i = int((~finite).nonzero()[0, 0])
        if last_checkpoint is not None:
            where = f"last good checkpoint: {last_checkpoint}"
        else:
            where = "no checkpoint was written yet" if out_dir else "no checkpoint (out_dir=None)"
        values = dict(zip(self.names, w[i].cpu()))
        try:
            Objective.check_finite(values, self.steps[i])
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}; {where}") from None
        raise NonFiniteLossError(f"the total loss is {float(values['total'])} at step {self.steps[i]}; {where}")

    def clear(self) -> None:
        self.values, self.steps, self.t0 = [], [], time.perf_counter()
