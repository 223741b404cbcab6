"""Decorator registries: every pluggable component of still is found by name.

>>> from still.registry import LOSSES
>>> @LOSSES.register("my_mse", paper="", defaults={"reduction": "mean"})
... def my_mse(student, teacher, reduction="mean"): ...

A registered object is either a function (called as-is with its parameters) or a class
(instantiated with its parameters). `Registry.build(name, **params)` returns a ready callable:
for a function, a `functools.partial`; for a class, an instance.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


class UnknownNameError(KeyError):
    """A name that no registry entry has; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0])


def close_matches(name: str, choices: list[str], n: int = 5) -> list[str]:
    """The `n` names in `choices` closest to `name` (substring matches first)."""
    sub = [c for c in choices if name and (name in c or c in name)]
    fuzzy = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    out: list[str] = []
    for c in sub + fuzzy:
        if c not in out:
            out.append(c)
    return out[:n]


@dataclass
class Entry:
    """One registered component."""

    name: str
    obj: Callable[..., Any]
    description: str
    paper: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_class(self) -> bool:
        return inspect.isclass(self.obj)

    def parameters(self) -> dict[str, inspect.Parameter]:
        target = self.obj.__init__ if self.is_class else self.obj
        params = dict(inspect.signature(target).parameters)
        params.pop("self", None)
        return params


class Registry:
    """A name → component table for one kind of component (loss, method, adapter, ...)."""

    def __init__(self, kind: str, factory: bool = False) -> None:
        self.kind = kind
        #: entries are factories: `build` calls a registered function (datasets, models, methods)
        #: instead of partially applying it (losses, metrics)
        self.factory = factory
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str | None = None,
        *,
        description: str | None = None,
        paper: str = "",
        defaults: dict[str, Any] | None = None,
        **meta: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that registers a function or class under `name` (default: its `__name__`)."""

        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            key = name or obj.__name__
            if key in self._entries and self._entries[key].obj is not obj:
                prev = self._entries[key].obj
                # Re-importing the same module (e.g. under pytest) re-registers the same qualified name.
                if (getattr(prev, "__module__", None), getattr(prev, "__qualname__", None)) != (
                    obj.__module__,
                    obj.__qualname__,
                ):
                    raise ValueError(
                        f"{self.kind} {key!r} is already registered by {prev.__module__}.{prev.__qualname__}; "
                        f"{obj.__module__}.{obj.__qualname__} needs another name"
                    )
            doc = description or (inspect.getdoc(obj) or "").strip().splitlines()
            desc = doc if isinstance(doc, str) else (doc[0] if doc else "")
            self._entries[key] = Entry(key, obj, desc, paper, dict(defaults or {}), meta)
            return obj

        return deco

    def entry(self, name: str) -> Entry:
        _ensure_loaded()
        if name not in self._entries:
            near = close_matches(name, sorted(self._entries))
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries)) or 'none'})"
            )
        return self._entries[name]

    def get(self, name: str) -> Callable[..., Any]:
        return self.entry(name).obj

    def build(self, name: str, **params: Any) -> Any:
        """A ready component: a class is instantiated; a function is called (factory registries:
        datasets, models, methods, teachers) or partially applied (losses, metrics)."""
        e = self.entry(name)
        kwargs = {**e.defaults, **params}
        allowed = e.parameters()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in allowed.values())
        unknown = [k for k in kwargs if k not in allowed and not takes_any]
        if unknown:
            names = [k for k, p in allowed.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            raise TypeError(
                f"{self.kind} {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(names) or 'nothing'}"
            )
        if e.is_class or self.factory:
            built = e.obj(**kwargs)
        else:
            built = functools.partial(e.obj, **kwargs) if kwargs else e.obj
        try:
            built.registry_name = name  # lets callers find the entry's metadata (e.g. shape_check)
        except (AttributeError, TypeError):
            pass
        return built

    def names(self) -> list[str]:
        _ensure_loaded()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        _ensure_loaded()
        return iter([self._entries[k] for k in sorted(self._entries)])

    def __contains__(self, name: object) -> bool:
        _ensure_loaded()
        return name in self._entries

    def __len__(self) -> int:
        _ensure_loaded()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


LOSSES = Registry("loss")
METHODS = Registry("method", factory=True)
ADAPTERS = Registry("adapter")
SCHEDULES = Registry("schedule")
DATASETS = Registry("dataset", factory=True)
MODELS = Registry("model", factory=True)
TEACHERS = Registry("teacher", factory=True)
METRICS = Registry("metric")

REGISTRIES: dict[str, Registry] = {
    "losses": LOSSES,
    "methods": METHODS,
    "adapters": ADAPTERS,
    "schedules": SCHEDULES,
    "datasets": DATASETS,
    "models": MODELS,
    "teachers": TEACHERS,
    "metrics": METRICS,
}

register_loss = LOSSES.register
register_method = METHODS.register
register_adapter = ADAPTERS.register
register_schedule = SCHEDULES.register
register_dataset = DATASETS.register
register_model = MODELS.register
register_teacher = TEACHERS.register
register_metric = METRICS.register

# Packages whose every module is imported (once) before a registry is read, so that a new file
# registers itself by being there: nobody edits an __init__ to add a component.
_PLUGIN_PACKAGES = (
    "still.losses",
    "still.methods",
    "still.teachers",
    "still.data",
    "still.models",
    "still.metrics",
    "still.adapters",
    "still.schedules",
)
_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        _import_plugins()
    except BaseException:
        _loaded = False  # a broken plugin fails every registry read, not just the first one
        raise


def _import_plugins() -> None:
    import importlib
    import pkgutil

    for pkg_name in _PLUGIN_PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except ModuleNotFoundError as exc:
            if exc.name == pkg_name:
                continue
            raise
        for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), prefix=pkg_name + "."):
            if info.name.rsplit(".", 1)[-1].startswith("_"):
                continue
            importlib.import_module(info.name)
