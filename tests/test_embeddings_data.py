"""Text data loaders: parsing of the Debian files, deterministic held-out splits, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from still.data.text import (
    FORTUNE_CATEGORIES, MissingDataError, fortunes, kjv_verses, parse_kjv, parse_wordnet_line, read_fortune_file,
    stable_fraction, text_collate, wordnet_glosses,
)
from still.registry import DATASETS

HAVE_WN = Path("/usr/share/wordnet/data.noun").exists()
HAVE_FORTUNES = Path("/usr/share/games/fortunes/people").exists()
HAVE_KJV = Path("/usr/lib/bible.data").exists()

ADJ = ('00002312 00 a 02 abaxial 0 dorsal 4 002 ;c 06037666 n 0000 ! 00002527 a 0101 | facing away from the axis '
       'of an organ or organism; "the abaxial surface of a leaf is the underside"  \n')
NOUN = ('00045646 04 n 02 rally 1 rallying 1 003 @ 00036762 n 0000 + 01097978 v 0204 + 01381567 v 0102 | the feat '
        'of mustering strength for a renewed effort; "he singled to start a rally in the 9th inning"; "he feared '
        'the rallying of their troops"  \n')
MANY = ('09999999 18 n 0b a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 0 j 0 big_apple(a) 0 000 | eleven lemmas, hex count; '
        'a semicolon in the definition\n')


def test_parse_wordnet_line():
    sid, lemmas, definition, examples = parse_wordnet_line(ADJ)
    assert sid == "a00002312" and lemmas == ["abaxial", "dorsal"]
    assert definition == "facing away from the axis of an organ or organism"
    assert examples == ["the abaxial surface of a leaf is the underside"]
    sid, lemmas, definition, examples = parse_wordnet_line(NOUN)
    assert lemmas == ["rally", "rallying"] and len(examples) == 2
    _, lemmas, definition, examples = parse_wordnet_line(MANY)
    assert len(lemmas) == 11 and lemmas[-1] == "big apple"          # hex 0b, '_' → ' ', '(a)' stripped
    assert definition == "eleven lemmas, hex count; a semicolon in the definition" and examples == []
    assert parse_wordnet_line("  1 This software and database is being provided\n") is None


def test_wordnet_from_a_small_root(tmp_path):
    (tmp_path / "data.noun").write_text("  1 license header\n" + NOUN + MANY)
    (tmp_path / "data.adj").write_text(ADJ)
    tr = wordnet_glosses("train", heldout_fraction=0.0, pos=("noun", "adj"), root=str(tmp_path))
    te = wordnet_glosses("test", heldout_fraction=1.0, pos=("noun", "adj"), root=str(tmp_path))
    assert len(tr) == 3 and len(te) == 3 and set(tr.synsets) == set(te.synsets)
    assert tr[0]["text"] == tr.texts[0] and tr[0]["index"] == 0
    with pytest.raises(MissingDataError, match="wordnet-base"):
        wordnet_glosses("train", pos=("verb",), root=str(tmp_path))
    with pytest.raises(ValueError, match="pos"):
        wordnet_glosses("train", pos=("nouns",), root=str(tmp_path))


def test_fortune_file_and_kjv_parsing(tmp_path):
    f = tmp_path / "cat"
    f.write_text("A first\n  fortune.\n\t\t-- Someone\n%\nsecond one\n%\n%\nthird\n")
    assert read_fortune_file(f) == ["A first fortune. -- Someone", "second one", "third"]
    verses = parse_kjv("Ge1:1 In the beginning God created the heaven and the earth.\n"
                       "1Sa2:3 Talk no more so exceeding proudly;\n  let not arrogancy come\nRev22:21 Amen.\n")
    assert verses[0] == ("Ge", "Ge1:1", "In the beginning God created the heaven and the earth.")
    assert verses[1] == ("1Sa", "1Sa2:3", "Talk no more so exceeding proudly; let not arrogancy come")
    assert verses[2][1] == "Rev22:21"
    with pytest.raises(MissingDataError, match="fortunes"):
        fortunes(root=str(tmp_path / "nowhere"))
    with pytest.raises(MissingDataError, match="'people' not found"):
        fortunes(root=str(tmp_path))


def test_stable_fraction_and_collate():
    assert stable_fraction("n00001740", "wordnet") == stable_fraction("n00001740", "wordnet")
    assert 0 <= stable_fraction("x") < 1 and stable_fraction("x") != stable_fraction("y")
    b = text_collate([{"text": "a", "index": 3, "y": 1}, {"text": "b", "index": 5, "y": 0}])
    assert b["text"] == ["a", "b"] and b["index"].tolist() == [3, 5] and b["y"].tolist() == [1, 0]


@pytest.mark.skipif(not HAVE_WN, reason="Debian wordnet-base is not installed")
def test_wordnet_real_split_is_disjoint_and_deterministic():
    tr, te = DATASETS.build("wordnet_glosses", split="train"), DATASETS.build("wordnet_glosses", split="test")
    assert len(tr) > 100_000 and 9_000 < len(te) < 13_000
    assert not set(tr.synsets) & set(te.synsets)
    assert len(set(l.lower() for l in te.lemmas)) == len(te)        # one synset per lemma in test
    sub = wordnet_glosses("train", subset=300)
    assert len(sub) == 300 and set(sub.synsets) <= set(wordnet_glosses("train", subset=600).synsets)
    assert sub.fingerprint() == wordnet_glosses("train", subset=300).fingerprint()


@pytest.mark.skipif(not HAVE_FORTUNES, reason="Debian fortunes is not installed")
def test_fortunes_real_split():
    tr, te = fortunes("train"), fortunes("test")
    assert tr.num_classes == 12 == len(FORTUNE_CATEGORIES)
    assert not set(tr.texts) & set(te.texts)
    assert sorted(set(te.labels)) == list(range(12))
    assert 1500 < len(tr) < 1700 and 500 < len(te) < 600


@pytest.mark.skipif(not HAVE_KJV, reason="Debian bible-kjv is not installed")
def test_kjv_real_split():
    te = kjv_verses("test")
    tr = kjv_verses("train", subset=1000)
    assert te.num_classes == 66 and 2800 < len(te) < 3400
    assert not set(te.refs) & set(tr.refs)
    assert te.texts[0] and te.classes[0] == "Ge"


@pytest.mark.skipif(not (HAVE_WN and HAVE_FORTUNES and HAVE_KJV), reason="Debian wordnet-base, fortunes, bible-kjv")
def test_distillation_text_holds_no_heldout_item():
    """Unlabeled fortunes leave out every item the probe may use; the distillation corpus leaves out held-out
    WordNet definitions and KJV verses (also when another synset / verse has the same text)."""
    from still.data.text import distill_corpus, fortunes_unlabeled

    unl = fortunes_unlabeled()
    probe = {t for s in ("train", "test") for t in fortunes(s, per_class=200).texts}
    assert len(unl) > 5000 and not probe & set(unl.texts)
    texts = distill_corpus(2000, fortunes_n=500, kjv_n=500)
    held = set(wordnet_glosses("test", unique_lemmas=False).texts) | set(kjv_verses("test").texts)
    assert len(texts) > 4000 and not held & set(texts) and not probe & set(texts)
    assert texts[:10] == distill_corpus(2000, fortunes_n=500, kjv_n=500)[:10]  # deterministic
    ds = DATASETS.build("distill_text", split="train", synsets=100, subset=50)
    assert len(ds) == 50 and ds[0]["text"] == ds.texts[0]


def test_distill_pairs_are_training_words_with_their_glosses():
    from still.data.text import distill_corpus, distill_pairs

    pairs = distill_pairs(2000)
    wn = wordnet_glosses("train", subset=2000)
    gloss_of = {}
    for lem, gl in zip(wn.lemmas, wn.texts):
        gloss_of.setdefault(lem, set()).add(gl)
    assert len(pairs) > 1900 and all(gl in gloss_of[lem] for lem, gl in pairs)
    held = set(wordnet_glosses("test", unique_lemmas=False).texts)
    flat = {x for p in pairs for x in p}
    assert not held & flat and flat <= set(distill_corpus(2000)) | {lem for lem, _ in pairs}
    assert len(set(pairs)) == len(pairs) and pairs == distill_pairs(2000)
