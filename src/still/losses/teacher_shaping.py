"""Teacher shaping: DHO's dual-head student (4.4) and LELP's pseudo-subclass targets (appendix A).

DHO trains two linear heads on shared student features: `ce_head` on labels, `kd_head` on the
teacher's soft targets, and mixes them at inference:
`p = (1 - α)·softmax(ce_head) + α·softmax(kd_head / β)`, α and β picked on validation data.

LELP turns a few-class teacher into an S·C-way one: each class's teacher embeddings, projected on
the null space of the teacher's head, give S principal directions (randomly rotated); the
pseudo-subclass logits `z_{c,s} = z_c + (h P V_c R_c)_s` are the student's soft targets.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import MODELS, register_loss, register_model
from still.teachers.base import Teacher
from still.taps import resolve_module

DHO_PAPER = "Kang et al. Dual-Head Optimization for semi-supervised distillation from vision-language models (2025)"
LELP_PAPER = "Loo, Iliopoulos, Hu, Vee. Linear Projections of Teacher Embeddings for Few-Class Distillation (2024)"


# ---------------------------------------------------------------------------------------- DHO
class DualHeadNet(nn.Module):
    """A backbone's embedding with two heads; forward returns log of DHO's inference mix (B, C).

    The backbone is a registered model whose `classifier` maps its embedding to logits (the
    vision models here); it is replaced by the two heads `ce_head` and `kd_head` (tap them by name).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, alpha: float = 0.5, beta: float = 1.0) -> None:
        super().__init__()
        if not isinstance(getattr(backbone, "classifier", None), nn.Linear):
            raise TypeError(f"dual_head needs a backbone with a Linear `classifier`, got {type(backbone).__name__}")
        dim = backbone.classifier.in_features
        backbone.classifier = nn.Identity()
        self.backbone = backbone
        self.ce_head = nn.Linear(dim, num_classes)
        self.kd_head = nn.Linear(dim, num_classes)
        self.alpha, self.beta = alpha, beta

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return self.ce_head(h), self.kd_head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ce, kd = self.heads(x)
        return dho_mix(ce, kd, self.alpha, self.beta).clamp_min(1e-12).log()


def _ex_labelled() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, 3, generator=g, requires_grad=True), torch.tensor([0, -100, 2, -100])), {}


