"""The recipe format: pydantic v2 models (unknown keys are errors) and a readable error report.

A recipe is YAML (read with `yaml.safe_load` only)::

    name: fashion_mnist_kd
    data:    {name: fashion_mnist, params: {train_subset: 20000}}
    teacher: {model: {name: fmnist_cnn}, train: {epochs: 3}, views: {logits: ""}}
    student: {model: {name: mlp, params: {hidden: [128]}}, views: {logits: ""}}
    method:  {name: kd, params: {temperature: 4.0, alpha: 0.9}}
    train:   {epochs: 3, batch_size: 128, lr: 0.001}
    eval:    {metrics: [accuracy]}
    baseline: true

`load_recipe(path, overrides=["train.lr=0.01"])` reads, overrides, validates and checks every
registered name; a problem raises `RecipeError` whose message names the file, the field path and
what is allowed (`recipe.yaml: train.lr: expected a number, got 'fast'`). The deeper checks that
need the models (taps, views, shapes) live in `still.recipes.validate`.
"""

from __future__ import annotations

import importlib
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class RecipeError(ValueError):
    """A recipe problem; the message names the file, the field path and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentSpec(_Strict):
    """A registered component by `name` (+ `params`), or user code via `factory: "pkg.mod:fn"`."""

    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    factory: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ComponentSpec":
        sources = [k for k in ("name", "factory", "hf") if getattr(self, k, None)]
        if len(sources) != 1:
            allowed = [k for k in ("name", "factory", "hf") if k in type(self).model_fields]
            raise ValueError(f"give exactly one of {', '.join(allowed)} (got {', '.join(sources) or 'none'})")
        if self.factory is not None and not _FACTORY_RE.match(self.factory):
            raise ValueError(f"factory {self.factory!r} must look like 'package.module:function'")
        return self


class DataSpec(ComponentSpec):
    """A DATASETS name (built as `DATASETS.build(name, split=..., **params)`) or a factory."""


class ModelSpec(ComponentSpec):
    """A MODELS name, a factory `"pkg.mod:fn"` (called with `**params`), or `hf: PATH` (a local HF model dir)."""

    hf: str | None = None


class TrainSpec(_Strict):
    """The fields of `still.engine.TrainConfig`; only the ones given are passed on."""

    epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, gt=0)
    lr: float | None = Field(default=None, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    betas: tuple[float, float] | None = None
    lr_schedule: Literal["constant", "linear", "cosine", "step"] | None = None
    warmup_steps: int | float | None = None  # steps, or a fraction of the run when < 1
    lr_milestones: list[float] | None = None
    lr_gamma: float | None = None
    grad_accum: int | None = Field(default=None, gt=0)
    clip_grad_norm: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    eval_every: int | None = None
    eval_every_epochs: int | None = None
    log_every: int | None = None
    checkpoint_every: int | None = None
    seed: int | None = None
    num_workers: int | None = None
    best_metric: str | None = None
    best_mode: Literal["max", "min"] | None = None
    tensorboard: bool | None = None
    mlflow: bool | None = None
    progress: bool | None = None
    find_unused_parameters: bool | None = None

    def given(self) -> dict[str, Any]:
        """The fields the recipe set (None means 'engine default')."""
        out = {k: v for k, v in self.model_dump().items() if v is not None}
        if "lr_milestones" in out:
            out["lr_milestones"] = tuple(out["lr_milestones"])
        return out


class TeacherSpec(_Strict):
    """A model (+ optional safetensors `weights`, + optional CE `train`ing first), or a recorded `store`."""

    model: ModelSpec | None = None
    weights: str | None = None
    train: TrainSpec | None = None
    views: dict[str, str] = Field(default_factory=dict)
    store: str | None = None
    inputs: str | list[str] | dict[str, str] | None = None

    @model_validator(mode="after")
    def _model_or_store(self) -> "TeacherSpec":
        if (self.model is None) == (self.store is None):
            raise ValueError("give either model (a live teacher) or store (a recorded teacher-signal store)")
        if self.store is not None and (self.weights or self.train):
            raise ValueError("a store teacher takes no weights or train section")
        return self


class StudentSpec(_Strict):
    """The student model, its view taps, optional starting `weights` and how it is called."""

    model: ModelSpec
    views: dict[str, str] = Field(default_factory=dict)
    weights: str | None = None
    inputs: str | list[str] | dict[str, str] | None = None
    train_subset: int | None = Field(default=None, gt=0, description=(
        "train the students (scratch and distilled alike) on this many samples of the training split, a fixed "
        "seeded subset; the teacher still trains on all of it (the small-transfer-set setting)"))


class MethodRef(_Strict):
    """A METHODS preset by name."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TermSpec(_Strict):
    """One extra term, as in `still.objective.build_term`."""

    loss: str
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    student: str | list[str] | None = None
    teacher: str | list[str] | None = None
    target: str | None = None
    inputs: dict[str, str] = Field(default_factory=dict)
    weight: float = 1.0
    schedule: str | dict[str, Any] | None = None
    adapter: str | dict[str, Any] | None = None
    shape_check: Literal["same", "batch", "none"] | None = None

    @model_validator(mode="after")
    def _teacher_or_target(self) -> "TermSpec":
        if self.teacher is not None and self.target is not None:
            raise ValueError("give either teacher (a teacher view) or target (a batch key), not both")
        return self

    def as_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if not d.get("inputs"):
            d.pop("inputs", None)
        if not d.get("params"):
            d.pop("params", None)
        return d


