"""Builders: turn the parts of a validated `Recipe` into data sets, models, teachers and objectives.

Shared by `still.recipes.validate` (cheap checks before training) and `still.pipeline` (the run).
Every error is a `RecipeError` naming the recipe field it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from still.recipes.schema import DataSpec, ModelSpec, Recipe, RecipeError, TeacherSpec, load_factory


def build_dataset(spec: DataSpec, split: str, where: str = "data") -> Any:
    """`DATASETS.build(name, split=split, **params)`, or `factory(split=split, **params)`."""
    from still.registry import DATASETS

    try:
        if spec.factory:
            return load_factory(spec.factory, f"{where}.factory")(split=split, **spec.params)
        return DATASETS.build(spec.name, split=split, **spec.params)
    except RecipeError:
        raise
    except TypeError as exc:
        raise RecipeError(f"{where}.params: {exc}") from None
    except (FileNotFoundError, ImportError, OSError) as exc:
        raise RecipeError(f"{where}: cannot load data set {spec.name or spec.factory!r}: {exc}") from None


def _data_params(fn: Callable[..., Any], params: dict[str, Any], data: Any) -> dict[str, Any]:
    """`params` plus the data set's `num_classes` / `input_shape` where `fn` takes them and they are unset."""
    import inspect

    try:
        sig = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return params
    out = dict(params)
    for key in ("num_classes", "input_shape"):
        if key in sig and key not in out and data is not None and getattr(data, key, None) is not None:
            out[key] = getattr(data, key)
    return out


def build_model(spec: ModelSpec, where: str, data: Any = None) -> nn.Module:
    """A model from a MODELS name, a `factory`, or a local HF directory (`hf: PATH`, never downloads).

    The data set's `num_classes` and `input_shape` are passed to a factory that takes them,
    unless the recipe sets them.
    """
    from still.registry import MODELS

    try:
        if spec.factory:
            fn = load_factory(spec.factory, f"{where}.factory")
            model = fn(**_data_params(fn, spec.params, data))
        elif spec.hf:
            import transformers  # heavy: only when a recipe asks for it

            params = dict(spec.params)
            auto = getattr(transformers, params.pop("auto_class", "AutoModel"))
            model = auto.from_pretrained(spec.hf, local_files_only=True, **params)
        else:
            model = MODELS.build(spec.name, **_data_params(MODELS.get(spec.name), spec.params, data))
    except RecipeError:
        raise
    except TypeError as exc:
        raise RecipeError(f"{where}.params: {exc}") from None
    if not isinstance(model, nn.Module):
        raise RecipeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    return model


def load_weights(model: nn.Module, path: str | Path, where: str) -> None:
    """Load a safetensors state dict into `model` (strict); other formats are refused."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix != ".safetensors":
        raise RecipeError(f"{where}: {p} is not a .safetensors file (only safetensors weights are loaded)")
    if not p.exists():
        raise RecipeError(f"{where}: no such file {p}")
    state = load_file(str(p))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RecipeError(f"{where}: {p} does not fit the model: {str(exc).splitlines()[0]}") from None


@dataclass
class ObjectiveParts:
    """What a recipe's method + terms contribute: the objective and the view maps it needs."""

    objective: Any
    student_views: dict[str, str]
    teacher_views: dict[str, str]
    wrap_teacher: Callable[..., Any] | None = None
    #: the method's once-before-training hook `(teacher, student, train_data) -> None`, if any
    prepare: Callable[..., Any] | None = None
    method_name: str = ""
    sources: dict[str, str] = field(default_factory=dict)  # "student.logits" -> field it came from


