"""Taps: capture intermediate tensors of any `nn.Module` by module path, with forward hooks.

A tap is written as a string::

    ""                      the model's own output
    "layer3.1.conv2"        the output of that submodule
    "encoder.layer.5[0]"    item 0 of the submodule's output (tuple/list)
    "[last_hidden_state]"   key of the root output (dict / HF ModelOutput)
    "fc@input"              the first positional input of `fc`
    "fc@input[1]"           its second positional input

Names are resolved on the *unwrapped* model, so a path stays the same under DDP (`module.`) or
`torch.compile` (`_orig_mod.`). No model is edited; hooks are removed on exit, also on exceptions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from still.registry import close_matches

_TAP_RE = re.compile(r"^(?P<path>[^@\[\]]*)(?P<input>@input)?(?P<keys>(\[[^\[\]]+\])*)$")


class TapError(KeyError):
    """A tap that names no module, or a key its output does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class TapSpec:
    """Where a view comes from: module `path`, its input or output, then a chain of keys."""

    path: str = ""
    keys: tuple[str | int, ...] = ()
    input: bool = False

    @classmethod
    def parse(cls, text: str | TapSpec) -> TapSpec:
        if isinstance(text, TapSpec):
            return text
        if cls is TapSpec and type(text) is str:  # the hot path parses the same few strings every step
            return _parse_cached(text)
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: str) -> TapSpec:
        m = _TAP_RE.match(text.strip())
        if not m:
            raise TapError(f"cannot parse tap {text!r}; expected 'path.to.module[key]' or 'path@input[0]'")
        keys = tuple(_key(k) for k in re.findall(r"\[([^\[\]]+)\]", m.group("keys")))
        return cls(m.group("path"), keys, bool(m.group("input")))

    def __str__(self) -> str:
        return self.path + ("@input" if self.input else "") + "".join(f"[{k}]" for k in self.keys)


@lru_cache(maxsize=1024)
def _parse_cached(text: str) -> TapSpec:
    return TapSpec._parse(text)


def _key(k: str) -> str | int:
    k = k.strip().strip("'\"")
    return int(k) if re.fullmatch(r"-?\d+", k) else k


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP/FSDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in {"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"}:
            model = model.module
        else:
            break
    return model


