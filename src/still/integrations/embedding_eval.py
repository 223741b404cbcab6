"""Built-in evaluation of sentence embedders (teachers and students alike).

An embedder is any `encode(texts: list[str]) -> (N, D)` callable (a tensor or numpy array).

* `wordnet_retrieval`: WordNet lemma → definition retrieval over held-out synsets (R@1, R@10).
* `fortunes_probe`: logistic-regression probe on the 12 fortunes categories (accuracy).
* `agreement`: teacher–student cosine (same width only) and the Spearman correlation of the two
  models' pairwise cosine similarities on held-out KJV verses.
* `throughput`: sentences/s, warmed up, interleaved, same batch size for every model.

>>> suite = EvalSuite.build(wordnet_pairs=2000)
>>> suite.evaluate(lambda t: student.encode(t), teacher_emb=suite.encode_kjv(teacher.encode))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Encoder = Callable[[list[str]], Any]


def as_tensor(x: Any) -> torch.Tensor:
    """`(N, D)` float32 tensor from a tensor, numpy array or nested list."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() != 2:
        raise ValueError(f"an encoder must return (N, D) embeddings; got shape {tuple(t.shape)}")
    return t.float()


def retrieval_recall(queries: torch.Tensor, docs: torch.Tensor, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Recall@k of query i retrieving doc i by cosine among all docs: `(N, D), (N, D)`.

    The rank of the right doc counts the docs scoring strictly higher (ties in its favour).
    """
    q, d = F.normalize(queries.float(), dim=1), F.normalize(docs.float(), dim=1)
    if q.shape[0] != d.shape[0]:
        raise ValueError(f"retrieval_recall: {q.shape[0]} queries but {d.shape[0]} docs (pairs i ↔ i)")
    sims = q @ d.t()
    right = sims.diagonal().unsqueeze(1)
    rank = (sims > right).sum(1)
    return {f"r{k}": float((rank < k).float().mean()) for k in ks}


def wordnet_retrieval(encode: Encoder, lemmas: Sequence[str], definitions: Sequence[str]) -> dict[str, float]:
    """R@1 / R@10 of lemma → its definition among all `definitions` (held-out synsets, one per lemma)."""
    return retrieval_recall(as_tensor(encode(list(lemmas))), as_tensor(encode(list(definitions))))


def linear_probe(train_x: torch.Tensor, train_y: Sequence[int], test_x: torch.Tensor, test_y: Sequence[int],
                 c: float = 10.0) -> float:
    """Accuracy of an L2-regularised logistic regression on L2-normalised embeddings (lbfgs, seed-free)."""
    from sklearn.linear_model import LogisticRegression

    xtr = F.normalize(train_x.float(), dim=1).numpy()
    xte = F.normalize(test_x.float(), dim=1).numpy()
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(xtr, np.asarray(train_y))
    return float((clf.predict(xte) == np.asarray(test_y)).mean())


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float | None]:
    """`cosine`: mean cos(s_i, t_i) (None when widths differ); `spearman`: of the pairwise cosine
    similarities (upper triangle) of the student against the teacher's. `(N, Ds), (N, Dt)`."""
    from scipy.stats import spearmanr

    s, t = F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)
    cos = float((s * t).sum(1).mean()) if s.shape == t.shape else None
    iu = torch.triu_indices(s.shape[0], s.shape[0], offset=1)
    ss, st = (s @ s.t())[iu[0], iu[1]].numpy(), (t @ t.t())[iu[0], iu[1]].numpy()
    return {"cosine": cos, "spearman": float(spearmanr(ss, st).statistic)}


