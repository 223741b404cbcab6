"""Vocabulary hashing, padded-head alignment, explicit mappings (still.losses.vocab)."""

from __future__ import annotations

import pytest
import torch

from still.losses import divergences as D
from still.losses.chunked import chunked_distill_loss
from still.losses.vocab import (VocabMismatchError, align_vocab, mapping_by_token, real_vocab_size, vocab_hash)


class Tok:
    """The only tokenizer API used: get_vocab() -> {token: id}."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self._v = dict(vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._v)


BASE = {f"tok{i}": i for i in range(50)}


def test_hash_is_order_free_and_sensitive_to_ids():
    assert vocab_hash(Tok(BASE)) == vocab_hash(dict(reversed(list(BASE.items()))))
    swapped = dict(BASE, tok1=2, tok2=1)  # same tokens, same size, two ids swapped: the silent bug
    assert vocab_hash(Tok(swapped)) != vocab_hash(Tok(BASE))
    assert real_vocab_size(Tok(BASE)) == 50


def test_hf_tokenizer_is_supported():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    assert vocab_hash(hf) == vocab_hash(vocab)
    al = align_vocab(hf, Tok(vocab), student_rows=8, teacher_rows=4)
    assert al.size == 4


def test_padded_heads_are_cut_to_the_shared_real_vocabulary():
    al = align_vocab(Tok(BASE), Tok(BASE), student_rows=64, teacher_rows=56)
    assert (al.size, al.student_rows, al.teacher_rows) == (50, 64, 56)
    g = torch.Generator().manual_seed(0)
    ws, wt = torch.randn(64, 6, generator=g, requires_grad=True), torch.randn(56, 9, generator=g)
    hs, ht = torch.randn(11, 6, generator=g), torch.randn(11, 9, generator=g)
    y = torch.tensor([0, 49, 50, 63, -100, 3, 4, 5, 6, 7, 8])
    lab = al.labels(y)
    assert lab.tolist()[:5] == [0, 49, -100, -100, -100]
    loss = chunked_distill_loss(hs, al.student_head(ws), ht, al.teacher_head(wt), labels=lab, ce_weight=0.5)
    zs, zt = al.student_logits(hs @ ws.t()), al.teacher_logits(ht @ wt.t())
    want = D.forward_kl(zs, zt, labels=lab) + 0.5 * torch.nn.functional.cross_entropy(zs, lab)
    torch.testing.assert_close(loss, want, rtol=5e-4, atol=1e-5)
    (g_ws,) = torch.autograd.grad(loss, ws)
    assert (g_ws[50:] == 0).all() and g_ws[:50].abs().sum() > 0  # padding rows never learn
    with pytest.raises(ValueError, match="rows"):
        align_vocab(Tok(BASE), Tok(BASE), student_rows=40, teacher_rows=56)
    with pytest.raises(ValueError, match="64"):
        al.student_head(ws[:60])


def test_different_tokenizers_are_refused_unless_mapped():
    other = {f"tok{i}": i for i in range(40)} | {"x": 40, "y": 41}
    with pytest.raises(VocabMismatchError) as e:
        align_vocab(Tok(BASE), Tok(other), 50, 42)
    msg = str(e.value)
    assert "hash" in msg and "only in the student" in msg and "mapping" in msg
    m = mapping_by_token(Tok(BASE), Tok(other))
    assert m.shape == (40, 2) and (m[:, 0] == m[:, 1]).all()
    al = align_vocab(Tok(BASE), Tok(other), 50, 42, mapping=m)
    assert al.size == 40
    assert al.labels(torch.tensor([3, 45, -100])).tolist() == [3, -100, -100]
    perm = torch.tensor([[0, 2], [1, 0], [2, 1]])  # a reordering mapping picks the right rows
    al2 = align_vocab(Tok(BASE), Tok(other), 50, 42, mapping=perm)
    wt = torch.arange(42.0)[:, None]
    assert al2.teacher_head(wt).squeeze(1).tolist() == [2.0, 0.0, 1.0]
    assert al2.labels(torch.tensor([2, 0, 7])).tolist() == [2, 0, -100]
    with pytest.raises(ValueError, match="repeats"):
        align_vocab(Tok(BASE), Tok(other), 50, 42, mapping=torch.tensor([[0, 1], [0, 2]]))
    with pytest.raises(ValueError, match="outside"):
        align_vocab(Tok(BASE), Tok(other), 50, 42, mapping=torch.tensor([[0, 99]]))
