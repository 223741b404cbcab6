"""Teacher-signal store: record a teacher's views once, distill from them many times.

>>> write_store(LiveTeacher(cnn, {"logits": "", "feat": "features"}), train_data, "runs/fmnist.store",
...             topk={"logits": 8}, dtype="float16", shard_size=4096)
>>> teacher = StoreTeacher("runs/fmnist.store")            # no model loaded
>>> teacher.check_compatible(data_fp=train_data.fingerprint(), preprocessing={"normalize": True})
>>> teacher.views(batch, ["logits", "feat"])               # keyed by batch["index"] (and batch["view_id"])

Writing is resumable and atomic: shard `s` holds items `[s*S, (s+1)*S)` of the data set's order and appears
under its final name only when complete (temp file, fsync, `os.replace`), followed by a sidecar with its
sha256; a rerun skips completed shards. Worker `w` of `W` (or torchrun's RANK/WORLD_SIZE) writes shards
w, w+W, ...; whichever worker completes the last shard merges them into `index.safetensors` and writes
`manifest.json` last. The format is described in `still.teachers.store_format`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler, default_collate

from still.teachers.base import Teacher
from still.teachers.store_format import (
    DENSE_DTYPES, FORMAT_VERSION, SAMPLE_ID, VIEW_ID, MappedTensors, StoreError, TopKLogits, ViewSpec,
    canonical_json, decode_view, encode_view, save_tensors, sha256_file, write_json_atomic,
)
from still.registry import register_teacher

PLAN, MANIFEST, INDEX = "plan.json", "manifest.json", "index.safetensors"


class StoreMismatchError(StoreError):
    """A store recorded with another teacher, data set or preprocessing than the one asked for."""


class MissingRecordError(StoreError, KeyError):
    """A (sample id, view id) that the store did not record."""

    def __str__(self) -> str:
        return str(self.args[0])


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments, else torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return rank, world_size


# ------------------------------------------------------------------------------------------------ writing

def _per_view(value: Any, names: Sequence[str], default: Any, what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what} names view(s) {unknown} that are not recorded; recorded: {list(names)}")
        return {n: value.get(n, default) for n in names}
    return {n: default if value is None else value for n in names}


def _fetch(dataset: Any, positions: Sequence[int], collate_fn: Callable | None) -> dict[str, Any]:
    items = dataset.__getitems__(list(positions)) if hasattr(dataset, "__getitems__") else [dataset[i] for i in positions]
    return (collate_fn or default_collate)(items)


def _ids(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if "index" not in batch:
        raise StoreError(f"batch has no 'index' (the sample id the store keys on); keys: {sorted(batch)}")
    sid = torch.as_tensor(batch["index"]).reshape(-1).cpu().long().numpy()
    vid = batch.get("view_id")
    vid = np.zeros_like(sid) if vid is None else torch.as_tensor(vid).reshape(-1).cpu().long().numpy()
    return sid, vid


def _to_device(batch: Mapping[str, Any], device: torch.device | str | None) -> dict[str, Any]:
    if device is None:
        return dict(batch)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_plan(teacher: Teacher, dataset: Any, *, views: Sequence[str] | None = None, topk: Any = None,
              dtype: Any = "float16", quant: Any = None, shard_size: int = 1024, batch_size: int = 256,
              preprocessing: Mapping[str, Any] | None = None, data_fingerprint: str | None = None,
              tokenizer_hash: str | None = None, collate_fn: Callable | None = None,
              device: torch.device | str | None = None) -> dict[str, Any]:
    """The capture settings of a store (`plan.json`); shapes are probed on the first two items."""
    names = list(views or teacher.available_views())
    topk_d, dtype_d = _per_view(topk, names, 0, "topk"), _per_view(dtype, names, "float16", "dtype")
    quant_d = _per_view(quant, names, "none", "quant")
    if data_fingerprint is None:
        if not hasattr(dataset, "fingerprint"):
            raise StoreError(f"{type(dataset).__name__} has no fingerprint(); pass data_fingerprint=... "
                             "(a hash of the data and its preprocessing) so readers can check they match")
        data_fingerprint = dataset.fingerprint()
    n = len(dataset)
    if n == 0:
        raise StoreError("the data set is empty: nothing to record")
    probe = teacher.views(_to_device(_fetch(dataset, range(min(2, n)), collate_fn), device), names)
    for nm in names:  # a teacher serving TopKLogits (e.g. a chunked LM head) is recorded at its own k by default
        if isinstance(probe[nm], TopKLogits) and not topk_d[nm]:
            topk_d[nm] = probe[nm].k
        elif isinstance(probe[nm], TopKLogits) and int(topk_d[nm]) > probe[nm].k:
            raise StoreError(f"view {nm!r}: the teacher serves its top {probe[nm].k}, topk asks for {topk_d[nm]}")
    specs = [ViewSpec(nm, tuple(probe[nm].shape[1:]), str(dtype_d[nm]).replace("torch.", ""), int(topk_d[nm] or 0),
                      quant_d[nm] or "none").to_json() for nm in names]
    return {
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": teacher.fingerprint(),
        "teacher": {"class": type(teacher).__name__,
                    "taps": {nm: str(s) for nm, s in getattr(teacher, "view_specs", {}).items() if nm in names}},
        "tokenizer_hash": tokenizer_hash,
        "data_fingerprint": str(data_fingerprint),
        "preprocessing": dict(preprocessing or {}),
        "n_items": n,
        "shard_size": int(shard_size),
        "batch_size": int(batch_size),
        "n_shards": math.ceil(n / shard_size),
        "views": specs,
    }


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like mappings."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif canonical_json(va) != canonical_json(vb):
            out.append(f"{prefix}{k}: store has {canonical_json(va)}, now {canonical_json(vb)}")
    return out


def _shard_complete(out: Path, s: int) -> dict[str, Any] | None:
    side = out / shard_name(s).replace(".safetensors", ".json")
    if not side.exists():
        return None
    info = json.loads(side.read_text())
    f = out / shard_name(s)
    return info if f.exists() and f.stat().st_size == info["bytes"] else None


def write_shard(teacher: Teacher, dataset: Any, out: Path, plan: Mapping[str, Any], s: int,
                collate_fn: Callable | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
    """Run the teacher over shard `s`'s items and write it atomically (shard first, then its sidecar)."""
    specs = [ViewSpec.from_json(v) for v in plan["views"]]
    names = [v.name for v in specs]
    lo, hi = s * plan["shard_size"], min(plan["n_items"], (s + 1) * plan["shard_size"])
    parts: dict[str, list[torch.Tensor]] = {}
    for b0 in range(lo, hi, plan["batch_size"]):
        batch = _fetch(dataset, range(b0, min(hi, b0 + plan["batch_size"])), collate_fn)
        sid, vid = _ids(batch)
        got = teacher.views(_to_device(batch, device), names)
        fields = {SAMPLE_ID: torch.from_numpy(sid), VIEW_ID: torch.from_numpy(vid)}
        for spec in specs:
            fields.update(encode_view(spec, got[spec.name]))
        for k, v in fields.items():
            parts.setdefault(k, []).append(v)
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    if not bool(tensors[VIEW_ID].any()):
        del tensors[VIEW_ID]  # un-augmented data: every view id is 0 (8 bytes a row saved)
    sha, nbytes = save_tensors(out / shard_name(s), tensors, {"still_store": f"format={FORMAT_VERSION} shard={s}"})
    info = {"shard": s, "file": shard_name(s), "rows": hi - lo, "bytes": nbytes, "sha256": sha}
    write_json_atomic(out / shard_name(s).replace(".safetensors", ".json"), info)
    return info


