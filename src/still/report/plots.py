"""PNG plots of a run directory's logs (matplotlib, Agg backend): every loss term and every eval metric.

Reads the engine's `metrics.jsonl` files: train records `{"split": "train", "step", "loss/<term>", "total", ...}`
and eval records `{"split": "eval", "step", "<metric>": ...}`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

SKIP_EVAL_KEYS = {"split", "step", "epoch", "time", "wall_s", "samples_per_s", "lr"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of one metrics.jsonl (bad lines, e.g. a half-written last line after a kill, are skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def find_logs(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """`{label: records}` for every metrics.jsonl under the run dir (label = its folder, e.g. 'seed0/distilled')."""
    logs = {}
    for p in sorted(run_dir.rglob("metrics.jsonl")):
        rel = p.parent.relative_to(run_dir).as_posix() or "run"
        if "/checkpoints" in "/" + rel:
            continue
        logs[rel] = read_jsonl(p)
    return logs


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return None


def series(records: list[dict[str, Any]], split: str) -> dict[str, tuple[list[float], list[float]]]:
    """`{key: (steps, values)}` of the numeric keys of `split` records."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        if r.get("split", "train") != split or "step" not in r:
            continue
        for k, v in r.items():
            f = _num(v)
            if f is None or k in ("step", "epoch"):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(float(r["step"]))
            ys.append(f)
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "x"


def _style(label: str) -> dict[str, Any]:
    colour = {"distilled": "tab:blue", "scratch": "tab:orange", "teacher": "tab:green"}
    kind = next((k for k in colour if k in label), None)
    return {"color": colour.get(kind or "", None), "alpha": 0.85, "linewidth": 1.2}


def make_plots(run_dir: str | Path) -> list[dict[str, str]]:
    """Write `plots/loss_<term>.png` and `plots/eval_<metric>.png`; return `[{"title", "file"}]`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    logs = find_logs(run_dir)
    made: list[dict[str, str]] = []
    groups: dict[tuple[str, str], dict[str, tuple[list[float], list[float]]]] = {}
    for label, recs in logs.items():
        for k, xy in series(recs, "train").items():
            if k.startswith("loss/") or k == "total":
                groups.setdefault(("loss", k.removeprefix("loss/")), {})[label] = xy
        for k, xy in series(recs, "eval").items():
            if k not in SKIP_EVAL_KEYS:
                groups.setdefault(("eval", k), {})[label] = xy
    order = sorted(groups, key=lambda g: (g[0] != "eval", g[1] == "total", g[1]))
    for kind, key in order:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=80)
        fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.14)  # tight_layout costs ~0.5 s a plot
        for label, (xs, ys) in sorted(groups[(kind, key)].items()):
            finite = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
            if finite:
                ax.plot(*zip(*finite), label=label, marker="o" if kind == "eval" and len(finite) < 30 else None,
                        markersize=3, **_style(label))
        title = f"{key} (test split)" if kind == "eval" else f"loss term: {key}"
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key if kind == "eval" else "unweighted value" if key != "total" else "weighted sum")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
        fname = f"{kind}_{_slug(key)}.png"
        fig.savefig(plots_dir / fname)
        plt.close(fig)
        made.append({"title": title, "file": f"plots/{fname}", "kind": kind})
    return made
