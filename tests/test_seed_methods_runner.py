"""The seed-method benchmark's runner (benchmarks/seed_methods.py) and shared row helpers (_seed_common)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _seed_common as common  # noqa: E402
import seed_methods  # noqa: E402


def test_verdict_directions() -> None:
    v = common.verdict
    assert v((0.50, 0.01), (0.60, 0.01), (0.70, 0.01), 3) == "beats plain KD; beats scratch"
    assert v((0.50, 0.01), (0.60, 0.01), (0.61, 0.01), 3) == "ties plain KD (within std); beats scratch"
    assert v((0.80, 0.01), (0.60, 0.01), (0.50, 0.01), 3) == "below plain KD; below scratch"
    # lower is better (NLL): a smaller value beats
    assert v((1.7, 0.01), (1.6, 0.01), (1.5, 0.01), 3, lower_better=True) == "beats plain KD; beats scratch"
    assert v((1.7, 0.01), (1.6, 0.01), (1.8, 0.01), 3, lower_better=True) == "below plain KD; below scratch"
    assert v((0.5, 0), (0.6, 0), (0.7, 0), 1) == "no verdict (1 seed)"
    assert v((0.5, 0.1), (0.6, 0.1), (0.75, 0.1), 3, scratch_name="untrained", kd_name="DINO") == \
        "ties DINO (within std); beats untrained"


def test_row_means_and_names() -> None:
    res = {"s": [0.5, 0.7], "k": [0.6, 0.6], "m": [0.9, 0.9]}
    r = common.row("x", "task", "acc", res, ("s", "k", "m"), "claim", 0.95, kd_column="DINO")
    assert r["scratch_mean"] == pytest.approx(0.6) and r["method_std"] == 0.0 and r["seeds"] == 2
    assert r["verdict"] == "beats DINO; beats scratch" and r["kd_column"] == "DINO" and r["teacher"] == 0.95


def test_budget_overrides_are_typed_and_checked() -> None:
    import _seed_ssl

    default = _seed_ssl.Budget().epochs
    b = seed_methods.make_budget(_seed_ssl, False, {"epochs": "7", "lr": "0.01", "max_steps": "5"})
    assert (b.epochs, b.lr, b.max_steps) == (7, 0.01, 5) and _seed_ssl.Budget().epochs == default
    assert seed_methods.make_budget(_seed_ssl, True, {}) is not _seed_ssl.QUICK  # a copy, never the module's
    with pytest.raises(SystemExit, match="no field 'epoch'"):
        seed_methods.make_budget(_seed_ssl, False, {"epoch": "3"})
    assert seed_methods.parse_budgets(["ssl.epochs=3", "cls.train=10"]) == {"ssl": {"epochs": "3"},
                                                                           "cls": {"train": "10"}}
    with pytest.raises(SystemExit, match="PART.FIELD=VALUE"):
        seed_methods.parse_budgets(["nope.epochs=3"])


def test_a_part_runs_end_to_end_and_a_failure_is_reported() -> None:
    got = seed_methods.run_part("ssl", True, [0], {})
    assert got["error"] is None and {r["method"] for r in got["rows"]} == {"mmc", "cmd"}
    assert all(r["part"] == "ssl" and 0.0 <= r["method_mean"] <= 1.0 for r in got["rows"])
    bad = seed_methods.run_part("ssl", True, [0], {"batch_size": "0"})
    assert bad["rows"] == [] and bad["error"]


def test_report_only_rebuilds_the_table_from_saved_rows_with_one_verdict_rule(tmp_path, monkeypatch, capsys) -> None:
    import json

    saved = tmp_path / "seed_methods.json"
    r = {"method": "m", "task": "t", "metric": "acc", "scratch_mean": 0.5, "scratch_std": 0.01, "kd_mean": 0.6,
         "kd_std": 0.01, "method_mean": 0.7, "method_std": 0.01, "paper_claim": "c", "seeds": 3, "teacher": 0.9,
         "verdict": "an old wording"}
    saved.write_text(json.dumps({"ssl": {"part": "ssl", "rows": [r], "seconds": 12.0, "budget": "B()", "error": None,
                                          "command": "python benchmarks/seed_methods.py", "date": "d", "wall_s": 99.0,
                                          "jobs": 2}}))
    monkeypatch.setattr(seed_methods, "SAVED", saved)
    got = seed_methods.main(["--report-only", "--no-write"])
    assert [x["verdict"] for x in got["rows"]] == ["beats plain KD; beats scratch"]
    out = capsys.readouterr().out
    assert "| m | t | acc | 50.00 ± 1.00 | 60.00 ± 1.00 | 70.00 ± 1.00 | 90.00 |" in out
    assert "`python benchmarks/seed_methods.py` (d): parts ssl; wall 99 s, 2 worker process(es)" in out


def test_override_fields_types_each_field_from_its_current_value() -> None:
    from dataclasses import dataclass

    from still.bench import override_fields

    @dataclass
    class C:
        n: int = 1
        lr: float = 0.1
        flag: bool = False
        text: str = "a"
        cap: int | None = None

    c = override_fields(C(), {"n": "3", "lr": "2e-3", "flag": "true", "text": "none", "cap": "7"})
    assert c == C(n=3, lr=0.002, flag=True, text="none", cap=7)  # "none" is a string for a str field
    assert override_fields(C(cap=4), {"cap": "None", "flag": "0"}) == C(cap=None, flag=False)
    with pytest.raises(SystemExit, match="--set: C has no field 'm'"):
        override_fields(C(), {"m": "1"}, "--set")
