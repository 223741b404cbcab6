"""`still cache`: record a recipe's teacher into a store, verify a store, write one with Ray Data.

Called by `still.cli`::

    still cache RECIPE --out STORE [--set k=v ...]   ->  cache_recipe(RECIPE, out=STORE, overrides=[...])
    still cache verify STORE                          ->  verify_store(STORE)   (exit 1 unless report.ok)

and from Python: `cache_recipe(recipe_path_or_obj, out, workers=4)` (4 local processes writing disjoint
shards), under `torchrun` (each rank calls `cache_recipe(..., rank=None)`: RANK/WORLD_SIZE are read), or
`write_store_ray(make_teacher, make_dataset, out)` on a Ray cluster (extra `still[ray]`).
A recipe then trains from the store with `teacher: {store: STORE}`; `open_store_for_recipe` refuses a
store recorded from other data or preprocessing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from still.teachers.store import (
    PLAN, StoreTeacher, VerifyReport, _shard_complete, finalize_store, make_plan, verify, write_shard, write_store,
)
from still.teachers.store_format import StoreError, write_json_atomic


def _load(recipe: Any, overrides: Sequence[str] = ()) -> Any:
    from still.recipes.schema import Recipe, load_recipe, parse_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe))
    return load_recipe(recipe, overrides)


def preprocessing_of(recipe: Any) -> dict[str, Any]:
    """What the store records as preprocessing/augmentation: the recipe's data section (name/factory + params)."""
    return recipe.data.model_dump(mode="json")


def recipe_teacher(recipe: Any, runs_root: str | Path = "runs") -> tuple[Any, Any, dict[str, str]]:
    """(LiveTeacher, train data set, recorded views {name: tap}) of a recipe with a model teacher.

    A teacher with a `train:` section is trained (or reused) through `still.pipeline.prepare_teacher`,
    with the same cache as `still run`.
    """
    from still.pipeline import _Log, prepare_teacher
    from still.recipes.build import build_dataset, build_live_teacher, build_objective

    spec = recipe.teacher
    if spec is None or spec.model is None:
        raise StoreError("still cache: the recipe's teacher must be a model (teacher.model); "
                         f"it is {'a store' if spec is not None else 'absent'}")
    train = build_dataset(recipe.data, "train")
    with tempfile.TemporaryDirectory() as run_dir, torch.random.fork_rng():
        torch.manual_seed(recipe.seed)  # an untrained teacher is then the same in every worker
        model, _, _ = prepare_teacher(recipe, train, None, Path(run_dir), Path(runs_root) / ".teachers",
                                      progress=False, log=_Log(None, quiet=True))
    parts = build_objective(recipe)
    views = {**{k: parts.teacher_views[k] for k in parts.objective.teacher_views() if k in parts.teacher_views},
             **dict(spec.views)}
    if not views:
        raise StoreError("still cache: the recipe names no teacher views to record (teacher.views is empty)")
    return build_live_teacher(model, spec, views), train, views


