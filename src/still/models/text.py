"""Sentence-embedding students, each a sentence-transformers model inside an `nn.Module`.

* `layer_dropped_student`: the teacher with only some of its layers (DistilBERT: keep every other
  layer), optionally narrower (weights sliced from the teacher) and/or with a projection to a width.
* `static_student`: per-token vectors, mean-pooled (an `EmbeddingBag`), initialised from the teacher's
  input token embeddings reduced by PCA, from a model2vec model, or at random.
* `st_model`: any sentence-transformers directory as a (trainable) student.

Every student is an `STStudent`: `student(**features) -> (B, D)`, `student.tokenize(texts)`,
`student.collate(samples)` (for a DataLoader of `still.data.text` samples), `student.encode(texts)`,
and `student.save(dir)`, which writes a directory that `SentenceTransformer(dir)` loads and that
gives the same embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from still.data.text import text_collate
from still.integrations import embedding_eval as _embedding_eval  # noqa: F401  registers the embedding metrics
from still.integrations import sentence_transformers as sti  # registers the `st_teacher` factory
from still.paths import cache_root
from still.registry import register_model


class STStudent(nn.Module):
    """A SentenceTransformer as a still student: `forward(**features) -> sentence embedding (B, D)`."""

    def __init__(self, st: Any) -> None:
        super().__init__()
        self.st = st

    @property
    def dim(self) -> int:
        return int(self.st.get_embedding_dimension())

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's own inputs for `texts` (tensors only: `input_ids`, `attention_mask`, or `offsets`)."""
        feats = sti.st_features(self.st, texts)
        return {k: v for k, v in feats.items() if isinstance(v, torch.Tensor)}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """`text_collate` plus this student's tokenized inputs."""
        batch = text_collate(samples)
        batch.update(self.tokenize(batch["text"]))
        return batch

    def forward(self, input_ids: torch.Tensor | None = None, texts: Sequence[str] | None = None,
                **features: Any) -> torch.Tensor:
        """`(B, D)` sentence embeddings from tokenized `features` (what `tokenize` gives) or raw `texts`."""
        feats = {k: v for k, v in features.items() if isinstance(v, torch.Tensor) and k not in ("labels", "y", "index")}
        if input_ids is None:
            if texts is None:
                raise ValueError("STStudent needs input_ids (from student.tokenize / student.collate) or texts=[...]")
            dev = next(self.parameters()).device
            feats = {k: v.to(dev) for k, v in self.tokenize(texts).items()}
            input_ids = feats.pop("input_ids")
        feats["input_ids"] = input_ids
        feats["modality"] = "text"
        return self.st(feats)["sentence_embedding"]

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """`(N, D)` embeddings in eval mode (the same path as the teacher's)."""
        return sti.st_encode(self.st, texts, batch_size)

    def save(self, path: str | Path) -> Path:
        """A sentence-transformers model directory: `SentenceTransformer(path)` loads it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.st.save(str(path))
        return path


def _bert_like(st: Any) -> Any:
    hf = st[0].auto_model
    if not hasattr(hf, "encoder") or not hasattr(hf.encoder, "layer"):
        raise TypeError(f"layer dropping needs an encoder with `encoder.layer` (BERT, MPNet, ...); got "
                        f"{type(hf).__name__}")
    return hf


def every_other(n_layers: int) -> list[int]:
    """DistilBERT-style: keep one layer out of two, ending with the last one (6 → [1, 3, 5])."""
    return list(range(n_layers - 1, -1, -2))[::-1]


def _sliced_model(hf: nn.Module, width: int, keep: Sequence[int]) -> nn.Module:
    """A copy of the HF encoder with hidden size `width` (heads of the same size, fewer of them), every
    weight initialised from the teacher's leading rows/columns (weight selection), layers `keep`."""
    cfg = hf.config.__class__.from_dict(hf.config.to_dict())
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    if width % head_dim:
        raise ValueError(f"width {width} must be a multiple of the teacher's head size {head_dim}")
    ratio = width / hf.config.hidden_size
    cfg.hidden_size, cfg.num_attention_heads = width, width // head_dim
    cfg.intermediate_size = int(round(hf.config.intermediate_size * ratio))
    cfg.num_hidden_layers = len(keep)
    small = type(hf)(cfg)
    src = hf.state_dict()
    remap = {f"encoder.layer.{j}.": f"encoder.layer.{i}." for j, i in enumerate(keep)}
    new_sd = {}
    for k, v in small.state_dict().items():
        sk = k
        for a, b in remap.items():
            if k.startswith(a):
                sk = b + k[len(a):]
                break
        t = src.get(sk)
        new_sd[k] = t[tuple(slice(0, n) for n in v.shape)].clone() if t is not None and t.dim() == v.dim() else v
    small.load_state_dict(new_sd)
    return small


