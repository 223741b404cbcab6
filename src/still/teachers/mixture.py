"""Mixtures of teachers behind the one Teacher interface, and MST-Distill's specialised (masked) teachers.

`MixtureTeacher(members, combine=...)` serves, for every view `v` that all members serve:

- `v`            the members' views combined: `"mean"` (average), `"confidence"` (per-sample weights
                 ∝ each member's max softmax probability of `confidence_view`), or `"stack"`;
- `v_experts`    the members' views stacked on dim 1: `(B, E, ...)` (what a learned router consumes);
- `v_<i>`        member i's view alone.

**The learned router (MST-Distill) is not in the teacher.** A teacher is frozen, `eval()` and under
`no_grad` by contract, so the router's GateNet lives in the stateful loss
`still.losses.mixture_losses.MSTRoutedKD` (an `nn.Module`): the Objective registers it as a submodule
and the engine optimises it with the student. The teacher side serves `logits_experts` `(B, E, C)`;
the loss picks a teacher per sample from the student's logits.

`MaskedTeacher` is MST-Distill's "specialised teacher": a frozen model whose layer `layer` is
multiplied by a MaskNet mask `σ(fc(MHA(embed(feature))))` through a forward hook (no model edit).
`fit_masknets` is the paper's stage 2: each MaskNet is trained so the masked teacher's softened
distribution moves toward the (detached) student's, `KD(z_masked ← z_s)` at T = 4.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_teacher
from still.taps import TapSpec, forward_with_views, resolve_module
from still.teachers.base import LiveTeacher, Teacher, weights_fingerprint

COMBINES = ("mean", "confidence", "stack")


def confidence_weights(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample mixture weights from stacked logits `(B, E, C)` -> `(B, E)`, rows summing to 1.

    w_{b,e} = c_{b,e} / Σ_e' c_{b,e'} with c_{b,e} = max_c softmax(z_{b,e}/T)_c (the member's confidence).
    """
    conf = F.softmax(logits.float() / temperature, dim=-1).amax(dim=-1)
    return conf / conf.sum(dim=1, keepdim=True)