def _worker(recipe_data: dict, out: str, rank: int, world: int, kw: dict, runs_root: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    recipe = _load(recipe_data)
    teacher, train, _ = recipe_teacher(recipe, runs_root)
    write_store(teacher, train, out, rank=rank, world_size=world, finalize=False,
                preprocessing=preprocessing_of(recipe), **kw)


def cache_recipe(recipe: Any, out: str | Path, *, overrides: Sequence[str] = (), workers: int = 1,
                 rank: int | None = None, world_size: int | None = None, resume: bool = True,
                 topk: Any = None, dtype: Any = "float16", quant: Any = None, shard_size: int = 4096,
                 batch_size: int = 256, runs_root: str | Path = "runs") -> Path | None:
    """Record the recipe's teacher views over its training data into the store `out`.

    `recipe`: a YAML path, a mapping or a `Recipe`. `workers > 1` spawns that many local processes
    (worker w writes shards w, w+W, ...) and finalizes; `rank`/`world_size` (or RANK/WORLD_SIZE under
    torchrun) make this call one of several; the last rank to finish writes the manifest. Returns the
    store path when the manifest exists, else None (other ranks still writing). Resumes by default.
    """
    rec = _load(recipe, overrides)
    out = Path(out)
    kw = dict(topk=topk, dtype=dtype, quant=quant, shard_size=shard_size, batch_size=batch_size)
    if workers > 1:
        import multiprocessing as mp

        if (out / PLAN).exists() and not resume:
            raise StoreError(f"{out} already holds a store; pass resume=True to continue it or choose a new path")
        teacher, train, _ = recipe_teacher(rec, runs_root)  # trains/caches the teacher once, writes the plan
        out.mkdir(parents=True, exist_ok=True)
        plan = make_plan(teacher, train, preprocessing=preprocessing_of(rec), **kw)
        if not (out / PLAN).exists():
            write_json_atomic(out / PLAN, plan)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(rec.model_dump(mode="json"), str(out), w, workers, kw, str(runs_root)))
                 for w in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [w for w, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise StoreError(f"still cache: worker(s) {failed} failed (exit codes "
                             f"{[procs[w].exitcode for w in failed]}); rerun to resume")
        return finalize_store(out)
    teacher, train, _ = recipe_teacher(rec, runs_root)
    return write_store(teacher, train, out, rank=rank, world_size=world_size, resume=resume,
                       preprocessing=preprocessing_of(rec), **kw)


def verify_store(path: str | Path) -> VerifyReport:
    """Check every shard's and the index's sha256 (`still cache verify STORE`); `report.ok` is the verdict."""
    return verify(path)


def open_store_for_recipe(recipe: Any, train_data: Any = None, **kw: Any) -> StoreTeacher:
    """The store teacher of a recipe with `teacher: {store: PATH}`, refused (StoreMismatchError) if it was
    recorded from other data (fingerprint of `train_data`) or another data/preprocessing section.

    Top-k views are served as dense log-probabilities by default (`topk="dense"`, missing mass spread
    uniformly), so every dense loss (kd, ...) works on them; pass `topk="sparse"` for losses that take
    `TopKLogits` (sparse_topk_kl, lm_kd) and never need the (..., V) tensor."""
    rec = _load(recipe)
    if rec.teacher is None or rec.teacher.store is None:
        raise StoreError("the recipe's teacher is not a store (teacher: {store: PATH})")
    kw.setdefault("topk", "dense")
    teacher = StoreTeacher(rec.teacher.store, **kw)
    fp = train_data.fingerprint() if train_data is not None and hasattr(train_data, "fingerprint") else None
    teacher.check_compatible(data_fp=fp, preprocessing=preprocessing_of(rec))
    return teacher


# ------------------------------------------------------------------------------------------------ Ray Data

class _RayShardWriter:
    """Ray Data actor: builds the teacher and data once, then writes the shards it is handed."""

    def __init__(self, make_teacher: Callable[[], Any], make_dataset: Callable[[], Any], out: str,
                 plan: dict[str, Any], threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.teacher, self.data, self.out, self.plan = make_teacher(), make_dataset(), Path(out), plan

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        infos = [write_shard(self.teacher, self.data, self.out, self.plan, int(s)) for s in batch["shard"]]
        return {"shard": np.array([i["shard"] for i in infos]), "sha256": np.array([i["sha256"] for i in infos])}


def write_store_ray(make_teacher: Callable[[], Any], make_dataset: Callable[[], Any], out: str | Path, *,
                    concurrency: int = 2, threads_per_worker: int = 1, **store_kw: Any) -> Path:
    """Write a store with Ray Data: one actor per worker, each shard written by exactly one actor.

    `make_teacher` / `make_dataset` are picklable zero-argument factories run on the workers (the data
    set must give every worker the same item order); `out` must be a path all workers see (shared file
    system). Shards are the same files `write_store` writes; completed shards are skipped (resumable).
    Needs `pip install still[ray]`; call `ray.init(...)` first to pick the cluster.
    """
    try:
        import ray
    except ImportError as exc:
        raise ImportError("write_store_ray needs Ray Data: pip install 'still[ray]'") from exc
    out = Path(out)
    plan = make_plan(make_teacher(), make_dataset(), **store_kw)
    out.mkdir(parents=True, exist_ok=True)
    if (out / PLAN).exists():
        import json

        from still.teachers.store import StoreMismatchError, _diff

        diffs = _diff(json.loads((out / PLAN).read_text()), plan)
        if diffs:
            raise StoreMismatchError(f"{out} was started with other capture settings:\n  " + "\n  ".join(diffs))
    else:
        write_json_atomic(out / PLAN, plan)
    todo = [s for s in range(plan["n_shards"]) if _shard_complete(out, s) is None]
    if todo:
        ds = ray.data.from_items([{"shard": s} for s in todo])
        ds.map_batches(_RayShardWriter, batch_size=1, concurrency=min(concurrency, len(todo)), num_cpus=threads_per_worker,
                       fn_constructor_args=(make_teacher, make_dataset, str(out), plan, threads_per_worker)).materialize()
    return finalize_store(out)


__all__ = ["cache_recipe", "verify_store", "open_store_for_recipe", "preprocessing_of", "recipe_teacher",
           "write_store_ray"]
