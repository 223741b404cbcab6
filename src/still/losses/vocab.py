"""Vocabulary alignment between a teacher and a student LM.

Two cases are told apart:

* **Same tokenizer, padded heads.** Checkpoints pad their embedding/lm-head rows for speed (e.g. a real
  vocabulary of 151,665 tokens in heads of 151,936 and 152,064 rows). Only the shared real rows carry
  meaning, so both heads (or logits) are cut to them: `align_vocab(...).student_head(W)`.
* **Different tokenizers.** Detected by a hash of the vocabulary (`vocab_hash`, from `get_vocab()`:
  token string → id, added tokens included) and refused with `VocabMismatchError`, unless an explicit
  mapping `(K, 2)` of (student id, teacher id) pairs is given; then both sides are restricted to the K
  mapped tokens (the distribution is renormalised over them). `mapping_by_token(student_tok, teacher_tok)`
  builds such a mapping from identical token strings, but only when asked.

>>> al = align_vocab(student_tok, teacher_tok, student_rows=152064, teacher_rows=151936)
>>> loss = chunked_distill_loss(h_s, al.student_head(W_s), h_t, al.teacher_head(W_t), labels=al.labels(y))
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch


class VocabMismatchError(ValueError):
    """Teacher and student tokenizers differ and no explicit mapping was given."""


def _vocab(tok: Any) -> dict[str, int]:
    if isinstance(tok, Mapping):
        return {str(k): int(v) for k, v in tok.items()}
    if hasattr(tok, "get_vocab"):
        return {str(k): int(v) for k, v in tok.get_vocab().items()}
    raise TypeError(f"expected a tokenizer with get_vocab() or a token→id mapping, got {type(tok).__name__}")


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def _digest(tok: Any, extra: tuple[str, ...] = ()) -> str:
    items = sorted(_vocab(tok).items(), key=lambda kv: (kv[1], kv[0]))
    h = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


def vocab_hash(tok: Any) -> str:
    """sha256 (hex, 16 chars) of the sorted (token, id) pairs of a tokenizer (or a token→id dict)."""
    return _digest(tok)


def tokenizer_hash(tokenizer: Any) -> str:
    """`vocab_hash` extended by the special-token ids (bos/eos/pad/unk): what a teacher store or cache records."""
    return _digest(tokenizer, tuple(f"{a}={getattr(tokenizer, a, None)}" for a in SPECIAL_IDS))


def real_vocab_size(tok: Any) -> int:
    """Rows that carry a token: 1 + the largest id of the vocabulary."""
    v = _vocab(tok)
    return max(v.values()) + 1 if v else 0


def mapping_by_token(student_tok: Any, teacher_tok: Any) -> torch.Tensor:
    """`(K, 2)` int64 (student id, teacher id) for every token string present in both vocabularies."""
    s, t = _vocab(student_tok), _vocab(teacher_tok)
    pairs = sorted((sid, t[tok]) for tok, sid in s.items() if tok in t)
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def _describe(s: dict[str, int], t: dict[str, int]) -> str:
    only_s = sorted(set(s) - set(t))
    only_t = sorted(set(t) - set(s))
    moved = sorted(k for k in set(s) & set(t) if s[k] != t[k])
    parts = [f"student has {len(s)} tokens, teacher {len(t)}"]
    for name, xs in (("only in the student", only_s), ("only in the teacher", only_t), ("with different ids", moved)):
        if xs:
            parts.append(f"{len(xs)} {name} (e.g. {', '.join(map(repr, xs[:3]))})")
    return "; ".join(parts)


@dataclass
class VocabAlignment:
    """How to cut/reorder head rows so index i means the same token on both sides.

    `size`: the aligned vocabulary K. Without a mapping the first K rows are kept on both sides; with a
    mapping `(K, 2)`, row i is student id `mapping[i, 0]` and teacher id `mapping[i, 1]`.
    """

    size: int
    student_rows: int
    teacher_rows: int
    mapping: torch.Tensor | None = None

    def _cut(self, x: torch.Tensor, side: int, rows: int, dim: int) -> torch.Tensor:
        if x.shape[dim] != rows:
            who = "student" if side == 0 else "teacher"
            raise ValueError(f"{who} tensor has {x.shape[dim]} vocabulary rows on dim {dim}, the alignment expects {rows}")
        if self.mapping is None:
            return x.narrow(dim, 0, self.size)
        return x.index_select(dim, self.mapping[:, side].to(x.device))

    def student_head(self, w: torch.Tensor) -> torch.Tensor:
        """Student lm-head weight `(Vs, H)` (or bias `(Vs,)`) → `(K, H)`."""
        return self._cut(w, 0, self.student_rows, 0)

    def teacher_head(self, w: torch.Tensor) -> torch.Tensor:
        """Teacher lm-head weight `(Vt, H)` (or bias) → `(K, H)`."""
        return self._cut(w, 1, self.teacher_rows, 0)

    def student_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Student logits `(..., Vs)` → `(..., K)`."""
        return self._cut(z, 0, self.student_rows, -1)

    def teacher_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Teacher logits `(..., Vt)` → `(..., K)`."""
        return self._cut(z, 1, self.teacher_rows, -1)

    def labels(self, y: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Student token ids `(...)` → aligned ids; ids outside the aligned vocabulary become `ignore_index`."""
        if self.mapping is None:
            return torch.where((y >= 0) & (y < self.size), y, torch.full_like(y, ignore_index))
        lut = torch.full((self.student_rows,), ignore_index, dtype=torch.long, device=y.device)
        lut[self.mapping[:, 0].to(y.device)] = torch.arange(self.size, device=y.device)
        ok = (y >= 0) & (y < self.student_rows)
        return torch.where(ok, lut[y.clamp(0, self.student_rows - 1)], torch.full_like(y, ignore_index))


