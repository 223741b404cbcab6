"""The training loop: one explicit loop over optimizer steps, on HF accelerate.

>>> result = train(student, objective, train_data, TrainConfig(epochs=3, batch_size=128, lr=1e-3),
...                teacher=LiveTeacher(cnn, {"logits": ""}), eval_fn=lambda m: {"accuracy": acc(m)},
...                out_dir="runs/kd")

Per optimizer step: for each of `grad_accum` micro-batches, student forward (views by taps) ->
teacher views -> objective -> backward; then clip, optimizer step, LR step, `teacher.after_step`.
Around it, small functions log (every `log_every` steps), evaluate (every `eval_every` steps and/or
`eval_every_epochs` epochs), and checkpoint (every `checkpoint_every` steps, at each epoch end and
at the end). The hot path makes no host sync: loss values stay on the device until a log step.

Distributed: launch the same script with `torchrun --nproc_per_node N script.py` or `accelerate launch`
(DDP; FSDP through an accelerate config). `batch_size` is per process; each process takes its slice of
every global batch (`still.engine.data`), losses are logged as means over processes, only the main
process writes files, and every process loads the checkpoint on resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from still.engine import checkpoint as ckpt
from still.engine.data import Plan, collate, make_loader, to_device
from still.engine.logging import LossWindow, Progress, build_loggers, read_metrics, truncate_metrics
from still import schedules
from still.objective import Objective
from still.taps import forward_with_views

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "linear", "cosine", "step")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train. `batch_size` is per process; the global batch is `batch_size * processes`, and one
    optimizer step consumes `grad_accum` such batches. `max_steps`, when set, overrides `epochs`."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9                      # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw only
    lr_schedule: str = "constant"
    warmup_steps: float = 0  # steps, or a fraction of the run when 0 < warmup_steps < 1
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # "step": fractions of the post-warm-up run
    lr_gamma: float = 0.1                           # "step": factor at each milestone
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    mixed_precision: str = "no"
    eval_every: int | None = None
    eval_every_epochs: int | None = 1
    log_every: int = 10
    checkpoint_every: int | None = None
    seed: int = 0
    num_workers: int = 0
    best_metric: str | None = None   # default: the first key eval_fn returns
    best_mode: str = "max"
    tensorboard: bool = False
    mlflow: bool = False
    progress: bool = True
    find_unused_parameters: bool = False  # DDP: set when some trained parameters get no gradient
    cpu: bool = False                     # train on the CPU even where an accelerator exists

    def __post_init__(self) -> None:
        def bad(name: str, allowed: Any) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is not allowed; expected {allowed}")

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", " | ".join(OPTIMIZERS))
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", " | ".join(LR_SCHEDULES))
        if self.mixed_precision not in PRECISIONS:
            raise bad("mixed_precision", " | ".join(PRECISIONS))
        if self.best_mode not in ("max", "min"):
            raise bad("best_mode", "max | min")
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "an integer >= 1")
        for name in ("max_steps", "eval_every", "eval_every_epochs", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise bad(name, "None or an integer >= 1")
        w = self.warmup_steps
        if w < 0 or (w >= 1 and w != int(w)):
            raise bad("warmup_steps", "a number of steps (an integer >= 0) or a fraction of the run in (0, 1)")
        if self.num_workers < 0:
            raise bad("num_workers", "an integer >= 0")
        if not self.lr > 0:
            raise bad("lr", "a positive float")


@dataclass
class TrainResult:
    """What `train` returns. `history` holds every record of metrics.jsonl (train and eval)."""

    steps: int
    epochs: float
    history: list[dict[str, Any]] = field(default_factory=list)
    final_eval: dict[str, float] | None = None
    best_eval: dict[str, float] | None = None
    out_dir: Path | None = None
    wall_time_s: float = 0.0


# -- the trainable unit -------------------------------------------------------------------------
class DistillModule(nn.Module):
    """Student + objective as one module, so DDP/FSDP and autocast cover both (adapters included).

    `forward(batch)` runs the student with taps, asks the teacher for its views, and returns the
    objective's `{term: (), ..., "total": ()}`. The teacher is held outside the module tree.
    """

    def __init__(self, student: nn.Module, objective: Objective, student_views: Mapping[str, str],
                 student_inputs: Any, teacher: Any, teacher_names: list[str]) -> None:
        super().__init__()
        self.student, self.objective = student, objective
        self.student_views, self.student_inputs = dict(student_views), student_inputs
        self.__dict__["teacher"] = teacher  # not a submodule: never trained, never in state_dict
        self.teacher_names = teacher_names

    def views(self, batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        _, s_views = forward_with_views(self.student, batch, self.student_views, inputs=self.student_inputs)
        t_views: dict[str, Any] = {}
        if self.teacher is not None and self.teacher_names:
            if getattr(self.teacher, "uses_student_views", False):
                t_views = self.teacher.views(batch, self.teacher_names, student_views=s_views)
            else:
                t_views = self.teacher.views(batch, self.teacher_names)
        return s_views, t_views

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        s_views, t_views = self.views(batch)
        return self.objective(s_views, t_views, batch)


def resolve_student_views(objective: Objective, student_views: Mapping[str, str] | None) -> dict[str, str]:
    """The view -> tap map to use; every view the objective reads must be in it."""
    needed = objective.student_views()
    if student_views is None:
        if len(needed) > 1:
            raise ValueError(f"the objective reads student views {needed}; pass student_views={{name: tap}} for them")
        return {n: "" for n in needed}
    missing = [n for n in needed if n not in student_views]
    if missing:
        raise ValueError(f"the objective reads student view(s) {missing}, but student_views maps only "
                         f"{sorted(student_views)}")
    return dict(student_views)


# -- optimizer and LR schedule ----------------------------------------------------------------------
def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """adamw | adam | sgd over `params` (weight decay on all of them)."""
    if not params:
        raise ValueError("nothing to train: the student and the objective have no parameter with requires_grad")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """`step -> multiplier of cfg.lr`: linear warm-up from 0 over `warmup_steps` (a fraction < 1 of
    `total_steps`, rounded down, or a number of steps), then the schedule (`still.schedules`: constant,
    linear to 0, cosine to 0, step decay) over the remaining steps."""
    w = cfg.warmup_steps
    warm = int(w * total_steps) if 0 < w < 1 else int(w)
    shape = {
        "constant": lambda: None,
        "linear": lambda: schedules.Linear(start=1.0, end=0.0),
        "cosine": lambda: schedules.Cosine(start=1.0, end=0.0),
        "step": lambda: schedules.Step(milestones=tuple(cfg.lr_milestones), gamma=cfg.lr_gamma),
    }[cfg.lr_schedule]()
    rest = max(total_steps - warm, 1)

    def factor(step: int) -> float:
        if step < warm:
            return step / warm
        return 1.0 if shape is None else float(shape(step - warm, rest))

    return factor


# -- where the run is ---------------------------------------------------------------------------------
@dataclass
class RunState:
    """Where the run is: optimizer steps done, epoch, micro-batches done in the epoch, best metric."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_value: float | None = None
    best_eval: dict[str, float] | None = None
    last_eval_step: int = -1

    def epoch_float(self, plan: Plan) -> float:
        return self.epoch + self.position / plan.batches_per_epoch

    def to_json(self, plan: Plan, cfg: TrainConfig, world: int) -> dict[str, Any]:
        """What state.json holds."""
        return {**dataclasses.asdict(self), "global_batch": plan.global_batch, "grad_accum": cfg.grad_accum,
                "world_size": world, "total_steps": plan.total_steps, "config": dataclasses.asdict(cfg)}

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> RunState:
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta})


