"""`student.train_subset`: the students train on a fixed subset, the teacher on the whole training split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from still.pipeline import student_subset
from still.recipes.schema import RecipeError, parse_recipe

from test_cli import TINY, _write
from still.cli import main


def test_student_subset_is_fixed_and_leaves_small_sets_alone() -> None:
    from still.data.vision import digits

    train = digits("train")
    a, b = student_subset(train, 100), student_subset(train, 100)
    assert len(a) == 100 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert student_subset(train, None) is train and student_subset(train, 10**6) is train
    plain = torch.utils.data.TensorDataset(train.x, train.y)  # no .subset(): the generic path
    sub = student_subset(plain, 50)
    assert len(sub) == 50 and len(set(sub.indices)) == 50


def test_run_reports_the_student_subset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = {**TINY, "student": {**TINY["student"], "train_subset": 48}}
    out = tmp_path / "run"
    rc = main(["run", str(_write(tmp_path, recipe)), "--out", str(out), "--runs-root", str(tmp_path), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"] == 128 and summary["data"]["student_train"] == 48


def test_train_subset_must_be_positive() -> None:
    with pytest.raises(RecipeError, match="train_subset"):
        parse_recipe({**TINY, "student": {**TINY["student"], "train_subset": 0}})