@register_model("st_layer_dropped")
def layer_dropped_student(teacher: str = "minilm", keep: Sequence[int] | int | None = None, width: int | None = None,
                          ffn_width: int | None = None, project_to: int | None = None,
                          max_seq_length: int | None = 128, device: str = "cpu") -> STStudent:
    """The teacher's encoder with layers `keep` only (default every other; an int n keeps n evenly spaced).

    `width` makes it narrower (weights sliced from the teacher; a weak init, it needs long training);
    `ffn_width` keeps, in every kept layer, the `ffn_width` feed-forward neurons with the largest
    ‖w_in‖·‖w_out‖ (structured pruning of the teacher's FFN); `project_to` appends a linear `Dense`
    layer to that width before the final normalisation (e.g. 384 → 768 for an MPNet teacher).
    """
    from sentence_transformers.base.modules.dense import Dense

    st = sti.load_st(teacher, device)
    hf = _bert_like(st)
    n = len(hf.encoder.layer)
    if keep is None:
        keep = every_other(n)
    elif isinstance(keep, int):
        keep = sorted({round(n - 1 - i * (n - 1) / max(keep - 1, 1)) for i in range(keep)}) if keep > 1 else [n - 1]
    keep = [int(i) for i in keep]
    if not keep or any(i < 0 or i >= n for i in keep):
        raise ValueError(f"keep={keep}: the teacher has layers 0..{n - 1}")
    if width is not None and width != hf.config.hidden_size:
        st[0].model = _sliced_model(hf, width, keep)
        _set_pooling_dim(st, width)
    else:
        hf.encoder.layer = nn.ModuleList([hf.encoder.layer[i] for i in keep])
        hf.config.num_hidden_layers = len(keep)
    if ffn_width is not None:
        _prune_ffn(st[0].auto_model, ffn_width)
    if max_seq_length is not None:
        st.max_seq_length = max_seq_length
    dim = int(st.get_embedding_dimension())
    if project_to is not None and project_to != dim:
        _insert_before_normalize(st, Dense(dim, project_to, bias=True, activation_function=nn.Identity()))
    return STStudent(st)


def _prune_ffn(hf: nn.Module, ffn_width: int) -> None:
    """Keep `ffn_width` intermediate neurons per layer (largest ‖row of W_in‖·‖column of W_out‖)."""
    if ffn_width > hf.config.intermediate_size:
        raise ValueError(f"ffn_width {ffn_width} > the teacher's intermediate size {hf.config.intermediate_size}")
    for layer in hf.encoder.layer:
        lin_in, lin_out = layer.intermediate.dense, layer.output.dense
        score = lin_in.weight.norm(dim=1) * lin_out.weight.norm(dim=0)
        idx = score.topk(ffn_width).indices.sort().values
        new_in = nn.Linear(lin_in.in_features, ffn_width, bias=lin_in.bias is not None)
        new_out = nn.Linear(ffn_width, lin_out.out_features, bias=lin_out.bias is not None)
        with torch.no_grad():
            new_in.weight.copy_(lin_in.weight[idx])
            if lin_in.bias is not None:
                new_in.bias.copy_(lin_in.bias[idx])
            new_out.weight.copy_(lin_out.weight[:, idx])
            if lin_out.bias is not None:
                new_out.bias.copy_(lin_out.bias)
        layer.intermediate.dense, layer.output.dense = new_in, new_out
    hf.config.intermediate_size = ffn_width


def _set_pooling_dim(st: Any, width: int) -> None:
    for m in st:
        if type(m).__name__ == "Pooling":
            for attr in ("word_embedding_dimension", "embedding_dimension"):
                if hasattr(m, attr):
                    setattr(m, attr, width)
            if hasattr(m, "pooling_output_dimension"):
                m.pooling_output_dimension = width


def _insert_before_normalize(st: Any, module: nn.Module) -> None:
    mods = list(st._modules.values())
    at = next((i for i, m in enumerate(mods) if type(m).__name__ == "Normalize"), len(mods))
    mods.insert(at, module)
    st._modules.clear()
    for i, m in enumerate(mods):
        st._modules[str(i)] = m


