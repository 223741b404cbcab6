"""Real English text from Debian packages: WordNet glosses, fortunes categories, KJV verses.

Every data set is a map-style `TextDataset` of dict samples `{"text": str, "index": int}` (plus
`"y": int` where there are labels), with `texts`, `labels`, `num_classes`, `input_shape=None` and
`fingerprint()`. Batch them with `text_collate` (texts stay a list of strings; the teacher and the
student tokenize them themselves, each with its own tokenizer).

Held-out splits are deterministic and independent of file order: an item goes to the test split
when a hash of its stable key (the WordNet synset id, the verse reference, the fortune's text) falls
under `heldout_fraction`. So a held-out WordNet synset is never seen in training, whatever subset of
the training split is taken.

>>> train = DATASETS.build("wordnet_glosses", split="train", subset=20000)
>>> test = DATASETS.build("wordnet_glosses", split="test")      # test.lemmas[i] ↔ test.texts[i]
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from still.registry import register_dataset

WORDNET_ROOT = Path("/usr/share/wordnet")
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
#: the 12 fortunes categories of the probe (feasibility notes: 1,800 train / 600 test)
FORTUNE_CATEGORIES = ("people", "computers", "science", "politics", "songs-poems", "work", "art", "food",
                      "sports", "love", "medicine", "law")
WORDNET_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}


class MissingDataError(FileNotFoundError):
    """A Debian data package is not installed; the message names it."""


@functools.lru_cache(maxsize=1 << 20)
def stable_fraction(key: str, salt: str = "") -> float:
    """A deterministic number in [0, 1) from `key` (sha256), used for held-out splits."""
    return int(hashlib.sha256((salt + key).encode()).hexdigest()[:12], 16) / float(16**12)


class TextDataset(Dataset):
    """Texts (and optional integer labels) as dict samples `{"text", "index"[, "y"]}`.

    A text may be a group (a tuple of strings, e.g. a word and its definition): `text_collate`
    flattens it into the batch, so its texts always share a batch; `flat_texts()` lists every string.
    """

    def __init__(self, name: str, texts: Sequence[str], labels: Sequence[int] | None = None,
                 classes: Sequence[str] | None = None, keys: Sequence[str] | None = None,
                 **extra: Any) -> None:
        self.name = name
        self.texts = list(texts)
        self.labels = None if labels is None else list(labels)
        self.classes = list(classes) if classes is not None else None
        self.num_classes = len(self.classes) if self.classes else 0
        self.input_shape = None
        self.keys = list(keys) if keys is not None else [str(i) for i in range(len(self.texts))]
        for k, v in extra.items():
            setattr(self, k, v)
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise ValueError(f"{name}: {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"text": self.texts[i], "index": i}
        if self.labels is not None:
            item["y"] = self.labels[i]
        return item

    def flat_texts(self) -> list[str]:
        """Every string, groups flattened, in order."""
        return [x for t in self.texts for x in ((t,) if isinstance(t, str) else t)]

    @staticmethod
    def collate_fn(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The engine's collate for text data (groups flattened): `text_collate`."""
        return text_collate(samples)

    def fingerprint(self) -> str:
        """sha256 (16 hex) over the name, the texts (a group's joined by \\x1f) and the labels."""
        h = hashlib.sha256(self.name.encode())
        for i, t in enumerate(self.texts):
            h.update((t if isinstance(t, str) else "\x1f".join(t)).encode() + b"\x00")
            if self.labels is not None:
                h.update(str(self.labels[i]).encode())
        return h.hexdigest()[:16]


