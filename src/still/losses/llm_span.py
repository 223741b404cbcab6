"""Token-level LM distillation from hidden states (fused head, chunked) and the span-level loss.

`lm_kd(student, teacher, labels=...)` is still's LLM token-level KD term. `student` and `teacher` are
either logits `(B, T, V)` or `LMHeadOutputs` (hidden `(B, T, H)` + head weight `(V, H)`, from
`still.integrations.causal_lm`); the teacher may also be `TopKLogits` (a recorded top-k store). With
`LMHeadOutputs` the `(B·T, V)` logits never exist: tokens go through the head in chunks, and each chunk's
gradient is computed in the forward pass (Liger-style), so the peak is one `(chunk, V)` block.

The loss is `kd_weight · Σ_valid D(p_t ‖ p_s) / n_valid + ce_weight · CE`, positions shifted for next-token
prediction (`shift=True`: position t predicts token t+1). Divergences (row-wise, on temperature-scaled
logits): forward_kl, reverse_kl, jsd (TRL's generalized JSD convention: m = β p_t + (1-β) p_s,
D = β KL(p_t‖m) + (1-β) KL(p_s‖m); β=0 → forward KL, β=1 → reverse KL), tvd, skew_kl, skew_rkl (DistiLLM).

`span_kd`: the span-level loss of Liu et al. (multi-granularity semantic revision): for adjacent tokens
i, i+1 inside one span, ‖p_t,i ⊙ p_t,i+1 − p_s,i ⊙ p_s,i+1‖² (summed over the vocabulary), mean over pairs.
Spans come from `span_ids (B, T)` (same id = same span); `word_span_ids` derives them from word boundaries.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from still.registry import register_loss

LM_KD_PAPER = "Hinton et al. 2015; Agarwal et al., On-Policy Distillation of LMs (GKD, ICLR 2024)"


# ---------------------------------------------------------------------------------------------------
# Row-wise divergences on (n, V) logits, returning (n,)
# ---------------------------------------------------------------------------------------------------
def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probs; terms with p = 0 contribute 0 (also when log q = -inf)."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def divergence_rows(name: str, zs: torch.Tensor, zt: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher logits `zt (n, V)` and student logits `zs (n, V)`."""
    ls, lt = F.log_softmax(zs.float(), -1), F.log_softmax(zt.float(), -1)
    if name == "forward_kl":
        return _kl_rows(lt, ls)
    if name == "reverse_kl":
        return _kl_rows(ls, lt)
    if name == "jsd":
        if beta <= 0.0:
            return _kl_rows(lt, ls)
        if beta >= 1.0:
            return _kl_rows(ls, lt)
        m = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)
        return beta * _kl_rows(lt, m) + (1 - beta) * _kl_rows(ls, m)
    if name in ("tvd", "tv"):
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    if name == "skew_kl":
        m = torch.logsumexp(torch.stack([lt + math.log(alpha), ls + math.log(1 - alpha)]), 0)
        return _kl_rows(lt, m)
    if name == "skew_rkl":
        m = torch.logsumexp(torch.stack([ls + math.log(alpha), lt + math.log(1 - alpha)]), 0)
        return _kl_rows(ls, m)
    raise KeyError(f"unknown divergence {name!r}; known: {', '.join(DIVERGENCES)}")


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "tv", "skew_kl", "skew_rkl")


# ---------------------------------------------------------------------------------------------------
# Teacher payloads → logits of a row range
# ---------------------------------------------------------------------------------------------------
def _is_head(x: Any) -> bool:
    return hasattr(x, "hidden") and hasattr(x, "weight")


def _head_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cap: float | None) -> torch.Tensor:
    z = h @ w.t()
    if b is not None:
        z = z + b
    return torch.tanh(z / cap) * cap if cap else z


