"""README.md stays true: its Python example runs, its recipe validates, its error messages are the real ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def test_readme_opens_with_make_demo_and_make_test() -> None:
    first = _blocks("bash")[0]
    cmds = [line.split("#")[0].strip() for line in first.splitlines() if line.split("#")[0].strip()]
    assert cmds[:2] == ["make demo", "make test"]


def test_python_example_runs_and_trains() -> None:
    code = _blocks("python")[0]
    assert len(code.strip().splitlines()) <= 12
    setup = code.split("\nfor ", 1)[0]  # everything before the training loop
    torch.manual_seed(0)
    before: dict = {}
    exec(compile(setup, "README.md", "exec"), before)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    losses = ns["losses"]
    assert set(losses) == {"kd", "ce", "total"} and all(torch.isfinite(v) for v in losses.values())
    w = 0.9 * losses["kd"] + 0.1 * losses["ce"]
    assert torch.allclose(losses["total"], w)
    # the loop updated the student and never the (frozen) teacher
    assert torch.equal(before["teacher"].model.classifier.weight, ns["teacher"].model.classifier.weight)
    assert not torch.equal(before["student"].classifier.weight, ns["student"].classifier.weight)
    assert all(not p.requires_grad for p in ns["teacher"].model.parameters())


def test_recipe_example_is_valid_and_matches_the_file() -> None:
    from still.recipes.schema import load_recipe, parse_recipe

    text = _blocks("yaml")[0]
    recipe = parse_recipe(yaml.safe_load(text), "README.md")
    path = re.search(r"# (recipes/\S+\.yaml)", text).group(1)
    real = load_recipe(README.parent / path)
    assert recipe.name == real.name and recipe.student == real.student and recipe.method == real.method
    assert [t.loss for t in recipe.terms] == [t.loss for t in real.terms]


def test_error_examples_are_the_real_messages() -> None:
    from still.recipes.schema import RecipeError, load_recipe
    from still.recipes.validate import validate_recipe

    text = " ".join(README.read_text().split())
    path = README.parent / "recipes" / "digits_fitnets.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["teacher"]["modle"] = raw["teacher"].pop("model")
    from still.recipes.schema import parse_recipe

    with pytest.raises(RecipeError) as ei:
        parse_recipe(raw, "digits_fitnets.yaml")
    assert str(ei.value) in text
    with pytest.raises(RecipeError) as ei:
        validate_recipe(load_recipe(path, ["student.views.feat=hiden.0"]), "digits_fitnets.yaml")
    msg = str(ei.value).split("digits_fitnets.yaml: ", 1)[1].split(" (")[0]
    assert msg in text
