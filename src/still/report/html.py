"""The HTML report of a run directory: teacher vs student table, per-seed figures, plots, the recipe.

Everything is read back from the run directory's files (`summary.json`, `recipe.yaml`, `metrics.jsonl`),
so `still report RUN_DIR` regenerates it at any time.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from still.report.plots import make_plots

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plots figure{margin:0}.plots img{width:520px}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}.note{color:#555;font-size:90%}
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _per_seed(summary: dict[str, Any]) -> str:
    metrics = summary.get("metrics", [])
    rows = []
    for v in ("scratch", "distilled"):
        for seed, r in summary.get(v, {}).get("per_seed", {}).items():
            rows.append([v, seed] + [f"{r[m]:.4f}" if m in r else "–" for m in metrics]
                        + [f"{r.get('train_s', float('nan')):.1f}"])
    if not rows:
        return ""
    return "<h2>Per seed</h2>" + _table(["variant", "seed"] + metrics + ["train time (s)"], rows)


def write_report(run_dir: str | Path) -> Path:
    """(Re)write `run_dir/report.html` and its `plots/*.png`; returns the report's path."""
    from still.pipeline import summary_rows

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    plots = make_plots(run_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>still report: "
             f"{html.escape(run_dir.name)}</title><style>{_CSS}</style></head><body>"]
    name = summary["recipe"] if summary else run_dir.name
    parts.append(f"<h1>still run: {html.escape(name)}</h1><p class='note'>{html.escape(str(run_dir))}</p>")
    if summary:
        header, rows = summary_rows(summary)
        n = len(summary.get("seeds", []))
        parts.append(f"<h2>Teacher vs student</h2><p>Test split, final weights"
                     f"{f', mean ± std over {n} seeds' if n > 1 else ''}.</p>")
        parts.append(_table(header, rows))
        if "delta" in summary:
            k, d = next(iter(summary["delta"].items()))
            parts.append(f"<p><b>distilled − scratch {html.escape(k)}: {d:+.4f}</b> (same student, same budget)</p>")
        data = summary.get("data", {})
        parts.append(f"<p class='note'>Data: {html.escape(str(data.get('name')))} ({data.get('train')} train / "
                     f"{data.get('test')} {html.escape(str(data.get('split', 'test')))}). Latency: "
                     f"{html.escape(summary.get('latency', ''))}. Teacher: "
                     f"{html.escape(str(summary.get('teacher', {}).get('source', 'none')))}. "
                     f"Wall time {summary.get('wall_s', 0):.0f} s.</p>")
        parts.append(_per_seed(summary))
    else:
        parts.append("<p>No summary.json yet (the run did not finish); plots show the logs so far.</p>")
    for kind, title in (("eval", "Evaluation curves"), ("loss", "Loss terms")):
        figs = [p for p in plots if p["kind"] == kind]
        if figs:
            parts.append(f"<h2>{title}</h2><div class='plots'>")
            parts += [f"<figure><img src='{html.escape(p['file'])}' alt='{html.escape(p['title'])}'></figure>"
                      for p in figs]
            parts.append("</div>")
    recipe = run_dir / "recipe.yaml"
    if recipe.exists():
        parts.append(f"<h2>Resolved recipe</h2><pre>{html.escape(recipe.read_text())}</pre>")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