def topk_to_logprobs(indices: torch.Tensor, logprobs: torch.Tensor, vocab_size: int,
                     missing: str = "uniform") -> torch.Tensor:
    """Dense teacher log-probs `(n, V)` from top-k `(n, k)`: the missing mass spread uniformly over the
    other ids (`"uniform"`), or dropped and the top-k renormalised (`"renormalize"`: other ids get -inf)."""
    n, k = indices.shape
    lp = logprobs.float()
    if missing == "renormalize" or k >= vocab_size:
        out = torch.full((n, vocab_size), float("-inf"), device=lp.device)
        return out.scatter(1, indices, lp - torch.logsumexp(lp, -1, keepdim=True))
    if missing != "uniform":
        raise ValueError(f"missing must be 'uniform' or 'renormalize', not {missing!r}")
    rest = (1 - lp.exp().sum(-1)).clamp_min(1e-12) / (vocab_size - k)
    out = rest.log().unsqueeze(-1).expand(n, vocab_size).clone()
    return out.scatter(1, indices, lp)


class _Rows:
    """Flattened views of a student/teacher payload, giving (chunk, V) logits for a row range."""

    def __init__(self, x: Any, name: str) -> None:
        if isinstance(x, torch.Tensor):
            self.kind = "dense"
        else:
            self.kind = "head" if _is_head(x) else ("topk" if hasattr(x, "logprobs") else "other")
        if self.kind == "head":
            self.h = x.hidden.reshape(-1, x.hidden.shape[-1])
            self.w, self.b, self.cap = x.weight, x.bias, getattr(x, "softcap", None)
            self.vocab = int(x.weight.shape[0])
        elif self.kind == "topk":
            self.idx = x.indices.reshape(-1, x.indices.shape[-1])
            self.lp = x.logprobs.reshape(-1, x.logprobs.shape[-1])
            self.vocab = int(x.vocab_size)
        elif self.kind == "dense":
            self.z = x.reshape(-1, x.shape[-1])
            self.vocab = int(x.shape[-1])
        else:
            raise TypeError(f"lm_kd: {name} must be logits, LMHeadOutputs or TopKLogits, not {type(x).__name__}")
        self.n = {"head": lambda: len(self.h), "topk": lambda: len(self.idx), "dense": lambda: len(self.z)}[self.kind]()


def _fused_rows_loss(s: _Rows, t: _Rows | None, chunk_fn: Callable[..., torch.Tensor], chunk_size: int,
                     overlap: int = 0, missing: str = "uniform") -> torch.Tensor:
    """Σ over chunks of `chunk_fn(zs, zt, a, b)` with per-chunk gradients (no (N, V) tensor is kept)."""
    if s.kind != "head":
        raise AssertionError
    tensors = [s.h, s.w] + ([s.b] if s.b is not None else [])

    def teacher_rows(a: int, b: int) -> torch.Tensor | None:
        if t is None:
            return None
        with torch.no_grad():
            if t.kind == "head":
                return _head_logits(t.h[a:b], t.w, t.b, t.cap).float()
            if t.kind == "topk":
                return topk_to_logprobs(t.idx[a:b], t.lp[a:b], t.vocab, missing)
            return t.z[a:b].float()

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *ts: torch.Tensor) -> torch.Tensor:
            h, w = ts[0], ts[1]
            bias = ts[2] if len(ts) > 2 else None
            need = [x.requires_grad for x in ts]
            grads = [torch.zeros_like(x) if r else None for x, r in zip(ts, need)]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            step = max(1, chunk_size)
            for a in range(0, s.n, step):
                b = min(s.n, a + step + overlap)
                with torch.enable_grad():
                    hc = h[a:b].detach().requires_grad_(need[0])
                    wd = w.detach().requires_grad_(need[1])
                    bd = bias.detach().requires_grad_(need[2]) if bias is not None else None
                    zs = _head_logits(hc, wd, bd, s.cap).float()
                    loss = chunk_fn(zs, teacher_rows(a, b), a, b)
                    inputs = [x for x, r in zip([hc, wd, bd], need) if r and x is not None]
                    if inputs and loss.requires_grad:
                        gs = iter(torch.autograd.grad(loss, inputs))
                        if need[0]:
                            grads[0][a:b] += next(gs)
                        if need[1]:
                            grads[1] += next(gs)
                        if bias is not None and need[2]:
                            grads[2] += next(gs)
                total = total + loss.detach()
            ctx.grads = grads
            return total

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            return tuple(None if x is None else x * g for x in ctx.grads)

    return _Fn.apply(*tensors)


