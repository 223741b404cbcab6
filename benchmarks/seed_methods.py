"""Issue 6's seed methods: each method's student vs the student from scratch vs plain KD, same task and
budget, mean ± std over seeds, with the paper's claim beside it. Rows come from the part modules
`benchmarks/_seed_dense.py` (dense prediction on the Fashion-MNIST mosaics),
`benchmarks/_seed_cls.py` (classification / relations / teacher shaping), `benchmarks/_seed_ood.py`
(OOD-VLM distillation, held-out classes), `benchmarks/_seed_arra.py` (ARRA on patch tokens) and
`benchmarks/_seed_ssl.py` (MMC / CMD momentum self-distillation, reconstructed from the abstract), each
exposing `rows(quick, seeds) -> list[dict]`; a missing or failing module is reported, not fatal. Each
part also writes its own BENCHMARKS.md section when run alone (`python benchmarks/_seed_ood.py`).
Rows with `fmt: "raw"` are printed as numbers, not percentages (`lower_better` marks the metric).

    python benchmarks/seed_methods.py --quick          # < 60 s: 1 seed, tiny budgets (a smoke run)
    python benchmarks/seed_methods.py                  # the full table: 3 seeds
    python benchmarks/seed_methods.py --parts dense --dense-train 320 --dense-epochs 2   # a smaller full run
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from still.bench import emit_json, markdown_table, write_section  # noqa: E402

SECTION = "Seed methods"
PARTS = {"dense": "_seed_dense", "cls": "_seed_cls", "ood": "_seed_ood", "arra": "_seed_arra", "ssl": "_seed_ssl"}


def _pct(m: float, s: float, fmt: str = "pct") -> str:
    return f"{m:.3f} ± {s:.3f}" if fmt == "raw" else f"{100 * m:.2f} ± {100 * s:.2f}"


def _col(r: dict[str, Any], key: str) -> str:
    """A note on what a column holds for rows whose baseline is not the default one."""
    return f" ({r[key]})" if r.get(key) else ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, tiny budgets (< 60 s)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 1 quick, 3 full)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run ({', '.join(PARTS)})")
    ap.add_argument("--dense-train", type=int, default=None, help="override the dense part's training canvases")
    ap.add_argument("--dense-epochs", type=int, default=None, help="override the dense part's student epochs")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    ap.add_argument("--write", action="store_true", help="with --quick: write the section anyway (it is a smoke run)")
    args = ap.parse_args(argv)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        mod_name = PARTS.get(part)
        if mod_name is None:
            raise SystemExit(f"--parts: unknown part {part!r}; known: {', '.join(PARTS)}")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            notes.append(f"part {part!r}: module {mod_name} not available ({exc})")
            continue
        if part == "dense" and (args.dense_train or args.dense_epochs):
            b = mod.QUICK if args.quick else mod.Budget()
            b.train = args.dense_train or b.train
            b.epochs = args.dense_epochs or b.epochs
            mod.Budget = lambda b=b: b  # type: ignore[assignment]
            mod.QUICK = b
            notes.append(f"dense budget: {b}")
        try:
            t1 = time.perf_counter()
            got = mod.rows(args.quick, seeds)
            for r in got:
                r.setdefault("part", part)
            rows += got
            notes.append(f"part {part!r}: {len(got)} rows in {time.perf_counter() - t1:.0f} s")
        except Exception as exc:  # a broken part must not hide the other's rows
            notes.append(f"part {part!r} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    header = ["method", "task", "metric", "scratch", "plain KD", "method", "teacher", "paper's claim", "verdict"]
    table = [[r["method"], r["task"], r["metric"] + (" (lower is better)" if r.get("lower_better") else ""),
              _pct(r["scratch_mean"], r["scratch_std"], r.get("fmt", "pct")) + _col(r, "scratch_column"),
              _pct(r["kd_mean"], r["kd_std"], r.get("fmt", "pct")) + _col(r, "kd_column"),
              _pct(r["method_mean"], r["method_std"], r.get("fmt", "pct")),
              f"{100 * r['teacher']:.2f}" if isinstance(r.get("teacher"), float) else "–",
              r["paper_claim"], r["verdict"]] for r in rows]
    wall = time.perf_counter() - t0
    md = (f"{'Quick smoke run (1 seed, tiny budgets): not a result. ' if args.quick else ''}"
          "Figures in % unless the metric says otherwise (ARRA: nats/token and Fréchet distance, lower is "
          "better); a parenthesis in a baseline cell says what that baseline is for that row. "
          f"Mean ± std over {len(seeds)} seed(s); wall {wall:.0f} s on "
          f"{__import__('torch').get_num_threads()} thread(s), CPU shared with other jobs.\n\n"
          + markdown_table(header, table) + "\n\n" + "\n".join(f"- {n}" for n in notes))
    print(md)
    if not args.no_write and (not args.quick or args.write):
        write_section(SECTION, md)
    figures = {"wall_s": wall, "seeds": len(seeds), "quick": args.quick, "rows": rows, "notes": notes}
    emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