def text_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch text samples: `{"text": list[str], "index": (B,) int64[, "y": (B,) int64]}`.

    A sample whose text is a group (tuple of strings) adds each of its strings, with its index and
    label repeated, so B counts strings, not samples."""
    texts: list[str] = []
    rows: list[int] = []
    for j, s in enumerate(samples):
        group = (s["text"],) if isinstance(s["text"], str) else tuple(s["text"])
        texts.extend(group)
        rows.extend([j] * len(group))
    out: dict[str, Any] = {"text": texts,
                           "index": torch.tensor([int(samples[j]["index"]) for j in rows], dtype=torch.long)}
    if "y" in samples[0]:
        out["y"] = torch.tensor([int(samples[j]["y"]) for j in rows], dtype=torch.long)
    return out


def _require(path: Path, package: str, what: str) -> Path:
    if not path.exists():
        raise MissingDataError(
            f"{what} not found at {path}: install the Debian package `{package}` "
            f"(sudo apt-get install {package})"
        )
    return path


def _subset(idx: list[int], subset: int | None, salt: str, keys: Sequence[str]) -> list[int]:
    """The first `subset` of `idx` in a fixed hash order (deterministic, nested as subset grows)."""
    if subset is None or subset >= len(idx):
        return idx
    order = sorted(idx, key=lambda i: stable_fraction(keys[i], salt + "subset"))
    return sorted(order[:subset])


# -- WordNet ------------------------------------------------------------------------------------
def parse_wordnet_line(line: str) -> tuple[str, list[str], str, list[str]] | None:
    """One `data.<pos>` line → `(synset_id, lemmas, definition, examples)`, or None for header lines.

    Format (wndb(5WN)): `offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt ... | gloss`.
    The gloss is `definition; "example"; "example"`; lemmas keep their spelling with `_` → space and
    adjective markers like `(a)` removed.
    """
    if line.startswith("  ") or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    f = head.split()
    offset, ss_type, w_cnt = f[0], f[2], int(f[3], 16)
    lemmas = [re.sub(r"\([a-z]+\)$", "", f[4 + 2 * k]).replace("_", " ") for k in range(w_cnt)]
    gloss = gloss.strip()
    parts = [p.strip() for p in re.split(r';\s*(?=")', gloss)]
    definition = parts[0].rstrip("; ").strip()
    examples = [p.strip('"; ') for p in parts[1:] if p.strip('"; ')]
    return f"{ss_type}{offset}", lemmas, definition, examples


def read_wordnet(root: Path | str = WORDNET_ROOT, pos: Sequence[str] = ("noun", "verb", "adj", "adv")
                 ) -> list[tuple[str, list[str], str, list[str]]]:
    """Every synset of the given parts of speech: `[(synset_id, lemmas, definition, examples)]` (parsed once)."""
    return list(_read_wordnet(str(root), tuple(pos)))


@functools.lru_cache(maxsize=4)
def _read_wordnet(root_s: str, pos: tuple[str, ...]) -> tuple[tuple[str, list[str], str, list[str]], ...]:
    root = Path(root_s)
    out = []
    for p in pos:
        if p not in WORDNET_POS:
            raise ValueError(f"wordnet pos {p!r}: choose from {list(WORDNET_POS)}")
        path = _require(root / f"data.{p}", "wordnet-base", f"WordNet data file data.{p}")
        with open(path, encoding="latin-1") as fh:
            for line in fh:
                rec = parse_wordnet_line(line)
                if rec is not None and rec[2]:
                    out.append(rec)
    return tuple(out)


@register_dataset("wordnet_glosses")
def wordnet_glosses(split: str = "train", heldout_fraction: float = 0.1, subset: int | None = None,
                    pos: Sequence[str] = ("noun", "verb", "adj", "adv"), unique_lemmas: bool | None = None,
                    root: str | None = None) -> TextDataset:
    """WordNet 3.0 definitions (Debian `wordnet-base`); `texts[i]` is a definition, `lemmas[i]` its first lemma.

    `split="test"` holds the synsets whose id hashes under `heldout_fraction` (about 11.8k of 117.6k);
    they never appear in `split="train"`. `subset` takes a fixed, nested subset. `unique_lemmas`
    (default: True for test) keeps one synset per lemma, so word → definition retrieval is well posed.
    Extra attributes: `lemmas`, `lemma_sets` (all lemmas of each synset), `synsets`, `examples`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"wordnet_glosses: split must be 'train' or 'test', got {split!r}")
    recs = read_wordnet(root or WORDNET_ROOT, pos)
    test = [stable_fraction(r[0], "wordnet") < heldout_fraction for r in recs]
    idx = [i for i, t in enumerate(test) if t == (split == "test")]
    if unique_lemmas if unique_lemmas is not None else split == "test":
        seen: set[str] = set()
        kept = []
        for i in sorted(idx, key=lambda i: stable_fraction(recs[i][0], "lemma")):
            lem = recs[i][1][0].lower()
            if lem not in seen:
                seen.add(lem)
                kept.append(i)
        idx = sorted(kept)
    keys = [r[0] for r in recs]
    idx = _subset(idx, subset, "wordnet", keys)
    return TextDataset(f"wordnet_glosses:{split}:{heldout_fraction}:{subset}:{','.join(pos)}",
                       [recs[i][2] for i in idx], keys=[keys[i] for i in idx],
                       lemmas=[recs[i][1][0] for i in idx], lemma_sets=[recs[i][1] for i in idx],
                       synsets=[keys[i] for i in idx],
                       examples=[recs[i][3] for i in idx])


