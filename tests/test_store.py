"""Teacher-signal store end to end: round trips, keys, corruption, mismatches, DDP reading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import store_writer as sw  # noqa: E402

from still.teachers.store import (  # noqa: E402
    DistributedExactSampler, MissingRecordError, StoreMismatchError, StoreTeacher, TeacherStore, finalize_store,
    verify, write_store,
)
from still.teachers.store_format import StoreError, TopKLogits  # noqa: E402

NAMES = ["logits", "feat", "logits16", "logits8"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("st") / "digits.store"
    assert write_store(sw.make_teacher(), sw.Digits(96), out, **sw.STORE_KW) == out
    return out


def _batch(ds, ids) -> dict:
    return default_collate([ds[i] for i in ids])


def test_round_trip_every_view_type(store: Path) -> None:
    ds, live = sw.Digits(96), sw.make_teacher()
    teacher = StoreTeacher(store)
    assert teacher.fingerprint() == live.fingerprint()
    assert teacher.available_views() == sorted(NAMES)
    b = _batch(ds, [95, 3, 17, 0, 64, 31])  # across shards, out of order
    got, ref = teacher.views(b, NAMES), live.views(b, NAMES)
    # dense float16 logits and bfloat16 features: exactly the cast of the live view (returned as float32)
    assert got["logits16"].dtype == torch.float32
    assert torch.equal(got["logits16"], ref["logits16"].half().float())
    assert torch.equal(got["feat"], ref["feat"].bfloat16().float())
    # top-k (fp16 values) and top-k int8: the teacher's top ids, log-probs, missing mass
    logp = torch.log_softmax(ref["logits"], -1)
    for name, k, tol in (("logits", 3, 2e-3), ("logits8", 4, 0.03)):
        t = got[name]
        assert isinstance(t, TopKLogits) and t.shape == ref[name].shape and t.k == k
        vals, idx = logp.topk(k, -1)
        assert torch.equal(t.indices, idx)
        torch.testing.assert_close(t.logprobs, vals, atol=tol, rtol=0)
        torch.testing.assert_close(t.missing, 1 - vals.exp().sum(-1), atol=1e-5, rtol=0)
    # stored dtypes on request, and dense reconstruction
    raw = StoreTeacher(store, dtype=None).views(b, ["feat", "logits16"])
    assert raw["feat"].dtype == torch.bfloat16 and raw["logits16"].dtype == torch.float16
    dense = StoreTeacher(store, topk="dense").views(b, ["logits"])["logits"]
    assert dense.shape == (6, 10)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(6), atol=1e-5, rtol=0)
    man = teacher.manifest
    assert man["views"][0]["name"] == "logits" and man["views"][0]["k"] == 3 and man["n_rows"] == 96
    assert man["preprocessing"] == {"scale": 1 / 16} and man["data_fingerprint"] == ds.fingerprint()


def test_token_views_of_a_sequence_model(tmp_path: Path) -> None:
    """(B, T, V) logits, V = 1000 (10-bit packed ids), keyed by sample id; HF-style input_ids batches."""

    class TinyLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.head = torch.nn.Embedding(1000, 16), torch.nn.Linear(16, 1000)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(input_ids))

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(0, 1000, (20, 7), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "index": torch.tensor(100 + i)}

    from still.teachers.base import LiveTeacher

    live = LiveTeacher(TinyLM(), {"logits": ""})
    out = write_store(live, Tokens(), tmp_path / "lm", topk={"logits": 8}, shard_size=6, batch_size=4,
                      data_fingerprint="tokens-v1")
    t = StoreTeacher(out)
    b = default_collate([Tokens()[i] for i in (19, 0, 7)])
    got = t.views(b, ["logits"])["logits"]
    vals, idx = torch.log_softmax(live.views(b, ["logits"])["logits"], -1).topk(8, -1)
    assert got.shape == (3, 7, 1000) and torch.equal(got.indices, idx)
    torch.testing.assert_close(got.logprobs, vals, atol=5e-3, rtol=0)
    assert t.manifest["bytes_per_position"]["logits"] == 10 + 16 + 4  # ceil(8*10/8) + 8*2 + 4
    with pytest.raises(MissingRecordError, match="sample id 5 view id 0"):
        t.views({"index": torch.tensor([100, 5])}, ["logits"])


def test_augmented_views_are_keyed_by_view_id(tmp_path: Path) -> None:
    ds = sw.Digits(12, views=3)
    out = write_store(sw.make_teacher(), ds, tmp_path / "aug", views=["logits16"], shard_size=5, batch_size=4)
    t, live = StoreTeacher(out), sw.make_teacher()
    assert t.manifest["views_per_sample_max"] == 3 and t.manifest["n_rows"] == 36
    b = _batch(ds, [35, 1, 2, 20])
    assert b["view_id"].tolist() == [2007, 1007, 2007, 2007]
    torch.testing.assert_close(t.views(b, ["logits16"])["logits16"], live.views(b, ["logits16"])["logits16"],
                               atol=1e-2, rtol=0)
    # the three views of a sample differ, and each is served under its own id
    same_sample = {"index": torch.tensor([4, 4, 4]), "view_id": torch.tensor([7, 1007, 2007])}
    v = t.views(same_sample, ["logits16"])["logits16"]
    assert not torch.equal(v[0], v[1]) and not torch.equal(v[1], v[2])
    with pytest.raises(MissingRecordError, match=r"sample id 4 view id 3007: it holds view ids \[7, 1007, 2007\]"):
        t.views({"index": torch.tensor([4]), "view_id": torch.tensor([3007])}, ["logits16"])
    with pytest.raises(MissingRecordError, match="no 'view_id'; 0 was assumed"):
        t.views({"index": torch.tensor([4])}, ["logits16"])
    with pytest.raises(MissingRecordError, match="sample id 12 .* not in the store"):
        t.views({"index": torch.tensor([12]), "view_id": torch.tensor([7])}, ["logits16"])
    with pytest.raises(KeyError, match="no view"):
        t.views(b, ["feat"])
    # the (sample, view) index is a checksummed file too
    assert t.manifest["index"]["kind"] == "sorted" and verify(out).ok
    idx = out / "index.safetensors"
    idx.write_bytes(idx.read_bytes()[:-1] + bytes([idx.read_bytes()[-1] ^ 1]))
    assert "index.safetensors: sha256" in str(verify(out))
    with pytest.raises(StoreError, match="index.safetensors: sha256"):
        StoreTeacher(out)


def test_flipped_byte_fails_verify_and_loading(store: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad.store"
    shutil.copytree(store, bad)
    assert verify(bad).ok
    shard = bad / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data, not the header
    shard.write_bytes(bytes(data))
    rep = verify(bad)
    assert not rep.ok and "shard-00002.safetensors: sha256" in str(rep) and len(rep.bad) == 1
    t = StoreTeacher(bad)
    t.views({"index": torch.tensor([0, 1])}, NAMES)  # shard 0 is intact
    with pytest.raises(StoreError, match="shard-00002.safetensors: sha256 .* the store is corrupt"):
        t.views({"index": torch.tensor([40])}, NAMES)
    with pytest.raises(StoreError, match="shard-00002"):
        TeacherStore(bad, check="open")
    assert t.manifest["index"] == {"kind": "identity", "rows": 96}  # ids 0..95 in order: no index file


def test_changed_teacher_data_or_preprocessing_is_refused(store: Path) -> None:
    t = StoreTeacher(store)
    ds = sw.Digits(96)
    t.check_compatible(teacher_fp=sw.make_teacher().fingerprint(), data_fp=ds.fingerprint(),
                       preprocessing={"scale": 1 / 16})
    changed = sw.make_teacher(perturb=1e-3).fingerprint()
    with pytest.raises(StoreMismatchError, match=f"teacher weights: store has fingerprint .*, now {changed}"):
        t.check_compatible(teacher_fp=changed)
    with pytest.raises(StoreMismatchError, match=r"preprocessing scale: store has 0.0625, now 0.125"):
        t.check_compatible(preprocessing={"scale": 1 / 8})
    with pytest.raises(StoreMismatchError, match=r"preprocessing flip: store has \"<absent>\", now true"):
        t.check_compatible(preprocessing={"scale": 1 / 16, "flip": True})
    with pytest.raises(StoreMismatchError, match="data set: store has fingerprint"):
        t.check_compatible(data_fp=sw.Digits(95).fingerprint())
    # a writer resuming into the store with another teacher or preprocessing refuses to mix them
    with pytest.raises(StoreMismatchError, match="teacher_fingerprint: store has"):
        write_store(sw.make_teacher(perturb=1e-3), ds, store, **sw.STORE_KW)
    with pytest.raises(StoreMismatchError, match="preprocessing.scale"):
        write_store(sw.make_teacher(), ds, store, **{**sw.STORE_KW, "preprocessing": {"scale": 0.5}})
    with pytest.raises(StoreError, match="already holds a store"):
        write_store(sw.make_teacher(), ds, store, resume=False, **sw.STORE_KW)


def test_incomplete_and_duplicate_stores(tmp_path: Path) -> None:
    ds = sw.Digits(40)
    assert write_store(sw.make_teacher(), ds, tmp_path / "half", rank=0, world_size=2, **sw.STORE_KW) is None
    with pytest.raises(StoreError, match="writing never finished"):
        StoreTeacher(tmp_path / "half")
    assert not verify(tmp_path / "half").ok
    with pytest.raises(StoreError, match=r"1 of 3 shards are not written yet \(e.g. \[1\]\)"):
        finalize_store(tmp_path / "half")

    class Dup(sw.Digits):
        def __getitem__(self, i: int) -> dict:
            item = super().__getitem__(i)
            item["index"] = torch.tensor(i % 30)
            return item

    with pytest.raises(StoreError, match="sample id 0 view id 0 is recorded twice"):
        write_store(sw.make_teacher(), Dup(40), tmp_path / "dup", **sw.STORE_KW)


def test_ddp_reader_sees_each_sample_exactly_once(store: Path) -> None:
    ds, teacher, live = sw.Digits(96), StoreTeacher(store), sw.make_teacher()
    world = 5  # 96 is not a multiple of 5: ranks get 20, 19, 19, 19, 19
    for epoch in (0, 1):
        seen, orders = [], []
        for rank in range(world):
            sampler = DistributedExactSampler(ds, num_replicas=world, rank=rank, seed=3)
            sampler.set_epoch(epoch)
            ids = []
            for b in DataLoader(ds, batch_size=8, sampler=sampler):
                v = teacher.views(b, ["logits16"])["logits16"]
                torch.testing.assert_close(v, live.views(b, ["logits16"])["logits16"], atol=1e-2, rtol=0)
                ids += b["index"].tolist()
            assert len(ids) == len(sampler) in (19, 20)
            seen += ids
            orders.append(ids)
        assert sorted(seen) == list(range(96))
        if epoch == 0:
            first = orders
    assert first != orders  # reshuffled per epoch


def test_sampler_reads_rank_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    s = DistributedExactSampler(10, shuffle=False)
    assert list(s) == [1, 4, 7] and len(s) == 3
    with pytest.raises(ValueError, match="rank 3 is outside 0..2"):
        DistributedExactSampler(10, rank=3)


def test_a_teacher_serving_topk_logits_is_recorded_as_is(tmp_path: Path) -> None:
    """A teacher whose view is already `TopKLogits` (an LM head's chunked top-k): recorded at its own k
    (or fewer), its missing mass kept; more entries than it has are refused before anything is written."""
    from still.teachers.base import Teacher

    ds, live = sw.Digits(40), sw.make_teacher()

    class TopK(Teacher):
        view_specs = {"topk": "top-5 of the digits teacher's logits"}

        def views(self, batch, names):
            logp = torch.log_softmax(live.views(batch, ["logits"])["logits"], -1)
            v, i = logp.topk(5, -1)
            return {"topk": TopKLogits(i, v, 1 - v.exp().sum(-1), logp.shape[-1])}

        def fingerprint(self) -> str:
            return "topk-" + live.fingerprint()

    t = TopK()
    b = _batch(ds, [39, 2, 20])
    ref = t.views(b, ["topk"])["topk"]
    for k, path in ((None, tmp_path / "own"), (3, tmp_path / "three")):
        write_store(t, ds, path, topk=None if k is None else {"topk": k}, shard_size=16, batch_size=8)
        got = StoreTeacher(path).views(b, ["topk"])["topk"]
        kk = k or 5
        assert got.k == kk and got.shape == ref.shape and torch.equal(got.indices, ref.indices[..., :kk])
        torch.testing.assert_close(got.logprobs, ref.logprobs[..., :kk], atol=2e-3, rtol=0)
        torch.testing.assert_close(got.missing, 1 - ref.logprobs[..., :kk].exp().sum(-1), atol=1e-5, rtol=0)
    with pytest.raises(StoreError, match="top 5"):
        write_store(t, ds, tmp_path / "more", topk={"topk": 6})
    assert not (tmp_path / "more").exists()  # refused before anything was written
