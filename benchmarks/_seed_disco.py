"""DiSCo (catalog 1.4) on a conversational-retrieval task built from WordNet, with real teachers.

Task: each synset's "conversation" wraps the lemma in one of eight conversational turns ("so, going
back to what we said, what about <lemma>?"); its rewrite is the bare lemma; the document to retrieve
is the synset's definition, among all held-out definitions (R@1). (A static student is a bag of
tokens, so the conversation must not hinge on word order: an earlier turn naming another topic would
be unresolvable for it; the filler words are what the student must learn to ignore.) The
student, a static-embedding model (`st_static`, 256-d, PCA init from MiniLM's token embeddings),
reads the conversation; the teachers (all-MiniLM-L6-v2 and all-mpnet-base-v2, frozen, cached) read
the rewrite (`RewriteTeacher`; documents are their own rewrite), as DiSCo's teachers score the
LLM-rewritten query. Training texts: the conversations and definitions of the training synsets.

Columns: scratch = the student's init, untrained (there are no labels to train on); plain KD = the
same score distillation from one teacher alone (MiniLM, or MPNet in the second row); method = DiSCo,
the mean of both teachers' in-batch score distributions (`disco` method, τ = 0.05); teacher =
MiniLM reading the raw conversation (what one would use without distillation). Same data, steps,
lr and batch for all; mean ± std over seeds (seed = shuffle order).

Used by `benchmarks/seed_methods.py` (`--parts disco`): `rows(quick, seeds, budget)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CLAIM = "up to +6 recall points out of domain on 5 conversational-search sets; multi-teacher beats its teachers [A]"
TURNS = ("hi! quick question: what is {}?", "so, going back to what we said, what about {}?",
         "could you tell me what {} means, please?", "i was reading earlier and wondered about {}",
         "ok and {}?", "thanks. next one: {}", "hmm, what does {} mean in this context?",
         "one more thing i keep wondering about, {}, can you explain")


@dataclass
class Budget:
    train: int = 1000          # training synsets (their MiniLM and MPNet embeddings are cached by embeddings.py)
    test: int = 1000           # held-out synsets: the retrieval pool
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    max_steps: int | None = None


QUICK = Budget(train=64, test=64, epochs=1, batch_size=32, max_steps=3)


def conversations(lemmas: list[str]) -> list[str]:
    """One conversational turn per synset, around its lemma (templates in turn)."""
    return [TURNS[i % len(TURNS)].format(lemma.replace("_", " ")) for i, lemma in enumerate(lemmas)]


def results(b: Budget, seeds: list[int]) -> dict[str, list[float]]:
    from still.data.text import wordnet_glosses
    from still.integrations import sentence_transformers as sti
    from still.integrations.embedding_eval import wordnet_retrieval
    from still.methods.base import build_method
    from still.models.text import static_student
    from still.paths import cache_root
    from still.teachers.rewrite import RewriteTeacher

    tr, te = wordnet_glosses("train", subset=b.train), wordnet_glosses("test", subset=b.test)
    conv_tr, conv_te = conversations(tr.lemmas), conversations(te.lemmas)
    rewrites = dict(zip(conv_tr, tr.lemmas))
    texts = list(dict.fromkeys(conv_tr + tr.texts))
    cache = cache_root("embeddings")
    minilm = sti.STTeacher("minilm", view="minilm", cache_dir=cache)
    mpnet = sti.STTeacher("mpnet", view="mpnet", cache_dir=cache)
    for t in (minilm, mpnet):
        t.precompute(tr.lemmas + tr.texts)
    teachers = {"minilm": RewriteTeacher(minilm, rewrites), "mpnet": RewriteTeacher(mpnet, rewrites)}
    both = sti.TeacherGroup(list(teachers.values()))
    res: dict[str, list[float]] = {"teacher": [wordnet_retrieval(lambda t: minilm.encode(t), conv_te, te.texts)["r1"]]}
    runs = {"kd_minilm": (["minilm"], teachers["minilm"]), "kd_mpnet": (["mpnet"], teachers["mpnet"]),
            "disco": (["minilm", "mpnet"], both)}
    for seed in seeds:
        torch.manual_seed(seed)
        st = static_student("minilm", dim=256, init="pca")
        res.setdefault("scratch", []).append(wordnet_retrieval(lambda t: st.encode(t, 256), conv_te, te.texts)["r1"])
        for name, (views, teacher) in runs.items():
            torch.manual_seed(seed)
            st = static_student("minilm", dim=256, init="pca")
            obj = build_method("disco", teachers=views).objective()
            sti.distill_embeddings(st, obj, texts, teacher, epochs=b.epochs, batch_size=b.batch_size, lr=b.lr,
                                   weight_decay=0.0, max_steps=b.max_steps, seed=seed)
            res.setdefault(name, []).append(wordnet_retrieval(lambda t: st.encode(t, 256), conv_te, te.texts)["r1"])
    return res


def rows(quick: bool, seeds: list[int], budget: Budget | None = None) -> list[dict[str, Any]]:
    from _seed_common import row

    b = budget or (QUICK if quick else Budget())
    res = results(b, seeds)
    task = f"WordNet conversations ({b.train} train synsets) → definition among {b.test}, R@1"
    teacher = res["teacher"][0]
    return [row("disco", task, "R@1", res, ("scratch", kd, "disco"), CLAIM, teacher,
                scratch_column="student init, untrained", kd_column=f"{label} alone")
            for kd, label in (("kd_minilm", "MiniLM"), ("kd_mpnet", "MPNet"))]
