"""Deterministic, resumable batching for the engine.

The engine never lets accelerate re-shard its data loader. Instead every epoch has one fixed plan:

- a permutation of the data set drawn from `(seed, epoch)` (so it is the same on every rank and
  after a restart),
- cut into *global* batches of `batch_size * world_size` samples (the last incomplete one is dropped),
- rank `r` takes the slice `[r * batch_size, (r + 1) * batch_size)` of every global batch.

A run's data position is therefore just `(epoch, batches done in the epoch)`; resuming skips exactly
the batches already done, without reading them. A 2-process run with per-process batch `B` sees the
same samples per step as a 1-process run with batch `2B`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


@dataclass(frozen=True)
class Plan:
    """How many batches and steps an epoch has, and how many steps the run takes."""

    batches_per_epoch: int  # micro-batches used per epoch (a multiple of grad_accum)
    steps_per_epoch: int
    total_steps: int
    global_batch: int       # samples per micro-batch over all processes

    @classmethod
    def make(cls, n: int, cfg: Any, world: int) -> Plan:
        """From the data set size, a `TrainConfig` and the number of processes."""
        gb = cfg.batch_size * world
        spe = (n // gb) // cfg.grad_accum
        if spe < 1:
            raise ValueError(f"the training data has {n} samples, fewer than one optimizer step needs: batch_size "
                             f"{cfg.batch_size} x {world} process(es) x grad_accum {cfg.grad_accum} = "
                             f"{gb * cfg.grad_accum}")
        total = int(cfg.max_steps) if cfg.max_steps else cfg.epochs * spe
        return cls(spe * cfg.grad_accum, spe, total, gb)


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of the `n` samples in `epoch`: `(n,)` int64, a function of `(seed, epoch)` only."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(n, generator=g)


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's index list for every global batch of `epoch`, starting at batch `start`.

    `len(self)` is the number of batches still to come in the epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        num_batches: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.seed, self.epoch, self.start = int(seed), int(epoch), int(start)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), shuffle
        full = self.num_samples // self.global_batch
        self.num_batches = full if num_batches is None else min(int(num_batches), full)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.iter_tensors():
            yield idx.tolist()

    def iter_tensors(self) -> Iterator[torch.Tensor]:
        """The same batches as `(batch_size,)` int64 tensors."""
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch, self.shuffle)
        gb, lo = self.global_batch, self.rank * self.batch_size
        for b in range(self.start, self.num_batches):
            yield perm[b * gb + lo : b * gb + lo + self.batch_size]


def collate(samples: Any) -> Any:
    """Default collate: a list of dict samples -> dict of stacked tensors.

    A data set with `__getitems__` (such as `InMemoryDataset`) returns a whole batch at once; such an
    already-batched mapping is passed through unchanged.
    """
    if isinstance(samples, Mapping):
        return dict(samples)
    return default_collate(samples)


class InMemoryDataset(Dataset):
    """Tensors held in memory as a map-style data set of dict samples, with fast batched fetch.

    >>> ds = InMemoryDataset(x=torch.randn(100, 8), y=torch.randint(0, 3, (100,)))
    >>> ds[0]                     # {"x": (8,), "y": (), "index": ()}
    >>> ds.__getitems__([0, 5])   # {"x": (2, 8), "y": (2,), "index": (2,)}, one gather per key

    An `index` key (the sample id) is added when not given.
    """

    def __init__(self, **tensors: torch.Tensor) -> None:
        if not tensors:
            raise ValueError("InMemoryDataset needs at least one tensor")
        sizes = {k: len(v) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"InMemoryDataset tensors differ in length: {sizes}")
        self.n = next(iter(sizes.values()))
        self.tensors = dict(tensors)
        self.tensors.setdefault("index", torch.arange(self.n))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, idx: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        ix = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(idx, dtype=torch.long)
        return {k: v[ix] for k, v in self.tensors.items()}

    def gather(self, ix: torch.Tensor) -> dict[str, torch.Tensor]:
        """`__getitems__` for a `(B,)` int64 tensor of valid, non-negative indices (what the engine's sampler
        yields), by `index_select`: the same values as `v[ix]`, several times faster for wide rows
        (about 25 µs instead of 130 µs for 128 rows of 784 floats on one CPU thread)."""
        return {k: torch.index_select(v, 0, ix) for k, v in self.tensors.items()}


class InProcessLoader:
    """What `DataLoader(num_workers=0)` does (fetch the batch's samples, collate), without its per-batch
    machinery: about 0.1 ms less per batch, which matters for small models."""

    def __init__(self, dataset: Dataset, sampler: RankBatchSampler, collate_fn: Callable[[Any], Any]) -> None:
        self.dataset, self.sampler, self.collate_fn = dataset, sampler, collate_fn

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.dataset, InMemoryDataset):  # index tensors go straight into the gathers
            own = type(self.dataset).__getitems__ is InMemoryDataset.__getitems__
            fetch = self.dataset.gather if own else self.dataset.__getitems__
            for ix in self.sampler.iter_tensors():
                yield self.collate_fn(fetch(ix))
            return
        get_many = getattr(self.dataset, "__getitems__", None)
        for idx in self.sampler:
            yield self.collate_fn(get_many(idx) if get_many else [self.dataset[i] for i in idx])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start: int,
    rank: int,
    world_size: int,
    num_batches: int | None = None,
    num_workers: int = 0,
    collate_fn: Callable[[Any], Any] | None = None,
    pin_memory: bool = False,
) -> DataLoader | InProcessLoader:
    """A loader over this rank's batches of `epoch` from batch `start` on: an `InProcessLoader` without
    workers or pinned memory, else a `DataLoader`.

    The DataLoader has its own generator seeded from `(seed, epoch)`, so creating it never draws from
    the global torch RNG (which would shift dropout masks after a resume).
    """
    sampler = RankBatchSampler(
        len(dataset), batch_size, seed=seed, epoch=epoch, start=start, rank=rank,
        world_size=world_size, num_batches=num_batches,
    )
    if num_workers == 0 and not pin_memory:
        return InProcessLoader(dataset, sampler, collate_fn or collate)
    g = torch.Generator().manual_seed((int(seed) * 7_919 + int(epoch) * 104_729 + 1) % (2**63 - 1))
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn or collate,
        pin_memory=pin_memory, generator=g,
    )


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Every tensor in a (nested) dict/list batch moved to `device`."""
    if isinstance(device, torch.device) and device.type == "cpu" and type(batch) is dict \
            and all(type(v) is torch.Tensor and v.is_cpu for v in batch.values()):
        return dict(batch)  # a flat batch already on the CPU (the engine's CPU hot path): nothing to move
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch
