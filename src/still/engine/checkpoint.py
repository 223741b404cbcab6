"""Atomic, safely loadable checkpoints.

A checkpoint is a directory::

    student.safetensors     the student's state dict
    objective.safetensors   adapters, stateful losses, routers (may be empty)
    teacher.safetensors     only for teachers that have state (an EMA teacher's `state_dict()`)
    optimizer.pt            optimizer.state_dict()      (tensors and plain Python: weights_only-safe)
    scheduler.pt            LR scheduler state_dict()
    rng.pt                  torch / CUDA / numpy / python RNG states, as tensors and plain Python
    state.json              step, epoch, position, best metric, config; written last

It is written into a temporary sibling directory and moved into place with `os.replace`, so a crash
while writing leaves the previous checkpoint as it was. A directory can't be renamed over a
non-empty one, so replacing `last` takes two renames (`last -> .last.old`, `.tmp -> last`);
`resolve()` falls back to `.last.old` should a crash land between them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


# -- RNG --------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain Python values (loadable with `weights_only=True`)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(py_version), "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state()` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different number of visible devices: give this process's device rank 0's state
            torch.cuda.set_rng_state(cuda[0])


# -- state dicts --------------------------------------------------------------------------------
def _for_safetensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights); contiguous CPU copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def split_state_dict(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """`{"student.fc.weight": w, "objective.x": v}` -> `{"student": {"fc.weight": w}, "objective": {...}}`."""
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in out:
            out[head][rest] = v
    return out


# -- writing --------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_checkpoint(
    directory: str | Path,
    *,
    student: Mapping[str, torch.Tensor],
    objective: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    state: Mapping[str, Any],
    rng: Mapping[str, Any] | None = None,
    teacher: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint to `directory`, atomically replacing any checkpoint there."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(_for_safetensors(student), str(tmp / "student.safetensors"))
        save_file(_for_safetensors(objective), str(tmp / "objective.safetensors"))
        if teacher is not None:
            save_file(_for_safetensors(teacher), str(tmp / "teacher.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
        for f in tmp.iterdir():
            _fsync_file(f)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old"
    if final.exists():
        if old.exists():  # a leftover of an earlier interrupted swap; `final` is complete
            shutil.rmtree(old)
        os.replace(final, old)
    # (if `final` is missing, `old` may be the only complete copy: it stays until `tmp` is in place)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    try:  # make the renames durable
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# -- reading --------------------------------------------------------------------------------------
def resolve(directory: str | Path) -> Path | None:
    """The complete checkpoint at `directory` (or its `.old` twin after an interrupted swap), or None."""
    d = Path(directory)
    if (d / STATE_FILE).is_file():
        return d
    old = d.parent / f".{d.name}.old"
    if (old / STATE_FILE).is_file():
        return old
    return None


def read_state(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_tensors(directory: str | Path, name: str) -> dict[str, torch.Tensor] | None:
    """`name.safetensors` from the checkpoint, or None when it has no such file."""
    p = Path(directory) / f"{name}.safetensors"
    return load_file(str(p)) if p.is_file() else None


def load_pickle(directory: str | Path, name: str) -> Any:
    """`name.pt` with `torch.load(weights_only=True)` (tensors and plain Python only)."""
    return torch.load(Path(directory) / f"{name}.pt", map_location="cpu", weights_only=True)


def load_student(directory: str | Path, student: torch.nn.Module, strict: bool = True) -> None:
    """Load a checkpoint's student weights into `student` (e.g. `out_dir/checkpoints/best`)."""
    sd = load_tensors(directory, "student")
    if sd is None:
        raise FileNotFoundError(f"no student.safetensors in {directory}")
    student.load_state_dict(sd, strict=strict)


# -- the engine's save / restore ------------------------------------------------------------------------
def save_training_state(path: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                        teacher: Any, state: Mapping[str, Any]) -> Path:
    """Checkpoint a run. Every process calls it (FSDP gathers the full state dict); the main process
    writes `path` atomically. `model` holds the submodules `student` and `objective`."""
    sd = accelerator.get_state_dict(model)  # full and unwrapped: keys "student.*", "objective.*"
    if accelerator.is_main_process:
        parts = split_state_dict(sd, ("student", "objective"))
        t_sd = teacher.state_dict() if teacher is not None and callable(getattr(teacher, "state_dict", None)) else None
        write_checkpoint(path, student=parts["student"], objective=parts["objective"], teacher=t_sd,
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), state=state)
    accelerator.wait_for_everyone()
    return Path(path)


def load_training_state(src: Path, student: torch.nn.Module, objective: torch.nn.Module, optimizer: Any,
                        scheduler: Any, teacher: Any, expect: Mapping[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer, LR schedule, RNG and teacher state from `src`; returns its state.json.

    `expect` lists state.json entries that must match this run (`global_batch`, `grad_accum`, `seed`):
    otherwise the saved data position would point at other samples."""
    meta = read_state(src)
    for key, now in expect.items():
        then = meta.get(key, meta.get("config", {}).get(key))
        if then != now:
            raise ValueError(f"cannot resume from {src}: it was written with {key}={then}, this run has "
                             f"{key}={now}; the saved data position would not match")
    student.load_state_dict(load_tensors(src, "student") or {})
    objective.load_state_dict(load_tensors(src, "objective") or {})
    t_sd = load_tensors(src, "teacher")
    if t_sd is not None and teacher is not None and callable(getattr(teacher, "load_state_dict", None)):
        teacher.load_state_dict(t_sd)
    optimizer.load_state_dict(load_pickle(src, "optimizer"))
    scheduler.load_state_dict(load_pickle(src, "scheduler"))
    set_rng_state(load_pickle(src, "rng"))
    return meta
