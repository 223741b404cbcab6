"""Issue 6's seed methods: each method's student vs the student from scratch vs plain KD, same task and
budget, mean ± std over seeds, with the paper's claim beside it, in one BENCHMARKS.md table.

Rows come from the part modules, each exposing `Budget`, `QUICK` and `rows(quick, seeds, budget)`
(shared helpers in `benchmarks/_seed_common.py`): `_seed_dense` (dense prediction on the Fashion-MNIST
mosaics), `_seed_cls` (classification / relations / teacher shaping), `_seed_ood` (OOD-VLM
distillation, held-out classes), `_seed_arra` (ARRA on patch tokens), `_seed_ssl` (MMC / CMD
momentum self-distillation, reconstructed from the abstract) and `_seed_disco` (DiSCo's multi-teacher
score distillation, real MiniLM / MPNet teachers reading rewrites). A failing part is reported, not fatal.
Parts run in `--jobs` worker processes of one torch thread each (the models are tiny: one thread each
beats two threads for one). Each part's rows are saved to `benchmarks/results/seed_methods.json`, so a
run of some parts (`--parts cls`) rewrites the table with the other parts' saved rows, marked with
the date and command that made them.

    python benchmarks/seed_methods.py --quick                    # < 60 s: 1 seed, tiny budgets; prints only
    python benchmarks/seed_methods.py                            # the full table: 3 seeds, 2 jobs
    python benchmarks/seed_methods.py --parts ood --budget ood.epochs=5   # one part, a budget override
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from _seed_common import verdict  # noqa: E402
from still.bench import emit_json, markdown_table, override_fields, write_section  # noqa: E402

SECTION = "Seed methods"
# longest first, so that `--jobs 2` puts the dense part on one worker and the others on the second
PARTS = {"dense": "_seed_dense", "cls": "_seed_cls", "arra": "_seed_arra", "ood": "_seed_ood", "ssl": "_seed_ssl",
         "disco": "_seed_disco"}
SAVED = HERE / "results" / "seed_methods.json"


def _pct(m: float, s: float, fmt: str = "pct") -> str:
    return f"{m:.3f} ± {s:.3f}" if fmt == "raw" else f"{100 * m:.2f} ± {100 * s:.2f}"


def _col(r: dict[str, Any], key: str) -> str:
    """A note on what a column holds for rows whose baseline is not the default one."""
    return f" ({r[key]})" if r.get(key) else ""


def parse_budgets(items: list[str]) -> dict[str, dict[str, str]]:
    """`["dense.epochs=8", "cls.train=2000"]` → {"dense": {"epochs": "8"}, "cls": {"train": "2000"}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        head, sep, value = item.partition("=")
        part, dot, field = head.partition(".")
        if not sep or not dot or part not in PARTS:
            raise SystemExit(f"--budget {item!r}: expected PART.FIELD=VALUE with PART in {', '.join(PARTS)}")
        out.setdefault(part, {})[field] = value
    return out


def make_budget(mod: Any, quick: bool, overrides: dict[str, str]) -> Any:
    """The part's QUICK or default Budget with `overrides` applied (typed by the dataclass's defaults)."""
    return override_fields(mod.QUICK if quick else mod.Budget(), overrides, f"--budget: {mod.__name__}")


def run_part(part: str, quick: bool, seeds: list[int], overrides: dict[str, str]) -> dict[str, Any]:
    """Run one part in this process (a worker: one torch thread); never raises."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(PARTS[part])
        budget = make_budget(mod, quick, overrides)
        got = mod.rows(quick, seeds, budget)
        for r in got:
            r["part"] = part
        return {"part": part, "rows": got, "seconds": time.perf_counter() - t0, "budget": repr(budget), "error": None}
    except SystemExit:
        raise
    except Exception as exc:  # a broken part must not hide the others' rows
        traceback.print_exc()
        return {"part": part, "rows": [], "seconds": time.perf_counter() - t0, "budget": None,
                "error": f"{type(exc).__name__}: {exc}"}


def table(rows: list[dict[str, Any]]) -> str:
    header = ["method", "task", "metric", "scratch", "plain KD", "method", "teacher", "paper's claim", "verdict"]
    body = [[r["method"], r["task"], r["metric"] + (" (lower is better)" if r.get("lower_better") else ""),
             _pct(r["scratch_mean"], r["scratch_std"], r.get("fmt", "pct")) + _col(r, "scratch_column"),
             _pct(r["kd_mean"], r["kd_std"], r.get("fmt", "pct")) + _col(r, "kd_column"),
             _pct(r["method_mean"], r["method_std"], r.get("fmt", "pct")),
             f"{100 * r['teacher']:.2f}" if isinstance(r.get("teacher"), float) else "–",
             r["paper_claim"], r["verdict"]] for r in rows]
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, tiny budgets (< 60 s); prints only")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 1 quick, 3 full)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run ({', '.join(PARTS)})")
    ap.add_argument("--budget", action="append", default=[], metavar="PART.FIELD=VALUE",
                    help="override a field of a part's Budget (repeatable), e.g. dense.epochs=8")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: 1 quick, 2 full)")
    ap.add_argument("--report-only", action="store_true", help="run nothing: rewrite the table from the saved rows")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    ap.add_argument("--write", action="store_true", help="with --quick: write the section anyway (a smoke run)")
    args = ap.parse_args(argv)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for p in parts:
        if p not in PARTS:
            raise SystemExit(f"--parts: unknown part {p!r}; known: {', '.join(PARTS)}")
    budgets = parse_budgets(args.budget)
    jobs = max(1, min(args.jobs or (1 if args.quick else 2), len(parts)))
    t0 = time.perf_counter()
    if args.report_only:
        done = []
    elif jobs == 1:
        done = [run_part(p, args.quick, seeds, budgets.get(p, {})) for p in parts]
    else:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers before torch loads there
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_part, p, args.quick, seeds, budgets.get(p, {})) for p in parts]
            done = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    cmd = "python " + " ".join(["benchmarks/seed_methods.py"] + (argv if argv is not None else sys.argv[1:]))
    stamp = time.strftime("%Y-%m-%d %H:%M")
    fresh = {d["part"]: {**d, "command": cmd, "date": stamp, "wall_s": wall, "jobs": jobs}
             for d in done if not d["error"]}
    saved: dict[str, Any] = {}
    if SAVED.exists() and not args.quick:
        saved = {k: v for k, v in json.loads(SAVED.read_text()).items() if k in PARTS and k not in fresh}
    merged = {p: (fresh.get(p) or saved.get(p)) for p in PARTS if fresh.get(p) or saved.get(p)}
    rows = [r for p in merged.values() for r in p["rows"]]
    for r in rows:  # one verdict rule for every row, saved ones included
        r["verdict"] = verdict((r["scratch_mean"], r["scratch_std"]), (r["kd_mean"], r["kd_std"]),
                               (r["method_mean"], r["method_std"]), int(r.get("seeds", len(seeds))),
                               bool(r.get("lower_better")), r.get("scratch_column") or "scratch",
                               r.get("kd_column") or "plain KD")
    notes = [f"part {d['part']!r} failed: {d['error']}" for d in done if d["error"]]
    notes += [f"part {p!r}: {len(v['rows'])} rows in {v['seconds']:.0f} s; {v['budget']}" for p, v in merged.items()]
    for p, v in merged.items():
        src: dict[str, set[str]] = {}
        for r in v["rows"]:
            if r.get("teacher_source"):
                src.setdefault(r["teacher_source"], set()).add(r["method"])
        if src:
            notes.append(f"part {p!r}: teachers " + "; ".join(f"{k} for {', '.join(sorted(ms))}" for k, ms in src.items())
                         + (" ('cached': weights an earlier run saved under $STILL_CACHE/bench/models, so their "
                            "training time is not in the part's seconds)" if "cached" in src else ""))
    runs: dict[tuple[str, str], list[str]] = {}
    for p, v in merged.items():
        runs.setdefault((v["command"], v["date"]), []).append(p)
    made = [f"`{c}` ({d}): parts {', '.join(ps)}; wall {merged[ps[0]].get('wall_s', 0):.0f} s, "
            f"{merged[ps[0]].get('jobs', 1)} worker process(es) of one torch thread each" for (c, d), ps in runs.items()]
    md = (f"{'Quick smoke run (1 seed, tiny budgets): not a result. ' if args.quick else ''}"
          "Figures in % unless the metric says otherwise (ARRA: nats/token and Fréchet distance, lower is "
          "better); a parenthesis in a baseline cell says what that baseline is for that row. Verdicts: "
          "'beats X' when the means differ by more than the two stds together. "
          f"Mean ± std over {len(seeds)} seed(s). The setup of each part is in its module's docstring. "
          "Rows made by " + "; ".join(made) + ".\n\n"
          + table(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes))
    print(md)
    if not args.quick:
        SAVED.parent.mkdir(parents=True, exist_ok=True)
        tmp = SAVED.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=1, default=float))
        os.replace(tmp, SAVED)
    if not args.no_write and (not args.quick or args.write):
        write_section(SECTION, md, command=cmd)
    figures = {"wall_s": wall, "seeds": len(seeds), "quick": args.quick, "jobs": jobs, "rows": rows, "notes": notes}
    emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
