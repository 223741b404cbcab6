"""Multi-exit self-distillation (MoSE / ModularStarEncoder, Gurioli et al., AAAI 2026).

MoSE trains exit heads at layers ι (e.g. {4, 9, 18, 27, 36} of 36) with

    L = Σ_{i∈ι} α_i·L_i,   α_i = i / L   (deeper exits weigh more)

where L_i is the task loss at exit i. "Self-distillation" in the paper is the deep exits' signal
regularising shallow layers through shared parameters; it has no explicit divergence. still also
offers the explicit deep→shallow form, each exit distilled from the (detached) last exit with the
same α_i weights: Σ_{i∈ι, i<L} α_i·T²·KL(softmax(z_L/T) ‖ softmax(z_i/T)). The teacher side is the
student itself (`still.teachers.self_teacher.SelfTeacher`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from still.registry import register_loss


def exit_weights(n_exits: int, layers: Sequence[int] | None = None, depth: int | None = None,
                 normalize: bool = False) -> list[float]:
    """α_i = layer_i / depth for each exit (MoSE). Without `layers`, exits are taken as evenly
    spaced (α = (j+1)/n). `normalize=True` rescales them to sum to 1."""
    if layers is None:
        w = [(j + 1) / n_exits for j in range(n_exits)]
    else:
        if len(layers) != n_exits:
            raise ValueError(f"exit_weights: {n_exits} exits but {len(layers)} layers {list(layers)}")
        d = depth if depth is not None else max(layers)
        if d <= 0 or any(not 0 < i <= d for i in layers):
            raise ValueError(f"exit_weights: layers {list(layers)} must lie in 1..depth={d}")
        w = [i / d for i in layers]
    if normalize:
        s = sum(w)
        w = [x / s for x in w]
    return w


def _exits(student: torch.Tensor | Sequence[torch.Tensor], loss: str) -> list[torch.Tensor]:
    zs = [student] if isinstance(student, torch.Tensor) else list(student)
    if not zs:
        raise ValueError(f"{loss}: no exit logits given")
    return [z if z.dtype in (torch.float32, torch.float64) else z.float() for z in zs]


def _exits_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(5, 7, generator=g, requires_grad=True) for _ in range(3)]
    return (zs, torch.randint(0, 7, (5,), generator=g)), {"layers": [1, 2, 4], "depth": 4}


def _exits_kd_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(5, 7, generator=g, requires_grad=True) for _ in range(3)]
    return (zs, torch.randn(5, 7, generator=g) * 2), {"layers": [1, 2, 4], "depth": 4}


@register_loss("multi_exit_ce", paper="Gurioli et al. ModularStarEncoder / MoSE: Modular Self-distillation "
               "Encoders (AAAI 2026)", shape_check="none", example=_exits_example)
def multi_exit_ce(student: Sequence[torch.Tensor], target: torch.Tensor, layers: Sequence[int] | None = None,
                  depth: int | None = None, normalize: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    """Σ_i α_i·CE(z_i, y) over exit logits `[(B, C)] * n` and labels `(B,)`, α_i = layer_i/depth (MoSE)."""
    zs = _exits(student, "multi_exit_ce")
    w = exit_weights(len(zs), layers, depth, normalize)
    y = target.reshape(-1).long()
    return sum(a * F.cross_entropy(z.reshape(-1, z.shape[-1]), y.to(z.device), label_smoothing=label_smoothing)
               for a, z in zip(w, zs))


@register_loss("multi_exit_kd", paper="Gurioli et al. ModularStarEncoder / MoSE: Modular Self-distillation "
               "Encoders (AAAI 2026)", shape_check="none", example=_exits_kd_example)
def multi_exit_kd(student: Sequence[torch.Tensor], teacher: torch.Tensor, layers: Sequence[int] | None = None,
                  depth: int | None = None, temperature: float = 4.0, normalize: bool = False,
                  skip_last: bool = True) -> torch.Tensor:
    """Σ_i α_i·T²·KL(softmax(t/T) ‖ softmax(z_i/T)), batch-mean, over exit logits `[(B, C)] * n`.

    `teacher` `(B, C)`: the last exit's logits, detached here (a self-teacher serves them detached
    already). The last exit is skipped (`skip_last`): it would be distilled from itself.
    """
    zs = _exits(student, "multi_exit_kd")
    w = exit_weights(len(zs), layers, depth, normalize)
    t = float(temperature)
    q = F.softmax(_exits(teacher.detach(), "multi_exit_kd")[0].reshape(-1, teacher.shape[-1]) / t, dim=-1)
    pairs = list(zip(w, zs))[:-1] if skip_last else list(zip(w, zs))
    if not pairs:
        return zs[0].sum() * 0.0
    total = zs[0].new_zeros(())
    for a, z in pairs:
        log_p = F.log_softmax(z.reshape(-1, z.shape[-1]) / t, dim=-1)
        total = total + a * F.kl_div(log_p, q.to(z.dtype), reduction="batchmean") * t * t
    return total


__all__ = ["exit_weights", "multi_exit_ce", "multi_exit_kd"]