def align_vocab(
    student_tok: Any,
    teacher_tok: Any,
    student_rows: int,
    teacher_rows: int,
    mapping: torch.Tensor | None = None,
) -> VocabAlignment:
    """Check the tokenizers and return the alignment of heads with `student_rows` / `teacher_rows` rows.

    Same vocabulary hash: the shared real vocabulary (1 + the largest id) is kept on both sides; both
    heads must have at least that many rows. Different hashes: `VocabMismatchError` naming the
    differences, unless `mapping` `(K, 2)` (student id, teacher id) is given.
    """
    s, t = _vocab(student_tok), _vocab(teacher_tok)
    if mapping is None:
        hs, ht = vocab_hash(s), vocab_hash(t)
        if hs != ht:
            raise VocabMismatchError(
                f"student and teacher tokenizers differ (vocabulary hash {hs} vs {ht}): {_describe(s, t)}. Token-level "
                "distillation needs the same token ids on both sides; pass mapping=(K, 2) student/teacher id pairs "
                "(e.g. still.losses.vocab.mapping_by_token(student_tok, teacher_tok)) to distill over shared tokens only")
        real = real_vocab_size(s)
        for who, rows in (("student", student_rows), ("teacher", teacher_rows)):
            if rows < real:
                raise ValueError(f"the {who} head has {rows} rows but the tokenizer has ids up to {real - 1}")
        return VocabAlignment(real, int(student_rows), int(teacher_rows))
    m = torch.as_tensor(mapping, dtype=torch.long)
    if m.dim() != 2 or m.shape[1] != 2 or m.shape[0] == 0:
        raise ValueError(f"mapping must be a non-empty (K, 2) tensor of (student id, teacher id), got {tuple(m.shape)}")
    for side, (who, rows) in enumerate((("student", student_rows), ("teacher", teacher_rows))):
        col = m[:, side]
        if int(col.min()) < 0 or int(col.max()) >= rows:
            raise ValueError(f"mapping has {who} ids outside [0, {rows})")
        if col.unique().numel() != col.numel():
            raise ValueError(f"mapping repeats {who} ids; each token may appear once")
    return VocabAlignment(int(m.shape[0]), int(student_rows), int(teacher_rows), m)
