"""DDK weights, SCRG correction, the on-policy loop, seq-KD, the top-k cache and the registered LLM methods."""

from __future__ import annotations

import math

import pytest
import torch

from still.data.lm_text import LMBlocks
from still.integrations.causal_lm import CausalLMTeacher, lm_head_outputs, student_from_config
from still.integrations.lm_loop import lm_perplexity, record_topk, student_head_fn, topk_store_teacher, train_lm
from still.methods.base import build_method
from still.methods.llm import DDKSampler, LMDistillConfig, generate, scrg_correction, scrg_sequences
from still.teachers.store import StoreError, StoreMismatchError, StoreTeacher, verify

CFG = dict(model_type="llama", vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def _blocks(n: int = 12, T: int = 16, domains: int = 2) -> LMBlocks:
    g = torch.Generator().manual_seed(0)
    return LMBlocks(torch.randint(0, 256, (n, T), generator=g), torch.arange(n) % domains,
                    [f"d{i}" for i in range(domains)])


def test_ddk_weights_hand_made():
    s = DDKSampler(3, alpha=0.5)
    w0 = s.update([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])             # ratios 2, 2, 3 → softmax
    e2, e3 = math.exp(2), math.exp(3)
    assert w0.tolist() == pytest.approx([e2 / (2 * e2 + e3), e2 / (2 * e2 + e3), e3 / (2 * e2 + e3)])
    w1 = s.update([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])             # equal ratios: ψ ∝ r, r ← ½ r + ½ · 1/3
    assert w1.tolist() == pytest.approx([0.5 * w + 0.5 / 3 for w in w0.tolist()])
    w2 = s.update([3.0, 1.0, 1.0], [1.0, 1.0, 1.0])             # ψ = r · exp(ratio)
    w1 = w1.tolist()
    psi = [w1[0] * math.exp(3), w1[1] * math.e, w1[2] * math.e]
    assert w2.tolist() == pytest.approx([0.5 * p / sum(psi) + 0.5 / 3 for p in psi])
    assert len(s.history) == 3 and abs(sum(w2.tolist()) - 1) < 1e-12
    with pytest.raises(ValueError, match="3 domain"):
        s.update([1.0, 2.0], [1.0, 1.0])


def test_scrg_correction_hand_made():
    # tokens: prompt [0, 1], generated [1, 0, 0]; teacher's argmax for tokens 2..4 = [1, 2, 3]
    tokens = torch.tensor([0, 1, 1, 0, 0])
    zt = torch.full((5, 4), -5.0)
    zt[1, 1] = zt[2, 2] = zt[3, 3] = 5.0
    zs = torch.zeros(5, 4)
    zs[2, 2] = 2.0      # position 2 (predicting token 3): student not far from teacher → smaller KL
    zs[3, 0] = 8.0      # position 3 (predicting token 4): student confident on 0 → larger KL
    assert scrg_correction(zs, zt, tokens, start=2) == (4, 3)
    agree = torch.tensor([0, 1, 1, 2, 3])
    assert scrg_correction(zs, zt, agree, start=2) is None      # all agree: plain sample kept


def test_scrg_sequences_replace_then_regenerate():
    student, tmodel = student_from_config(CFG, seed=0), student_from_config(CFG, seed=1)
    teacher = CausalLMTeacher(tmodel)
    prompts = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(2))
    orig = generate(student, prompts, 6, 1.0, 256, generator=torch.Generator().manual_seed(7))
    seq, fixed = scrg_sequences(student, teacher, prompts, 6, 1, 1.0, 256, generator=torch.Generator().manual_seed(7))
    assert seq.shape == orig.shape and torch.equal(seq[:, :4], prompts)
    with torch.no_grad():
        t_logits = lm_head_outputs(tmodel, {"input_ids": seq}).logits()
    assert any(j >= 0 for j in fixed)
    for b, j in enumerate(fixed):
        if j < 0:
            assert torch.equal(seq[b], orig[b])
            continue
        assert 4 <= j < 10
        assert torch.equal(seq[b, :j], orig[b, :j])                    # the prefix is the student's sample
        assert int(seq[b, j]) == int(t_logits[b, j - 1].argmax())     # the teacher's token replaced it
        assert int(orig[b, j]) != int(seq[b, j])


class _Spy(CausalLMTeacher):
    def __init__(self, model):
        super().__init__(model)
        self.seen = []

    def views(self, batch, names):
        self.seen.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return super().views(batch, names)


def test_on_policy_loop_scores_student_generations():
    data = _blocks()
    teacher = _Spy(student_from_config(CFG, seed=1))
    student = student_from_config(CFG, seed=0)
    cfg = LMDistillConfig(steps=3, batch_size=2, on_policy=1.0, prompt_len=5, gen_len=4, kd_weight=1.0,
                          ce_weight=1.0, divergence="jsd", allowed_gen_rows=256)
    before = [p.clone() for p in student.parameters()]
    r = train_lm(student, data, cfg, teacher=teacher)
    assert r["on_policy_steps"] == 3 and len(teacher.seen) == 3
    prefixes = {tuple(x[:5].tolist()) for x in data.blocks}
    for b in teacher.seen:
        assert b["input_ids"].shape == (2, 9)                  # prompt + generation, not the data block
        assert all(tuple(x[:5].tolist()) in prefixes for x in b["input_ids"])
        assert int(b["input_ids"][:, 5:].max()) < 256          # generation limited to the allowed rows
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
    # on-policy steps carry no CE: with kd_weight 0 nothing is learnt
    r0 = train_lm(student_from_config(CFG, seed=0), data, LMDistillConfig(
        steps=2, batch_size=2, on_policy=1.0, prompt_len=5, gen_len=3, kd_weight=0.0, ce_weight=1.0),
        teacher=CausalLMTeacher(student_from_config(CFG, seed=1)))
    assert r0["losses"] == [0.0, 0.0]


