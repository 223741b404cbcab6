"""Recipes: every recipe under recipes/ validates and runs briefly; each error names the field and what is allowed."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml

from still.recipes.schema import RecipeError, apply_overrides, load_factory, load_recipe, parse_recipe, read_yaml
from still.recipes.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

BASE = {
    "name": "t",
    "data": {"name": "digits", "params": {"subset": 128}},
    "teacher": {"model": {"name": "mlp", "params": {"hidden": [32]}}, "views": {"logits": ""}},
    "student": {"model": {"name": "mlp", "params": {"hidden": [8]}}, "views": {"logits": ""}},
    "method": {"name": "kd"},
    "train": {"max_steps": 2, "batch_size": 16, "progress": False},
}


def _raw(**changes: object) -> dict:
    d = json.loads(json.dumps(BASE))
    d.update(changes)
    return d


def _error(data: dict, deep: bool = False) -> str:
    with pytest.raises(RecipeError) as ei:
        r = parse_recipe(data, "recipe.yaml")
        if deep:
            validate_recipe(r, "recipe.yaml")
    return str(ei.value)


# ---- every recipe: validated, then run briefly ---------------------------------------------------


def _brief_overrides(raw: dict) -> list[str]:
    """Overrides that shrink a recipe to a few steps on a tiny subset (where the data set allows it)."""
    from still.registry import DATASETS

    sets = ["train.max_steps=2", "train.log_every=1", "train.progress=false", "train.eval_every=2",
            "train.batch_size=16", "eval.latency=false", "eval.batch_size=64"]
    data = raw.get("data", {})
    if data.get("name") in DATASETS and "subset" in inspect.signature(DATASETS.get(data["name"])).parameters:
        sets.append("data.params.subset=96")
    if raw.get("teacher", {}).get("train") is not None:
        sets += ["teacher.train.max_steps=1", "teacher.train.progress=false", "teacher.train.batch_size=16"]
    return sets


def _skip_reason(exc: RecipeError) -> str | None:
    """Absent data (a data set whose files are not installed) is the only acceptable reason to skip."""
    msg = str(exc)
    if "cannot load data set" in msg and ("not found" in msg or "No such file" in msg):
        return f"data not installed: {msg.splitlines()[0][:200]}"
    return None


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates_and_runs_briefly(path: Path, tmp_path: Path) -> None:
    from still.pipeline import run_recipe

    raw = read_yaml(path)
    recipe = load_recipe(path)  # the recipe as written: keys, types and names
    try:
        validate_recipe(recipe, path.name)  # taps, views and shapes on one real batch
    except RecipeError as exc:
        reason = _skip_reason(exc)
        if reason:
            pytest.skip(reason)
        raise
    brief = parse_recipe(apply_overrides(raw, _brief_overrides(raw)), path.name)
    summary = run_recipe(brief, out_dir=tmp_path / "run", runs_root=tmp_path, progress=False, quiet=True,
                         source=path.name, report=False)
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["recipe"] == recipe.name
    assert (run / "recipe.yaml").exists()
    if brief.eval.metrics:
        metric = brief.eval.metrics[0]
        assert summary["distilled"]["mean"][metric] == summary["distilled"]["mean"][metric]  # not NaN
    assert (run / f"seed{brief.seed}" / "distilled" / "metrics.jsonl").exists()
    if brief.baseline:
        assert "scratch" in summary and ("delta" in summary or not brief.eval.metrics)


def test_core_recipes_exist() -> None:
    names = {p.stem for p in RECIPES}
    assert {"fashion_mnist_kd", "digits_kd", "digits_fitnets"} <= names


# ---- schema errors: field path and what is allowed ----------------------------------------------


def test_wrong_type_names_field_and_expected_type() -> None:
    msg = _error(_raw(train={"lr": "fast"}))
    assert "recipe.yaml: train.lr: expected a number, got 'fast'" in msg


def test_unknown_key_lists_allowed_keys() -> None:
    d = _raw()
    d["teacher"]["modle"] = d["teacher"].pop("model")
    msg = _error(d)
    assert "teacher.modle: unknown key" in msg
    assert "allowed: model, weights, train, views, store, inputs" in msg
    assert "did you mean 'model'" in msg


def test_unknown_key_in_a_list_item() -> None:
    msg = _error(_raw(terms=[{"loss": "kd", "student": "logits", "teacher": "logits", "wieght": 2}]))
    assert "terms[0].wieght: unknown key" in msg and "weight" in msg


def test_literal_field_lists_the_choices() -> None:
    msg = _error(_raw(train={"optimizer": "adm"}))
    assert "train.optimizer: expected one of 'adamw', 'adam' or 'sgd', got 'adm'" in msg


def test_missing_required_field() -> None:
    d = _raw()
    del d["student"]
    assert "student: required field is missing" in _error(d)


@pytest.mark.parametrize("field,value,registry_word,close", [
    ("method", {"name": "kdd"}, "method", "kd"),
    ("data", {"name": "digit"}, "dataset", "digits"),
    ("eval", {"metrics": ["acuracy"]}, "metric", "accuracy"),
])
def test_unknown_registered_name_gives_closest(field: str, value: dict, registry_word: str, close: str) -> None:
    msg = _error(_raw(**{field: value}))
    assert f"unknown {registry_word}" in msg and repr(close) in msg
    assert {"method": "method.name", "data": "data.name", "eval": "eval.metrics[0]"}[field] in msg


def test_unknown_model_loss_schedule_adapter_names() -> None:
    d = _raw(terms=[{"loss": "fitnet", "student": "logits", "teacher": "logits", "schedule": "cosin",
                     "adapter": {"name": "linaer"}}])
    d["student"]["model"]["name"] = "mlpp"
    msg = _error(d)
    assert "student.model.name: unknown model 'mlpp'" in msg and "'mlp'" in msg
    assert "terms[0].loss: unknown loss 'fitnet'" in msg and "'fitnets'" in msg
    assert "terms[0].schedule: unknown schedule 'cosin'" in msg and "'cosine'" in msg
    assert "terms[0].adapter: unknown adapter 'linaer'" in msg and "'linear'" in msg


def test_bad_method_params_are_named() -> None:
    msg = _error(_raw(method={"name": "kd", "params": {"temprature": 2}}), deep=True)
    assert "method.params" in msg and "temprature" in msg and "temperature" in msg


def test_model_source_must_be_exactly_one() -> None:
    d = _raw()
    d["student"]["model"] = {"name": "mlp", "factory": "x.y:z"}
    assert "student.model: give exactly one of name, factory, hf (got name, factory)" in _error(d)


def test_factory_must_be_module_colon_attr_and_is_imported_not_evaluated() -> None:
    d = _raw()
    d["student"]["model"] = {"factory": "__import__('os').system('true')"}
    assert "must look like 'package.module:function'" in _error(d)
    assert load_factory("still.registry:close_matches")("kd", ["kd", "dkd"])[0] == "kd"
    with pytest.raises(RecipeError, match="has no attribute 'nope'"):
        load_factory("still.registry:nope")
    with pytest.raises(RecipeError, match="cannot import module"):
        load_factory("no_such_pkg_xyz.mod:fn")


def test_factory_model_is_built_with_data_shapes(tmp_path: Path) -> None:
    d = _raw()
    d["student"]["model"] = {"factory": "still.models.vision:mlp", "params": {"hidden": [4]}}
    rep = validate_recipe(parse_recipe(d), "r")
    assert rep.student_views["logits"] == (4, 10)


def test_yaml_is_read_with_safe_load(tmp_path: Path) -> None:
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        read_yaml(p)


def test_set_overrides_are_yaml_scalars_applied_before_validation(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_raw(terms=[{"loss": "kd", "student": "logits", "teacher": "logits"}])))
    r = load_recipe(p, ["train.lr=0.01", "train.progress=false", "student.model.params.hidden=[4, 4]",
                        "terms.0.weight=0.25", "eval.metrics=[accuracy, top5]", "baseline=true"])
    assert r.train.lr == 0.01 and r.train.progress is False and r.student.model.params["hidden"] == [4, 4]
    assert r.terms[0].weight == 0.25 and r.eval.metrics == ["accuracy", "top5"] and r.baseline is True
    with pytest.raises(RecipeError, match="r.yaml: train.lr: expected a number, got 'fast'"):
        load_recipe(p, ["train.lr=fast"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(p, ["train.lr"])
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(p, ["terms.5.weight=1"])


# ---- deep validation: taps, views, shapes ------------------------------------------------------


def test_missing_tap_lists_close_module_names() -> None:
    d = _raw()
    d["student"]["views"] = {"logits": "", "feat": "hiden.0"}
    d["teacher"]["views"] = {"logits": "", "feat": "hidden.0"}
    d["terms"] = [{"loss": "fitnets", "student": "feat", "teacher": "feat", "adapter": "linear"}]
    msg = _error(d, deep=True)
    assert "student.views.feat: tap 'hiden.0'" in msg and "no module 'hiden.0'" in msg
    assert "Closest:" in msg and "hidden.0" in msg


def test_teacher_tap_error_names_teacher_field() -> None:
    d = _raw()
    d["student"]["views"] = {"logits": "", "feat": "hidden.0"}
    d["teacher"]["views"] = {"logits": "", "feat": "classifer"}
    d["terms"] = [{"loss": "fitnets", "student": "feat", "teacher": "feat", "adapter": "linear"}]
    msg = _error(d, deep=True)
    assert "teacher.views.feat: tap 'classifer'" in msg and "classifier" in msg


def test_view_used_by_a_term_but_not_declared() -> None:
    d = _raw(terms=[{"loss": "fitnets", "student": "feat", "teacher": "logits"}])
    msg = _error(d, deep=True)
    assert "student.views" in msg and "['feat']" in msg and "add e.g." in msg


def test_shape_mismatch_between_compared_views_before_training() -> None:
    d = _raw()
    d["student"]["views"] = {"logits": "", "feat": "hidden.0"}   # (B, 8)
    d["teacher"]["views"] = {"logits": "", "feat": "hidden.0"}   # (B, 32)
    d["terms"] = [{"name": "hint", "loss": "fitnets", "student": "feat", "teacher": "feat"}]
    msg = _error(d, deep=True)
    assert "term 'hint'" in msg and "(4, 8)" in msg and "(4, 32)" in msg and "adapter" in msg
    d["terms"][0]["adapter"] = "linear"  # the fix the message suggests
    rep = validate_recipe(parse_recipe(d), "r")
    assert rep.teacher_views["feat"] == (4, 32) and "hint" in rep.terms


def test_store_teacher_missing_path_is_reported(tmp_path: Path) -> None:
    d = _raw(teacher={"store": str(tmp_path / "nope"), "views": {"logits": "logits"}})
    msg = _error(d, deep=True)
    assert "teacher.store" in msg


def test_teacher_needs_model_or_store() -> None:
    assert "give either model" in _error(_raw(teacher={"views": {"logits": ""}}))


def test_no_teacher_but_terms_need_one() -> None:
    d = _raw()
    del d["teacher"]
    assert "no teacher" in _error(d, deep=True)


# ---- pipeline behaviour ----------------------------------------------------------------------------


def test_teacher_is_trained_once_and_reused_from_cache(tmp_path: Path) -> None:
    from still.pipeline import run_recipe

    d = _raw(baseline=True)
    d["teacher"]["train"] = {"max_steps": 3, "batch_size": 16, "progress": False}
    r = parse_recipe(d)
    s1 = run_recipe(r, out_dir=tmp_path / "a", runs_root=tmp_path, quiet=True, report=False)
    s2 = run_recipe(r, out_dir=tmp_path / "b", runs_root=tmp_path, quiet=True, report=False)
    assert s1["teacher"]["source"].startswith("trained here") and s2["teacher"]["source"].startswith("cached")
    assert s1["teacher"]["accuracy"] == s2["teacher"]["accuracy"]
    caches = [p for p in (tmp_path / ".teachers").iterdir()]
    assert len(caches) == 1 and (caches[0] / "teacher.safetensors").exists()
    # a changed teacher spec is a different cache entry
    d["teacher"]["train"]["lr"] = 0.01
    run_recipe(parse_recipe(d), out_dir=tmp_path / "c", runs_root=tmp_path, quiet=True, report=False)
    assert len(list((tmp_path / ".teachers").iterdir())) == 2
    # same seed, same init and same data order for scratch in both runs
    assert s1["scratch"]["mean"]["accuracy"] == s2["scratch"]["mean"]["accuracy"]


def test_seeds_give_mean_and_std_and_summary_fields(tmp_path: Path) -> None:
    from still.pipeline import run_recipe, summary_rows

    d = _raw(baseline=True, eval={"metrics": ["accuracy", "nll"], "latency_repeats": 3})
    s = run_recipe(parse_recipe(d), out_dir=tmp_path / "r", seeds=[0, 1], runs_root=tmp_path, quiet=True,
                   report=False)
    accs = [s["distilled"]["per_seed"][k]["accuracy"] for k in ("0", "1")]
    assert s["distilled"]["mean"]["accuracy"] == pytest.approx(sum(accs) / 2)
    assert s["distilled"]["std"]["accuracy"] == pytest.approx(float(torch.tensor(accs).std()))
    for v in ("teacher", "scratch", "distilled"):
        row = s[v] if v == "teacher" else s[v]["mean"]
        assert row["parameters"] > 0 and row["latency_s"] > 0 and "nll" in row
    assert s["distilled"]["mean"]["parameters"] == 8 * 64 + 8 + 8 * 10 + 10
    header, rows = summary_rows(s)
    assert header[:3] == ["model", "accuracy", "nll"] and len(rows) == 3 and "±" in rows[2][1]
    assert (tmp_path / "r" / "seed1" / "scratch" / "student.safetensors").exists()
    assert "batch size 1" in s["latency"]


def test_report_has_plots_of_every_term_and_metric(tmp_path: Path) -> None:
    from still.pipeline import run_recipe
    from still.report import write_report

    d = _raw(baseline=True, train={"max_steps": 4, "batch_size": 16, "progress": False, "log_every": 1,
                                   "eval_every": 2})
    run_recipe(parse_recipe(d), out_dir=tmp_path / "r", runs_root=tmp_path, quiet=True)
    plots = {p.name for p in (tmp_path / "r" / "plots").iterdir()}
    assert {"loss_kd.png", "loss_ce.png", "loss_total.png", "eval_accuracy.png"} <= plots
    html = (tmp_path / "r" / "report.html").read_text()
    assert "student (distilled)" in html and "plots/loss_kd.png" in html and "Resolved recipe" in html
    (tmp_path / "r" / "report.html").unlink()
    write_report(tmp_path / "r")
    assert (tmp_path / "r" / "report.html").exists()


def test_warmup_steps_takes_steps_or_a_fraction() -> None:
    from still.pipeline import _config

    for w in (5, 0.1):
        r = parse_recipe(_raw(train={**BASE["train"], "warmup_steps": w}), "recipe.yaml")
        assert _config(r.train, "train", seed=0, progress=False).warmup_steps == w
    with pytest.raises(RecipeError, match="warmup_steps"):
        _config(parse_recipe(_raw(train={**BASE["train"], "warmup_steps": 2.5}), "recipe.yaml").train, "train",
                seed=0, progress=False)