class EvalSpec(_Strict):
    """Evaluation on the test split: METRICS names, batch size, latency measurement."""

    metrics: list[str] = Field(default_factory=lambda: ["accuracy"])
    batch_size: int = Field(default=512, gt=0)
    split: str = "test"
    latency: bool = True
    latency_repeats: int = Field(default=50, gt=0)


class Recipe(_Strict):
    """A whole run: data, teacher, student, method + extra terms, training budget, evaluation."""

    name: str = Field(pattern=r"^[\w.-]+$")
    description: str = ""
    seed: int = 0
    data: DataSpec
    teacher: TeacherSpec | None = None
    student: StudentSpec
    method: MethodRef | None = None
    terms: list[TermSpec] = Field(default_factory=list)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    baseline: bool = False

    @model_validator(mode="after")
    def _has_objective(self) -> "Recipe":
        if self.method is None and not self.terms:
            raise ValueError("give a method or at least one term (the objective would be empty)")
        return self


# --------------------------------------------------------------------------------------------
# Readable errors
# --------------------------------------------------------------------------------------------

_TYPE_WORDS = {
    "float": "a number", "int": "an integer", "bool": "true or false", "string": "a string",
    "str": "a string", "dict": "a mapping", "list": "a list", "model": "a mapping",
}


def _path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_classes(tp: Any) -> list[type[BaseModel]]:
    """The BaseModel classes inside an annotation (Optional, Union, list[...], dict[..., ...])."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    out: list[type[BaseModel]] = []
    if typing.get_origin(tp) in (Union, types.UnionType, list, dict, tuple):
        for a in typing.get_args(tp):
            out += _model_classes(a)
    return out


def _model_at(root: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class whose field `loc[-1]` is (used to list the allowed keys)."""
    cls: type[BaseModel] | None = root
    for part in loc[:-1]:
        if cls is None:
            return None
        if isinstance(part, int):
            continue
        if part not in cls.model_fields:
            return None
        found = _model_classes(cls.model_fields[part].annotation)
        cls = found[0] if found else None
    return cls


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _describe(err: Mapping[str, Any], root: type[BaseModel]) -> str:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("function-after",)))]
    kind = err["type"]
    where = _path(loc)
    if kind == "extra_forbidden":
        cls = _model_at(root, loc)
        allowed = ", ".join(cls.model_fields) if cls else "?"
        from still.registry import close_matches

        near = close_matches(str(loc[-1]), list(cls.model_fields)) if cls else []
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"{where}: unknown key{hint}; allowed: {allowed}"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{where}: expected one of {expected}, got {_short(err.get('input'))}"
    m = re.match(r"^(float|int|bool|string|str|dict|list|model)_(type|parsing|from_float)", kind)
    if m:
        words = _TYPE_WORDS[m.group(1)]
        extra = " (a whole number)" if kind == "int_from_float" else ""
        return f"{where}: expected {words}{extra}, got {_short(err.get('input'))}"
    if kind == "value_error":
        return f"{where}: {str(err.get('msg', '')).removeprefix('Value error, ')}"
    return f"{where}: {err.get('msg', kind)} (got {_short(err.get('input'))})"