def build_objective(recipe: Recipe, method: str | None = None, method_params: dict | None = None) -> ObjectiveParts:
    """The objective of `recipe` (method preset + extra terms); `method="scratch"` for the baseline.

    View maps: the method's default taps, overridden by `student.views` / `teacher.views`.
    """
    from still.methods.base import build_method
    from still.objective import Objective, build_term
    from still.registry import UnknownNameError

    terms: list[Any] = []
    s_views: dict[str, str] = {}
    t_views: dict[str, str] = {}
    sources: dict[str, str] = {}
    wrap = prepare = None
    name = method or (recipe.method.name if recipe.method else "")
    if name:
        params = method_params if method is not None else (recipe.method.params if recipe.method else {})
        try:
            spec = build_method(name, **(params or {}))
        except UnknownNameError as exc:
            raise RecipeError(f"method.name: {exc}") from None
        except TypeError as exc:
            raise RecipeError(f"method.params: {exc}") from None
        terms += spec.build_terms()
        for k, v in spec.student_views.items():
            s_views[k], sources[f"student.{k}"] = v, f"method {name!r} (default tap)"
        for k, v in spec.teacher_views.items():
            t_views[k], sources[f"teacher.{k}"] = v, f"method {name!r} (default tap)"
        wrap = spec.wrap_teacher
        prepare = getattr(spec, "prepare", None)
    if method is None:  # extra terms belong to the distilled run only
        for i, t in enumerate(recipe.terms):
            try:
                terms.append(build_term(t.as_dict()))
            except UnknownNameError as exc:
                raise RecipeError(f"terms[{i}]: {exc}") from None
            except (TypeError, ValueError, KeyError) as exc:
                raise RecipeError(f"terms[{i}]: {exc}") from None
    for k, v in recipe.student.views.items():
        s_views[k], sources[f"student.{k}"] = v, f"student.views.{k}"
    if recipe.teacher is not None:
        for k, v in recipe.teacher.views.items():
            t_views[k], sources[f"teacher.{k}"] = v, f"teacher.views.{k}"
    try:
        objective = Objective(terms)
    except ValueError as exc:
        raise RecipeError(f"terms: {exc}") from None
    need_s = objective.student_views()
    missing = [v for v in need_s if v not in s_views]
    if missing:
        raise RecipeError(
            f"student.views: the objective's terms use student view(s) {missing}, but student.views gives "
            f"{sorted(s_views) or 'none'}; add e.g. `student: {{views: {{{missing[0]}: <module path>}}}}`"
        )
    return ObjectiveParts(objective, {k: s_views[k] for k in need_s} or {"logits": s_views.get("logits", "")},
                          t_views, wrap, prepare, name, sources)


def build_live_teacher(model: nn.Module, spec: TeacherSpec, views: dict[str, str]) -> Any:
    """A `LiveTeacher` serving `views` (unknown taps raise RecipeError naming `teacher.views.<name>`)."""
    from still.taps import TapError
    from still.teachers.base import LiveTeacher

    try:
        return LiveTeacher(model, views, inputs=spec.inputs)
    except TapError as exc:
        raise RecipeError(f"teacher.views: {exc}") from None


def build_store_teacher(recipe: Recipe, train_data: Any = None) -> Any:
    """The recorded-store teacher of `teacher: {store: PATH}`, checked against the recipe's data.

    Uses `still.teachers.cache_cmd.open_store_for_recipe`, which refuses a store recorded from other data
    (the training set's fingerprint) or another data/preprocessing section.
    """
    assert recipe.teacher is not None and recipe.teacher.store is not None
    path = recipe.teacher.store
    if not Path(path).exists():
        raise RecipeError(f"teacher.store: no store at {path}; record one with `still cache RECIPE --out {path}`")
    try:
        from still.teachers.cache_cmd import open_store_for_recipe
        from still.teachers.store_format import StoreError
    except ImportError as exc:
        raise RecipeError(f"teacher.store: the store teacher is not available in this install ({exc})") from None
    try:
        return open_store_for_recipe(recipe, train_data)
    except (StoreError, ValueError, OSError, KeyError) as exc:
        raise RecipeError(f"teacher.store: {path}: {exc}") from None


def seeded_model(spec: ModelSpec, where: str, seed: int, data: Any = None) -> nn.Module:
    """Build a model with torch's RNG seeded, so a seed gives the same initial weights every time."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build_model(spec, where, data)
    finally:
        torch.random.set_rng_state(state)


__all__ = ["build_dataset", "build_model", "load_weights", "build_objective", "ObjectiveParts",
           "build_live_teacher", "build_store_teacher", "seeded_model"]
