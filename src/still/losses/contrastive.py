"""Contrastive representation distillation (CRD) with a momentum memory bank of negatives."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from still.registry import register_loss


def nce_loss(probs: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE objective on `(B, K+1)` unnormalised probabilities; column 0 is the positive.

    −(1/B)·Σ_b [log(P_pos/(P_pos + K·Pn + ε)) + Σ_k log(K·Pn/(P_neg,k + K·Pn + ε))], Pn = 1/num_data.
    """
    b, k1 = probs.shape
    m = k1 - 1
    mpn = m / float(num_data)
    pos = probs[:, 0]
    neg = probs[:, 1:]
    log_d1 = torch.log(pos / (pos + mpn + eps))
    log_d0 = torch.log(mpn / (neg + mpn + eps))
    return -(log_d1.sum() + log_d0.sum()) / b


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's `x` `(n_rank, ...)` along dim 0 (sizes may differ); `x` itself in one process."""
    world = _world()
    if world == 1:
        return x
    import torch.distributed as dist

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = max(int(v) for v in sizes)
    padded = torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(v)] for p, v in zip(parts, sizes)])


def _all_reduce(x: torch.Tensor, op: str) -> torch.Tensor:
    if _world() == 1:
        return x
    import torch.distributed as dist

    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x / _world() if op == "mean" else x


def _crd_example() -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g, requires_grad=True)
    t = torch.randn(4, 3, 2, generator=g)
    return (s, t), {"index": torch.tensor([0, 5, 2, 9])}


@register_loss("crd", paper="Tian, Krishnan, Isola. Contrastive Representation Distillation (ICLR 2020)",
               shape_check="batch", example=_crd_example)
