"""`still cache` glue: a recipe's teacher recorded into a store, verified, and checked against a recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_kd.yaml"
FAST = ["teacher.train=null"]  # the teacher as built (seeded): no engine run needed


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from still.teachers.cache_cmd import cache_recipe

    out = tmp_path_factory.mktemp("cache") / "digits.store"
    assert cache_recipe(RECIPE, out, overrides=FAST, topk={"logits": 4}, shard_size=400) == out
    return out


def test_cache_recipe_records_the_recipe_teacher(cached: Path) -> None:
    from still.recipes.schema import load_recipe
    from still.teachers.cache_cmd import recipe_teacher, verify_store
    from still.teachers.store import StoreTeacher

    rep = verify_store(cached)
    assert rep.ok and rep.checked == 4 and "OK" in str(rep)  # 4 shards (1,347 digits / 400); identity index
    t = StoreTeacher(cached)
    man = t.manifest
    assert man["preprocessing"] == {"factory": None, "name": "digits", "params": {}}
    assert man["n_rows"] == 1347 and man["views"][0]["k"] == 4
    recipe = load_recipe(RECIPE, FAST)
    live, train, views = recipe_teacher(recipe)
    assert views == {"logits": ""} and man["data_fingerprint"] == train.fingerprint()
    b = torch.utils.data.default_collate([train[i] for i in (0, 700, 1346)])
    got = t.views(b, ["logits"])["logits"]
    assert torch.equal(got.indices, torch.log_softmax(live.views(b, ["logits"])["logits"], -1).topk(4, -1).indices)


def test_open_store_for_recipe_refuses_other_data(cached: Path) -> None:
    from still.recipes.build import build_dataset
    from still.recipes.schema import load_recipe
    from still.teachers.cache_cmd import open_store_for_recipe
    from still.teachers.store import StoreMismatchError

    store_teacher = [f"teacher={{store: {cached}, views: {{logits: ''}}}}"]
    recipe = load_recipe(RECIPE, store_teacher)
    train = build_dataset(recipe.data, "train")
    t = open_store_for_recipe(recipe, train)
    assert t.available_views() == ["logits"]
    b = torch.utils.data.default_collate([train[i] for i in (3, 9)])
    dense = t.views(b, ["logits"])["logits"]  # top-4 served dense by default, so `kd` works on it
    assert isinstance(dense, torch.Tensor) and dense.shape == (2, 10)
    assert type(open_store_for_recipe(recipe, train, topk="sparse").views(b, ["logits"])["logits"]).__name__ == "TopKLogits"
    other = load_recipe(RECIPE, store_teacher + ["data.params={subset: 500}"])
    with pytest.raises(StoreMismatchError, match="preprocessing params.subset: store has \"<absent>\", now 500"):
        open_store_for_recipe(other)


@pytest.mark.slow  # spawns two worker processes (each imports torch and the recipe stack)
def test_cache_recipe_with_two_workers_equals_one(cached: Path, tmp_path: Path) -> None:
    from still.teachers.cache_cmd import cache_recipe

    out = cache_recipe(RECIPE, tmp_path / "two", overrides=FAST, topk={"logits": 4}, shard_size=400, workers=2)
    for f in sorted(p.name for p in cached.glob("*.safetensors")):
        assert (out / f).read_bytes() == (cached / f).read_bytes(), f