@register_loss("ce_labelled", paper=DHO_PAPER, shape_check="none", example=_ex_labelled)
def ce_labelled(student: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean CE (B, C) vs (B,) over the labelled rows only; 0 (with a gradient path) when a batch has none.

    `ce` (a plain mean with ignore_index) is NaN on an all-unlabelled batch, which 1 %-label
    semi-supervised batches often are.
    """
    t = target.reshape(-1).long()
    keep = t != ignore_index
    per = F.cross_entropy(student.reshape(len(t), -1), t.clamp_min(0), reduction="none")
    return (per * keep).sum() / keep.sum().clamp_min(1)


def dho_mix(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """DHO inference probabilities (B, C): (1 - α)·softmax(ce) + α·softmax(kd / β)."""
    return (1 - alpha) * ce_logits.softmax(-1) + alpha * (kd_logits / beta).softmax(-1)


DHO_ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
DHO_BETAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


@torch.no_grad()
def dho_select_mix(model: DualHeadNet, x: torch.Tensor, y: torch.Tensor, alphas: Sequence[float] = DHO_ALPHAS,
                   betas: Sequence[float] = DHO_BETAS, batch_size: int = 512) -> tuple[float, float, float]:
    """Grid-search α, β on validation data (x, y) as the paper does; sets them on `model`.

    Returns `(alpha, beta, validation accuracy)`.
    """
    was = model.training
    model.eval()
    ce, kd = zip(*(model.heads(x[i : i + batch_size]) for i in range(0, len(x), batch_size)))
    ce_l, kd_l = torch.cat(ce), torch.cat(kd)
    best = (0.0, 1.0, -1.0)
    for a in alphas:
        for b in betas:
            acc = float((dho_mix(ce_l, kd_l, a, b).argmax(-1) == y).float().mean())
            if acc > best[2] + 1e-12:
                best = (a, b, acc)
    model.alpha, model.beta = best[0], best[1]
    model.train(was)
    return best


@register_model("dual_head", paper=DHO_PAPER)
def dual_head(backbone: str = "small_cnn", backbone_params: Mapping[str, Any] | None = None, num_classes: int = 10,
              input_shape: Sequence[int] = (1, 28, 28), alpha: float = 0.5, beta: float = 1.0) -> DualHeadNet:
    """DHO student: a registered backbone with its classifier replaced by `ce_head` + `kd_head`."""
    bb = MODELS.build(backbone, num_classes=num_classes, input_shape=input_shape, **dict(backbone_params or {}))
    return DualHeadNet(bb, num_classes, alpha, beta)


# --------------------------------------------------------------------------------------- LELP
class SubclassNet(nn.Module):
    """A student with an S·C-way head (`base`, tap it for the subclass logits (B, C·S)).

    forward returns class log-probabilities (B, C): the log of the summed subclass probabilities.
    """

    def __init__(self, base: nn.Module, num_classes: int, subclasses: int) -> None:
        super().__init__()
        self.base, self.num_classes, self.subclasses = base, num_classes, subclasses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = self.base(x)
        return sub.log_softmax(-1).view(len(sub), self.num_classes, self.subclasses).logsumexp(-1)


@register_model("subclass_student", paper=LELP_PAPER)
def subclass_student(backbone: str = "mlp", backbone_params: Mapping[str, Any] | None = None, num_classes: int = 2,
                     subclasses: int = 5, input_shape: Sequence[int] = (1, 28, 28)) -> SubclassNet:
    """LELP student: a registered backbone with num_classes·subclasses outputs, read back as classes."""
    base = MODELS.build(backbone, num_classes=num_classes * subclasses, input_shape=input_shape,
                        **dict(backbone_params or {}))
    return SubclassNet(base, num_classes, subclasses)


def null_space_projector(w: torch.Tensor) -> torch.Tensor:
    """P = I - Wᵀ(WWᵀ)⁺W (d, d) for a head W (C, d): removes the logit-relevant directions."""
    w = w.double()
    return (torch.eye(w.shape[1], dtype=w.dtype) - w.T @ torch.linalg.pinv(w @ w.T) @ w)


def fit_lelp(embeddings: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor, subclasses: int = 5,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """Fit LELP's per-class subspaces from teacher embeddings (N, d), labels (N,), head W (C, d).

    Returns `{"P": (d, d), "mean": (C, d), "basis": (C, d, S), "scale": ()}`: the class-c offsets of a
    sample are `((h P - mean_c) @ basis_c) / scale`, with basis_c = V_c R_c (top-S principal
    directions of class c's null-space embeddings, then a random rotation R_c ∈ O(S)); `scale` is the
    std of all in-class offsets, so offsets are O(1) next to the logits ([R]: the catalog leaves it open).
    """
    g = torch.Generator().manual_seed(seed)
    h = embeddings.double()
    p = null_space_projector(head_weight)
    hp = h @ p
    c_count = head_weight.shape[0]
    d = h.shape[1]
    means = torch.zeros(c_count, d, dtype=torch.float64)
    bases = torch.zeros(c_count, d, subclasses, dtype=torch.float64)
    offsets = []
    for c in range(c_count):
        hc = hp[labels == c]
        if len(hc) < 2:
            raise ValueError(f"LELP: class {c} has {len(hc)} teacher embeddings; it needs at least 2 to fit")
        means[c] = hc.mean(0)
        _, _, vh = torch.linalg.svd(hc - means[c], full_matrices=False)
        v = vh[:subclasses].T  # (d, S') top directions
        if v.shape[1] < subclasses:
            v = torch.cat([v, torch.zeros(d, subclasses - v.shape[1], dtype=v.dtype)], 1)
        q, r = torch.linalg.qr(torch.randn(subclasses, subclasses, generator=g, dtype=torch.float64))
        rot = q * torch.sign(torch.diagonal(r))  # Haar-random orthogonal
        bases[c] = v @ rot
        offsets.append((hc - means[c]) @ bases[c])
    scale = torch.cat(offsets).std().clamp_min(1e-8)
    return {"P": p.float(), "mean": means.float(), "basis": bases.float(), "scale": scale.float()}


def lelp_logits(embed: torch.Tensor, logits: torch.Tensor, fit: Mapping[str, torch.Tensor],
                centre: bool = True) -> torch.Tensor:
    """Pseudo-subclass logits (B, C·S): z_{c,s} = z_c + log_softmax_s(o_c)_s, o_c = (h P - mean_c) V_c R_c / scale.

    With `centre=True` (default) the subclass probabilities of class c sum exactly to the teacher's
    class probability (Σ_s e^{z_{c,s}} = e^{z_c}: "the subclasses sum back to the class", the
    catalog's stated intent). `centre=False` is the plain z_c + o_{c,s}, whose class sums add
    logsumexp_s(o_c), a sample-dependent bias that can override the teacher's decision: measured on
    a binary digits problem, it took the subclass teacher from 78 % to chance.
    """
    hp = embed.float() @ fit["P"].to(embed.device)
    off = torch.einsum("bcd,cds->bcs", hp.unsqueeze(1) - fit["mean"].to(embed.device),
                       fit["basis"].to(embed.device)) / fit["scale"].to(embed.device)
    if centre:
        off = off.log_softmax(-1)
    return (logits.float().unsqueeze(-1) + off).flatten(1)


class LELPTeacher(Teacher):
    """Wraps a live teacher; serves `subclass_logits` (B, C·S) after `fit(train_data)`.

    The base teacher must serve `embed_view` (penultimate embedding (B, d)) and `logits_view`
    (B, C); `head` is the module path of its Linear output layer (W (C, d)).
    """

    def __init__(self, base: Any, subclasses: int = 5, embed_view: str = "embed", logits_view: str = "logits",
                 head: str = "classifier", seed: int = 0) -> None:
        self.base, self.subclasses, self.seed = base, subclasses, seed
        self.embed_view, self.logits_view = embed_view, logits_view
        self.head = resolve_module(base.model, head)
        self.fitted: dict[str, torch.Tensor] | None = None
        self.view_specs = {**base.view_specs, "subclass_logits": "lelp"}

    @torch.no_grad()
    def fit(self, train_data: Any, batch_size: int = 512, **_: Any) -> None:
        """Collect teacher embeddings of the whole training set and fit the subclass subspaces."""
        loader = torch.utils.data.DataLoader(train_data, batch_size=batch_size, shuffle=False)
        embs, labs = [], []
        device = next(self.base.model.parameters()).device
        for b in loader:
            b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            embs.append(self.base.views(b, [self.embed_view])[self.embed_view].flatten(1).cpu())
            labs.append(b["y"].cpu())
        self.fitted = fit_lelp(torch.cat(embs), torch.cat(labs), self.head.weight.detach().cpu(),
                               self.subclasses, self.seed)

    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        base_names = [n for n in names if n != "subclass_logits"]
        need = set(base_names)
        if "subclass_logits" in names:
            if self.fitted is None:
                raise RuntimeError("LELPTeacher: call fit(train_data) (the method's prepare hook) before training")
            need |= {self.embed_view, self.logits_view}
        v = self.base.views(batch, sorted(need))
        out = {n: v[n] for n in base_names}
        if "subclass_logits" in names:
            out["subclass_logits"] = lelp_logits(v[self.embed_view].flatten(1), v[self.logits_view], self.fitted)
        return out

    def fingerprint(self) -> str:
        return f"lelp-{self.subclasses}-{self.seed}-" + self.base.fingerprint()

    def to(self, device: torch.device | str) -> "LELPTeacher":
        self.base.to(device)
        return self