# -- fortunes ------------------------------------------------------------------------------------
def read_fortune_file(path: Path | str) -> list[str]:
    """The texts of one fortunes file (split on lines holding a single `%`), whitespace-normalised."""
    items: list[str] = []
    cur: list[str] = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines() + ["%"]:
        if line.rstrip() == "%":
            text = " ".join(" ".join(cur).split())
            if text:
                items.append(text)
            cur = []
        else:
            cur.append(line)
    return items


@register_dataset("fortunes")
def fortunes(split: str = "train", categories: Sequence[str] = FORTUNE_CATEGORIES, per_class: int = 200,
             test_fraction: float = 0.25, root: str | None = None) -> TextDataset:
    """Fortunes (Debian `fortunes`, `fortunes-min`) labelled by category file, at most `per_class` each.

    Each category's distinct texts are ordered by a hash of their text; the first `per_class` are
    kept (all of them for small files: medicine has 74, sports 147, love 150, food 198) and the
    first `test_fraction` of those form the test split. The 12 default categories give 1,626 / 543.
    """
    if split not in ("train", "test"):
        raise ValueError(f"fortunes: split must be 'train' or 'test', got {split!r}")
    base = _require(Path(root or FORTUNES_ROOT), "fortunes", "the fortunes directory")
    texts, labels = [], []
    per_cat = {}
    for cat in categories:
        path = base / cat
        if not path.exists():
            have = sorted(p.name for p in base.iterdir() if p.suffix not in (".dat", ".u8") and p.is_file())
            raise MissingDataError(f"fortunes category {cat!r} not found in {base} (install Debian `fortunes` "
                                   f"and `fortunes-min`); available: {have}")
        per_cat[cat] = set(read_fortune_file(path))
    counts: dict[str, int] = {}
    for items in per_cat.values():
        for t in items:
            counts[t] = counts.get(t, 0) + 1
    for c, cat in enumerate(categories):
        # a text filed under two of the categories has no single label: dropped
        items = sorted((t for t in per_cat[cat] if counts[t] == 1), key=lambda t: stable_fraction(t, "fortunes"))
        items = items[:per_class]
        n_test = int(round(test_fraction * len(items)))
        chosen = items[:n_test] if split == "test" else items[n_test:]
        texts += chosen
        labels += [c] * len(chosen)
    return TextDataset(f"fortunes:{split}:{','.join(categories)}:{per_class}:{test_fraction}",
                       texts, labels, classes=list(categories), keys=texts)


def fortune_files(root: str | Path | None = None) -> list[Path]:
    """Every fortunes text file (not `.dat` / `.u8`, not links) in the fortunes directory."""
    base = _require(Path(root or FORTUNES_ROOT), "fortunes", "the fortunes directory")
    return sorted(p for p in base.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))


