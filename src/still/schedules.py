"""Weight schedules: `schedule(step, total_steps) -> float`, registered by name.

A term's effective weight at a step is `weight * schedule(step, total_steps)`. `step` counts
optimizer steps from 0; `total_steps` is the run's planned number of steps.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

from still.registry import register_schedule


class Schedule(Protocol):
    def __call__(self, step: int, total_steps: int) -> float: ...


def _frac(step: int, total: int, start: int = 0, end: int | None = None) -> float:
    end = total if end is None else end
    if end <= start:
        return 1.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


@register_schedule("constant")
class Constant:
    """Always `value`."""

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def __call__(self, step: int, total_steps: int) -> float:
        return self.value


@register_schedule("linear")
class Linear:
    """Linear from `start` to `end` between steps `begin` and `until` (default: the whole run)."""

    def __init__(self, start: float = 1.0, end: float = 0.0, begin: int = 0, until: int | None = None) -> None:
        self.start, self.end, self.begin, self.until = start, end, begin, until

    def __call__(self, step: int, total_steps: int) -> float:
        f = _frac(step, total_steps, self.begin, self.until)
        return self.start + (self.end - self.start) * f


@register_schedule("cosine")
class Cosine:
    """Half-cosine from `start` to `end` between steps `begin` and `until` (default: the whole run)."""

    def __init__(self, start: float = 1.0, end: float = 0.0, begin: int = 0, until: int | None = None) -> None:
        self.start, self.end, self.begin, self.until = start, end, begin, until

    def __call__(self, step: int, total_steps: int) -> float:
        f = _frac(step, total_steps, self.begin, self.until)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * f))


@register_schedule("step")
class Step:
    """`value * gamma**k` after the k-th milestone (steps, or fractions of the run if all ≤ 1)."""

    def __init__(self, milestones: Sequence[float] = (0.5,), gamma: float = 0.1, value: float = 1.0) -> None:
        self.milestones, self.gamma, self.value = sorted(milestones), gamma, value

    def __call__(self, step: int, total_steps: int) -> float:
        frac = all(0 < m <= 1 for m in self.milestones) and any(m < 1 for m in self.milestones)
        ms = [m * total_steps if frac else m for m in self.milestones]
        return self.value * self.gamma ** sum(step >= m for m in ms)


@register_schedule("warmup")
class Warmup:
    """Linear warm-up from 0 to `value` over `steps` (or a fraction of the run if < 1), then `value`."""

    def __init__(self, steps: float = 0.1, value: float = 1.0) -> None:
        self.steps, self.value = steps, value

    def __call__(self, step: int, total_steps: int) -> float:
        n = self.steps * total_steps if 0 < self.steps < 1 else self.steps
        return self.value if n <= 0 else self.value * min(step / n, 1.0)


def build_schedule(spec: str | dict | Schedule | None) -> Schedule | None:
    """A schedule from a name, `{"name": ..., **params}`, an instance, or None."""
    from still.registry import SCHEDULES

    if spec is None or callable(spec) and not isinstance(spec, (str, dict)):
        return spec  # type: ignore[return-value]
    if isinstance(spec, str):
        return SCHEDULES.build(spec)
    params = dict(spec)
    return SCHEDULES.build(params.pop("name"), **params)