def write_store(teacher: Teacher, dataset: Any, out: str | Path, *, views: Sequence[str] | None = None,
                topk: int | Mapping[str, int] | None = None, dtype: str | Mapping[str, str] = "float16",
                quant: str | Mapping[str, str] | None = None, shard_size: int = 1024, batch_size: int = 256,
                preprocessing: Mapping[str, Any] | None = None, data_fingerprint: str | None = None,
                tokenizer_hash: str | None = None, rank: int | None = None, world_size: int | None = None,
                resume: bool = True, finalize: bool = True, collate_fn: Callable | None = None,
                device: torch.device | str | None = None,
                on_shard: Callable[[dict[str, Any]], None] | None = None) -> Path | None:
    """Record `teacher`'s views over `dataset` (map-style, items carry "index") into the store `out`.

    `views`: view names (default: all the teacher serves); `topk={"logits": 32}` records those views as
    top-k log-probabilities (others dense); `dtype` per view or for all ("float16" | "bfloat16" | "float32",
    the dense dtype or the top-k values' dtype); `quant={"logits": "int8"}` quantises top-k values.
    This process writes shards rank, rank + world_size, ...; returns the store path once the manifest is
    written (by this or the last finishing worker), else None. `resume=False` refuses an existing store.
    `on_shard(info)` is called after each shard is written (progress, tests).
    """
    out = Path(out)
    rank, world_size = rank_and_world(rank, world_size)
    plan = make_plan(teacher, dataset, views=views, topk=topk, dtype=dtype, quant=quant, shard_size=shard_size,
                     batch_size=batch_size, preprocessing=preprocessing, data_fingerprint=data_fingerprint,
                     tokenizer_hash=tokenizer_hash, collate_fn=collate_fn, device=device)
    out.mkdir(parents=True, exist_ok=True)
    if (out / PLAN).exists():
        if not resume:
            raise StoreError(f"{out} already holds a store; pass resume=True to continue it or choose a new path")
        diffs = _diff(json.loads((out / PLAN).read_text()), plan)
        if diffs:
            raise StoreMismatchError(f"{out} was started with other capture settings; refusing to mix them:\n  "
                                     + "\n  ".join(diffs) + "\n(write to a new path, or delete the old store)")
    else:
        write_json_atomic(out / PLAN, plan)  # concurrent workers write identical plans
    if (out / MANIFEST).exists():
        return out
    for s in range(rank, plan["n_shards"], world_size):
        if _shard_complete(out, s) is None:
            info = write_shard(teacher, dataset, out, plan, s, collate_fn, device)
            if on_shard is not None:
                on_shard(info)
    if finalize and all(_shard_complete(out, s) for s in range(plan["n_shards"])):
        return finalize_store(out)
    return None