@register_dataset("fortunes_unlabeled")
def fortunes_unlabeled(exclude_per_class: int = 200, categories: Sequence[str] = FORTUNE_CATEGORIES,
                       subset: int | None = None, root: str | None = None) -> TextDataset:
    """Unlabeled fortunes from every file, for distillation text, without any item the probe may use.

    Excluded: the first `exclude_per_class` items (in the probe's hash order) of each probe category,
    which covers `fortunes(per_class=p)` for any `p <= exclude_per_class` (train and test alike).
    `subset` keeps a fixed, nested subset (hash order).
    """
    files = fortune_files(root)
    probe = {t for split in ("train", "test")
             for t in fortunes(split, categories, per_class=exclude_per_class, root=root).texts}
    texts = sorted({t for f in files for t in read_fortune_file(f)} - probe,
                   key=lambda t: stable_fraction(t, "fortunes_unlabeled"))
    if subset is not None:
        texts = texts[:subset]
    return TextDataset(f"fortunes_unlabeled:{exclude_per_class}:{','.join(categories)}:{subset}", texts, keys=texts)


# -- KJV -------------------------------------------------------------------------------------------
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def parse_kjv(text: str) -> list[tuple[str, str, str]]:
    """`bible -f` output (`Ge1:1 In the beginning ...`, one verse a line) → `[(book, ref, verse)]`."""
    out = []
    for line in text.splitlines():
        m = _VERSE.match(line.strip())
        if m:
            book, ch, vs, body = m.groups()
            out.append((book, f"{book}{ch}:{vs}", body.strip()))
        elif line.strip() and out:  # a wrapped continuation line
            b, r, body = out[-1]
            out[-1] = (b, r, body + " " + line.strip())
    return out


def read_kjv(bible_cmd: str = "bible") -> list[tuple[str, str, str]]:
    """All 31,102 KJV verses through the `bible` reader (Debian `bible-kjv` + `bible-kjv-text`)."""
    exe = shutil.which(bible_cmd)
    if exe is None or not Path("/usr/lib/bible.data").exists():
        raise MissingDataError("the KJV reader `bible` or its text /usr/lib/bible.data is missing: install the "
                               "Debian packages `bible-kjv` and `bible-kjv-text`")
    res = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"`bible -f Gen1:1-Rev22:21` failed ({res.returncode}): {res.stderr[:300]}")
    verses = parse_kjv(res.stdout)
    if len(verses) < 30000:
        raise RuntimeError(f"`bible -f` gave only {len(verses)} verses; expected 31,102")
    return verses


@register_dataset("kjv_verses")
def kjv_verses(split: str = "train", heldout_fraction: float = 0.1, subset: int | None = None) -> TextDataset:
    """KJV verses labelled by book (66 classes); a verse is held out when its reference hashes low."""
    if split not in ("train", "test"):
        raise ValueError(f"kjv_verses: split must be 'train' or 'test', got {split!r}")
    verses = read_kjv()
    books = list(dict.fromkeys(v[0] for v in verses))
    refs = [v[1] for v in verses]
    idx = [i for i, r in enumerate(refs) if (stable_fraction(r, "kjv") < heldout_fraction) == (split == "test")]
    idx = _subset(idx, subset, "kjv", refs)
    return TextDataset(f"kjv_verses:{split}:{heldout_fraction}:{subset}", [verses[i][2] for i in idx],
                       [books.index(verses[i][0]) for i in idx], classes=books, keys=[refs[i] for i in idx],
                       refs=[refs[i] for i in idx])