_ENGINE_NAMES = {"forward_kl": "forward_kl", "reverse_kl": "reverse_kl", "jsd": "jsd", "tvd": "tv", "tv": "tv",
                 "skew_kl": "skew_kl", "skew_rkl": "skew_rkl"}


def _engine_kd(student: Any, teacher: Any, t: "_Rows | None", kd_valid: torch.Tensor, n_kd: torch.Tensor,
               divergence: str, beta: float, alpha: float, temp: float, scale_t2: bool, kd_weight: float,
               kd_rows: int | None, chunk_size: int, missing: str) -> torch.Tensor | None:
    """The KD term through `still.losses.chunked.chunked_distill_loss` (None where it does not apply:
    no teacher, a dense-logits student, or a top-k teacher with a divergence other than forward KL)."""
    if t is None or t.kind == "dense" or divergence not in _ENGINE_NAMES:
        return None
    try:
        from still.losses.chunked import chunked_distill_loss
    except ImportError:  # pragma: no cover - the engine is part of still; the local path has the same maths
        return None
    name, params = _ENGINE_NAMES[divergence], {}
    if name == "jsd":
        params = {"beta": beta}
    elif name in ("skew_kl", "skew_rkl"):
        params = {"alpha": alpha}
    r = kd_rows
    ws = student.weight[:r]
    bs = None if student.bias is None else student.bias[:r]
    kw: dict[str, Any] = {"student_softcap": getattr(student, "softcap", None)}
    if t.kind == "topk":
        if name != "forward_kl":
            return None
        name, params = "sparse_topk_kl", {"missing": {"renormalize": "renormalise"}.get(missing, missing)}
        kw["teacher_topk"] = (t.idx, t.lp)
    else:
        kw.update(teacher_hidden=t.h, teacher_head=t.w[:r], teacher_bias=None if t.b is None else t.b[:r],
                  teacher_softcap=t.cap)
    return chunked_distill_loss(student.hidden, ws, student_bias=bs, mask=kd_valid, divergence=name,
                                divergence_params=params, temperature=temp, scale_t2=scale_t2, kd_weight=kd_weight,
                                num_valid=n_kd, chunk_size=chunk_size, **kw)