def module_names(model: nn.Module) -> list[str]:
    """Every tappable module path of the unwrapped model ("" is the root)."""
    return [n for n, _ in unwrap_model(model).named_modules()]


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at `path`, or a TapError listing the closest existing names."""
    model = unwrap_model(model)
    for prefix in ("module.", "_orig_mod."):
        if path.startswith(prefix) and path not in dict(model.named_modules()):
            path = path[len(prefix) :]
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    near = close_matches(path, [n for n in modules if n])
    hint = f" Closest: {', '.join(near)}." if near else ""
    raise TapError(f"no module {path!r} in {type(model).__name__}.{hint} ({len(modules)} modules in all)")


def select(value: Any, keys: tuple[str | int, ...], where: str = "") -> Any:
    """Follow `keys` into nested outputs (tuple, list, dict, HF ModelOutput, attribute)."""
    for k in keys:
        try:
            if isinstance(value, Mapping) or hasattr(value, "keys") and isinstance(k, str):
                value = value[k]
            elif isinstance(k, int) and isinstance(value, (tuple, list)):
                value = value[k]
            elif isinstance(k, str) and hasattr(value, k):
                value = getattr(value, k)
            else:
                value = value[k]
        except (KeyError, IndexError, TypeError, AttributeError):
            avail = list(value.keys()) if hasattr(value, "keys") else (
                f"indices 0..{len(value) - 1}" if isinstance(value, (tuple, list)) else type(value).__name__
            )
            raise TapError(f"tap {where!r}: output has no key {k!r}; it has {avail}") from None
    return value


class Taps:
    """Context manager that records the named views of `model` during its forward passes.

    >>> with Taps(model, {"feat": "layer3", "logits": ""}) as taps:
    ...     out = model(x)
    >>> taps.views["feat"].shape      # (B, C, H, W)

    `detach=True` stores detached tensors (for teachers). Views are refreshed on every forward;
    `clear()` empties them. Root taps ("" path) are taken from the model's return value.
    """

    def __init__(self, model: nn.Module, views: Mapping[str, str | TapSpec], detach: bool = False) -> None:
        self.model = unwrap_model(model)
        self.specs = {name: TapSpec.parse(spec) for name, spec in views.items()}
        self.detach = detach
        self.views: dict[str, Any] = {}
        self._handles: list[Any] = []
        # Resolve eagerly: an unknown path is an error before any compute.
        self._modules = {name: resolve_module(self.model, s.path) for name, s in self.specs.items()}

    def _store(self, name: str, value: Any) -> None:
        spec = self.specs[name]
        v = select(value, spec.keys, str(spec))
        if self.detach and isinstance(v, torch.Tensor):
            v = v.detach()
        self.views[name] = v

    def __enter__(self) -> Taps:
        for name, spec in self.specs.items():
            mod = self._modules[name]
            if spec.input:
                def pre_hook(m: nn.Module, args: tuple, kwargs: dict, _n: str = name) -> None:
                    inputs = args if args else tuple(kwargs.values())
                    # "fc@input" is the first positional input; "fc@input[i]..." indexes the inputs.
                    self._store(_n, inputs if self.specs[_n].keys or not inputs else inputs[0])

                self._handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def hook(m: nn.Module, args: tuple, output: Any, _n: str = name) -> None:
                    self._store(_n, output)

                self._handles.append(mod.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.views = {}

    def missing(self) -> list[str]:
        """Views that the last forward did not produce (a module that never ran)."""
        return [n for n in self.specs if n not in self.views]

    def __iter__(self) -> Iterator[str]:
        return iter(self.views)


def call_model(model: nn.Module, batch: Mapping[str, Any] | torch.Tensor, inputs: Any = None) -> Any:
    """Call `model` on a batch.

    `inputs` picks what is passed: a list of batch keys (positional), a dict `{kwarg: batch_key}`,
    or None for the default: `batch["x"]` if present, else the HF keys the batch holds
    (`input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`, `labels` is never passed).
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if inputs is None:
        if "x" in batch:
            return model(batch["x"])
        hf = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "position_ids")
        return model(**{k: batch[k] for k in hf if k in batch})
    if isinstance(inputs, str):
        return model(batch[inputs])
    if isinstance(inputs, Mapping):
        return model(**{k: batch[v] for k, v in inputs.items()})
    return model(*[batch[k] for k in inputs])


def forward_with_views(
    model: nn.Module,
    batch: Mapping[str, Any] | torch.Tensor,
    views: Mapping[str, str | TapSpec],
    inputs: Any = None,
    detach: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Run `model` on `batch` and return `(output, {view_name: tensor})`."""
    specs = {n: TapSpec.parse(s) for n, s in views.items()}
    if len(specs) == 1:  # one view, the common case on the hot path
        (n, s), = specs.items()
        if not (s.path or s.input or s.keys):  # the model's own output: no hooks, no keys
            out = call_model(model, batch, inputs)
            return out, {n: out.detach() if detach and isinstance(out, torch.Tensor) else out}
    hooked = {n: s for n, s in specs.items() if s.path or s.input}
    if hooked:
        with Taps(model, hooked, detach=detach) as taps:
            out = call_model(model, batch, inputs)
        result = dict(taps.views)
    else:  # only root views: no hooks to install (the common logit-KD case, on the hot path)
        out = call_model(model, batch, inputs)
        result = {}
    for n, s in specs.items():
        if not (s.path or s.input):
            v = select(out, s.keys, str(s))
            result[n] = v.detach() if detach and isinstance(v, torch.Tensor) else v
    missing = [n for n in specs if n not in result]
    if missing:
        raise TapError(
            f"views {missing} were not produced: their modules "
            f"({', '.join(str(specs[n]) for n in missing)}) did not run in forward"
        )
    return out, result
