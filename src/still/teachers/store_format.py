"""On-disk format of the teacher-signal store: view specs, encoders and decoders, bit packing, shard files.

A store is a directory::

    plan.json                  capture settings (teacher/data fingerprints, preprocessing, views, shard size);
                               written first; a resumed or parallel writer must agree with it
    shard-00000.safetensors    rows [0, S) of the item order; one tensor per field (below) plus
                               `__sample_id__` (N,) int64 and, for augmented data, `__view_id__` (N,) int64
    shard-00000.json           sidecar {rows, bytes, sha256}: written after the shard, marks it complete
    index.safetensors          `sample_id` (+ `view_id`) (M,) int64 sorted by (sample, view) -> `row` int64, the
                               global row (shard = row // S); absent when sample id i is row i and every view
                               id is 0 (manifest `index.kind` "identity" instead of "sorted")
    manifest.json              written last: the plan + every shard's name/rows/sha256 + the index's sha256

Shards are plain safetensors files (`safetensors.torch.load_file` opens them), read here through one
`np.memmap` per shard so a batch gathers its rows without loading the shard.

Fields of a view with per-row source shape `shape = (*lead, V)`:

* dense: `name` (N, *shape) in float16 | bfloat16 | float32.
* top-k (`k` > 0) of log-probabilities `log_softmax(x, -1)` (temperature 1), sorted descending:
  `name.indices` (N, *lead, ceil(k*b/8)) uint8, each index packed in b = ceil(log2 V) bits
  (little-endian bit order); `name.values` (N, *lead, k) float16 | bfloat16 | float32, or with
  `quant="int8"` `name.values_q` (N, *lead, k) uint8 plus `name.qparams` (N, *lead, 2) float32
  (offset, step: value = offset + q * step, one pair per row/token); `name.missing` (N, *lead) float32,
  the probability mass outside the top k (1 - sum exp(values), computed before rounding).

Bytes per token of a top-k view: ceil(k*b/8) + 2k + 4 (fp16 values) or ceil(k*b/8) + k + 12 (int8),
both within the issue's bound k*(b + 16)/8 + 16.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

FORMAT_VERSION = 1
SAMPLE_ID, VIEW_ID = "__sample_id__", "__view_id__"
DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUANTS = ("none", "int8")
MISSING_MODES = ("uniform", "renormalize")
#: log-probability used for "no mass" entries of reconstructed dense logits (finite, so 0 * log 0 = 0)
NO_MASS = -1.0e4

_ST_TO_NP = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64, "U8": np.uint8,
             "I8": np.int8, "U16": np.uint16, "I16": np.int16, "I32": np.int32, "U32": np.uint32,
             "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_}


class StoreError(RuntimeError):
    """A store that is incomplete, corrupt, or asked for something it did not record."""


def index_bits(vocab_size: int) -> int:
    """Bits per packed index: ceil(log2 V), at least 1."""
    return max(1, (int(vocab_size) - 1).bit_length())


@dataclass(frozen=True)
class ViewSpec:
    """How one view is recorded. `shape` is the per-row shape of the teacher's tensor (dense shape)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float16"
    k: int = 0
    quant: str = "none"

    def __post_init__(self) -> None:
        if self.dtype not in DENSE_DTYPES:
            raise ValueError(f"view {self.name!r}: dtype must be one of {sorted(DENSE_DTYPES)}, got {self.dtype!r}")
        if self.quant not in QUANTS:
            raise ValueError(f"view {self.name!r}: quant must be one of {QUANTS}, got {self.quant!r}")
        if self.k:
            if not self.shape:
                raise ValueError(f"view {self.name!r}: top-k needs a last (vocabulary) dimension; shape is ()")
            if not 0 < self.k <= self.shape[-1]:
                raise ValueError(f"view {self.name!r}: k={self.k} must be in 1..V={self.shape[-1]}")
        elif self.quant != "none":
            raise ValueError(f"view {self.name!r}: quant={self.quant!r} applies to top-k views only (k > 0)")

    @property
    def kind(self) -> str:
        return "topk" if self.k else "dense"

    @property
    def vocab_size(self) -> int:
        return self.shape[-1]

    @property
    def bits(self) -> int:
        return index_bits(self.vocab_size)

    def fields(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Field name -> (torch dtype, per-row shape) as stored in a shard."""
        if not self.k:
            return {self.name: (DENSE_DTYPES[self.dtype], self.shape)}
        lead, n = self.shape[:-1], self.name
        out = {f"{n}.indices": (torch.uint8, (*lead, math.ceil(self.k * self.bits / 8)))}
        if self.quant == "int8":
            out[f"{n}.values_q"] = (torch.uint8, (*lead, self.k))
            out[f"{n}.qparams"] = (torch.float32, (*lead, 2))
        else:
            out[f"{n}.values"] = (DENSE_DTYPES[self.dtype], (*lead, self.k))
        out[f"{n}.missing"] = (torch.float32, lead)
        return out

    def bytes_per_row(self) -> int:
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for d, s in self.fields().values())

    def bytes_per_position(self) -> float:
        """Bytes per token (per leading position) of a top-k view, per row of a dense one."""
        return self.bytes_per_row() / (math.prod(self.shape[:-1]) if self.k else 1)

    def bound_per_position(self) -> float | None:
        """The issue's size bound k*(ceil(log2 V) + 16)/8 + 16 bytes per token (top-k views)."""
        return self.k * (self.bits + 16) / 8 + 16 if self.k else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["kind"] = self.kind
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ViewSpec:
        return cls(d["name"], tuple(d["shape"]), d.get("dtype", "float16"), int(d.get("k", 0)), d.get("quant", "none"))


class TopKLogits(tuple):
    """A sparse teacher distribution: the top-k log-probabilities (temperature 1) and the mass outside.

    `indices` (..., k) int64 vocabulary ids, `logprobs` (..., k) float32 (descending), `missing` (...,)
    float32 = 1 - sum(exp(logprobs)) as recorded, `vocab_size` V. `shape` is the dense shape (..., V), so
    shape checks against the student's logits pass. It is also the pair `(indices, logprobs)` (a tuple
    of two), which is what `still.losses.divergences.sparse_topk_kl` takes; `lm_kd` reads its fields.
    A tempered top-k distribution is exact up to the missing mass: softmax(logprobs / T) over the k ids
    equals the teacher's tempered softmax restricted to them and renormalised.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    missing: torch.Tensor
    vocab_size: int

    def __new__(cls, indices: torch.Tensor, logprobs: torch.Tensor, missing: torch.Tensor, vocab_size: int) -> TopKLogits:
        self = super().__new__(cls, (indices, logprobs))
        self.indices, self.logprobs, self.missing, self.vocab_size = indices, logprobs, missing, int(vocab_size)
        return self

    def __repr__(self) -> str:
        return f"TopKLogits(shape={tuple(self.shape)}, k={self.k}, vocab_size={self.vocab_size})"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.indices.shape[:-1], self.vocab_size))

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def to(self, device: torch.device | str) -> TopKLogits:
        return TopKLogits(self.indices.to(device), self.logprobs.to(device), self.missing.to(device), self.vocab_size)

    def dense(self, missing: str = "uniform") -> torch.Tensor:
        """Dense log-probabilities (..., V) float32.

        `missing="uniform"`: the recorded missing mass is spread evenly over the V - k other ids;
        `"renormalize"`: the other ids get no mass (log-prob NO_MASS) and the top k are renormalised.
        Either way the result is log-normalised (so rounding of stored values cannot leave it off 1).
        """
        if missing not in MISSING_MODES:
            raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
        rest = self.vocab_size - self.k
        if missing == "uniform" and rest > 0:
            fill = torch.log(self.missing.float().clamp_min(1e-30) / rest)[..., None]
        else:
            fill = torch.full((*self.missing.shape, 1), NO_MASS, device=self.device)
        out = fill.expand(*self.shape).clone()
        out.scatter_(-1, self.indices, self.logprobs.float())
        return torch.log_softmax(out, dim=-1)


# ---------------------------------------------------------------- bit packing

def pack_indices(idx: np.ndarray, bits: int) -> np.ndarray:
    """(..., k) non-negative ints -> (..., ceil(k*bits/8)) uint8, `bits` per index, little-endian bit order."""
    idx = np.asarray(idx)
    k = idx.shape[-1]
    flat = idx.reshape(-1, k).astype(np.uint64)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"index {int(flat.max())} does not fit in {bits} bits")
    bit = np.empty((len(flat), k * bits), dtype=np.uint8)
    for b in range(bits):  # bit b of index j sits at position j*bits + b
        bit[:, b::bits] = (flat >> np.uint64(b)) & np.uint64(1)
    packed = np.packbits(bit, axis=-1, bitorder="little")
    return packed.reshape(*idx.shape[:-1], packed.shape[-1])


def unpack_indices(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of `pack_indices`: (..., nbytes) uint8 -> (..., k) int64. Vectorised byte gathers, no bit arrays."""
    packed = np.asarray(packed)
    nbytes = packed.shape[-1]
    flat = packed.reshape(-1, nbytes)
    span = (bits + 7 + 7) // 8  # bytes an index can straddle (shift <= 7)
    buf = np.zeros((len(flat), nbytes + span), dtype=np.uint8)
    buf[:, :nbytes] = flat
    pos = np.arange(k, dtype=np.int64) * bits
    first, shift = pos // 8, (pos % 8).astype(np.uint64)
    acc = np.zeros((len(flat), k), dtype=np.uint64)
    for j in range(span):
        acc |= buf[:, first + j].astype(np.uint64) << np.uint64(8 * j)
    out = (acc >> shift) & np.uint64((1 << bits) - 1)
    return out.astype(np.int64).reshape(*packed.shape[:-1], k)


# ---------------------------------------------------------------- encode / decode

def _topk_of(spec: ViewSpec, x: torch.Tensor | TopKLogits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, missing) of the view's top `spec.k` log-probs, on the CPU: from dense logits
    (B, ..., V), or from a teacher that already serves `TopKLogits` with at least k entries (its first k,
    which are descending; its recorded missing mass when k is all it has, so nothing is re-estimated)."""
    if isinstance(x, TopKLogits):
        if x.k < spec.k:
            raise StoreError(f"view {spec.name!r}: the teacher serves its top {x.k}, the store records top {spec.k}")
        vals, idx = x.logprobs[..., :spec.k].detach().float().cpu(), x.indices[..., :spec.k].cpu()
        if x.k == spec.k:
            return vals, idx, x.missing.detach().float().cpu()
    else:
        vals, idx = torch.log_softmax(x.detach().cpu().float(), dim=-1).topk(spec.k, dim=-1, sorted=True)
    return vals, idx, (-torch.expm1(torch.logsumexp(vals, dim=-1))).clamp_min(0).float()


def encode_view(spec: ViewSpec, x: torch.Tensor | TopKLogits) -> dict[str, torch.Tensor]:
    """Teacher tensor (B, *spec.shape) or `TopKLogits` of that dense shape -> the view's fields, each
    (B, *field_shape), on the CPU."""
    if tuple(x.shape[1:]) != spec.shape:
        raise StoreError(f"view {spec.name!r}: teacher gave per-row shape {tuple(x.shape[1:])}, the store records {spec.shape}")
    if not spec.k:
        if isinstance(x, TopKLogits):
            raise StoreError(f"view {spec.name!r}: the teacher serves top-k log-probs; record it with topk="
                             f"{{{spec.name!r}: k}} (a dense view needs the full tensor)")
        return {spec.name: x.detach().cpu().to(DENSE_DTYPES[spec.dtype]).contiguous()}
    vals, idx, missing = _topk_of(spec, x)
    n = spec.name
    out = {f"{n}.indices": torch.from_numpy(pack_indices(idx.numpy(), spec.bits)), f"{n}.missing": missing}
    vals = vals.float()
    if spec.quant == "int8":
        finite = vals.clamp_min(-1e4)
        lo, hi = finite.amin(-1, keepdim=True), finite.amax(-1, keepdim=True)
        step = ((hi - lo) / 255).clamp_min(1e-12)
        out[f"{n}.values_q"] = torch.round((finite - lo) / step).clamp(0, 255).to(torch.uint8)
        out[f"{n}.qparams"] = torch.cat([lo, step], dim=-1)
    else:
        out[f"{n}.values"] = vals.to(DENSE_DTYPES[spec.dtype])
    return {key: v.contiguous() for key, v in out.items()}


def to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A gathered numpy field as a torch tensor of the stored dtype (bfloat16 is stored as raw uint16)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def decode_view(spec: ViewSpec, fields: Mapping[str, np.ndarray]) -> torch.Tensor | TopKLogits:
    """Gathered fields (B, *field_shape) -> dense tensor (B, *shape) in the stored dtype, or TopKLogits."""
    f = spec.fields()
    if not spec.k:
        return to_torch(fields[spec.name], f[spec.name][0])
    n = spec.name
    idx = torch.from_numpy(unpack_indices(fields[f"{n}.indices"], spec.k, spec.bits))
    if spec.quant == "int8":
        q = torch.from_numpy(np.ascontiguousarray(fields[f"{n}.values_q"])).float()
        qp = torch.from_numpy(np.ascontiguousarray(fields[f"{n}.qparams"]))
        vals = qp[..., :1] + q * qp[..., 1:]
    else:
        vals = to_torch(fields[f"{n}.values"], f[f"{n}.values"][0]).float()
    return TopKLogits(idx, vals, torch.from_numpy(np.ascontiguousarray(fields[f"{n}.missing"])), spec.vocab_size)


# ---------------------------------------------------------------- files

def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> str:
    """Write `data` to `path` via a temp file, fsync and `os.replace`; returns its sha256 (hex)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> str:
    return write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Atomically write a safetensors file; returns (sha256, bytes). Same tensors give the same bytes.

    safetensors writes `metadata` from a hash map (key order varies between processes), so give at most
    one key if the bytes must be reproducible.
    """
    if metadata and len(metadata) > 1:
        raise ValueError("save_tensors: give at most one metadata key (safetensors orders several keys arbitrarily)")
    from safetensors.torch import save

    data = save({k: tensors[k].contiguous() for k in sorted(tensors)}, metadata=dict(sorted((metadata or {}).items())))
    return write_atomic(path, data), len(data)


@dataclass
class MappedTensors:
    """A safetensors file opened as one read-only `np.memmap`; `array(name)` is a zero-copy view."""

    path: Path
    mm: np.memmap = field(init=False, repr=False)
    header: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        try:
            self.mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            n = int.from_bytes(bytes(self.mm[:8]), "little")
            self.header = json.loads(bytes(self.mm[8 : 8 + n]))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.base = 8 + n

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def array(self, name: str) -> np.ndarray:
        if name not in self.header:
            raise StoreError(f"{self.path}: no tensor {name!r}; it has {self.names()}")
        h = self.header[name]
        start, end = h["data_offsets"]
        dt = np.dtype(_ST_TO_NP[h["dtype"]])
        return np.frombuffer(self.mm, dtype=dt, count=(end - start) // dt.itemsize,
                             offset=self.base + start).reshape(h["shape"])