def format_validation_error(exc: ValidationError, source: str = "recipe", root: type[BaseModel] = None) -> str:
    """One readable message: `source: field.path: what is wrong; what is allowed`, one line per problem.

    Union fields produce one pydantic error per alternative; we keep the most specific one per path.
    """
    root = root or Recipe
    lines: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        text = _describe(err, root)
        key = text.split(":", 1)[0]
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"{source}: {text}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reading, overriding, validating
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"train.lr=0.01"` → (["train", "lr"], 0.01); the value is parsed as a YAML scalar/flow value."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY.PATH=VALUE (e.g. train.lr=0.01)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `--set a.b=value` overrides to the raw recipe dict (before validation); returns it.

    A numeric path part indexes a list (`terms.0.weight=0.5`); missing mappings are created.
    """
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {text!r}: {here} is not an index of a list of {len(node)}")
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(parts[:i])} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"--set {text!r}: {last!r} is not an index of a list of {len(node)}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"--set {text!r}: {'.'.join(parts[:-1])} is not a mapping")
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The raw recipe mapping from a YAML file (safe_load only)."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"{p}: no such recipe file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a mapping at the top level, got {type(data).__name__}")
    return data


def parse_recipe(data: Mapping[str, Any], source: str = "recipe", check_names: bool = True) -> Recipe:
    """Validate a raw mapping into a `Recipe` (and check registered names); raises RecipeError."""
    try:
        recipe = Recipe.model_validate(dict(data))
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None
    if check_names:
        check_registered_names(recipe, source)
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = (), check_names: bool = True) -> Recipe:
    """Read `path`, apply `--set` overrides, validate, check registered names."""
    data = apply_overrides(read_yaml(path), overrides)
    return parse_recipe(data, source=Path(path).name, check_names=check_names)


def _check(source: str, where: str, registry: Any, name: str, problems: list[str]) -> None:
    from still.registry import UnknownNameError

    try:
        registry.entry(name)
    except UnknownNameError as exc:
        problems.append(f"{source}: {where}: {exc}")


def check_registered_names(recipe: Recipe, source: str = "recipe") -> None:
    """Every registered name the recipe uses exists; else RecipeError with the closest names."""
    from still.registry import ADAPTERS, DATASETS, LOSSES, METHODS, METRICS, MODELS, SCHEDULES

    problems: list[str] = []
    if recipe.data.name:
        _check(source, "data.name", DATASETS, recipe.data.name, problems)
    for side in ("teacher", "student"):
        spec = getattr(recipe, side)
        if spec is not None and spec.model is not None and spec.model.name:
            _check(source, f"{side}.model.name", MODELS, spec.model.name, problems)
    if recipe.method is not None:
        _check(source, "method.name", METHODS, recipe.method.name, problems)
    for i, t in enumerate(recipe.terms):
        _check(source, f"terms[{i}].loss", LOSSES, t.loss, problems)
        for key, reg in (("schedule", SCHEDULES), ("adapter", ADAPTERS)):
            val = getattr(t, key)
            name = val if isinstance(val, str) else (val or {}).get("name") if isinstance(val, dict) else None
            if isinstance(val, dict) and "name" not in val:
                problems.append(f"{source}: terms[{i}].{key}: a mapping needs a 'name'")
            elif name:
                _check(source, f"terms[{i}].{key}", reg, name, problems)
    for i, m in enumerate(recipe.eval.metrics):
        _check(source, f"eval.metrics[{i}]", METRICS, m, problems)
    if problems:
        raise RecipeError("\n".join(problems))


def load_factory(spec: str, where: str = "factory") -> Callable[..., Any]:
    """The callable named by `"package.module:attr"` (importlib + getattr; never eval)."""
    if not _FACTORY_RE.match(spec):
        raise RecipeError(f"{where}: {spec!r} must look like 'package.module:function'")
    mod_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise RecipeError(f"{where}: cannot import module {mod_name!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{where}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"{where}: {spec!r} is not callable")
    return obj


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (defaults filled in, None fields of train sections dropped)."""
    data = recipe.model_dump(mode="json")
    data["train"] = recipe.train.given()
    if recipe.teacher is not None and recipe.teacher.train is not None:
        data["teacher"]["train"] = recipe.teacher.train.given()
    return yaml.safe_dump(data, sort_keys=False)


__all__ = [
    "Recipe", "RecipeError", "DataSpec", "ModelSpec", "TeacherSpec", "StudentSpec", "MethodRef", "TermSpec",
    "TrainSpec", "EvalSpec", "load_recipe", "parse_recipe", "read_yaml", "apply_overrides", "parse_override",
    "check_registered_names", "load_factory", "format_validation_error", "recipe_to_yaml",
]