# -- one optimizer step -----------------------------------------------------------------------------------
def step_functions(accelerator: Any, optimizer: Any
                   ) -> tuple[Callable[[torch.Tensor], None], Callable[[], None], Callable[[], None]]:
    """`(backward, optimizer_step, zero_grad)` for the hot path.

    Without a grad scaler (fp16) and outside XLA / DeepSpeed / Megatron, accelerate's wrappers reduce to
    `loss.backward()`, `optimizer.step()` and `optimizer.zero_grad(set_to_none=True)` (the engine never uses
    `accelerator.accumulate`, so accelerate's `sync_gradients` is always true); calling those directly saves
    accelerate's per-step checks (`AcceleratedOptimizer.step` probes `importlib.util.find_spec("lomo_optim")`,
    `AcceleratedOptimizer.zero_grad` runs `inspect.signature` on every call).
    """
    from accelerate.utils import DistributedType

    special = {DistributedType.XLA, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM}
    if accelerator.scaler is None and accelerator.distributed_type not in special:
        inner = getattr(optimizer, "optimizer", optimizer)
        return (lambda loss: loss.backward()), inner.step, (lambda: inner.zero_grad(set_to_none=True))
    return accelerator.backward, optimizer.step, (lambda: optimizer.zero_grad(set_to_none=True))