class CRDLoss(nn.Module):
    """CRD: NCE between student and teacher embeddings, negatives drawn from a memory bank.

    Call as `loss(student (B, ...), teacher (B, ...), index (B,) int64)` (term `inputs={"index": "index"}`;
    `index` is the sample id in the training set). Both features are flattened, mapped by a linear head
    (sized lazily on the first call, trained with the student) to `feat_dim` and L2-normalised. The student
    embedding is scored against K negatives and its positive from the *teacher* memory, and vice versa;
    scores are exp(v·m/τ) normalised by a constant Z fixed on the first batch. After each training-mode
    call the memories' rows `index` move to normalise(momentum·m + (1 − momentum)·v); under
    torch.distributed the rows of every process are applied on every process (all-gather), the bank
    grows alike everywhere and Z is the mean over processes, so the banks stay identical.

    `num_samples` fixes the bank size (the data set's size, as in the paper); without it the bank grows
    to cover the largest index seen and negatives are drawn from the ids seen so far. Defaults are the
    paper's (feat_dim 128, K = 16384, τ = 0.07, momentum 0.5). Memory per step is B·(K+1)·feat_dim floats
    twice: lower `num_negatives` for small machines.
    """

    #: score the whole bank by one matmul while it has at most this many rows per sampled row
    full_bank_factor: int = 32

    def __init__(self, feat_dim: int = 128, num_negatives: int = 16384, nce_t: float = 0.07,
                 momentum: float = 0.5, num_samples: int | None = None) -> None:
        super().__init__()
        self.feat_dim, self.num_negatives = int(feat_dim), int(num_negatives)
        self.nce_t, self.momentum = float(nce_t), float(momentum)
        self.num_samples = num_samples
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None
        n0 = int(num_samples) if num_samples else 0
        self.register_buffer("memory_s", self._init_rows(n0))
        self.register_buffer("memory_t", self._init_rows(n0))
        # normalising constants (−1: not set yet) and the number of ids known (for growing banks)
        self.register_buffer("z", torch.full((2,), -1.0))
        self.register_buffer("n_seen", torch.tensor(n0, dtype=torch.long))

    def _init_rows(self, n: int, like: torch.Tensor | None = None) -> torch.Tensor:
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        kw: dict[str, Any] = {} if like is None else {"device": like.device, "dtype": like.dtype}
        return torch.rand(n, self.feat_dim, **kw).mul_(2 * stdv).add_(-stdv)

    @property
    def num_data(self) -> int:
        """The bank size used for the noise distribution Pn = 1/num_data."""
        return int(self.num_samples) if self.num_samples else int(self.n_seen)

    def _grow(self, index: torch.Tensor) -> None:
        need = index.max().reshape(1) + 1
        # in training every process grows alike (collectives only run in training: every process trains)
        need = int(_all_reduce(need, "max") if self.training else need)
        if self.num_samples:
            if need > int(self.num_samples):
                raise IndexError(f"crd: sample index {need - 1} >= num_samples={self.num_samples}")
            return
        if need > self.memory_s.shape[0]:
            cap = max(need, 2 * self.memory_s.shape[0])
            extra = cap - self.memory_s.shape[0]
            self.memory_s = torch.cat([self.memory_s, self._init_rows(extra, self.memory_s)])
            self.memory_t = torch.cat([self.memory_t, self._init_rows(extra, self.memory_t)])
        self.n_seen.fill_(max(int(self.n_seen), need))

    def _head(self, side: str, x: torch.Tensor) -> nn.Linear:
        head = getattr(self, f"embed_{side}")
        if head is None:
            head = nn.Linear(x.shape[1], self.feat_dim).to(device=x.device, dtype=x.dtype)
            setattr(self, f"embed_{side}", head)
        return head

    def embed(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised embeddings `(B, feat_dim)` of student and teacher features."""
        s = student.reshape(student.shape[0], -1)
        t = teacher.reshape(teacher.shape[0], -1).to(s.device)
        s = s if s.dtype in (torch.float32, torch.float64) else s.float()
        t = t.to(s.dtype)
        vs = F.normalize(self._head("s", s)(s), dim=1)
        vt = F.normalize(self._head("t", t)(t), dim=1)
        return vs, vt

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor,
                contrast_index: torch.Tensor | None = None) -> torch.Tensor:
        """NCE loss (scalar). `contrast_index` `(B, K+1)` fixes the bank rows (column 0 = positives)."""
        if student.shape[0] != teacher.shape[0] or index.numel() != student.shape[0]:
            raise ValueError(f"crd: student batch {student.shape[0]}, teacher batch {teacher.shape[0]} and "
                             f"{index.numel()} indices must agree")
        index = index.reshape(-1).long().to(student.device)
        if self.memory_s.device != student.device:
            self.to(student.device)
        self._grow(index)
        vs, vt = self.embed(student, teacher)
        with torch.autocast(device_type=vs.device.type, enabled=False):  # exp(·/τ) wants float32 or better
            return self._nce(vs if vs.dtype == torch.float64 else vs.float(),
                             vt if vt.dtype == torch.float64 else vt.float(), index, contrast_index)

    def _nce(self, vs: torch.Tensor, vt: torch.Tensor, index: torch.Tensor,
             contrast_index: torch.Tensor | None) -> torch.Tensor:
        mem_s, mem_t = self.memory_s.to(vs.dtype), self.memory_t.to(vs.dtype)
        b = vs.shape[0]
        if contrast_index is None:
            contrast_index = torch.randint(0, self.num_data, (b, self.num_negatives + 1), device=vs.device)
            contrast_index[:, 0] = index
        contrast_index = contrast_index.to(vs.device).long()
        out_s = torch.exp(self._scores(vs, mem_t, contrast_index) / self.nce_t)  # student vs teacher bank
        out_t = torch.exp(self._scores(vt, mem_s, contrast_index) / self.nce_t)  # teacher vs student bank
        n = self.num_data
        if float(self.z[0]) < 0:
            means = torch.stack([out_s.detach().mean(), out_t.detach().mean()])
            means = _all_reduce(means, "mean") if self.training else means
            self.z.copy_(means.to(self.z.dtype) * n)
        loss = nce_loss(out_s / self.z[0].to(out_s.dtype), n) + nce_loss(out_t / self.z[1].to(out_t.dtype), n)
        if self.training:
            with torch.no_grad():
                # under DDP every process applies every process's rows, so the banks stay identical
                index = all_gather_rows(index)
                vs, vt = all_gather_rows(vs.detach()), all_gather_rows(vt.detach())
                for mem, v in ((self.memory_s, vs), (self.memory_t, vt)):
                    rows = mem[index] * self.momentum + v.detach().to(mem.dtype) * (1 - self.momentum)
                    mem.index_copy_(0, index, F.normalize(rows, dim=1))
        return loss

    def _scores(self, v: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """v_b · memory[rows[b, k]] for `v` (B, F), `rows` (B, K+1) -> (B, K+1).

        Scoring the whole bank with one matmul and picking the rows is far faster on CPU than gathering
        B·(K+1) rows, unless the bank is much larger than the sample (then rows are gathered).
        """
        b, k1 = rows.shape
        n = memory.shape[0]
        if n <= self.full_bank_factor * k1 and b * n <= 2**26:
            # autograd keeps the bank for v's gradient; the update after the loss writes it in place
            bank = memory.clone() if self.training and memory.data_ptr() in self._bank_ptrs() else memory
            return (v @ bank.t()).gather(1, rows)
        w = memory[rows.reshape(-1)].view(b, k1, -1)
        return torch.bmm(w, v.unsqueeze(2)).squeeze(2)

    def _bank_ptrs(self) -> set[int]:
        return {self.memory_s.data_ptr(), self.memory_t.data_ptr()}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # A fresh CRD (bank not grown, heads not built yet) takes the saved shapes.
        for name in ("memory_s", "memory_t"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        for side in ("s", "t"):
            w = state_dict.get(f"{prefix}embed_{side}.weight")
            if w is not None and getattr(self, f"embed_{side}") is None:
                setattr(self, f"embed_{side}", nn.Linear(w.shape[1], w.shape[0]).to(device=self.memory_s.device, dtype=w.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
