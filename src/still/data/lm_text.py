"""Text domains for language-model distillation, tokenised into fixed-length blocks with held-out splits.

Domains (each read from what Debian / CPython ship; no download):

    kjv        the King James Bible, one verse per document (`bible -f "Gen1:1-Rev22:21"`, package bible-kjv)
    fortunes   /usr/share/games/fortunes/* (one fortune per document, split on "%")
    wordnet    WordNet 3.0 glosses (/usr/share/wordnet/data.{noun,verb,adj,adv}), one gloss per document
    pydoc      CPython's `pydoc_data.topics` (always present), one paragraph per document

>>> docs = domain_texts("kjv", max_chars=200_000)
>>> ds = LMBlocks.from_texts(docs, tokenizer, block_size=128, split="train")   # samples {"input_ids", "labels", ...}

The split is deterministic: a document goes to "test" when sha256(domain, document index) falls in the
held-out fraction, so the same text is held out whatever the tokenizer, block size or `max_chars`.
`ByteTokenizer` is a hub-free tokenizer (bytes + specials) used by tests and the quick benchmark.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from still.registry import register_dataset

DOMAINS = ("kjv", "fortunes", "wordnet", "pydoc")


class DomainUnavailableError(FileNotFoundError):
    """The system package a text domain reads is not installed."""


def _kjv() -> list[str]:
    exe = shutil.which("bible") or ("/usr/games/bible" if os.path.exists("/usr/games/bible") else None)
    if exe is None:
        raise DomainUnavailableError("domain 'kjv' needs the Debian package bible-kjv (the `bible` command)")
    out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    docs = []
    for line in out.splitlines():
        line = line.strip()
        if not line:
            continue
        ref, _, verse = line.partition(" ")  # "Ge1:1 In the beginning ..."
        if verse and any(c.isdigit() for c in ref):
            docs.append(verse.strip())
        elif docs:
            docs[-1] += " " + line
    return docs


def _fortunes(root: str = "/usr/share/games/fortunes") -> list[str]:
    files = sorted(f for f in glob.glob(os.path.join(root, "*"))
                   if os.path.isfile(f) and not f.endswith((".dat", ".u8")) and "off" not in Path(f).parts)
    if not files:
        raise DomainUnavailableError(f"domain 'fortunes' needs the Debian package fortunes ({root} is empty)")
    docs = []
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in text.split("\n%\n") if d.strip() and d.strip() != "%"]
    return docs


def _wordnet(root: str = "/usr/share/wordnet") -> list[str]:
    files = [os.path.join(root, f"data.{p}") for p in ("noun", "verb", "adj", "adv")]
    if not all(os.path.exists(f) for f in files):
        raise DomainUnavailableError(f"domain 'wordnet' needs the Debian package wordnet-base ({root})")
    docs = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(" ") or "|" not in line:
                    continue
                words = line.split(" ")
                lemma = words[4].replace("_", " ") if len(words) > 4 else ""
                gloss = line.split("|", 1)[1].strip()
                if gloss:
                    docs.append(f"{lemma}: {gloss}" if lemma else gloss)
    return docs


def _pydoc() -> list[str]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        docs += [p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 20]
    return docs


_READERS: dict[str, Callable[[], list[str]]] = {"kjv": _kjv, "fortunes": _fortunes, "wordnet": _wordnet, "pydoc": _pydoc}


@functools.lru_cache(maxsize=8)
def _all_docs(domain: str) -> tuple[str, ...]:
    if domain not in _READERS:
        raise KeyError(f"unknown text domain {domain!r}; known: {', '.join(DOMAINS)}")
    # exact duplicates (pydoc repeats paragraphs across topics, fortune files overlap) are dropped, so no
    # text is both in train and in test
    return tuple(dict.fromkeys(_READERS[domain]()))


def available_domains() -> list[str]:
    """The domains whose system data is installed here."""
    out = []
    for d in DOMAINS:
        try:
            if _all_docs(d):
                out.append(d)
        except DomainUnavailableError:
            pass
    return out


def is_test_doc(domain: str, index: int, test_fraction: float = 0.1) -> bool:
    """Deterministic held-out assignment of document `index` of `domain`."""
    h = hashlib.sha256(f"{domain}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < test_fraction


def domain_texts(domain: str, split: str = "train", max_chars: int | None = None,
                 test_fraction: float = 0.1) -> list[str]:
    """The documents of `domain` in `split` ("train" | "test" | "all"), in file order, up to `max_chars`.

    Documents are taken in a fixed shuffled order (by hash) so `max_chars` samples the whole domain
    (all books of the Bible, every fortune file), not only its beginning.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    docs = _all_docs(domain)
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(f"order:{domain}:{i}".encode()).digest())
    out, n = [], 0
    for i in order:
        if split != "all" and is_test_doc(domain, i, test_fraction) != (split == "test"):
            continue
        out.append(docs[i])
        n += len(docs[i])
        if max_chars is not None and n >= max_chars:
            break
    return out


