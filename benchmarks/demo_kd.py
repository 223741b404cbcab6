"""The demo as a benchmark: teacher / student from scratch / distilled student, mean ± std over seeds.

Runs `recipes/fashion_mnist_kd.yaml` through the same pipeline as `still run` (teacher trained here,
then for each seed the student from scratch and distilled, same init, same data order, same budget)
and writes the table to BENCHMARKS.md ("Fashion-MNIST KD demo"). By default the teacher is trained
in a fresh cache, so the wall time is what a first `make demo` costs.

    python benchmarks/demo_kd.py                     # the demo recipe, seeds 0,1,2 (minutes)
    python benchmarks/demo_kd.py --reuse-teacher     # reuse runs/.teachers/ (the make demo cache)
    python benchmarks/demo_kd.py --quick             # recipes/digits_kd.yaml, seeds 0,1,2 (< 60 s); JSON only
    python benchmarks/demo_kd.py --from-run RUN_DIR  # rebuild the section from a finished run's summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from still.bench import emit_json, markdown_table, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits recipe (< 60 s); prints JSON, writes nothing")
    ap.add_argument("--recipe", default=None, help="recipe to run (default: the demo, or digits_kd with --quick)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    ap.add_argument("--reuse-teacher", action="store_true", help="use the runs/.teachers cache (else a fresh one)")
    ap.add_argument("--write", action="store_true", help="with --quick: also write a '(quick)' section")
    ap.add_argument("--made-by", default=None, metavar="TEXT",
                    help="with --from-run: the command that made the run (shown in the section)")
    ap.add_argument("--from-run", default=None, metavar="RUN_DIR",
                    help="no training: rebuild the section from RUN_DIR/summary.json (a run of this script)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from still.pipeline import run_recipe, summary_rows
    from still.recipes.schema import load_recipe

    recipe_path = Path(args.recipe) if args.recipe else ROOT / "recipes" / (
        "digits_kd.yaml" if args.quick else "fashion_mnist_kd.yaml")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    recipe = load_recipe(recipe_path, args.set)
    runs_root = ROOT / "runs"
    command = None
    if args.from_run:
        summary = json.loads((Path(args.from_run) / "summary.json").read_text())
        seeds, wall = [int(k) for k in summary["seeds"]], float(summary["wall_s"])
        command = (f"python benchmarks/demo_kd.py{' --reuse-teacher' if args.reuse_teacher else ''} "
                   f"(run {Path(summary['run_dir']).name}; section rebuilt by --from-run)")
        if args.made_by:
            command = f"{args.made_by} (run {Path(summary['run_dir']).name}; section rebuilt by demo_kd.py --from-run)"
    else:
        with tempfile.TemporaryDirectory(prefix="still-demo-teacher-") as tmp:
            cache = runs_root / ".teachers" if args.reuse_teacher else Path(tmp)
            t0 = time.perf_counter()
            summary = run_recipe(recipe, seeds=seeds, runs_root=runs_root, teacher_cache=cache, progress=False,
                                 quiet=args.quick, source=recipe_path.name)
            wall = time.perf_counter() - t0
    metric = recipe.eval.metrics[0]
    d, s = summary["distilled"], summary.get("scratch")
    figures = {
        "quick": args.quick, "recipe": recipe.name, "seeds": seeds, "wall_s": round(wall, 1),
        "torch_threads": torch.get_num_threads(), "teacher_source": summary.get("teacher", {}).get("source", ""),
        "teacher_train_s": summary.get("teacher", {}).get("train_s"),
        f"teacher_{metric}": summary.get("teacher", {}).get(metric),
        f"distilled_{metric}_mean": d["mean"][metric], f"distilled_{metric}_std": d["std"][metric],
        "distilled_per_seed": [d["per_seed"][str(k)][metric] for k in seeds],
        "run_dir": summary["run_dir"],
    }
    if s is not None:
        figures.update({f"scratch_{metric}_mean": s["mean"][metric], f"scratch_{metric}_std": s["std"][metric],
                        "scratch_per_seed": [s["per_seed"][str(k)][metric] for k in seeds],
                        "delta": summary["delta"][metric],
                        "distilled_beats_scratch": bool(summary["delta"][metric] > 0)})
    if not args.quick or args.write:
        header, rows = summary_rows(summary)
        per_seed = markdown_table(
            ["seed", f"scratch {metric}", f"distilled {metric}", "distilled − scratch"],
            [[k, f"{s['per_seed'][str(k)][metric]:.4f}" if s else "–", f"{d['per_seed'][str(k)][metric]:.4f}",
              f"{d['per_seed'][str(k)][metric] - s['per_seed'][str(k)][metric]:+.4f}" if s else "–"] for k in seeds])
        data = summary["data"]
        t = summary.get("teacher", {})
        students = (f"; the students train on a fixed subset of {data['student_train']} of the training images "
                    f"(`student.train_subset`), the teacher on all of them" if data.get("student_train") else "")
        md = "\n\n".join([
            f"Recipe `{recipe_path.relative_to(ROOT) if recipe_path.is_relative_to(ROOT) else recipe_path}`"
            f" ({data['name']}: {data['train']} train / {data['test']} test{students}), seeds "
            f"{','.join(map(str, seeds))}. Test {metric} of "
            f"the final weights (no checkpoint selection), mean ± std over seeds; the scratch and distilled "
            f"students share the initial weights, the data order and the budget of each seed.",
            markdown_table(header, rows),
            f"**distilled − scratch {metric}: {summary['delta'][metric]:+.4f}**" if s else "",
            per_seed,
            f"Latency: {summary['latency']}. Teacher: {t.get('source', '–')}"
            + (f", trained in {t['train_s']:.0f} s" if t.get("train_s") else "")
            + f". Whole run (teacher included{'' if not args.reuse_teacher else ' unless cached'}): {wall:.0f} s "
            f"wall ({os.cpu_count()} CPUs; the command above says how it was run).",
        ])
        write_section("Fashion-MNIST KD demo" + (" (quick)" if args.quick else ""), md, command=command)
    emit_json(figures)


if __name__ == "__main__":
    main()
