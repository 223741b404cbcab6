"""Every runnable `benchmarks/*.py` accepts `--quick` and prints its figures as one JSON object (emit_json).

Checked statically (AST), so the test costs milliseconds: a benchmark is a file without a leading
underscore, or any file with an `if __name__ == "__main__":` block; helpers such as `_seed_dense.py`
(imported by `seed_methods.py`) are exempt. Running each `--quick` (< 60 s each) is `make bench`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _has_main_guard(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = {getattr(n, "id", None) for n in ast.walk(node.test)}
            consts = {getattr(n, "value", None) for n in ast.walk(node.test)}
            if "__name__" in names and "__main__" in consts:
                return True
    return False


def _runnable() -> list[Path]:
    out = []
    for p in sorted(BENCH.glob("*.py")):
        tree = ast.parse(p.read_text(), str(p))
        if not p.name.startswith("_") or _has_main_guard(tree):
            out.append(p)
    return out


def _calls(tree: ast.Module) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _call_name(c: ast.Call) -> str:
    f = c.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def test_there_are_benchmarks() -> None:
    assert len(_runnable()) >= 5


@pytest.mark.parametrize("path", _runnable(), ids=lambda p: p.name)
def test_benchmark_contract(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    assert _has_main_guard(tree), f"{path.name}: no `if __name__ == '__main__':` block"
    flags = {a.value for c in _calls(tree) if _call_name(c) == "add_argument"
             for a in c.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    assert "--quick" in flags, f"{path.name}: no `--quick` argument (found {sorted(flags)})"
    assert any(_call_name(c) == "emit_json" for c in _calls(tree)), (
        f"{path.name}: never calls still.bench.emit_json (the one-JSON-object last line)")
