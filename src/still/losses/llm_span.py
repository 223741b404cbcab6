"""Token-level LM distillation (`lm_kd`) and the span-level loss (`span_kd`): thin wrappers of the chunked engine.

`lm_kd(student, teacher, labels=...)` is still's LLM token-level KD term. `student` and `teacher` are
either logits `(B, T, V)` or `LMHeadOutputs` (hidden `(B, T, H)` + head weight `(V, H)`, from
`still.integrations.causal_lm`); the teacher may also be a top-k teacher (`TopKLogits`: `.indices`,
`.logprobs`, `.vocab_size`). With `LMHeadOutputs` the `(B·T, V)` logits never exist: the loss runs through
`still.losses.chunked.chunked_distill_loss` (one chunked loop for all of still), with the divergences of
`still.losses.divergences` (each written once). With logits it calls the same row functions densely.

The loss is `kd_weight · Σ_valid D(p_t ‖ p_s) / n_valid + ce_weight · CE`, positions shifted for next-token
prediction (`shift=True`: position t predicts token t+1). KD compares the first `kd_rows` vocabulary rows;
CE uses all of the student's rows. Divergences: every name of `still.losses.divergences.DIVERGENCES`
(`tvd` is an alias of `tv`); `beta` goes to jsd (TRL's generalized JSD: β=0 → forward KL, β=1 → reverse
KL), `alpha` to skew_kl / skew_rkl (DistiLLM). A top-k teacher with forward KL uses the sparse KL on the
log-probs as recorded (`missing` says where the missing mass goes); with another divergence it is
densified (`still.losses.chunked.densify_topk`) and then treated as teacher logits (1/T applies).

`span_kd`: the span-level loss of Liu et al. (multi-granularity semantic revision): for adjacent tokens
i, i+1 inside one span, ‖p_t,i ⊙ p_t,i+1 − p_s,i ⊙ p_s,i+1‖² (summed over the vocabulary), mean over pairs.
Spans come from `span_ids (B, T)` (same id = same span); `word_span_ids` derives them from word boundaries.
It is a pairwise row function (`Divergence(..., overlap=1)`) run by the same chunked engine.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from still.losses.chunked import _weight_bias, chunked_distill_loss, densify_topk
from still.losses.divergences import DACKL, Divergence, get_divergence, prepare_logits, reduce_rows
from still.registry import register_loss

LM_KD_PAPER = "Hinton et al. 2015; Agarwal et al., On-Policy Distillation of LMs (GKD, ICLR 2024)"
ALIASES = {"tvd": "tv"}


def _div_params(name: str, beta: float, alpha: float, missing: str) -> dict[str, Any]:
    """The `divergence_params` lm_kd's flat arguments mean for divergence `name`."""
    return {"jsd": {"beta": beta}, "skew_kl": {"alpha": alpha}, "skew_rkl": {"alpha": alpha},
            "sparse_topk_kl": {"missing": missing}}.get(name, {})