def train_step(model: nn.Module, optimizer: Any, scheduler: Any, accelerator: Any, batches: Any, cfg: TrainConfig,
               names: list[str], backward: Callable[[torch.Tensor], None], optimizer_step: Callable[[], None],
               zero_grad: Callable[[], None],
               ) -> tuple[list[list[torch.Tensor]], float, torch.Tensor | None]:
    """One optimizer step over `grad_accum` micro-batches.

    Returns the detached loss values `[[term_1, ..., total] per micro-batch]` (still on the device), the lr
    used and the gradient norm before clipping (None without clipping).
    """
    values = []
    for i in range(cfg.grad_accum):
        batch = to_device(next(batches), accelerator.device)
        sync = i == cfg.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = model(batch)
            backward(out["total"] / cfg.grad_accum if cfg.grad_accum > 1 else out["total"])
        values.append([out[n].detach() for n in names])
    grad_norm = None
    if cfg.clip_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer_step()
    if not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow skips the update
        scheduler.step()
    zero_grad()
    return values, lr, grad_norm


def evaluate(eval_fn: Callable[[nn.Module], Mapping[str, Any]], student: nn.Module,
             accelerator: Any) -> dict[str, float]:
    """`eval_fn(student)` in eval mode, without gradients. Every process runs it (FSDP needs them all);
    the main process's figures are the ones recorded."""
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            metrics = eval_fn(student)
    finally:
        student.train(was_training)
    if not isinstance(metrics, Mapping) or not metrics:
        raise TypeError(f"eval_fn must return a non-empty dict of metrics, got {metrics!r}")
    return {k: float(v) for k, v in metrics.items()}


