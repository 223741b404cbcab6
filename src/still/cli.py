"""The `still` command line: a thin layer over the Python API.

    still run RECIPE [--out DIR] [--seeds 0,1,2] [--set a.b=value ...] [--resume]
    still validate RECIPE [--set a.b=value ...]
    still list [losses|methods|adapters|schedules|datasets|models|metrics|teachers]
    still report RUN_DIR
    still cache RECIPE --out STORE        (record a teacher-signal store; still.teachers.cache_cmd)
    still cache verify STORE
    still eval ...                        (embedding evaluation; still.eval_cmd)

Recipe problems exit with status 2 and one readable message per problem on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Sequence

KINDS = ("losses", "methods", "adapters", "schedules", "datasets", "models", "metrics", "teachers")


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 120)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from still.registry import REGISTRIES

    kinds = [args.kind] if args.kind else list(KINDS)
    console = _console()
    for kind in kinds:
        reg = REGISTRIES[kind]
        with_paper = kind in ("losses", "methods")
        table = Table(title=f"{kind} ({len(reg)})", title_justify="left", show_lines=False)
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("description")
        if with_paper:
            table.add_column("paper")
        for e in reg.entries():
            row = [e.name, e.description]
            if with_paper:
                row.append(e.paper or "")
            table.add_row(*row)
        console.print(table)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from still.recipes.schema import load_recipe
    from still.recipes.validate import validate_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    report = validate_recipe(recipe, os.path.basename(args.recipe))
    console = _console()
    console.print(f"[green]OK[/] {args.recipe}: recipe {recipe.name!r} is valid")
    for line in report.lines():
        console.print(f"  {line}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from still.pipeline import print_summary, run_recipe
    from still.recipes.schema import load_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    console = _console()
    summary = run_recipe(
        recipe, out_dir=args.out, seeds=args.seeds, resume=args.resume, runs_root=args.runs_root,
        progress=False if args.no_progress else None, console=console, quiet=args.quiet,
        source=os.path.basename(args.recipe),
    )
    print_summary(summary, console)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from still.report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path}")
    return 0


def _optional(module: str, what: str) -> Any:
    """Import an optional command module, or None (the command then says it is not available)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            print(f"still: {what} is not available in this install (module {module} is missing)", file=sys.stderr)
            return None
        raise


# ---- still cache: provided by still.teachers.cache_cmd (cache_recipe, verify_store) -------------------
def cmd_cache(args: argparse.Namespace) -> int:
    mod = _optional("still.teachers.cache_cmd", "`still cache`")
    if mod is None:
        return 3
    if args.target == "verify":
        if not args.store:
            print("still cache verify: give the store path: still cache verify STORE", file=sys.stderr)
            return 2
        result = mod.verify_store(args.store)
        print(result)
        return 0 if getattr(result, "ok", True) else 1
    if not args.out:
        print("still cache: give the store to write: still cache RECIPE --out STORE", file=sys.stderr)
        return 2
    result = mod.cache_recipe(args.target, out=args.out, overrides=args.set or [], workers=args.workers,
                              runs_root=args.runs_root)
    print(f"store written: {result}" if result is not None else "this rank's shards are written; "
          "the last rank to finish writes the manifest")
    return 0


# ---- still eval: provided by the embeddings component (still.eval_cmd: add_arguments(parser), main(args)) ----
def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a model (embeddings: retrieval, probes); see still.eval_cmd")
    try:
        mod = importlib.import_module("still.eval_cmd")
    except ModuleNotFoundError:
        mod = None
    if mod is not None and hasattr(mod, "add_arguments"):
        mod.add_arguments(p)
    else:
        p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    mod = _optional("still.eval_cmd", "`still eval`")
    if mod is None:
        return 3
    return int(mod.main(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="still", description="Knowledge distillation for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="train the teacher (cached), the scratch and distilled students; report")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>/<timestamp>/)")
    p.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds, e.g. 0,1,2 (mean ± std)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field (YAML value)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or the latest run) exactly")
    p.add_argument("--runs-root", default="runs", help="where run directories and the teacher cache live")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="only the final table")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a recipe (keys, types, names, taps, shapes) without training")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("list", help="registered components: name, one-line description (+ paper)")
    p.add_argument("kind", nargs="?", choices=KINDS)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("report", help="regenerate report.html and plots of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cache", help="record a teacher-signal store (RECIPE --out STORE) or check one (verify STORE)")
    p.add_argument("target", help="RECIPE, or 'verify'")
    p.add_argument("store", nargs="?", help="with 'verify': the store to check")
    p.add_argument("--out", default=None, help="the store to write")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--workers", type=int, default=1, help="local processes writing disjoint shards")
    p.add_argument("--runs-root", default="runs", help="where the teacher cache lives (as for still run)")
    p.set_defaults(func=cmd_cache)

    _add_eval(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `still` console script; returns the exit status."""
    from still.recipes.schema import RecipeError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.func(args) or 0)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
