"""Benchmark helpers shared by `benchmarks/*.py`: interleaved timing, live-tensor memory, BENCHMARKS.md.

Timing: `interleaved_median({"a": fa, "b": fb}, repeats=7)` runs a, b, a, b, ... and reports the
median seconds of each, so drift and noise hit every contender alike.
Memory: `PeakMemory` counts the bytes of tensor storages created while it is active and still alive
(a TorchDispatchMode; RSS is never used). Tensors that existed before (inputs, weights) are not counted.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_MD = Path(os.environ.get("STILL_BENCHMARKS_MD", ROOT / "BENCHMARKS.md"))


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages allocated inside the `with` block (any device)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[tuple[str, int], int] = {}
        self.current = 0
        self.peak = 0
        self._refs: list[weakref.ref] = []

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        n = st.nbytes()
        if n == 0 or key in self.live:
            return
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)

        def _freed(_: Any, key: tuple[str, int] = key) -> None:
            self.current -= self.live.pop(key, 0)

        self._refs.append(weakref.ref(st, _freed))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak live-tensor bytes allocated while `fn()` runs."""
    with PeakMemory() as m:
        fn()
    return m.peak


def interleaved_median(
    fns: Mapping[str, Callable[[], Any]], repeats: int = 7, warmup: int = 1
) -> dict[str, float]:
    """Median wall seconds per call of each function, measured round-robin."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_std(values: list[float], digits: int = 4) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_section(name: str, markdown: str, command: str | None = None, path: Path | None = None) -> Path:
    """Replace (or append) the `name` section of BENCHMARKS.md; records the command that made it."""
    path = Path(path or BENCHMARKS_MD)
    cmd = command or "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    body = (
        f"<!-- BEGIN {name} -->\n## {name}\n\n"
        f"Made by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M')} ({torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}).\n\n{markdown.strip()}\n<!-- END {name} -->\n"
    )
    text = path.read_text() if path.exists() else "# still benchmarks\n\nEach section is rewritten by the script named in it.\n\n"
    pat = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->\n?", re.S)
    text = pat.sub(lambda _: body, text) if pat.search(text) else text.rstrip() + "\n\n" + body
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def override_fields(obj: Any, overrides: Mapping[str, str], what: str = "override") -> Any:
    """A copy of the dataclass `obj` with string `overrides` ({field: "value"}) typed by its fields: bools
    from 1/true/yes, "none" → None for Optional fields, else the type of the current value (a None
    value: int if the text is an integer, else float). An unknown field is a SystemExit naming `what`."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(obj)}
    typed: dict[str, Any] = {}
    for name, raw in overrides.items():
        if name not in fields:
            raise SystemExit(f"{what}: {type(obj).__name__} has no field {name!r}; fields: {', '.join(fields)}")
        cur = getattr(obj, name)
        if raw.lower() == "none" and (cur is None or "None" in str(fields[name].type)):
            typed[name] = None
        elif isinstance(cur, bool):
            typed[name] = raw.lower() in ("1", "true", "yes")
        else:
            kind = type(cur) if cur is not None else (int if raw.lstrip("-").isdigit() else float)
            typed[name] = kind(raw)
    return dataclasses.replace(obj, **typed)


def cache_dir(*parts: str) -> Path:
    """`$STILL_CACHE/bench/<parts...>` (default `~/.cache/still/bench`), created."""
    from still.paths import cache_root

    out = cache_root("bench", *parts)
    out.mkdir(parents=True, exist_ok=True)
    return out


def cached_model(key: Mapping[str, Any], build: Callable[[], torch.nn.Module],
                 fit: Callable[[torch.nn.Module], Any], name: str = "teacher") -> tuple[torch.nn.Module, dict[str, Any]]:
    """`build()` then `fit(model)`, or the weights a previous call with the same `key` saved.

    The key (any JSON-able description of data, model and budget) is hashed into
    `$STILL_CACHE/bench/models/<name>-<hash>.safetensors`, written atomically; a file that does not
    match the built model's parameters raises instead of being loaded silently. Returns
    (model in eval mode, {"source": "cached" | "trained", "seconds": fit or load time, "path"}).
    """
    import hashlib

    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir("models") / f"{name}-{digest}.safetensors"
    model = build()
    t0 = time.perf_counter()
    if path.exists():
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"cached model {path} does not fit {type(model).__name__}: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}; delete the file to retrain")
        return model.eval(), {"source": "cached", "seconds": time.perf_counter() - t0, "path": str(path)}
    fit(model)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"key": json.dumps(key, sort_keys=True, default=str)})
    os.replace(tmp, path)
    return model.eval(), {"source": "trained", "seconds": time.perf_counter() - t0, "path": str(path)}


def emit_json(figures: Mapping[str, Any]) -> None:
    """Print the benchmark's figures as one JSON object on the last line of stdout."""
    print(json.dumps(figures, default=float), flush=True)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