# -- set-up -------------------------------------------------------------------------------------------
def make_accelerator(cfg: TrainConfig) -> Any:
    """An `Accelerator` for this run. accelerate keeps one global state per process; a second run in the
    same process with another precision resets it (what accelerate's own tests do)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
        AcceleratorState._reset_state()
    # accelerate only sets up multi-process CPU (gloo) when asked for the CPU explicitly
    cpu = cfg.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
        step_scheduler_with_optimizer=False,
    )


def validate_first_batch(module: DistillModule, batch: Mapping[str, Any], seed: int) -> None:
    """Student, teacher and `objective.validate` on one batch: materialises lazy adapters and raises
    shape errors before the optimizer exists.

    It leaves no trace on training: buffers (BatchNorm statistics, memory banks) and the RNG are
    restored, and adapters are initialised from `seed` alone (not from whatever RNG the forward used),
    so a 2-process run and a 1-process run with the same global batch get the same adapters.
    """
    saved = {n: b.detach().clone() for n, b in module.named_buffers()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        s_views, t_views = module.views(batch)
        torch.default_generator.manual_seed(seed)  # adapters are created on the CPU, then moved
        module.objective.validate(s_views, t_views, batch)
    buffers = dict(module.named_buffers())
    for n, b in saved.items():
        buffers[n].copy_(b)


# -- the loop -----------------------------------------------------------------------------------------
def train(
    student: nn.Module,
    objective: Objective,
    train_data: Any,
    config: TrainConfig | None = None,
    teacher: Any = None,
    student_views: Mapping[str, str] | None = None,
    student_inputs: Any = None,
    eval_fn: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    collate_fn: Callable[[Any], Any] | None = None,
) -> TrainResult:
    """Train `student` (in place) on `objective` over `train_data`; see the module docstring."""
    from accelerate.utils import DistributedType, set_seed

    started = time.perf_counter()
    cfg = config or TrainConfig()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs the out_dir of the run to continue")
    accelerator = make_accelerator(cfg)
    world, main = accelerator.num_processes, accelerator.is_main_process
    set_seed(cfg.seed)

    # set-up: views, devices, the data plan, one validation batch, then the optimizer
    views = resolve_student_views(objective, student_views)
    teacher_names = objective.teacher_views()
    if teacher_names and teacher is None:
        raise ValueError(f"the objective reads teacher view(s) {teacher_names}, but no teacher was given")
    if teacher is not None:
        teacher.to(accelerator.device)
    module = DistillModule(student, objective, views, student_inputs, teacher, teacher_names)
    module.to(accelerator.device).train()
    if not (hasattr(train_data, "__len__") and hasattr(train_data, "__getitem__")):
        raise TypeError(f"train_data must be a map-style data set (__len__ and __getitem__ giving dict samples), "
                        f"got {type(train_data).__name__}; exact resume needs indexable data")
    plan = Plan.make(len(train_data), cfg, world)
    objective.set_progress(0, plan.total_steps)
    loader_args = dict(seed=cfg.seed, rank=accelerator.process_index, world_size=world,
                       num_batches=plan.batches_per_epoch, collate_fn=collate_fn or collate)
    first = next(iter(make_loader(train_data, cfg.batch_size, epoch=0, start=0, **loader_args)))
    validate_first_batch(module, to_device(first, accelerator.device), cfg.seed)
    optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, plan.total_steps))
    model, optimizer = accelerator.prepare(module, optimizer)
    backward, optimizer_step, zero_grad = step_functions(accelerator, optimizer)

    # resume: weights, optimizer, schedule, RNG, data position; metrics.jsonl cut to the checkpoint
    state, history, last_ckpt = RunState(), [], None
    ckpt_dir = out / "checkpoints" if out is not None else None
    if resume:
        if accelerator.distributed_type == DistributedType.FSDP:
            raise NotImplementedError("exact resume under FSDP is not implemented: the optimizer state is sharded "
                                      "and still saves the main process's part only; resume with DDP or 1 process")
        src = ckpt.resolve(ckpt_dir / "last")
        if src is None:
            warnings.warn(f"resume=True but {ckpt_dir / 'last'} holds no checkpoint; starting from step 0")
        else:
            meta = ckpt.load_training_state(src, student, objective, optimizer, scheduler, teacher, expect={
                "global_batch": plan.global_batch, "grad_accum": cfg.grad_accum, "seed": cfg.seed})
            state = RunState.from_json(meta)
            last_ckpt = ckpt_dir / "last"
            history = [r for r in read_metrics(out) if int(r.get("step", 0)) <= state.step]
            accelerator.wait_for_everyone()
            if main:
                truncate_metrics(out, state.step)
    elif out is not None and main:  # a fresh run in an old directory: fresh log, no stale checkpoints
        (out / "metrics.jsonl").unlink(missing_ok=True)
        for kind in ("last", "best"):
            if ckpt.resolve(ckpt_dir / kind) is not None:
                warnings.warn(f"{ckpt_dir / kind} is from an earlier run; this run (resume=False) replaces it")
                shutil.rmtree(ckpt_dir / kind, ignore_errors=True)
    accelerator.wait_for_everyone()

    loggers = build_loggers(out if main else None, tensorboard=cfg.tensorboard and main,
                            mlflow=cfg.mlflow and main, params=dataclasses.asdict(cfg))
    progress = Progress(plan.total_steps, state.step, enabled=cfg.progress and main)
    term_names = [t.name for t in objective.terms]
    window = LossWindow(term_names + ["total"])
    final_eval: dict[str, float] | None = None
    after_step = getattr(teacher, "after_step", None) if teacher is not None else None

    def record(rec: dict[str, Any]) -> None:
        history.append(rec)
        loggers.log(rec)

    def log_window() -> None:
        if not len(window):
            return
        w = window.matrix(accelerator)
        window.check(w, last_ckpt, out)
        means = w.mean(0).tolist()
        n_steps, dt = len(window), time.perf_counter() - window.t0
        rec: dict[str, Any] = {"split": "train", "step": state.step, "epoch": round(state.epoch_float(plan), 6)}
        rec.update({f"loss/{n}": v for n, v in zip(term_names, means)})
        rec.update({f"weight/{n}": v for n, v in objective.weights().items()})
        rec.update({"total": means[-1], "lr": window.lr,
                    "samples_per_s": n_steps * cfg.grad_accum * plan.global_batch / max(dt, 1e-9)})
        if window.grad_norm is not None:
            rec["grad_norm"] = float(window.grad_norm)
        record(rec)
        progress.update(state.step, {n: v for n, v in zip(term_names + ["total"], means)})
        window.clear()

    def run_eval() -> None:
        nonlocal final_eval
        if len(window):
            window.check(window.matrix(accelerator), last_ckpt, out)
        metrics = evaluate(eval_fn, student, accelerator)
        if world > 1:  # every process follows the main one's figures, so best-checkpoint decisions agree
            from accelerate.utils import broadcast_object_list

            metrics = broadcast_object_list([metrics], from_process=0)[0]
        final_eval, state.last_eval_step = metrics, state.step
        record({"split": "eval", "eval": True, "step": state.step, "epoch": round(state.epoch_float(plan), 6),
                **metrics})
        key = cfg.best_metric or next(iter(metrics))
        if key not in metrics:
            raise KeyError(f"TrainConfig.best_metric={key!r} is not among the eval metrics {sorted(metrics)}")
        v = metrics[key]
        better = state.best_value is None or (v > state.best_value if cfg.best_mode == "max" else v < state.best_value)
        if better and math.isfinite(v):
            state.best_value, state.best_eval = v, {"step": state.step, **metrics}
            if ckpt_dir is not None:
                ckpt.save_training_state(ckpt_dir / "best", accelerator, model, optimizer, scheduler, teacher,
                                         state.to_json(plan, cfg, world))

    def save_last() -> None:
        nonlocal last_ckpt
        if ckpt_dir is None:
            return
        if len(window):  # never checkpoint weights that a non-finite loss has touched
            window.check(window.matrix(accelerator), last_ckpt, out)
        last_ckpt = ckpt.save_training_state(ckpt_dir / "last", accelerator, model, optimizer, scheduler, teacher,
                                             state.to_json(plan, cfg, world))

    saved_at = state.step if last_ckpt is not None else -1
    try:
        while state.step < plan.total_steps:
            batches = iter(make_loader(train_data, cfg.batch_size, epoch=state.epoch, start=state.position,
                                       num_workers=cfg.num_workers, pin_memory=accelerator.device.type == "cuda",
                                       **loader_args))
            while state.position < plan.batches_per_epoch and state.step < plan.total_steps:
                objective.set_progress(state.step, plan.total_steps)
                values, lr, grad_norm = train_step(model, optimizer, scheduler, accelerator, batches, cfg,
                                                   term_names + ["total"], backward, optimizer_step, zero_grad)
                if after_step is not None:
                    after_step(student)
                window.add(state.step, values, lr, grad_norm)
                state.step += 1
                state.position += cfg.grad_accum
                if state.step % cfg.log_every == 0:
                    log_window()
                if eval_fn is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                    run_eval()
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    save_last()
                    saved_at = state.step
            if state.position >= plan.batches_per_epoch:  # the epoch is complete
                state.epoch, state.position = state.epoch + 1, 0
                if eval_fn is not None and cfg.eval_every_epochs and state.epoch % cfg.eval_every_epochs == 0 \
                        and state.last_eval_step != state.step:
                    run_eval()
                if saved_at != state.step:
                    save_last()
                    saved_at = state.step
        log_window()
        if eval_fn is not None and state.last_eval_step != state.step:
            run_eval()
        if saved_at != state.step:
            save_last()
        if eval_fn is not None and final_eval is None:  # resumed a finished run: its last eval is logged
            evals = [r for r in history if r.get("split") == "eval" and r.get("step") == state.step]
            final_eval = {k: v for k, v in evals[-1].items() if k not in ("split", "eval", "step", "epoch")} \
                if evals else None
    finally:
        progress.close()
        loggers.close()

    return TrainResult(steps=state.step, epochs=state.epoch_float(plan), history=history, final_eval=final_eval,
                       best_eval=state.best_eval, out_dir=out, wall_time_s=time.perf_counter() - started)