def distill_corpus(synsets: int | None = 8000, fortunes_n: int = 0, kjv_n: int = 0, lemmas: bool = True,
                   max_chars: int | None = 400) -> list[str]:
    """Distillation text (no held-out item): glosses (+ first lemmas) of `synsets` training synsets
    (a fixed nested subset; None = all ~106k), `fortunes_n` unlabeled fortunes (probe items excluded)
    and `kjv_n` training KJV verses (held-out verses excluded). Deduplicated, order kept; texts longer
    than `max_chars` are dropped (they would be cut at the models' max length anyway), and so is any
    text equal to a held-out WordNet definition or KJV verse. Lemmas are kept even when a held-out
    synset shares them: the student sees the teacher's embedding of the word, never its held-out pair."""
    out: list[str] = []
    if synsets is None or synsets > 0:
        wn = wordnet_glosses("train", subset=synsets)
        out += wn.texts + (wn.lemmas if lemmas else [])
    if fortunes_n:
        out += fortunes_unlabeled(subset=fortunes_n).texts
    if kjv_n:
        out += kjv_verses("train", subset=kjv_n).texts
    if max_chars is not None:
        out = [t for t in out if len(t) <= max_chars]
    # a text equal to a held-out definition or verse (duplicates across synsets / verses) is dropped too
    held = set(wordnet_glosses("test", unique_lemmas=False).texts)
    if kjv_n:
        held.update(kjv_verses("test").texts)
    return [t for t in dict.fromkeys(out) if t not in held]


def distill_pairs(synsets: int | None = 8000, max_chars: int | None = 400) -> list[tuple[str, str]]:
    """(first lemma, gloss) of `synsets` training synsets (the nested subset `distill_corpus` reads),
    for batches that keep a word with its definition (`distill_embeddings` groups). The same texts as
    `distill_corpus(synsets)`: glosses over `max_chars` or equal to a held-out definition are dropped
    (with their pair), as is a lemma equal to one, and a repeated (lemma, gloss) pair is kept once."""
    wn = wordnet_glosses("train", subset=synsets)
    held = set(wordnet_glosses("test", unique_lemmas=False).texts)
    pairs = [(lem, gl) for lem, gl in zip(wn.lemmas, wn.texts)
             if gl not in held and lem not in held and (max_chars is None or len(gl) <= max_chars)]
    return list(dict.fromkeys(pairs))


@register_dataset("distill_text")
def distill_text(split: str = "train", synsets: int | None = 8000, fortunes_n: int = 0, kjv_n: int = 0,
                 lemmas: bool = True, subset: int | None = None, pairs: bool = False) -> TextDataset:
    """Unlabeled distillation text for embedding recipes: `distill_corpus(...)` as a `TextDataset`
    (`split="train"`; `subset` keeps its first texts); `split="test"` is the held-out WordNet
    definitions (the embedding metrics score on their own held-out sets, not on this split).
    `pairs=True`: the synsets come as (lemma, gloss) groups that share a batch (`distill_pairs`; then a
    batch of `batch_size` samples holds up to twice as many texts), the fortunes / verses as single texts."""
    if split == "test":
        return wordnet_glosses("test", subset=subset)
    if split != "train":
        raise ValueError(f"distill_text: split must be 'train' or 'test', got {split!r}")
    if pairs:
        if not lemmas:
            raise ValueError("distill_text: pairs=True pairs each gloss with its lemma; it needs lemmas=True")
        rest = distill_corpus(0, fortunes_n, kjv_n) if fortunes_n or kjv_n else []
        texts: list[Any] = [*distill_pairs(synsets), *rest][:subset]
    else:
        texts = distill_corpus(synsets, fortunes_n, kjv_n, lemmas)[:subset]
    keys = [t if isinstance(t, str) else "\x1f".join(t) for t in texts]
    return TextDataset(f"distill_text:{synsets}:{fortunes_n}:{kjv_n}:{lemmas}:{subset}" + (":pairs" if pairs else ""),
                       texts, keys=keys)


__all__ = ["TextDataset", "text_collate", "MissingDataError", "wordnet_glosses", "fortunes", "kjv_verses",
           "fortunes_unlabeled", "fortune_files", "distill_corpus", "distill_pairs", "distill_text",
           "parse_wordnet_line", "read_fortune_file", "parse_kjv", "FORTUNE_CATEGORIES", "stable_fraction"]