def pca_reduce(weights: torch.Tensor, dim: int) -> torch.Tensor:
    """`(V, D) -> (V, dim)`: centred PCA projection (top-`dim` right singular vectors), float32."""
    w = weights.detach().float()
    if dim > w.shape[1]:
        raise ValueError(f"pca dim {dim} > embedding width {w.shape[1]}")
    w = w - w.mean(0, keepdim=True)
    _, vecs = torch.linalg.eigh((w.t() @ w).double())          # (D, D): cheaper than an SVD of (V, D)
    top = vecs[:, -dim:].flip(1).to(w.dtype)                    # eigenvectors, largest eigenvalue first
    return (w @ top).contiguous()


@register_model("st_static")
def static_student(teacher: str = "minilm", dim: int = 256, init: str = "pca", model2vec_path: str | None = None,
                   normalize: bool = True, seed: int = 0) -> STStudent:
    """A static (bag-of-tokens) student on the teacher's tokenizer: mean of per-token vectors `(V, dim)`.

    `init`: "pca" (the teacher's input token embeddings reduced to `dim` by PCA, rescaled to unit
    mean norm), "model2vec" (the vectors of a model2vec model at `model2vec_path`, with its tokenizer;
    without a path, `model2vec.distill` of the teacher at `dim`, made once and cached), or "random".
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.sentence_transformer.modules.static_embedding import StaticEmbedding
    from tokenizers import Tokenizer

    if init == "model2vec":
        if model2vec_path is None:
            model2vec_path = str(model2vec_distilled(teacher, dim))
        emb = StaticEmbedding.load(str(model2vec_path))
        if emb.embedding_dim != dim:
            raise ValueError(f"the model2vec model at {model2vec_path} has dim {emb.embedding_dim}, not {dim}")
        # model2vec saves float16 vectors; AdamW on float16 weights underflows (eps 1e-8 is 0 in fp16,
        # so m / (sqrt(v) + eps) becomes inf, then NaN): train in float32
        emb.float()
    else:
        tdir = sti.resolve_model_path(teacher)
        tok_file = tdir / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(f"static_student needs a fast tokenizer file {tok_file}")
        tokenizer = Tokenizer.from_file(str(tok_file))
        if init == "pca":
            st = sti.load_st(tdir)
            w = pca_reduce(st[0].auto_model.get_input_embeddings().weight, dim)
            w = w / w.norm(dim=1).mean()
        elif init == "random":
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(tokenizer.get_vocab_size(), dim, generator=g) / dim**0.5
        else:
            raise ValueError(f"static_student: init must be 'pca', 'model2vec' or 'random', got {init!r}")
        emb = StaticEmbedding(tokenizer, embedding_weights=w)
    mods: list[nn.Module] = [emb] + ([Normalize()] if normalize else [])
    return STStudent(SentenceTransformer(modules=mods, device="cpu"))


def model2vec_distilled(teacher: str = "minilm", dim: int = 256) -> Path:
    """`model2vec.distill(teacher, pca_dims=dim)` saved under `~/.cache/still/models/model2vec-<hash>-<dim>`
    (made once, minutes on a CPU; reused afterwards)."""
    import hashlib
    import os
    import shutil
    import tempfile

    tdir = sti.resolve_model_path(teacher)
    key = hashlib.sha256(str(tdir.resolve()).encode()).hexdigest()[:12]
    out = cache_root("models", f"model2vec-{key}-{dim}")
    if (out / "modules.json").exists() or (out / "config.json").exists():
        return out
    try:
        from model2vec.distill import distill
    except ImportError as exc:
        raise ImportError("init='model2vec' without model2vec_path needs model2vec[distill]: "
                          "pip install 'model2vec[distill]'") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        distill(model_name=str(tdir), pca_dims=dim, device="cpu").save_pretrained(tmp + "/m")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp + "/m", out)
    return out


@register_model("st_model")
def st_model(path: str = "minilm", device: str = "cpu") -> STStudent:
    """Any sentence-transformers model directory (or 'minilm' / 'mpnet') as a trainable student."""
    return STStudent(sti.load_st(path, device))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["STStudent", "layer_dropped_student", "static_student", "st_model", "pca_reduce", "every_other",
           "count_parameters", "model2vec_distilled"]