def finalize_store(out: str | Path) -> Path:
    """Merge the shards' ids into `index.safetensors` and write `manifest.json` (last). Idempotent."""
    out = Path(out)
    if not (out / PLAN).exists():
        raise StoreError(f"{out}: no {PLAN}; this is not a store being written")
    plan = json.loads((out / PLAN).read_text())
    infos = [_shard_complete(out, s) for s in range(plan["n_shards"])]
    missing = [s for s, i in enumerate(infos) if i is None]
    if missing:
        raise StoreError(f"{out}: {len(missing)} of {plan['n_shards']} shards are not written yet "
                         f"(e.g. {missing[:8]}); rerun the writer (it resumes) before finalizing")
    sid, vid = [], []
    for info in infos:
        m = MappedTensors(out / info["file"])
        a = np.array(m.array(SAMPLE_ID))
        b = np.array(m.array(VIEW_ID)) if VIEW_ID in m.header else np.zeros_like(a)
        if len(a) != info["rows"]:
            raise StoreError(f"{info['file']}: {len(a)} rows, its sidecar says {info['rows']}")
        sid.append(a), vid.append(b)
    sid_a, vid_a = np.concatenate(sid), np.concatenate(vid)
    order = np.lexsort((vid_a, sid_a))  # global row (shard * shard_size + row) in (sample, view) order
    sid_a, vid_a = sid_a[order], vid_a[order]
    dup = np.flatnonzero((sid_a[1:] == sid_a[:-1]) & (vid_a[1:] == vid_a[:-1]))
    if len(dup):
        i, S = dup[0], plan["shard_size"]
        raise StoreError(f"{out}: sample id {sid_a[i]} view id {vid_a[i]} is recorded twice (shards "
                         f"{order[i] // S} and {order[i + 1] // S}); ids must be unique per (sample, view)")
    n_rows = int(len(sid_a))
    if not vid_a.any() and np.array_equal(sid_a, np.arange(n_rows)) and np.array_equal(order, np.arange(n_rows)):
        index: dict[str, Any] = {"kind": "identity", "rows": n_rows}  # sample id i is global row i: no index file
        (out / INDEX).unlink(missing_ok=True)
        idx_bytes = 0
    else:
        cols = {"sample_id": torch.from_numpy(sid_a), "row": torch.from_numpy(order.astype(np.int64))}
        if vid_a.any():
            cols["view_id"] = torch.from_numpy(vid_a)
        idx_sha, idx_bytes = save_tensors(out / INDEX, cols)
        index = {"kind": "sorted", "file": INDEX, "rows": n_rows, "bytes": idx_bytes, "sha256": idx_sha}
    specs = [ViewSpec.from_json(v) for v in plan["views"]]
    manifest = {
        **plan,
        "shards": [{k: i[k] for k in ("file", "rows", "bytes", "sha256")} for i in infos],
        "index": index,
        "n_rows": n_rows,
        "views_per_sample_max": int(np.max(np.unique(sid_a, return_counts=True)[1])),
        "bytes_per_row": {s.name: s.bytes_per_row() for s in specs},
        "bytes_per_position": {s.name: s.bytes_per_position() for s in specs},
        "bytes_total": int(sum(i["bytes"] for i in infos) + idx_bytes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(out / MANIFEST, manifest)
    for tmp in out.glob(".shard-*.tmp-*"):  # temp files of writers killed mid-write: every shard is final now
        tmp.unlink(missing_ok=True)
    return out


@dataclass
class VerifyReport:
    """Result of `verify(store)`: `ok` only if every file is present and matches its sha256."""

    path: Path
    ok: bool
    checked: int = 0
    bytes: int = 0
    bad: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.path}: {'OK' if self.ok else 'CORRUPT'} ({self.checked} files, {self.bytes} bytes checked)"
        return "\n  ".join([head, *self.bad])


def verify(path: str | Path) -> VerifyReport:
    """Check every shard's and the index's sha256 against the manifest."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        why = "writing never finished (plan.json but no manifest)" if (path / PLAN).exists() else "not a store"
        return VerifyReport(path, False, bad=[f"no {MANIFEST}: {why}"])
    man = json.loads((path / MANIFEST).read_text())
    rep = VerifyReport(path, True)
    for f in [*man["shards"], *([man["index"]] if "file" in man["index"] else [])]:
        p = path / f["file"]
        if not p.exists():
            rep.bad.append(f"{f['file']}: missing")
            continue
        got = sha256_file(p)
        rep.checked += 1
        rep.bytes += p.stat().st_size
        if got != f["sha256"]:
            rep.bad.append(f"{f['file']}: sha256 {got[:16]}… but the manifest says {f['sha256'][:16]}…")
    rep.ok = not rep.bad
    return rep


# ------------------------------------------------------------------------------------------------ reading

class TeacherStore:
    """A finished store opened for reading: memory-mapped shards, random access by (sample id, view id).

    `check="first_use"` (default) verifies each shard's sha256 the first time a batch touches it (and the
    index at open); `"open"` verifies every shard now; `"none"` trusts the files.
    """

    def __init__(self, path: str | Path, check: str = "first_use") -> None:
        if check not in ("first_use", "open", "none"):
            raise ValueError(f"check must be 'first_use', 'open' or 'none', got {check!r}")
        self.path, self.check = Path(path), check
        if not (self.path / MANIFEST).exists():
            why = ("writing never finished: rerun the writer (it resumes) or finalize_store()"
                   if (self.path / PLAN).exists() else "no such store")
            raise StoreError(f"{self.path}: no {MANIFEST} ({why})")
        self.manifest: dict[str, Any] = json.loads((self.path / MANIFEST).read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.path}: format version {self.manifest.get('format_version')}, "
                             f"this still reads version {FORMAT_VERSION}")
        self.specs = {v["name"]: ViewSpec.from_json(v) for v in self.manifest["views"]}
        self._sid = self._vid = self._pos = None  # identity index: sample id i is row i, view id 0
        if "file" in self.manifest["index"]:
            if check != "none":
                self._verify_file(self.manifest["index"])
            idx = MappedTensors(self.path / INDEX)
            self._sid, self._pos = idx.array("sample_id"), idx.array("row")
            self._vid = idx.array("view_id") if "view_id" in idx.header else np.zeros(len(self._sid), np.int64)
        self.shard_size = int(self.manifest["shard_size"])
        self._open: dict[int, MappedTensors] = {}
        if check == "open":
            for s in range(len(self.manifest["shards"])):
                self.shard(s)

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def _verify_file(self, f: Mapping[str, Any]) -> None:
        got = sha256_file(self.path / f["file"])
        if got != f["sha256"]:
            raise StoreError(f"{self.path / f['file']}: sha256 {got[:16]}… does not match the manifest's "
                             f"{f['sha256'][:16]}…; the store is corrupt (run `still cache verify {self.path}`)")

    def shard(self, s: int) -> MappedTensors:
        if s not in self._open:
            f = self.manifest["shards"][s]
            if self.check != "none":
                self._verify_file(f)
            self._open[s] = MappedTensors(self.path / f["file"])
        return self._open[s]

    def lookup(self, sample_ids: np.ndarray, view_ids: np.ndarray | None = None) -> np.ndarray:
        """Global row (shard * shard_size + row) of each (sample id, view id); view id 0 where `view_ids` is
        None. Missing ids raise MissingRecordError naming them."""
        q = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        qv = np.zeros_like(q) if view_ids is None else np.asarray(view_ids, dtype=np.int64).reshape(-1)
        if self._sid is None:
            bad = np.flatnonzero((q < 0) | (q >= len(self)) | (qv != 0))
            if len(bad):
                i = bad[0]
                what = ("it records view id 0 only" if 0 <= q[i] < len(self) else
                        f"that sample id is not in the store (it holds sample ids 0..{len(self) - 1})")
                raise MissingRecordError(
                    f"store {self.path} has no record of sample id {q[i]} view id {qv[i]}: {what}; {len(bad)} of "
                    f"the {len(q)} ids asked are missing. The store never falls back to another view.")
            return q
        lo, hi = np.searchsorted(self._sid, q, "left"), np.searchsorted(self._sid, q, "right")
        width = max(1, int((hi - lo).max(initial=0)))
        cand = lo[:, None] + np.arange(width)
        valid = cand < hi[:, None]
        match = valid & (self._vid[np.minimum(cand, len(self._sid) - 1)] == qv[:, None])
        found = match.any(1)
        if not found.all():
            bad = np.flatnonzero(~found)
            i = bad[0]
            have = self._vid[lo[i]:hi[i]][:8].tolist()
            what = (f"it holds view ids {have} for that sample" if have else "that sample id is not in the store")
            hint = "" if view_ids is not None or not have else " (the batch has no 'view_id'; 0 was assumed)"
            raise MissingRecordError(
                f"store {self.path} has no record of sample id {q[i]} view id {qv[i]}: {what}{hint}; "
                f"{len(bad)} of the {len(q)} ids asked are missing. The store never falls back to another view.")
        return self._pos[cand[np.arange(len(q)), match.argmax(1)]]

    def gather(self, names: Sequence[str], pos: np.ndarray) -> dict[str, torch.Tensor | TopKLogits]:
        """Decoded views of the given global rows, in order: dense tensors (stored dtype) or TopKLogits."""
        pos = np.asarray(pos, dtype=np.int64)
        shard, row = np.divmod(pos, self.shard_size)
        fnames = [(name, f) for name in names for f in self.specs[name].fields()]
        bufs: dict[str, np.ndarray] = {}
        uniq = np.unique(shard)
        for s in uniq:
            sel = None if len(uniq) == 1 else np.flatnonzero(shard == s)
            rows = row if sel is None else row[sel]
            m = self.shard(int(s))
            for _, f in fnames:
                part = m.array(f)[rows]
                if sel is None:
                    bufs[f] = part
                    continue
                if f not in bufs:
                    bufs[f] = np.empty((len(pos), *part.shape[1:]), dtype=part.dtype)
                bufs[f][sel] = part
        return {name: decode_view(self.specs[name], bufs) for name in names}


@register_teacher("store")
class StoreTeacher(Teacher):
    """Serves the views recorded in a store, by `batch["index"]` (and `batch["view_id"]` if present).

    Dense views come back as tensors (B, *shape) cast to `dtype` (default float32; None keeps the stored
    dtype). Top-k views come back as `TopKLogits` (indices, logprobs, missing, vocab_size) with
    `topk="sparse"` (default), or as dense log-probabilities (B, ..., V) with `topk="dense"`, the
    missing mass handled by `missing` ("uniform" | "renormalize", see `TopKLogits.dense`).
    """

    def __init__(self, path: str | Path, *, topk: str = "sparse", missing: str = "uniform",
                 dtype: str | torch.dtype | None = "float32", check: str = "first_use",
                 device: torch.device | str | None = None) -> None:
        if topk not in ("sparse", "dense"):
            raise ValueError(f"topk must be 'sparse' or 'dense', got {topk!r}")
        self.store = TeacherStore(path, check=check)
        self.topk, self.missing, self.device = topk, missing, device
        self.dtype = DENSE_DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.view_specs = dict(self.store.specs)

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest

    def fingerprint(self) -> str:
        return self.store.manifest["teacher_fingerprint"]

    def to(self, device: torch.device | str) -> StoreTeacher:
        self.device = device
        return self

    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
        self._check_names(names)
        sid, vid = _ids(batch)
        got = self.store.gather(names, self.store.lookup(sid, vid if "view_id" in batch else None))
        index = batch["index"]
        device = self.device or (index.device if isinstance(index, torch.Tensor) else "cpu")
        out: dict[str, Any] = {}
        for name, v in got.items():
            if isinstance(v, TopKLogits):
                v = v.to(device)
                out[name] = v.dense(self.missing) if self.topk == "dense" else v
            else:
                out[name] = v.to(device=device, dtype=self.dtype or v.dtype)
        return out

    def check_compatible(self, *, teacher_fp: str | None = None, data_fp: str | None = None,
                         preprocessing: Mapping[str, Any] | None = None, tokenizer_hash: str | None = None) -> None:
        """Refuse (StoreMismatchError naming each difference) a store recorded from something else."""
        m, diffs = self.manifest, []
        if teacher_fp is not None and teacher_fp != m["teacher_fingerprint"]:
            diffs.append(f"teacher weights: store has fingerprint {m['teacher_fingerprint']}, now {teacher_fp}")
        if data_fp is not None and str(data_fp) != m["data_fingerprint"]:
            diffs.append(f"data set: store has fingerprint {m['data_fingerprint']}, now {data_fp}")
        if tokenizer_hash is not None and tokenizer_hash != m.get("tokenizer_hash"):
            diffs.append(f"tokenizer: store has hash {m.get('tokenizer_hash')}, now {tokenizer_hash}")
        if preprocessing is not None:
            diffs += [f"preprocessing {d}" for d in _diff(m["preprocessing"], dict(preprocessing))]
        if diffs:
            raise StoreMismatchError(f"store {self.store.path} does not match what you train with:\n  " + "\n  ".join(diffs))


class DistributedExactSampler(Sampler[int]):
    """Each of `num_replicas` ranks gets a disjoint part of a (seeded, per-epoch) permutation; together they
    see every sample exactly once per epoch (no padding duplicates, unlike `DistributedSampler`).

    Ranks' lengths differ by at most one; under DDP wrap the loop in `torch.distributed.algorithms.Join`
    (or drop the last uneven batch) so no rank waits on a missing all-reduce. Call `set_epoch(e)` per epoch.
    """

    def __init__(self, data: Any, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0) -> None:
        self.n = data if isinstance(data, int) else len(data)
        self.rank, self.num_replicas = rank_and_world(rank, num_replicas)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))