class MixtureTeacher(Teacher):
    """A mixture of teachers (live, stored, masked, EMA, ...) served as one teacher. See the module doc."""

    def __init__(self, members: Sequence[Teacher], combine: str = "mean", confidence_view: str = "logits",
                 temperature: float = 1.0) -> None:
        if not members:
            raise ValueError("MixtureTeacher needs at least one member teacher")
        if combine not in COMBINES:
            raise ValueError(f"MixtureTeacher: combine must be one of {COMBINES}, got {combine!r}")
        self.members = list(members)
        self.combine, self.confidence_view, self.temperature = combine, confidence_view, float(temperature)
        common = set(self.members[0].view_specs)
        for m in self.members[1:]:
            common &= set(m.view_specs)
        if not common:
            raise ValueError("MixtureTeacher: the members share no view name: "
                             + "; ".join(f"{i}: {sorted(m.view_specs)}" for i, m in enumerate(self.members)))
        self.common = sorted(common)
        specs: dict[str, Any] = {}
        for v in self.common:
            specs[v] = ("combined", v)
            specs[f"{v}_experts"] = ("stacked", v)
        for i, m in enumerate(self.members):
            for v in m.view_specs:
                specs[f"{v}_{i}"] = ("member", v, i)
        self.view_specs = specs
        self.uses_student_views = any(getattr(m, "uses_student_views", False) for m in self.members)

    def __len__(self) -> int:
        return len(self.members)

    def _member_views(self, i: int, batch: Mapping[str, Any], names: Sequence[str],
                      student_views: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        m = self.members[i]
        if getattr(m, "uses_student_views", False):
            return m.views(batch, list(names), student_views=student_views)
        return m.views(batch, list(names))

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any], names: Sequence[str],
              student_views: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        self._check_names(names)
        need: list[set[str]] = [set() for _ in self.members]
        for n in names:
            kind = self.view_specs[n]
            if kind[0] == "member":
                need[kind[2]].add(kind[1])
            else:
                for s in need:
                    s.add(kind[1])
                if kind[0] == "combined" and self.combine == "confidence":
                    for s in need:
                        s.add(self.confidence_view)
        got = [self._member_views(i, batch, sorted(need[i]), student_views) if need[i] else {}
               for i in range(len(self.members))]
        out: dict[str, torch.Tensor] = {}
        weights: torch.Tensor | None = None
        for n in names:
            kind = self.view_specs[n]
            if kind[0] == "member":
                out[n] = got[kind[2]][kind[1]]
                continue
            stacked = torch.stack([g[kind[1]] for g in got], dim=1)  # (B, E, ...)
            if kind[0] == "stacked" or self.combine == "stack":
                out[n] = stacked
            elif self.combine == "mean":
                out[n] = stacked.mean(dim=1)
            else:
                if weights is None:
                    conf_logits = torch.stack([g[self.confidence_view] for g in got], dim=1)
                    weights = confidence_weights(conf_logits, self.temperature)
                w = weights.to(stacked.dtype).reshape(weights.shape + (1,) * (stacked.dim() - 2))
                out[n] = (w * stacked).sum(dim=1)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors `"<i>.<key>"` of the members that have state (MaskNets, EMA weights), for checkpoints."""
        out: dict[str, torch.Tensor] = {}
        for i, m in enumerate(self.members):
            if callable(getattr(m, "state_dict", None)):
                out.update({f"{i}.{k}": v for k, v in m.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for i, m in enumerate(self.members):
            part = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)}
            if part and callable(getattr(m, "load_state_dict", None)):
                m.load_state_dict(part)

    def after_step(self, student: nn.Module) -> None:
        for m in self.members:
            if hasattr(m, "after_step"):
                m.after_step(student)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.combine}:{self.confidence_view}:{self.temperature}".encode())
        for m in self.members:
            h.update(m.fingerprint().encode())
        return h.hexdigest()[:16]

    def to(self, device: torch.device | str) -> "MixtureTeacher":
        for m in self.members:
            m.to(device)
        return self


# ----------------------------------------------------------------------------------------------
# MST-Distill specialised teachers: MaskNets plugged into a frozen teacher by a forward hook
# ----------------------------------------------------------------------------------------------


def _mask_hidden(feat_dim: int, heads: int) -> int:
    """The paper code's width: h = d // (2·heads) · heads (at least `heads`)."""
    return max(feat_dim // (2 * heads) * heads, heads)


class MaskNet1d(nn.Module):
    """Channel mask for a 1-D feature `(B, d)` -> `(B, d)` in (0, 1): σ(fc(MHA(embed(x)))).

    `embed: Linear(d -> d·h)` makes d channel tokens of width h; multi-head self-attention over the
    tokens; `fc: h -> 1` per token; sigmoid. h = d // (2·heads) · heads as in the paper's code.
    """

    def __init__(self, feat_dim: int, heads: int = 3) -> None:
        super().__init__()
        self.d, self.h = int(feat_dim), _mask_hidden(int(feat_dim), heads)
        self.embed = nn.Linear(self.d, self.d * self.h)
        self.mha = nn.MultiheadAttention(self.h, heads, batch_first=True)
        self.fc = nn.Linear(self.h, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).reshape(x.shape[0], self.d, self.h)
        a, _ = self.mha(tokens, tokens, tokens, need_weights=False)
        return torch.sigmoid(self.fc(a).squeeze(-1))


class MaskNet2d(MaskNet1d):
    """Channel mask for a map `(B, C, H, W)` -> `(B, C)`: depthwise-separable stride-2 conv + BN + ReLU + GAP first."""

    def __init__(self, feat_dim: int, heads: int = 3) -> None:
        super().__init__(feat_dim, heads)
        c = int(feat_dim)
        self.reduce = nn.Sequential(
            nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.reduce(x))


class MaskedTeacher(LiveTeacher):
    """A frozen teacher whose module `layer` output is multiplied by a MaskNet channel mask.

    The MaskNet (`MaskNet1d` for `(B, d)`, `MaskNet2d` for `(B, C, H, W)`) is built from the first
    feature it sees (`materialize(batch)`), and is trained only by `fit_masknets`. Several
    MaskedTeachers may share one `model` (the hook is attached only during their own forward).
    """

    def __init__(self, model: nn.Module, views: Mapping[str, str | TapSpec], layer: str, heads: int = 3,
                 inputs: Any = None, masknet: nn.Module | None = None) -> None:
        super().__init__(model, views, inputs=inputs)
        self.layer = layer
        self._layer_module = resolve_module(self.model, layer)
        self.heads = heads
        self.masknet = masknet

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.dim() not in (2, 4):
            raise ValueError(f"MaskedTeacher: layer {self.layer!r} must output (B, d) or (B, C, H, W), "
                             f"got {type(output).__name__} {getattr(output, 'shape', '')}")
        if self.masknet is None:
            cls = MaskNet1d if output.dim() == 2 else MaskNet2d
            self.masknet = cls(output.shape[1], self.heads).to(output.device).eval()
        mask = self.masknet(output)
        return output * mask.reshape(mask.shape + (1,) * (output.dim() - 2))

    def forward_views(self, batch: Mapping[str, Any], names: Sequence[str], detach: bool) -> dict[str, torch.Tensor]:
        """The masked model's views (with the mask hook attached for this forward only)."""
        handle = self._layer_module.register_forward_hook(self._hook)
        try:
            _, v = forward_with_views(self.model, batch, {n: self.view_specs[n] for n in names},
                                      inputs=self.inputs, detach=detach)
        finally:
            handle.remove()
        return v

    @torch.no_grad()
    def materialize(self, batch: Mapping[str, Any]) -> nn.Module:
        """Build the MaskNet from one batch (so an optimizer can be made); returns it."""
        self.forward_views(batch, [next(iter(self.view_specs))], detach=True)
        assert self.masknet is not None
        return self.masknet

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        self.model.eval()
        if self.masknet is not None:
            self.masknet.eval()
        return self.forward_views(batch, names, detach=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The MaskNet's weights (`masknet.<key>`; the teacher's own weights are not trained)."""
        if self.masknet is None:
            return {}
        return {f"masknet.{k}": v.detach().clone() for k, v in self.masknet.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        sd = {k[len("masknet."):]: v for k, v in state.items() if k.startswith("masknet.")}
        if not sd:
            return
        if self.masknet is None:  # rebuild it from the saved shapes: embed is (d·h, d)
            d = sd["embed.weight"].shape[1]
            cls = MaskNet2d if any(k.startswith("reduce.") for k in sd) else MaskNet1d
            self.masknet = cls(d, self.heads)
        self.masknet.load_state_dict(sd)
        self.masknet.eval()

    def fingerprint(self) -> str:
        mn = weights_fingerprint(self.masknet) if self.masknet is not None else "unbuilt"
        return f"{weights_fingerprint(self.model)}:{self.layer}:{mn}"


def _kd_t(student_logits: torch.Tensor, target_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T²·KL(softmax(target/T) ‖ softmax(student/T)), batch-mean (the paper's `distillation_loss`)."""
    log_p = F.log_softmax(student_logits / t, dim=-1)
    q = F.softmax(target_logits / t, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * t * t


def fit_masknets(teachers: Sequence[MaskedTeacher], student: nn.Module, batches: Callable[[], Iterable[Mapping]],
                 epochs: int = 1, lr: float = 1e-4, temperature: float = 4.0, logits_view: str = "logits",
                 student_inputs: Any = None) -> list[float]:
    """MST-Distill stage 2: train each teacher's MaskNet so the masked teacher moves toward the student.

    Per batch and teacher: loss = T²·KL(softmax(z_s/T) ‖ softmax(z_masked/T)) with the student
    `eval()` and detached, teacher weights frozen, one Adam per MaskNet (lr 1e-4, T = 4 as in the
    paper's code). `batches()` returns a fresh iterable of batches per epoch. Returns the mean loss
    per epoch (averaged over teachers). The paper keeps the best MaskNets by validation KL; this
    keeps the last ones.
    """
    from still.taps import call_model

    it = iter(batches())
    first = next(it, None)
    if first is None:
        raise ValueError("fit_masknets: the data gave no batch")
    opts = [torch.optim.Adam(t.materialize(first).parameters(), lr=lr) for t in teachers]
    was_training = student.training
    student.eval()
    history = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in batches():
            with torch.no_grad():
                zs = call_model(student, batch, student_inputs)
                zs = zs if isinstance(zs, torch.Tensor) else zs[0]
            for t, opt in zip(teachers, opts):
                t.model.eval()
                t.masknet.train()
                zt = t.forward_views(batch, [logits_view], detach=False)[logits_view]
                loss = _kd_t(zt, zs.detach(), temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                count += 1
        history.append(total / max(count, 1))
    for t in teachers:
        t.masknet.eval()
        for p in t.masknet.parameters():
            p.requires_grad_(False)
    student.train(was_training)
    return history


def specialised_teachers(models: Sequence[nn.Module], layers: Sequence[Sequence[str]],
                         views: Mapping[str, str] | None = None, heads: int = 3,
                         inputs: Sequence[Any] | None = None) -> list[MaskedTeacher]:
    """One MaskedTeacher per (model, layer): MST-Distill's pool (paper: 2 layers × {teacher, aux} = 4)."""
    if len(models) != len(layers):
        raise ValueError(f"specialised_teachers: {len(models)} models but {len(layers)} layer lists")
    views = dict(views or {"logits": ""})
    out = []
    for i, (m, ls) in enumerate(zip(models, layers)):
        for layer in ls:
            out.append(MaskedTeacher(m, views, layer, heads=heads, inputs=None if inputs is None else inputs[i]))
    return out


@register_teacher("mixture", paper="")
def mixture_teacher(members: Sequence[Teacher], combine: str = "mean", confidence_view: str = "logits",
                    temperature: float = 1.0) -> MixtureTeacher:
    """A mixture of teachers: mean, confidence-weighted, or stacked for a learned router."""
    return MixtureTeacher(members, combine=combine, confidence_view=confidence_view, temperature=temperature)


__all__ = ["MixtureTeacher", "MaskedTeacher", "MaskNet1d", "MaskNet2d", "fit_masknets", "specialised_teachers",
           "confidence_weights"]