def divergence_rows(name: str, zs: torch.Tensor, zt: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-row divergence `(n,)` between raw teacher logits `zt (n, V)` and student logits `zs (n, V)`
    (the row functions of `still.losses.divergences` on prepared fp32 logits)."""
    div = get_divergence(ALIASES.get(name, name))
    return div.rows(prepare_logits(zs), prepare_logits(zt), None, **_div_params(div.name, beta, alpha, "uniform"))


def topk_to_logprobs(indices: torch.Tensor, logprobs: torch.Tensor, vocab_size: int,
                     missing: str = "uniform") -> torch.Tensor:
    """Dense teacher log-probs `(n, V)` from top-k `(n, k)` (`densify_topk`): the missing mass spread
    uniformly over the other ids ("uniform"), or dropped and the top-k renormalised ("renormalize")."""
    return densify_topk(indices, logprobs, vocab_size, missing)


def _is_head(x: Any) -> bool:
    return hasattr(x, "hidden") and hasattr(x, "weight")


def _is_topk(x: Any) -> bool:
    return hasattr(x, "indices") and hasattr(x, "logprobs")


def _vocab(x: Any, name: str) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[-1])
    if _is_head(x):
        return int(x.weight.shape[0])
    if _is_topk(x):
        return int(x.vocab_size)
    raise TypeError(f"lm_kd: {name} must be logits, LMHeadOutputs or TopKLogits, not {type(x).__name__}")


def _dense_logits(x: Any) -> torch.Tensor:
    """`(B, T, V)` logits of a payload (the head applied at once: the dense path only)."""
    if isinstance(x, torch.Tensor):
        return x
    if _is_head(x):
        z = x.hidden @ x.weight.t()
        z = z if x.bias is None else z + x.bias
        cap = getattr(x, "softcap", None)
        return torch.tanh(z / cap) * cap if cap else z
    raise TypeError(f"not logits or LMHeadOutputs: {type(x).__name__}")


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
    s_vocab = _vocab(student, "student")
    ref = student.hidden if _is_head(student) else student
    B, T = ref.shape[0], ref.shape[1]
    tgt, valid = _shifted_targets((B, T), labels, attention_mask, shift, ignore_index, ref.device)
    kd_valid = valid
    if kd_mask is not None:
        km = kd_mask.to(ref.device).bool()
        if shift:
            km = torch.cat([km[:, 1:], torch.zeros_like(km[:, :1])], 1)
        kd_valid = valid & km.reshape(-1)
    if teacher is None or kd_weight == 0.0:
        teacher, kd_weight = None, 0.0
    else:
        t_vocab = _vocab(teacher, "teacher")
        if kd_rows is None:
            if t_vocab != s_vocab:
                from still.losses.vocab import VocabMismatchError

                raise VocabMismatchError(
                    f"lm_kd: student has {s_vocab} vocabulary rows, teacher {t_vocab}; pass kd_rows (the shared "
                    "real vocabulary, see causal_lm.aligned_vocab_size) instead of comparing misaligned ids")
            kd_rows = s_vocab
        if kd_rows > min(s_vocab, t_vocab):
            raise ValueError(f"lm_kd: kd_rows={kd_rows} exceeds the student ({s_vocab}) or teacher ({t_vocab}) rows")
    if labels is None and ce_weight:
        raise ValueError("lm_kd: ce_weight > 0 needs labels")
    name = ALIASES.get(divergence, divergence)
    topk = teacher is not None and _is_topk(teacher)
    if topk and name == "forward_kl" and _is_head(student):
        name = "sparse_topk_kl"  # KL on the recorded log-probs (no (N, V) teacher is built)
    get_divergence(name)
    params = _div_params(name, beta, alpha, {"renormalize": "renormalise"}.get(missing, missing))
    lab = torch.where(valid, tgt, torch.full_like(tgt, ignore_index))
    n_kd, n_ce = kd_valid.sum().clamp_min(1).float(), valid.sum().clamp_min(1).float()
    if _is_head(student):
        kw: dict[str, Any] = {}
        if _is_head(teacher):
            kw.update(teacher_hidden=teacher.hidden, teacher_head=teacher.weight[:kd_rows],
                      teacher_bias=None if teacher.bias is None else teacher.bias[:kd_rows],
                      teacher_softcap=getattr(teacher, "softcap", None))
        elif topk:
            kw.update(teacher_topk=teacher)
        elif teacher is not None:
            kw.update(teacher_logits=teacher)
        return chunked_distill_loss(
            student.hidden, student.weight, student_bias=student.bias, labels=lab, kd_mask=kd_valid,
            divergence=name, divergence_params=params, temperature=float(temperature), scale_t2=scale_t2,
            kd_weight=kd_weight, ce_weight=ce_weight, num_valid=n_ce, num_kd_valid=n_kd, topk_missing=missing,
            chunk_size=chunk_size, student_softcap=getattr(student, "softcap", None), kd_vocab=kd_rows, **kw)
    zs = student.reshape(B * T, -1).float()
    loss = zs.new_zeros(())
    if teacher is not None:
        if topk:
            zt = densify_topk(teacher.indices.reshape(B * T, -1), teacher.logprobs.reshape(B * T, -1),
                              t_vocab, missing)
        else:
            zt = _dense_logits(teacher).reshape(B * T, -1)
        div = get_divergence(name)
        t_in: Any = (teacher.indices.reshape(B * T, -1), teacher.logprobs.reshape(B * T, -1)) if div.sparse_teacher \
            else zt[:, :kd_rows]
        rows = div.rows if not params else (lambda s_, t_, l_: div.rows(s_, t_, l_, **params))
        kd = reduce_rows(rows, zs[:, :kd_rows], t_in, temperature=float(temperature), mask=kd_valid, reduction="sum",
                         scale_t2=scale_t2, sparse_teacher=div.sparse_teacher, name=f"lm_kd {name}")
        loss = loss + kd_weight * kd / n_kd
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(zs, lab, ignore_index=ignore_index, reduction="sum") / n_ce
    return loss


@register_loss("chunked_kd", paper="Hinton et al. (2015); chunked fused-linear form as in Liger-Kernel (Hsu et al., 2024)",
               example=lambda: _lm_example(), shape_check="none")
class LMDistillLoss(nn.Module):
    """LLM token-level KD as an Objective term: `chunked_distill_loss` driven by views.

    Student view: an object with `.hidden (B, T, Hs)` and `.weight (V, Hs)` (optional `.bias`, `.softcap`;
    e.g. `LMHeadOutputs`), or hidden states `(B, T, Hs)` with the head bound by `bind(student_head=...)`.
    Teacher view: the same (teacher gets no gradient), cached logits `(B, T, V)`, or a top-k teacher
    (`.indices`/`.logprobs`, `{"indices", "values"}` or `(ids, log-probs)`, each `(B, T, k)`; divergence
    "sparse_topk_kl"). Bound heads are *not* submodules, so the Objective neither re-optimises nor re-saves
    them. `divergence` is a name (`forward_kl`, `jsd`, ...) or "dac_kl" (a trainable `DACKL` sub-module built
    from `divergence_params`). Batch inputs: `labels (B, T)` aligned with the hidden states (shift them
    before; `ignore_index` marks non-targets), optional `mask (B, T)` and `kd_mask (B, T)` (KD-only positions). `ce_weight` adds the hard-label CE
    in the same pass. `vocab_rows` compares only the first rows of both heads (padded vocabularies; see
    `still.losses.vocab.align_vocab`).
    """

    def __init__(self, divergence: str = "forward_kl", divergence_params: dict[str, Any] | None = None,
                 temperature: float = 1.0, scale_t2: bool = False, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 ignore_index: int = -100, chunk_size: int | None = None, vocab_rows: int | None = None,
                 topk_missing: str = "uniform", student_head: Any = None, teacher_head: Any = None) -> None:
        super().__init__()
        self.divergence_params = dict(divergence_params or {})
        self.dac = DACKL(**self.divergence_params) if divergence == "dac_kl" else None
        if divergence != "dac_kl":
            get_divergence(divergence)
        self.divergence = divergence
        self.temperature, self.scale_t2 = float(temperature), bool(scale_t2)
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        self.ignore_index, self.chunk_size, self.vocab_rows = int(ignore_index), chunk_size, vocab_rows
        self.topk_missing = topk_missing
        self._heads: dict[str, Any] = {}
        self.bind(student_head, teacher_head)

    def bind(self, student_head: Any = None, teacher_head: Any = None) -> "LMDistillLoss":
        """Attach lm-heads (`nn.Linear`, a module with `.weight`, or a `(V, H)` tensor). Returns self."""
        if student_head is not None:
            self._heads["student"] = student_head
        if teacher_head is not None:
            self._heads["teacher"] = teacher_head
        return self

    def _rows(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        r = self.vocab_rows
        if r is None:
            return w, b
        if r > w.shape[0]:
            raise ValueError(f"chunked_kd: vocab_rows={r} exceeds a head with {w.shape[0]} rows")
        return w[:r], None if b is None else b[:r]

    def forward(self, student: Any, teacher: Any, labels: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, num_valid: int | torch.Tensor | None = None,
                kd_mask: torch.Tensor | None = None, student_head: Any = None, teacher_head: Any = None) -> torch.Tensor:
        """Views as in the class docstring; heads given here override bound ones."""
        kw: dict[str, Any] = {}
        if hasattr(student, "hidden") and hasattr(student, "weight"):
            hs, (ws, bs) = student.hidden, (student.weight, getattr(student, "bias", None))
            kw["student_softcap"] = getattr(student, "softcap", None)
        else:
            head = student_head if student_head is not None else self._heads.get("student")
            if head is None:
                raise RuntimeError("chunked_kd: the student view is hidden states but no student lm-head is bound "
                                   "(loss.bind(student_head=model.lm_head)) and it has no .weight")
            hs, (ws, bs) = student, _weight_bias(head, None, "student_head")
        ws, bs = self._rows(ws, bs)
        V = ws.shape[0]
        t_head = teacher_head if teacher_head is not None else self._heads.get("teacher")
        if hasattr(teacher, "hidden") and hasattr(teacher, "weight"):
            wt, bt = self._rows(teacher.weight, getattr(teacher, "bias", None))
            kw.update(teacher_hidden=teacher.hidden, teacher_head=wt, teacher_bias=bt,
                      teacher_softcap=getattr(teacher, "softcap", None))
        elif hasattr(teacher, "indices") and hasattr(teacher, "logprobs"):
            kw["teacher_topk"] = (teacher.indices, teacher.logprobs)
        elif isinstance(teacher, (list, tuple, dict)):
            kw["teacher_topk"] = teacher
        elif t_head is not None:
            wt, bt = self._rows(*_weight_bias(t_head, None, "teacher_head"))
            kw.update(teacher_hidden=teacher, teacher_head=wt, teacher_bias=bt)
        else:
            if teacher.shape[-1] < V:
                raise RuntimeError(f"chunked_kd: teacher view {tuple(teacher.shape)} is not logits over V={V} and no "
                                   "teacher lm-head is bound (loss.bind(teacher_head=...))")
            kw["teacher_logits"] = teacher[..., :V]
        params = {} if self.dac is not None else self.divergence_params
        return chunked_distill_loss(
            hs, ws, student_bias=bs, labels=labels, mask=mask, ignore_index=self.ignore_index,
            divergence=self.dac if self.dac is not None else self.divergence, divergence_params=params,
            temperature=self.temperature, scale_t2=self.scale_t2, kd_weight=self.kd_weight, ce_weight=self.ce_weight,
            num_valid=num_valid, kd_mask=kd_mask, topk_missing=self.topk_missing, chunk_size=self.chunk_size, **kw)


def _lm_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    ht = torch.randn(2, 5, 12, generator=g)
    student_head, teacher_head = nn.Linear(8, 17), nn.Linear(12, 17)
    labels = torch.tensor([[1, 2, -100, 3, 4], [5, -100, 6, 7, 8]])
    return (hs, ht), {"labels": labels, "student_head": student_head, "teacher_head": teacher_head}


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


def span_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Row i of prepared logits `(M, V)`: Σ_v (p_s,i ⊙ p_s,i+1 − p_t,i ⊙ p_t,i+1)², `(M,)`; the last row 0."""
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    d = ((ps[:-1] * ps[1:] - pt[:-1] * pt[1:]) ** 2).sum(-1)
    return torch.cat([d, d.new_zeros(1)])


SPAN = Divergence("span_kd", span_rows, overlap=1)  # pairwise: not a token divergence, so not in DIVERGENCES


@register_loss("span_kd", paper="Liu et al., Multi-Granularity Semantic Revision for LLM Distillation (2024)",
               shape_check="none", example=_span_example)
def span_kd(student: Any, teacher: Any, span_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            temperature: float = 1.0, kd_rows: int | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Span-level correlation loss: mean over adjacent in-span pairs (i, i+1) of
    Σ_v (p_t,i ⊙ p_t,i+1 − p_s,i ⊙ p_s,i+1)_v², p = softmax(z / T) over the first `kd_rows` rows.

    student/teacher: logits (B, T, V) or LMHeadOutputs; span_ids (B, T) integers; attention_mask (B, T).
    Pairs never cross rows of the batch (the flattened position i+1 must be in the same sequence).
    """
    ref = student.hidden if _is_head(student) else student
    B, T = ref.shape[0], ref.shape[1]
    kd_rows = kd_rows or min(_vocab(student, "student"), _vocab(teacher, "teacher"))
    sp = span_ids.to(ref.device)
    same = torch.zeros(B, T, dtype=torch.bool, device=ref.device)
    same[:, :-1] = sp[:, 1:] == sp[:, :-1]
    if attention_mask is not None:
        am = attention_mask.to(ref.device).bool()
        same[:, :-1] &= am[:, 1:] & am[:, :-1]
    pair = same.reshape(-1)  # pair (i, i+1) valid, flattened; the last position of a row is never valid
    n_pairs = pair.sum().clamp_min(1).float()
    if _is_head(student):
        kw: dict[str, Any] = {"teacher_logits": teacher} if isinstance(teacher, torch.Tensor) else dict(
            teacher_hidden=teacher.hidden, teacher_head=teacher.weight[:kd_rows],
            teacher_bias=None if teacher.bias is None else teacher.bias[:kd_rows],
            teacher_softcap=getattr(teacher, "softcap", None))
        return chunked_distill_loss(
            student.hidden, student.weight, student_bias=student.bias, divergence=SPAN, temperature=float(temperature),
            kd_mask=pair, num_kd_valid=n_pairs, chunk_size=chunk_size, student_softcap=getattr(student, "softcap", None),
            kd_vocab=kd_rows, **kw)
    zs = prepare_logits(_dense_logits(student).reshape(B * T, -1)[:, :kd_rows], temperature)
    zt = prepare_logits(_dense_logits(teacher).reshape(B * T, -1)[:, :kd_rows], temperature)
    return (span_rows(zs, zt) * pair).sum() / n_pairs