def _shifted_targets(n_pos: tuple[int, int], labels: torch.Tensor | None, attention_mask: torch.Tensor | None,
                     shift: bool, ignore_index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened `(B·T,)` next-token targets and the valid-position mask (last position invalid if shifted)."""
    B, T = n_pos
    if labels is None:
        tgt = torch.zeros(B, T, dtype=torch.long, device=device)
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
    else:
        tgt = labels.to(device).long()
        valid = tgt != ignore_index
    if attention_mask is not None:
        valid = valid & attention_mask.to(device).bool()
    if shift:
        tgt = torch.cat([tgt[:, 1:], torch.zeros_like(tgt[:, :1])], 1)
        valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], 1)
        if attention_mask is not None:  # the predicting position must be real too
            valid = valid & attention_mask.to(device).bool()
    return tgt.reshape(-1), valid.reshape(-1)


def _example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g)
    t = torch.randn(2, 5, 11, generator=g)
    return (s, t), {"labels": torch.randint(0, 11, (2, 5), generator=g), "ce_weight": 0.5}


@register_loss("lm_kd", paper=LM_KD_PAPER, shape_check="none", example=_example)
def lm_kd(student: Any, teacher: Any = None, labels: torch.Tensor | None = None,
          attention_mask: torch.Tensor | None = None, divergence: str = "forward_kl", temperature: float = 1.0,
          beta: float = 0.5, alpha: float = 0.1, kd_weight: float = 1.0, ce_weight: float = 0.0,
          kd_rows: int | None = None, shift: bool = True, ignore_index: int = -100, chunk_size: int = 1024,
          scale_t2: bool = False, missing: str = "uniform", kd_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level LM distillation (+ optional CE in the same pass), mean over valid next-token positions.

    student: logits (B, T, Vs) | LMHeadOutputs (hidden (B, T, H), weight (Vs, H)).
    teacher: logits (B, T, Vt) | LMHeadOutputs | TopKLogits (indices/logprobs (B, T, k)) | None (CE only).
    labels (B, T): token ids (HF: the loss shifts); -100 = ignored. attention_mask (B, T).
    kd_rows: compare only the first `kd_rows` vocabulary rows of both sides (padded vocabularies, or a
    sub-vocabulary student's extra UNK row); when Vs != Vt it must be given (never a silent truncation).
    kd_mask (B, T): optional extra mask for the KD term only (e.g. generated positions in on-policy steps).
    """
    s = _Rows(student, "student")
    ref = student.hidden if s.kind == "head" else student
    B, T = ref.shape[0], ref.shape[1]
    tgt, valid = _shifted_targets((B, T), labels, attention_mask, shift, ignore_index, ref.device)
    kd_valid = valid
    if kd_mask is not None:
        km = kd_mask.to(ref.device).bool()
        if shift:
            km = torch.cat([km[:, 1:], torch.zeros_like(km[:, :1])], 1)
        kd_valid = valid & km.reshape(-1)
    t = None
    if teacher is not None and kd_weight != 0.0:
        t = _Rows(teacher, "teacher")
        if kd_rows is None:
            if t.vocab != s.vocab:
                from still.integrations.causal_lm import VocabMismatchError

                raise VocabMismatchError(
                    f"lm_kd: student has {s.vocab} vocabulary rows, teacher {t.vocab}; pass kd_rows (the shared "
                    "real vocabulary, see causal_lm.aligned_vocab_size) instead of comparing misaligned ids")
            kd_rows = s.vocab
        if kd_rows > min(s.vocab, t.vocab):
            raise ValueError(f"lm_kd: kd_rows={kd_rows} exceeds the student ({s.vocab}) or teacher ({t.vocab}) rows")
    if labels is None and ce_weight:
        raise ValueError("lm_kd: ce_weight > 0 needs labels")
    n_kd = kd_valid.sum().clamp_min(1).float()
    n_ce = valid.sum().clamp_min(1).float()
    temp = float(temperature)
    t2 = temp * temp if scale_t2 else 1.0

    def chunk_fn(zs: torch.Tensor, zt: torch.Tensor | None, a: int, b: int) -> torch.Tensor:
        loss = zs.new_zeros(())
        if zt is not None:
            m = kd_valid[a:b]
            if m.any():
                d = divergence_rows(divergence, zs[m, :kd_rows] / temp, zt[m, :kd_rows] / temp, beta, alpha)
                loss = loss + kd_weight * t2 * d.sum() / n_kd
        if ce_weight:
            m = valid[a:b]
            if m.any():
                loss = loss + ce_weight * F.cross_entropy(zs[m], tgt[a:b][m], reduction="sum") / n_ce
        return loss

    if s.kind == "head":
        engine = _engine_kd(student, teacher, t, kd_valid, n_kd, divergence, beta, alpha, temp, scale_t2,
                            kd_weight, kd_rows, chunk_size, missing)
        if engine is not None:  # KD through issue 3's chunked engine; CE (if any) in a local fused pass
            if not ce_weight:
                return engine
            return engine + _fused_rows_loss(s, None, chunk_fn, chunk_size)
        return _fused_rows_loss(s, t, chunk_fn, chunk_size, missing=missing)
    zt = None
    if t is not None:
        zt = t.z.float() if t.kind == "dense" else (
            _head_logits(t.h, t.w, t.b, t.cap).float() if t.kind == "head"
            else topk_to_logprobs(t.idx, t.lp, t.vocab, missing))
    return chunk_fn(s.z.float(), zt, 0, s.n)


# ---------------------------------------------------------------------------------------------------
# Span loss
# ---------------------------------------------------------------------------------------------------
def word_span_ids(input_ids: torch.Tensor, starts_word: torch.Tensor) -> torch.Tensor:
    """Span ids `(B, T)`: a new span begins at every token whose id is marked in `starts_word (V,)` bool
    (e.g. tokens beginning with "▁"/"Ġ", spaces and punctuation). Adjacent tokens of one word share an id."""
    begin = starts_word.to(input_ids.device)[input_ids]
    begin[:, 0] = True
    return torch.cumsum(begin.long(), 1)


def word_starts_from_tokenizer(tokenizer: Any, ids: torch.Tensor | None = None) -> torch.Tensor:
    """`(V,)` bool: which ids begin a word (SentencePiece "▁", byte-BPE "Ġ", bytes ≤ 0x40 for ByteTokenizer)."""
    vocab = tokenizer.get_vocab()
    V = max(vocab.values()) + 1
    out = torch.zeros(V, dtype=torch.bool)
    for tok, i in vocab.items():
        if tok.startswith(("▁", "Ġ", "<", " ", "\n")) or not tok[:1].isalnum():
            out[i] = True
    if ids is not None:  # a sub-vocabulary: re-index (the UNK row starts a span)
        out = torch.cat([out[ids], torch.tensor([True])])
    if type(tokenizer).__name__ == "ByteTokenizer":
        out[:] = False
        out[:65] = True  # space, digits, punctuation start a span; letters continue it
        out[256:] = True
    return out


def _span_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)), {
        "span_ids": torch.tensor([[1, 1, 2, 2, 2, 3], [1, 2, 2, 3, 3, 3]])}


