"""Text domains: deterministic held-out splits, fixed-length blocks, the byte tokenizer."""

from __future__ import annotations

import pytest
import torch

from still.data.lm_text import (DOMAINS, ByteTokenizer, LMBlocks, available_domains,
                                domain_blocks, domain_texts, is_test_doc)
from still.registry import DATASETS


def test_pydoc_domain_split_is_deterministic_and_disjoint():
    train, test = domain_texts("pydoc", "train"), domain_texts("pydoc", "test")
    assert train and test and not set(train) & set(test)
    assert len(test) / (len(train) + len(test)) == pytest.approx(0.1, abs=0.04)
    assert domain_texts("pydoc", "train", max_chars=2000) == domain_texts("pydoc", "train", max_chars=2000)
    assert is_test_doc("pydoc", 7) == is_test_doc("pydoc", 7)
    with pytest.raises(ValueError, match="split"):
        domain_texts("pydoc", "val")
    with pytest.raises(KeyError, match="known"):
        domain_texts("nope")


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_installed_domain_reads(domain):
    if domain not in available_domains():
        pytest.skip(f"system data for {domain} is not installed")
    docs = domain_texts(domain, "train", max_chars=3000)
    assert docs and all(isinstance(d, str) and d for d in docs) and sum(map(len, docs)) >= 3000


def test_blocks_shapes_targets_and_domains():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo" and tok.encode("a")[0] == tok.bos_token_id
    ds = domain_blocks(["pydoc"], tok, "train", block_size=32, max_chars=3000)
    s = ds[0]
    assert s["input_ids"].shape == (32,) and torch.equal(s["labels"], s["input_ids"])
    assert torch.equal(s["y"][:-1], s["input_ids"][1:]) and int(s["y"][-1]) == -100
    a = LMBlocks(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), ["a"])
    b = LMBlocks(torch.ones(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long), ["b"])
    both = LMBlocks.concat([a, b])
    assert both.domains == ["a", "b"] and both.domain_ids.tolist() == [0, 0, 0, 1, 1]
    assert both.domain_indices("b").tolist() == [3, 4] and len(both.select([4])) == 1
    assert both.fingerprint() != a.fingerprint()
    with pytest.raises(ValueError, match="fewer than one block"):
        LMBlocks.from_texts(["ab"], tok, block_size=64)
    reg = DATASETS.build("lm_text", split="test", domains=["pydoc"], block_size=16, max_chars=500)
    assert reg[0]["input_ids"].shape == (16,)


def test_blocks_start_with_bos_and_join_documents_as_text():
    tok = ByteTokenizer()
    ds = LMBlocks.from_texts(["abc", "de", "fghij"], tok, block_size=4)
    # stream "abc\n\nde\n\nfghij\n\n" (16 bytes) in 5 blocks of 3 after one BOS each
    assert ds.blocks[:, 0].tolist() == [tok.bos_token_id] * 5
    assert tok.decode(ds.blocks[:, 1:].flatten()) == "abc\n\nde\n\nfghij\n"
    assert not (ds.blocks[:, 1:] >= 256).any()  # no BOS/EOS inside the stream
    old = LMBlocks.from_texts(["abc", "de"], tok, block_size=4, separator=None)
    assert old.blocks.flatten().tolist() == [256, 97, 98, 99, 257, 256, 100, 101]