class ByteTokenizer:
    """A hub-free tokenizer: UTF-8 bytes are ids 0..255, then <bos>=256, <eos>=257, <pad>=258.

    Enough of the HF tokenizer interface for still (`__call__`, `encode`, `decode`, `get_vocab`,
    `bos_token_id`, ...) so tests and the quick benchmark run without any model files.
    """

    def __init__(self) -> None:
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 256, 257, 258
        self.vocab_size = 259
        self.name_or_path = "still-byte-tokenizer"

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = True, **_: Any) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def get_vocab(self) -> dict[str, int]:
        v = {f"<0x{i:02X}>": i for i in range(256)}
        v.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
        return v


def tokenize_docs(docs: Sequence[str], tokenizer: Any, eos: bool = True, separator: str | None = None) -> torch.Tensor:
    """One long 1-D int64 stream of `docs`.

    `separator=None` (the old layout): each document tokenised with the tokenizer's specials (BOS), then EOS.
    `separator="\n\n"`: documents tokenised without specials and joined by the separator's tokens, as
    plain text (no BOS/EOS inside the stream; `LMBlocks.from_texts` puts one BOS at each block start).
    """
    if separator is not None:
        enc = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
        sep = list(tokenizer(separator, add_special_tokens=False)["input_ids"])
        flat: list[int] = []
        for i, ids in enumerate(enc):
            flat += (sep if i else []) + list(ids)
        return torch.tensor(flat + sep, dtype=torch.long)
    enc = tokenizer(list(docs), add_special_tokens=True)["input_ids"]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    flat = []
    for ids in enc:
        flat += list(ids)
        if eos and eos_id is not None:
            flat.append(int(eos_id))
    return torch.tensor(flat, dtype=torch.long)