def test_seq_kd_trains_on_teacher_generations():
    data = _blocks()
    teacher = _Spy(student_from_config(CFG, seed=1))
    r = train_lm(student_from_config(CFG, seed=0), data, LMDistillConfig(
        steps=2, batch_size=2, seq_kd=True, kd_weight=1.0, prompt_len=4, gen_len=3), teacher=teacher)
    assert len(r["losses"]) == 2 and teacher.seen[0]["input_ids"].shape == (2, 7)


def test_ddk_loop_and_perplexity_per_domain():
    data = _blocks()
    teacher = CausalLMTeacher(student_from_config(CFG, seed=1))
    r = train_lm(student_from_config(CFG, seed=0), data, LMDistillConfig(steps=4, batch_size=2, ddk=True, ddk_every=2),
                 teacher=teacher, ddk_eval=data.select([0, 1, 2, 3]))
    assert len(r["ddk_weights"]) == 2 and all(abs(sum(w) - 1) < 1e-9 for w in r["ddk_weights"])
    ppl = lm_perplexity(student_head_fn(student_from_config(CFG, seed=0)), data)
    assert set(ppl) >= {"d0", "d1", "all"} and 100 < ppl["all"] < 600     # near-uniform over 259 ids


def test_topk_cache_round_trip_and_refusal(tmp_path):
    data = _blocks(n=5)
    teacher = CausalLMTeacher(student_from_config(CFG, seed=1), topk=8)
    path = record_topk(teacher, data, tmp_path / "c", k=8, batch_size=2, shard_size=2)  # 3 shards
    store = topk_store_teacher(path, teacher.fingerprint(), data.fingerprint())
    assert isinstance(store, StoreTeacher) and verify(path).ok
    batch = {"input_ids": data.blocks[[3, 1]], "index": torch.tensor([3, 1])}
    live, got = teacher.views(batch, ["topk"])["topk"], store.views(batch, ["topk"])["topk"]
    assert torch.equal(live.indices, got.indices) and got.vocab_size == live.vocab_size
    torch.testing.assert_close(live.logprobs, got.logprobs, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(live.missing, got.missing)  # recorded, not re-estimated from fp16 values
    with pytest.raises(StoreMismatchError, match="teacher weights"):
        topk_store_teacher(path, "0" * 16, data.fingerprint())
    with pytest.raises(StoreMismatchError, match="data set"):
        topk_store_teacher(path, teacher.fingerprint(), "0" * 16)
    small = topk_store_teacher(record_topk(teacher, data, tmp_path / "c4", k=4, batch_size=2))  # fewer than served
    assert torch.equal(small.views(batch, ["topk"])["topk"].indices, live.indices[..., :4])
    with pytest.raises(StoreError, match="top 8"):
        record_topk(teacher, data, tmp_path / "c16", k=16)
    r = train_lm(student_from_config(CFG, seed=0), data, LMDistillConfig(steps=2, batch_size=2), teacher=store)
    assert all(math.isfinite(x) for x in r["losses"])


def test_registered_methods_build_objectives():
    for name, params in [("lm_kd", {"divergence": "reverse_kl"}), ("gkd", {"lmbda": 0.3}), ("scrg", {}),
                         ("ddk", {"every": 5}), ("seq_kd", {})]:
        spec = build_method(name, **params)
        assert spec.objective().student_views() == ["lm"]
    assert build_method("gkd", lmbda=0.3).lm.on_policy == 0.3
    assert build_method("scrg").lm.scrg and build_method("scrg").lm.span_weight == 1.0


def test_issue4_store_serves_lm_distillation(tmp_path):
    """The teacher-signal store (still.teachers.store) records the sub-vocab logits view as top-k; lm_kd reads it."""
    store_mod = pytest.importorskip("still.teachers.store")
    from still.integrations.causal_lm import SubVocab, SubVocabCollate
    from still.losses.llm_span import lm_kd

    data = _blocks(n=4)
    sub = SubVocab.from_corpus(data.blocks, 259)
    collate = SubVocabCollate(sub)
    teacher = CausalLMTeacher(student_from_config(CFG, seed=1), rows=sub.ids, topk=8)
    out = store_mod.write_store(teacher, data, tmp_path / "s", views=["logits"], topk={"logits": 8},
                                collate_fn=collate, batch_size=2, shard_size=2)
    st = store_mod.StoreTeacher(out)
    batch = collate([data[i] for i in (2, 0)])
    rec, live = st.views(batch, ["logits"])["logits"], teacher.views(batch, ["topk"])["topk"]
    assert torch.equal(rec.indices, live.indices)
    student = lm_head_outputs(student_from_config({**CFG, "vocab_size": sub.size}, seed=0), batch)
    a = lm_kd(student, rec, labels=batch["labels"], kd_rows=len(sub.ids))
    b = lm_kd(student, live, labels=batch["labels"], kd_rows=len(sub.ids))
    assert a.item() == pytest.approx(b.item(), rel=2e-2)
    r = train_lm(student_from_config({**CFG, "vocab_size": sub.size}, seed=0), data,
                 LMDistillConfig(steps=2, batch_size=2, kd_rows=len(sub.ids)), teacher=st, collate=collate)
    assert all(math.isfinite(x) for x in r["losses"])
