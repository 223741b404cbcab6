"""LAD's label-assisted teacher (Qiu et al., ECCV 2024): the teacher sees the image *and* a noised
one-hot label map as extra input channels (privileged information), and is trained with dual-path
consistency so that it does not just copy its label input.

- `noised_onehot(mask, k, noise, generator)`: (B, H, W) → (B, K, H, W); each pixel's label is
  replaced by a uniformly random class with probability `noise` (unlabelled pixels, -100, give 0).
- `LabelAssistedTeacher(model, num_classes, noise)`: a frozen model over `cat(x, noised_onehot(mask))`
  (B, 1 + K, H, W) serving views by taps; a fresh noise draw every batch.
- `dual_path_loss(logits_a, logits_b, target, consistency)`: CE on both paths + consistency·MSE of their
  softmaxes. Path a: label noised at `noise`; path b: a second, independent and heavier draw
  (`noise_b`); the catalog does not pin down the paper's exact pairing or noise rate ([R]).
- `fit_label_assisted(model, data, ...)`: trains the teacher with that loss (its own small loop).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_loss, register_teacher
from still.taps import TapSpec, forward_with_views, resolve_module
from still.teachers.base import Teacher, weights_fingerprint

LAD_PAPER = "Qiu et al. Label-Assisted Distillation for semantic segmentation (ECCV 2024)"
IGNORE = -100


def noised_onehot(mask: torch.Tensor, num_classes: int, noise: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One-hot (B, K, H, W) float of `mask` (B, H, W), each labelled pixel flipped to a uniform random
    class with probability `noise`; pixels equal to -100 are all-zero."""
    m = mask.long()
    valid = m != IGNORE
    m = m.clamp_min(0)
    if noise > 0:
        flip = torch.rand(m.shape, generator=generator, device=m.device) < noise
        rnd = torch.randint(0, num_classes, m.shape, generator=generator, device=m.device)
        m = torch.where(flip, rnd, m)
    dt = torch.get_default_dtype()
    oh = F.one_hot(m, num_classes).permute(0, 3, 1, 2).to(dt)
    return oh * valid[:, None].to(dt)


def _logits_cf(out: torch.Tensor, k: int) -> torch.Tensor:
    """Channel-first logits (B, K, H, W) from (B, K, H, W) or pixel rows (B, H, W, K)."""
    return out if out.shape[1] == k else out.permute(0, 3, 1, 2)


@register_loss("lad_dual_path", paper=LAD_PAPER, shape_check="none", example=lambda: (
    (torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True),
     torch.randint(0, 3, (2, 4, 4))), {}))
def dual_path_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, target: torch.Tensor,
                   consistency: float = 1.0) -> torch.Tensor:
    """CE(a, y) + CE(b, y) + consistency·MSE(softmax a, softmax b); logits (B, K, H, W), y (B, H, W)
    (pixels of -100 ignored; a batch without labels gives the consistency term only)."""
    a = logits_a if logits_a.dtype in (torch.float32, torch.float64) else logits_a.float()
    b = logits_b if logits_b.dtype in (torch.float32, torch.float64) else logits_b.float()
    if bool((target != IGNORE).any()):
        ce = F.cross_entropy(a, target.long(), ignore_index=IGNORE) + F.cross_entropy(b, target.long(), ignore_index=IGNORE)
    else:  # an unlabelled batch: only the consistency term
        ce = a.sum() * 0.0
    return ce + consistency * F.mse_loss(a.softmax(1), b.softmax(1))


class LabelAssistedTeacher(Teacher):
    """A frozen model over cat(x, noised one-hot(batch[label_key])) serving views by taps."""

    uses_labels = True

    def __init__(self, model: nn.Module, views: Mapping[str, str], num_classes: int = 11, noise: float = 0.1,
                 label_key: str = "y", input_key: str = "x", seed: int = 0) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.view_specs = {n: TapSpec.parse(s) for n, s in views.items()}
        for s in self.view_specs.values():
            resolve_module(self.model, s.path)
        self.num_classes, self.noise = num_classes, noise
        self.label_key, self.input_key = label_key, input_key
        self.generator = torch.Generator().manual_seed(seed)

    def teacher_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x, y = batch[self.input_key], batch[self.label_key]
        oh = noised_onehot(y.cpu(), self.num_classes, self.noise, self.generator).to(x.device, x.dtype)
        return torch.cat([x, oh], 1)

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        self.model.eval()
        _, v = forward_with_views(self.model, {"x": self.teacher_input(batch)},
                                  {n: self.view_specs[n] for n in names}, detach=True)
        return v

    def fingerprint(self) -> str:
        return f"lad{self.noise}:{weights_fingerprint(self.model)}"

    def to(self, device: torch.device | str) -> "LabelAssistedTeacher":
        self.model.to(device)
        return self


@register_teacher("label_assisted", paper=LAD_PAPER)
def label_assisted(model: nn.Module, views: Mapping[str, str], num_classes: int = 11, noise: float = 0.1,
                   label_key: str = "y") -> LabelAssistedTeacher:
    """A label-assisted teacher: `model` takes (B, 1 + K, H, W) = image ⊕ noised one-hot label."""
    return LabelAssistedTeacher(model, views, num_classes, noise, label_key)


def fit_label_assisted(model: nn.Module, data: Any, num_classes: int = 11, epochs: int = 2, batch_size: int = 32,
                       lr: float = 3e-3, noise: float = 0.1, noise_b: float = 0.5, consistency: float = 1.0,
                       seed: int = 0, label_key: str = "y", max_steps: int | None = None,
                       lr_schedule: str = "constant", warmup: float = 0.0) -> list[float]:
    """Train `model` (input 1 + K channels) with the dual-path loss on `data` (Adam; `lr_schedule` and a
    `warmup` fraction of the steps as in `still.engine.TrainConfig`); returns per-step losses."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:  # a model already wrapped by LabelAssistedTeacher is frozen: train it, then refreeze
        p.requires_grad_(True)
    try:
        return _fit(model, data, num_classes, epochs, batch_size, lr, noise, noise_b, consistency, seed, label_key,
                    max_steps, lr_schedule, warmup)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _fit(model: nn.Module, data: Any, num_classes: int, epochs: int, batch_size: int, lr: float, noise: float,
         noise_b: float, consistency: float, seed: int, label_key: str, max_steps: int | None,
         lr_schedule: str = "constant", warmup: float = 0.0) -> list[float]:
    from still.engine.loop import TrainConfig, lr_factor

    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = min(max_steps or 1 << 62, epochs * len(loader))
    cfg = TrainConfig(lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total))
    dev = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        for batch in loader:
            x, y = batch["x"].to(dev), batch[label_key].to(dev)
            xa = torch.cat([x, noised_onehot(y.cpu(), num_classes, noise, g).to(dev)], 1)
            xb = torch.cat([x, noised_onehot(y.cpu(), num_classes, noise_b, g).to(dev)], 1)
            out = model(torch.cat([xa, xb]))
            la, lb = _logits_cf(out, num_classes).chunk(2)
            loss = dual_path_loss(la, lb, y, consistency)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if max_steps is not None and len(losses) >= max_steps:
                model.eval()
                return losses
    model.eval()
    return losses


__all__ = ["LabelAssistedTeacher", "noised_onehot", "dual_path_loss", "fit_label_assisted", "label_assisted"]
