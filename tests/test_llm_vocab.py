"""Tokenizer hashing, padded-vocabulary alignment, sub-vocabularies, students built from a config."""

from __future__ import annotations

import pytest
import torch

from still.data.lm_text import ByteTokenizer
from still.integrations.causal_lm import (CausalLMTeacher, SubVocab, SubVocabCollate, VocabMismatchError,
                                          aligned_vocab_size, check_same_tokenizer, lm_head_outputs,
                                          num_parameters, student_from_config, tokenizer_hash)

CFG = dict(model_type="llama", vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


class _Shifted(ByteTokenizer):
    """Same size, two ids swapped: the silent-mismatch case."""

    def get_vocab(self):
        v = super().get_vocab()
        v["<0x41>"], v["<0x42>"] = v["<0x42>"], v["<0x41>"]
        return v


def test_same_tokenizer_passes_and_mismatch_is_refused_with_details():
    assert check_same_tokenizer(ByteTokenizer(), ByteTokenizer()) == tokenizer_hash(ByteTokenizer())
    with pytest.raises(VocabMismatchError) as e:
        check_same_tokenizer(ByteTokenizer(), _Shifted(), where="recipe teacher")
    msg = str(e.value)
    assert "recipe teacher" in msg and "id 65" in msg and "TRL #4562" in msg


def test_aligned_vocab_size_with_padded_heads():
    tok = ByteTokenizer()
    a = student_from_config({**CFG, "vocab_size": 264}, seed=0)  # padded head (264 rows)
    b = student_from_config(CFG, seed=1)
    assert aligned_vocab_size(tok, a, b) == 259
    small = student_from_config({**CFG, "vocab_size": 200}, seed=0)
    with pytest.raises(VocabMismatchError, match="fewer"):
        aligned_vocab_size(tok, small)


def test_subvocab_encode_decode_and_corpus_selection():
    toks = torch.tensor([5, 5, 5, 9, 9, 2, 7])
    sub = SubVocab.from_corpus(toks, full_size=12, max_size=2, always=[0], unk_full=1)
    assert sub.ids.tolist() == [0, 5] and sub.size == 3 and sub.unk == 2
    assert sub.encode(torch.tensor([5, 0, 9])).tolist() == [1, 0, 2]
    assert sub.decode(torch.tensor([1, 0, 2])).tolist() == [5, 0, 1]
    full = SubVocab.from_corpus(toks, full_size=12)
    assert full.ids.tolist() == [2, 5, 7, 9]
    again = SubVocab.from_state(full.state())
    assert again.ids.tolist() == full.ids.tolist()


def test_dropped_mass_matches_a_naive_sum():
    m = student_from_config(CFG, seed=0).eval()
    ids = torch.randint(0, 259, (2, 6), generator=torch.Generator().manual_seed(0))
    sub = SubVocab(torch.arange(0, 259, 3), 259)
    got = sub.measure_dropped_mass(m, ids, batch_size=1)
    with torch.no_grad():
        p = torch.softmax(m(input_ids=ids).logits, -1)
    keep = torch.zeros(259, dtype=torch.bool)
    keep[sub.ids] = True
    assert got == pytest.approx(float(p[..., ~keep].sum(-1).mean()), rel=1e-4)


def test_subvocab_collate_and_teacher_rows():
    sub = SubVocab(torch.tensor([3, 10, 256]), 259)
    x = torch.tensor([3, 10, 77, 256])
    b = SubVocabCollate(sub)([{"input_ids": x, "labels": x, "index": torch.tensor(0)}])
    assert b["teacher_input_ids"].tolist() == [[3, 10, 77, 256]]
    assert b["input_ids"].tolist() == [[0, 1, 3, 2]] and b["labels"].tolist() == [[0, 1, 3, 2]]
    tm = student_from_config(CFG, seed=0)
    out = CausalLMTeacher(tm, rows=sub.ids).views(b, ["lm", "logits", "topk"])
    with torch.no_grad():
        full = tm(input_ids=b["teacher_input_ids"]).logits
    torch.testing.assert_close(out["logits"], full[..., sub.ids], rtol=1e-5, atol=1e-5)
    assert out["lm"].weight.shape == (3, 16) and out["topk"].indices.shape == (1, 4, 3)


def test_lm_head_outputs_equals_model_logits():
    m = student_from_config(CFG, seed=0).eval()
    ids = torch.randint(0, 259, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(lm_head_outputs(m, {"input_ids": ids}).logits(), m(input_ids=ids).logits)


def test_student_from_teacher_keeps_chosen_layers_and_subvocab_rows():
    t = student_from_config(CFG, seed=3)
    rows = torch.tensor([1, 4, 9, 200])
    s = student_from_config(None, init="teacher", teacher=t, layers=[0, 2], vocab_rows=rows)
    assert s.config.num_hidden_layers == 2 and s.config.vocab_size == 5
    tl, sl = t.model.layers, s.model.layers
    torch.testing.assert_close(sl[1].mlp.up_proj.weight, tl[2].mlp.up_proj.weight)
    torch.testing.assert_close(sl[0].self_attn.q_proj.weight, tl[0].self_attn.q_proj.weight)
    emb = s.get_input_embeddings().weight
    torch.testing.assert_close(emb[:4], t.get_input_embeddings().weight[rows])
    assert num_parameters(s) < num_parameters(t)
    rnd = student_from_config(CFG, seed=0, hidden_size=8, intermediate_size=16)
    assert rnd.config.hidden_size == 8
    with pytest.raises(ValueError, match="indices"):
        student_from_config(None, init="teacher", teacher=t, layers=[0, 5])