class LMBlocks(Dataset):
    """Fixed-length token blocks `{"input_ids", "attention_mask", "labels", "y": (T,), "index", "domain"}`.

    `labels` equals `input_ids` (HF convention: the model shifts); `y` holds the next-token targets
    (`input_ids[1:]`, then -100), so still's generic metrics (accuracy) read next-token accuracy. `domain` is the integer id of the
    block's domain within `domains` (for DDK's sampler and per-domain evaluation).
    """

    def __init__(self, blocks: torch.Tensor, domain_ids: torch.Tensor, domains: Sequence[str], name: str = "lm") -> None:
        if blocks.ndim != 2:
            raise ValueError(f"blocks must be (N, T), got {tuple(blocks.shape)}")
        self.blocks, self.domain_ids, self.domains, self.name = blocks.long(), domain_ids.long(), list(domains), name
        self.block_size = int(blocks.shape[1])

    @classmethod
    def from_texts(cls, docs: Sequence[str], tokenizer: Any, block_size: int = 128, domain: str = "text",
                   max_blocks: int | None = None, separator: str | None = "\n\n") -> LMBlocks:
        """Blocks of `block_size` tokens. Default layout: documents joined by `separator` as plain text, and
        every block starts with BOS followed by `block_size - 1` stream tokens. Models trained with BOS at
        position 0 degrade badly without it (Gemma-3-270M on KJV: perplexity 150 on blocks cut mid-stream
        with BOS/EOS per verse, 38 with this layout). `separator=None`: the old per-document BOS…EOS stream
        cut into blocks (no BOS at block starts)."""
        stream = tokenize_docs(docs, tokenizer, separator=separator)
        bos = getattr(tokenizer, "bos_token_id", None) if separator is not None else None
        step = block_size - (bos is not None)
        n = len(stream) // step
        if max_blocks is not None:
            n = min(n, max_blocks)
        if n == 0:
            raise ValueError(f"domain {domain!r}: {len(stream)} tokens, fewer than one block of {block_size}")
        blocks = stream[: n * step].view(n, step)
        if bos is not None:
            blocks = torch.cat([torch.full((n, 1), int(bos), dtype=torch.long), blocks], 1)
        return cls(blocks, torch.zeros(n, dtype=torch.long), [domain], name=domain)

    @classmethod
    def concat(cls, parts: Sequence[LMBlocks]) -> LMBlocks:
        domains: list[str] = []
        blocks, ids = [], []
        for p in parts:
            for j, d in enumerate(p.domains):
                if d not in domains:
                    domains.append(d)
            remap = torch.tensor([domains.index(d) for d in p.domains])
            blocks.append(p.blocks)
            ids.append(remap[p.domain_ids])
        return cls(torch.cat(blocks), torch.cat(ids), domains, name="+".join(domains))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.blocks[i]
        y = torch.cat([x[1:], torch.tensor([-100])])  # next-token targets (for still's metrics: accuracy)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone(), "y": y,
                "index": torch.tensor(i), "domain": self.domain_ids[i]}

    def domain_indices(self, domain: str | int) -> torch.Tensor:
        d = self.domains.index(domain) if isinstance(domain, str) else int(domain)
        return torch.nonzero(self.domain_ids == d).flatten()

    def select(self, idx: torch.Tensor | Sequence[int]) -> LMBlocks:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return LMBlocks(self.blocks[idx], self.domain_ids[idx], self.domains, self.name)

    def map_tokens(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LMBlocks:
        """A copy with every token id passed through `fn` (e.g. a sub-vocabulary's `encode`)."""
        return LMBlocks(fn(self.blocks), self.domain_ids, self.domains, self.name)

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr(self.domains).encode())
        h.update(self.blocks.numpy().tobytes())
        h.update(self.domain_ids.numpy().tobytes())
        return h.hexdigest()[:16]


def domain_blocks(domains: Sequence[str], tokenizer: Any, split: str = "train", block_size: int = 128,
                  max_chars: int | None = 200_000, max_blocks: int | None = None,
                  separator: str | None = "\n\n") -> LMBlocks:
    """`LMBlocks` of several domains (ids in the order given); layout as in `LMBlocks.from_texts`."""
    parts = [LMBlocks.from_texts(domain_texts(d, split, max_chars), tokenizer, block_size, d, max_blocks, separator)
             for d in domains]
    return LMBlocks.concat(parts)


@register_dataset("lm_text")
def lm_text(split: str = "train", domains: Sequence[str] = DOMAINS, block_size: int = 128,
            max_chars: int | None = 200_000, max_blocks: int | None = None, tokenizer: str = "bytes") -> LMBlocks:
    """Text domains as LM blocks; `tokenizer` is "bytes" or a local HF tokenizer directory."""
    if tokenizer == "bytes":
        tok: Any = ByteTokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return domain_blocks(domains, tok, "test" if split == "test" else "train", block_size, max_chars, max_blocks)