def throughput(encoders: Mapping[str, Encoder], texts: Sequence[str], repeats: int = 3,
               min_seconds: float = 0.5) -> dict[str, float]:
    """Sentences/s of each encoder on the same `texts` (warmed up, interleaved, median of `repeats`).

    A fast encoder is run `k` times per measurement (k calibrated on the warm-up so that one
    measurement lasts ≥ `min_seconds`), so timer and scheduling noise do not dominate. Give every
    encoder the same batch size (e.g. `lambda t: st_encode(model, t, 64)`).
    """
    import time

    from still.bench import interleaved_median

    texts = list(texts)
    passes = {}
    for k, f in encoders.items():
        t0 = time.perf_counter()
        f(texts)  # warm-up, and calibration
        passes[k] = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)) + 1)

    def runner(f: Encoder, n: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                f(texts)
        return run

    secs = interleaved_median({k: runner(f, passes[k]) for k, f in encoders.items()}, repeats=repeats, warmup=0)
    return {k: passes[k] * len(texts) / v for k, v in secs.items()}


@dataclass
class EvalSuite:
    """The held-out data of the evaluation, loaded once."""

    lemmas: list[str]
    definitions: list[str]
    fortunes_train: Any
    fortunes_test: Any
    kjv: list[str]
    _kjv_cache: dict[int, tuple[Any, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def build(cls, wordnet_pairs: int | None = 2000, fortunes_per_class: int = 200, kjv_verses: int = 1000
              ) -> "EvalSuite":
        """Held-out WordNet synsets (one per lemma, `wordnet_pairs` of them), fortunes, held-out KJV verses."""
        from still.data.text import fortunes, kjv_verses as kjv, wordnet_glosses

        wn = wordnet_glosses(split="test", subset=wordnet_pairs)
        return cls(wn.lemmas, wn.texts, fortunes("train", per_class=fortunes_per_class),
                   fortunes("test", per_class=fortunes_per_class), kjv("test", subset=kjv_verses).texts)

    def encode_kjv(self, encode: Encoder) -> torch.Tensor:
        return as_tensor(encode(self.kjv))

    def reference_kjv(self, encode: Encoder) -> torch.Tensor:
        """`encode_kjv`, computed once per encoder (the teacher's verses serve every student)."""
        if id(encode) not in self._kjv_cache:  # the encoder is kept with it, so its id stays its own
            self._kjv_cache[id(encode)] = (encode, self.encode_kjv(encode))
        return self._kjv_cache[id(encode)][1]

    def evaluate(self, encode: Encoder, teacher_kjv: torch.Tensor | None = None, fortunes: bool = True
                 ) -> dict[str, Any]:
        """`{"r1", "r10"[, "fortunes_acc"][, "kjv_cosine", "kjv_spearman"]}` for one embedder."""
        out: dict[str, Any] = dict(wordnet_retrieval(encode, self.lemmas, self.definitions))
        if fortunes:
            tr = as_tensor(encode(self.fortunes_train.texts))
            te = as_tensor(encode(self.fortunes_test.texts))
            out["fortunes_acc"] = linear_probe(tr, self.fortunes_train.labels, te, self.fortunes_test.labels)
        if teacher_kjv is not None:
            ag = agreement(self.encode_kjv(encode), teacher_kjv)
            out["kjv_cosine"], out["kjv_spearman"] = ag["cosine"], ag["spearman"]
        return out


# -- recipe metrics ------------------------------------------------------------------------------
#: sizes of the held-out sets a recipe's embedding metrics use (the benchmark's)
RECIPE_SUITE = {"wordnet_pairs": 1000, "fortunes_per_class": 100, "kjv_verses": 500}
#: texts and repeats of the throughput metric
THROUGHPUT = {"texts": 128, "repeats": 3}
#: each embedding metric's primary figure (also stored under the metric's own name)
PRIMARY = {"wordnet_retrieval": "wordnet_r1", "fortunes_probe": "fortunes_acc", "kjv_agreement": "kjv_spearman",
           "throughput": "sent_per_s"}


def _metric_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g)

    def enc(texts: list[str]) -> torch.Tensor:  # a toy bag-of-characters encoder
        return torch.stack([table[[ord(c) % 50 for c in t]].mean(0) for t in texts])

    words = ["cat", "dog", "tree", "car"]
    suite = EvalSuite(words, [w + " animal thing" for w in words], None, None, [w * 2 for w in words])
    return (suite, enc), {"reference": enc}


def _register(name: str):
    from still.registry import register_metric

    return register_metric(name, task="embedding", example=_metric_example)


@_register("wordnet_retrieval")
def wordnet_retrieval_metric(suite: "EvalSuite", encode: Encoder, reference: Encoder | None = None) -> dict[str, float]:
    """Embedding metric: held-out WordNet lemma → definition retrieval `{"wordnet_r1", "wordnet_r10"}`."""
    r = wordnet_retrieval(encode, suite.lemmas, suite.definitions)
    return {"wordnet_r1": r["r1"], "wordnet_r10": r["r10"]}


@_register("fortunes_probe")
def fortunes_probe_metric(suite: "EvalSuite", encode: Encoder, reference: Encoder | None = None) -> dict[str, float]:
    """Embedding metric: logistic-regression probe accuracy on the 12 fortunes categories `{"fortunes_acc"}`."""
    if suite.fortunes_train is None:
        return {}
    tr, te = as_tensor(encode(suite.fortunes_train.texts)), as_tensor(encode(suite.fortunes_test.texts))
    return {"fortunes_acc": linear_probe(tr, suite.fortunes_train.labels, te, suite.fortunes_test.labels)}


@_register("kjv_agreement")
def kjv_agreement_metric(suite: "EvalSuite", encode: Encoder, reference: Encoder | None = None) -> dict[str, float]:
    """Embedding metric: agreement with `reference` (the teacher) on held-out KJV verses
    `{"kjv_spearman"[, "kjv_cosine"]}` (cosine only when the widths agree); `{}` without a reference."""
    if reference is None:
        return {}
    ag = agreement(suite.encode_kjv(encode), suite.reference_kjv(reference))
    return {k: v for k, v in (("kjv_cosine", ag["cosine"]), ("kjv_spearman", ag["spearman"])) if v is not None}


@_register("throughput")
def throughput_metric(suite: "EvalSuite", encode: Encoder, reference: Encoder | None = None) -> dict[str, float]:
    """Embedding metric: sentences/s on held-out definitions (warmed up, interleaved with `reference`,
    median of 3) `{"sent_per_s"[, "reference_sent_per_s", "x_teacher"]}`. `encode` and `reference`
    must take the same batch size (the pipeline passes `st_encode(model, texts, batch_size)`)."""
    texts = suite.definitions[: THROUGHPUT["texts"]]
    enc = {"model": encode} if reference is None else {"model": encode, "reference": reference}
    tp = throughput(enc, texts, repeats=THROUGHPUT["repeats"])
    out = {"sent_per_s": tp["model"]}
    if reference is not None:
        out.update(reference_sent_per_s=tp["reference"], x_teacher=tp["model"] / tp["reference"])
    return out


def is_embedding_metric(name: str) -> bool:
    """Whether METRICS entry `name` is an embedding metric (`task="embedding"`), not a logits metric."""
    from still.registry import METRICS

    return name in METRICS and METRICS.entry(name).meta.get("task") == "embedding"


def embedding_metrics() -> list[str]:
    from still.registry import METRICS

    return [n for n in METRICS.names() if is_embedding_metric(n)]


def evaluate_embedder(suite: "EvalSuite", metrics: Sequence[str], encode: Encoder, reference: Encoder | None = None,
                      fast_encode: Encoder | None = None, fast_reference: Encoder | None = None
                      ) -> dict[str, float]:
    """The flat figures of the embedding `metrics` for one model (see each metric's keys).

    `encode` / `reference` may read a cache; `fast_encode` / `fast_reference` (default: the same)
    are the uncached paths that `throughput` times."""
    from still.registry import METRICS

    out: dict[str, float] = {}
    for m in metrics:
        if not is_embedding_metric(m):
            raise ValueError(f"{m!r} is not an embedding metric; choose from {embedding_metrics()}")
        fn = METRICS.build(m)
        if m == "throughput":
            out.update(fn(suite, fast_encode or encode, (fast_reference or reference) if reference else None))
        else:
            out.update(fn(suite, encode, reference))
    return out


__all__ = ["retrieval_recall", "wordnet_retrieval", "linear_probe", "agreement", "throughput", "EvalSuite",
           "as_tensor", "is_embedding_metric", "embedding_metrics", "evaluate_embedder", "RECIPE_SUITE"]
