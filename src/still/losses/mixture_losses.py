"""MST-Distill's routed mixture distillation: a learned GateNet picks a teacher per sample.

Stage 3 of MST-Distill (Li et al., ACM MM 2025; code Gray-OREO/MST-Distill, `KD_methods/MST.py`)::

    g   = softmax(GateNet(z_s))                                  # (B, E); GateNet: Linear(C, 2C) → Linear(2C, E)
    idx = topk(g, k)                                             # k = 1 by default
    L   = w_task·CE(z_s, y) + w_kl·(1/k)·Σ_{j<k} KD(z_s ← z_{idx_j}.detach()) + w_lb·LB(g)
    LB  = KLDivLoss(reduction="batchmean")(log mean_b g, U) = (1/E)·Σ_e (1/E)·(log(1/E) − log ḡ_e)
          (the code's `batchmean` on a 1-D input divides by E)   or  "cv": std(Σ_b g) / mean(Σ_b g)

KD is T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch-mean, T = 4. The GateNet reads the student's
logits *without* detaching them (as in the code), so the load-balancing gradient reaches the student
too; the top-k indices are not differentiable, so the router learns only through LB.

The GateNet is a stateful part: `MSTRouter` (an `nn.Module`, built lazily from C and E on the first
batch) is owned by the `MSTRoutedKD` loss module, so the Objective registers it and the engine
optimises it with the student. `RouterLoadBalance(router=kd.router)` reads the same router without
registering it a second time (so a checkpoint holds each tensor once).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_loss

Experts = torch.Tensor | Sequence[torch.Tensor]


def stack_experts(experts: Experts, batch: int | None = None) -> torch.Tensor:
    """Expert logits as `(B, E, C)` from a stacked tensor or a list of E tensors `(B, C)`."""
    x = experts if isinstance(experts, torch.Tensor) else torch.stack(list(experts), dim=1)
    if x.dim() != 3:
        raise ValueError(f"expert logits must be (B, E, C) or a list of (B, C); got shape {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"expert logits have batch {x.shape[0]} but the student has {batch}")
    return x


class MSTRouter(nn.Module):
    """MST-Distill's GateNet: logits `(B, C)` -> routing logits `(B, E)`; Linear(C, 2C) → Linear(2C, E).

    No activation between the two layers (as in the paper's code). Built on the first call when
    `num_classes`/`num_experts` are not given.
    """

    def __init__(self, num_classes: int | None = None, num_experts: int | None = None) -> None:
        super().__init__()
        self.fc1: nn.Linear | None = None
        self.fc2: nn.Linear | None = None
        if num_classes is not None and num_experts is not None:
            self._build(num_classes, num_experts)

    def _build(self, c: int, e: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self.fc1 = nn.Linear(c, 2 * c, device=device, dtype=dtype)
        self.fc2 = nn.Linear(2 * c, e, device=device, dtype=dtype)

    @property
    def num_experts(self) -> int | None:
        return None if self.fc2 is None else self.fc2.out_features

    def forward(self, student_logits: torch.Tensor, num_experts: int | None = None) -> torch.Tensor:
        z = student_logits if student_logits.dtype in (torch.float32, torch.float64) else student_logits.float()
        if self.fc1 is None:
            if num_experts is None:
                raise ValueError("MSTRouter: first call needs num_experts (or build it with num_classes/num_experts)")
            self._build(z.shape[-1], num_experts, z.device, z.dtype)
        assert self.fc1 is not None and self.fc2 is not None
        if num_experts is not None and num_experts != self.fc2.out_features:
            raise ValueError(f"MSTRouter was built for {self.fc2.out_features} experts but got {num_experts}")
        return self.fc2(self.fc1(z))

    def probs(self, student_logits: torch.Tensor, num_experts: int | None = None) -> torch.Tensor:
        """softmax of the routing logits: `(B, E)`."""
        return F.softmax(self.forward(student_logits, num_experts), dim=-1)


def kd_t2(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batch-mean; logits `(B, C)`."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t


def load_balance(gate_probs: torch.Tensor, mode: str = "kl") -> torch.Tensor:
    """MST-Distill's load-balancing term on gate probabilities `(B, E)`; minimal (0) for uniform load.

    "kl": (1/E)·KL(U ‖ mean_b g) (the code's `KLDivLoss(batchmean)` on a 1-D input); "cv": the
    coefficient of variation of the per-expert importance Σ_b g (unbiased std, as torch.std).
    """
    if mode == "kl":
        avg = gate_probs.mean(dim=0)
        u = torch.full_like(avg, 1.0 / avg.numel())
        return (u * (u.log() - avg.log())).sum() / avg.numel()
    if mode == "cv":
        imp = gate_probs.sum(dim=0)
        return imp.std() / imp.mean()
    raise ValueError(f"load_balance: mode must be 'kl' or 'cv', got {mode!r}")


def _mst_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    experts = torch.randn(6, 3, 5, generator=g) * 2
    return (s, experts), {}


@register_loss("mst_routed_kd", paper="Li et al. MST-Distill: Mixture of Specialized Teachers for Cross-Modal "
               "Knowledge Distillation (ACM MM 2025)", shape_check="batch", example=_mst_example)
class MSTRoutedKD(nn.Module):
    """Routed mixture KD: each sample distils from the top-k teachers its learned GateNet picks.

    `forward(student (B, C), experts (B, E, C) or [E × (B, C)]) -> scalar`:
    (1/k)·Σ_{j<k} T²·KL(softmax(z_{b, idx_j}/T) ‖ softmax(z_s/T)) with idx = topk(softmax(GateNet(z_s)), k).
    `routing="soft"` is the code's weighted variant: KD from Σ_e g_e·z_e (gradient reaches the router).
    After each call `last_indices` holds the chosen experts `(B, k)` (for routing statistics).
    """

    def __init__(self, temperature: float = 4.0, k: int = 1, routing: str = "topk",
                 router: MSTRouter | None = None) -> None:
        super().__init__()
        if routing not in ("topk", "soft"):
            raise ValueError(f"mst_routed_kd: routing must be 'topk' or 'soft', got {routing!r}")
        self.temperature, self.k, self.routing = float(temperature), int(k), routing
        self.router = router if router is not None else MSTRouter()
        self.last_indices: torch.Tensor | None = None

    def forward(self, student: torch.Tensor, experts: Experts) -> torch.Tensor:
        zs = student if student.dtype in (torch.float32, torch.float64) else student.float()
        ze = stack_experts(experts, zs.shape[0]).to(zs.dtype).detach()
        e = ze.shape[1]
        if not 1 <= self.k <= e:
            raise ValueError(f"mst_routed_kd: k={self.k} but there are {e} experts")
        g = self.router.probs(zs, e)  # (B, E)
        if self.routing == "soft":
            self.last_indices = g.argmax(-1, keepdim=True).detach()
            return kd_t2(zs, (g.unsqueeze(-1) * ze).sum(1), self.temperature)
        idx = torch.topk(g, self.k, dim=1).indices  # (B, k), not differentiable
        self.last_indices = idx.detach()
        chosen = torch.gather(ze, 1, idx.unsqueeze(-1).expand(-1, -1, ze.shape[-1]))  # (B, k, C)
        loss = zs.new_zeros(())
        for j in range(self.k):
            loss = loss + kd_t2(zs, chosen[:, j], self.temperature)
        return loss / self.k


@register_loss("mst_load_balance", paper="Li et al. MST-Distill: Mixture of Specialized Teachers for Cross-Modal "
               "Knowledge Distillation (ACM MM 2025)", shape_check="batch", example=_mst_example)
class RouterLoadBalance(nn.Module):
    """Load-balancing term on the router's gate probabilities for this batch (see `load_balance`).

    `forward(student (B, C), experts (B, E, C) or [E × (B, C)]) -> scalar` (experts give E only).
    `router`: the `MSTRoutedKD.router` to balance; it is referenced, not registered again. Without
    one, this module owns its own router.
    """

    def __init__(self, mode: str = "kl", router: MSTRouter | None = None) -> None:
        super().__init__()
        if mode not in ("kl", "cv"):
            raise ValueError(f"mst_load_balance: mode must be 'kl' or 'cv', got {mode!r}")
        self.mode = mode
        if router is None:
            self.own_router: MSTRouter | None = MSTRouter()
            self._shared: tuple[MSTRouter, ...] = ()
        else:
            self.own_router = None
            self._shared = (router,)  # a tuple: not a registered submodule

    @property
    def router(self) -> MSTRouter:
        return self.own_router if self.own_router is not None else self._shared[0]

    def forward(self, student: torch.Tensor, experts: Experts) -> torch.Tensor:
        zs = student if student.dtype in (torch.float32, torch.float64) else student.float()
        e = stack_experts(experts, zs.shape[0]).shape[1] if not isinstance(experts, torch.Tensor) else experts.shape[1]
        return load_balance(self.router.probs(zs, e), self.mode)


__all__ = ["MSTRouter", "MSTRoutedKD", "RouterLoadBalance", "load_balance", "kd_t2", "stack_experts"]