@register_loss("span_kd", paper="Liu et al., Multi-Granularity Semantic Revision for LLM Distillation (2024)",
               shape_check="none", example=_span_example)
def span_kd(student: Any, teacher: Any, span_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            temperature: float = 1.0, kd_rows: int | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Span-level correlation loss: mean over adjacent in-span pairs (i, i+1) of
    Σ_v (p_t,i ⊙ p_t,i+1 − p_s,i ⊙ p_s,i+1)_v², p = softmax(z / T) over the first `kd_rows` rows.

    student/teacher: logits (B, T, V) or LMHeadOutputs; span_ids (B, T) integers; attention_mask (B, T).
    Pairs never cross rows of the batch (the flattened position i+1 must be in the same sequence).
    """
    s, t = _Rows(student, "student"), _Rows(teacher, "teacher")
    ref = student.hidden if s.kind == "head" else student
    B, T = ref.shape[0], ref.shape[1]
    kd_rows = kd_rows or min(s.vocab, t.vocab)
    sp = span_ids.to(ref.device)
    same = torch.zeros(B, T, dtype=torch.bool, device=ref.device)
    same[:, :-1] = sp[:, 1:] == sp[:, :-1]
    if attention_mask is not None:
        am = attention_mask.to(ref.device).bool()
        same[:, :-1] &= am[:, 1:] & am[:, :-1]
    pair = same.reshape(-1)  # pair (i, i+1) valid, flattened; the last position of a row is never valid
    n_pairs = pair.sum().clamp_min(1).float()
    temp = float(temperature)

    def chunk_fn(zs: torch.Tensor, zt: torch.Tensor, a: int, b: int) -> torch.Tensor:
        ps = torch.softmax(zs[:, :kd_rows] / temp, -1)
        pt = torch.softmax(zt[:, :kd_rows] / temp, -1)
        m = pair[a : b - 1] if b - a > 1 else pair[a:a]
        m = m[: len(ps) - 1]
        if not m.any():
            return zs.new_zeros(()) + 0.0 * zs.sum()
        ds = ps[:-1][m] * ps[1:][m]
        dt = pt[:-1][m] * pt[1:][m]
        return ((ds - dt) ** 2).sum() / n_pairs

    if s.kind == "head":
        return _fused_rows_loss(s, t, chunk_fn, chunk_size, overlap=1)
    zt = t.z.float() if t.kind == "dense" else _head_logits(t.h, t.w, t.b, t.cap).float()
    return chunk_fn(s.z.float(), zt, 0, s.n)
