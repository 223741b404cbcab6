"""The run pipeline: a validated recipe → teacher (cached), students (scratch and distilled) → summary and report.

>>> from still.recipes.schema import load_recipe
>>> from still.pipeline import run_recipe
>>> summary = run_recipe(load_recipe("recipes/digits_kd.yaml"), seeds=[0, 1, 2])
>>> summary["distilled"]["mean"]["accuracy"], summary["scratch"]["mean"]["accuracy"]

Run directory (`runs/<recipe name>/<timestamp>/` or `out_dir`)::

    recipe.yaml                  the resolved recipe
    teacher/metrics.jsonl        the teacher's CE training log (when it was trained for this recipe)
    seed<k>/<variant>/           variant = distilled | scratch
        metrics.jsonl checkpoints/{last,best}/ student.safetensors result.json
    summary.json report.html plots/*.png

A teacher with a `train:` section is trained once with cross-entropy and cached under
`<runs_root>/.teachers/<hash of the teacher spec + data spec>/`; reruns reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from still.recipes.build import (
    build_dataset, build_live_teacher, build_objective, build_store_teacher, load_weights,
    seeded_model,
)
from still.recipes.schema import Recipe, RecipeError, TrainSpec, recipe_to_yaml

VARIANTS = ("teacher", "scratch", "distilled")
LATENCY_NOTE = "median seconds of one forward pass at batch size 1 (eval mode, 10 warm-up passes, CPU, {threads} threads)"


def _engine() -> tuple[Any, Any]:
    try:
        from still.engine import TrainConfig, train
    except ImportError as exc:
        raise RuntimeError(f"still.engine is not available ({exc}); the pipeline needs still.engine.train") from None
    return TrainConfig, train


def _config(spec: TrainSpec | None, where: str, **force: Any) -> Any:
    TrainConfig, _ = _engine()
    fields = {**(spec.given() if spec else {}), **{k: v for k, v in force.items() if v is not None}}
    try:
        return TrainConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_cache_key(recipe: Recipe) -> str:
    """Hash of what determines a trained teacher: its model, weights, train section, seed and the data spec."""
    t = recipe.teacher
    assert t is not None and t.model is not None
    weights = None
    if t.weights:
        p = Path(t.weights)
        weights = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.exists() else str(p)
    return _hash({
        "v": 1, "model": t.model.model_dump(), "weights": weights, "train": t.train.given() if t.train else None,
        "seed": (t.train.seed if t.train and t.train.seed is not None else recipe.seed),
        "data": recipe.data.model_dump(), "inputs": t.inputs, "torch": torch.__version__.split("+")[0],
    })


def _save_state(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def _measure(model: nn.Module, test: Any, recipe: Recipe, inputs: Any) -> dict[str, Any]:
    from still.metrics import count_parameters, evaluate, latency_per_sample

    out: dict[str, Any] = {}
    if recipe.eval.metrics:
        out.update(evaluate(model, test, recipe.eval.metrics, recipe.eval.batch_size, inputs))
    out["parameters"] = count_parameters(model)
    if recipe.eval.latency and len(test):
        sample = torch.utils.data.default_collate([test[0]])
        out["latency_s"] = latency_per_sample(model, sample, inputs, repeats=recipe.eval.latency_repeats)
    return out


class _Log:
    def __init__(self, console: Any, quiet: bool) -> None:
        self.console, self.quiet = console, quiet

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        if self.console is not None:
            self.console.print(msg)
        else:
            from rich.text import Text

            print(Text.from_markup(msg).plain, flush=True)


def prepare_teacher(
    recipe: Recipe, train: Any, test: Any, run_dir: Path, cache_root: Path, progress: bool | None, log: _Log,
) -> tuple[nn.Module | None, Any, dict[str, Any]]:
    """(teacher model or None, store teacher or None, info row). Trains and caches the teacher if asked."""
    spec = recipe.teacher
    if spec is None:
        return None, None, {}
    if spec.store is not None:
        store = build_store_teacher(recipe, train)
        return None, store, {"source": f"store {spec.store}"}
    assert spec.model is not None
    seed = spec.train.seed if spec.train is not None and spec.train.seed is not None else recipe.seed
    model = seeded_model(spec.model, "teacher.model", seed, train)  # the same teacher for the same spec
    if spec.weights:
        load_weights(model, spec.weights, "teacher.weights")
    info: dict[str, Any] = {"source": f"weights {spec.weights}" if spec.weights else "as built (untrained)"}
    if spec.train is not None:
        key = teacher_cache_key(recipe)
        final = cache_root / key
        if (final / "teacher.safetensors").exists():
            load_weights(model, final / "teacher.safetensors", f"teacher cache {final}")
            info["source"] = f"cached {final}"
            if (final / "train.json").exists():
                info["train_s"] = json.loads((final / "train.json").read_text()).get("train_s")
            log(f"[bold]teacher[/]: reusing {final}")
        else:
            partial = cache_root / f"{key}.partial"
            partial.mkdir(parents=True, exist_ok=True)
            (partial / "spec.json").write_text(json.dumps(
                {"teacher": spec.model_dump(mode="json"), "data": recipe.data.model_dump(mode="json")}, indent=2))
            _, train_fn = _engine()
            cfg = _config(spec.train, "teacher.train", seed=seed, progress=progress)
            resume = (partial / "checkpoints" / "last").exists()
            log(f"[bold]teacher[/]: training {spec.model.name or spec.model.factory} with cross-entropy "
                f"({'resuming ' if resume else ''}cache {final})")
            objective = build_objective(recipe, method="scratch", method_params={}).objective
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            train_fn(model, objective, train, config=cfg, teacher=None, student_views={"logits": ""},
                     student_inputs=spec.inputs, eval_fn=None, out_dir=str(partial), resume=resume)
            train_s = time.perf_counter() - t0
            _save_state(model, partial / "teacher.safetensors")
            (partial / "train.json").write_text(json.dumps({"train_s": train_s}))
            shutil.rmtree(partial / "checkpoints", ignore_errors=True)  # the weights are kept above
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            info["source"] = f"trained here, cached {final}"
            info["train_s"] = train_s
        if (final / "metrics.jsonl").exists():
            (run_dir / "teacher").mkdir(parents=True, exist_ok=True)
            shutil.copy(final / "metrics.jsonl", run_dir / "teacher" / "metrics.jsonl")
    return model, None, info


def _finished(out: Path, resume: bool, seed: int, variant: str, log: _Log) -> dict[str, Any] | None:
    """With `resume`, the result of a seed's variant that already finished (`out/result.json`); else None."""
    done = out / "result.json"
    if resume and done.exists():
        log(f"seed {seed} {variant}: already finished, reusing {done}")
        return json.loads(done.read_text())
    return None


def _fit_student(
    recipe: Recipe, variant: str, seed: int, train: Any, out: Path, resume: bool, progress: bool | None, log: _Log,
    teacher_for: Callable[[Any, nn.Module], Any], eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    detail: str = "",
) -> tuple[nn.Module, float]:
    """Build the variant's objective and seeded student, train it into `out` against `teacher_for(parts, student)`
    (resuming from `out/checkpoints/last` if asked and there), save it; return (student on CPU, train seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    _, train_fn = _engine()
    parts = build_objective(recipe, method="scratch", method_params={}) if variant == "scratch" else build_objective(recipe)
    student = seeded_model(recipe.student.model, "student.model", seed, train)
    if recipe.student.weights:
        load_weights(student, recipe.student.weights, "student.weights")
    teacher = teacher_for(parts, student)
    cfg = _config(recipe.train, "train", seed=seed, progress=progress)
    resume_here = resume and (out / "checkpoints" / "last").exists()
    log(f"[bold]seed {seed}[/] {variant}: training {recipe.student.model.name or 'student'}{detail} "
        f"(terms: {', '.join(t.name for t in parts.objective.terms)}){' resuming' if resume_here else ''}")
    t0 = time.perf_counter()
    train_fn(student, parts.objective, train, config=cfg, teacher=teacher, student_views=parts.student_views,
             student_inputs=recipe.student.inputs, eval_fn=eval_fn, out_dir=str(out), resume=resume_here,
             collate_fn=getattr(train, "collate_fn", None))
    train_s = time.perf_counter() - t0
    student = student.cpu()
    _save_state(student, out / "student.safetensors")
    return student, train_s


def _variant_teacher(recipe: Recipe, variant: str, parts: Any, student: nn.Module, train: Any,
                     teacher_model: nn.Module | None, store: Any) -> Any:
    """The teacher a variant trains against: None for scratch; for distilled the store or the live teacher
    serving the objective's teacher views, wrapped and prepared as the method asks."""
    if variant != "distilled":
        return None
    teacher, need_t = store, parts.objective.teacher_views()
    if store is None and teacher_model is not None and need_t:
        assert recipe.teacher is not None
        teacher = build_live_teacher(teacher_model, recipe.teacher, {k: parts.teacher_views[k] for k in need_t})
    if parts.wrap_teacher is not None:
        teacher = parts.wrap_teacher(teacher, student)
    if parts.prepare is not None:
        parts.prepare(teacher, student, train)
    return teacher


def _train_variant(
    recipe: Recipe, variant: str, seed: int, train: Any, test: Any, teacher_model: nn.Module | None,
    store: Any, out: Path, resume: bool, progress: bool | None, log: _Log,
) -> dict[str, Any]:
    from still.metrics import make_eval_fn

    reused = _finished(out, resume, seed, variant, log)
    if reused is not None:
        return reused
    eval_fn = (make_eval_fn(test, recipe.eval.metrics, recipe.eval.batch_size, recipe.student.inputs)
               if recipe.eval.metrics else None)
    student, train_s = _fit_student(
        recipe, variant, seed, train, out, resume, progress, log, eval_fn=eval_fn,
        teacher_for=lambda parts, s: _variant_teacher(recipe, variant, parts, s, train, teacher_model, store))
    result = _measure(student, test, recipe, recipe.student.inputs)
    result["train_s"] = train_s
    result["seed"] = seed
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    from still.bench import mean_std

    keys = sorted({k for r in per_seed.values() for k, v in r.items() if isinstance(v, (int, float)) and k != "seed"})
    mean, std = {}, {}
    for k in keys:
        vals = [float(r[k]) for r in per_seed.values() if k in r]
        mean[k], std[k] = mean_std(vals)
    return {"per_seed": {str(s): r for s, r in per_seed.items()}, "mean": mean, "std": std}


def student_subset(train: Any, n: int | None, seed: int = 0) -> Any:
    """The first `n` samples of a seeded permutation of `train` (all of it when `n` is None or too large)."""
    if n is None or n >= len(train):
        return train
    if hasattr(train, "subset"):
        return train.subset(n, seed)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.utils.data.Subset(train, perm.tolist())


def resolve_run_dir(recipe: Recipe, out_dir: str | Path | None, resume: bool, runs_root: Path) -> Path:
    """`out_dir`, or for `--resume` the latest `runs/<name>/<timestamp>/`, or a new timestamped one."""
    if out_dir is not None:
        return Path(out_dir)
    base = runs_root / recipe.name
    if resume:
        runs = sorted(p for p in base.glob("*") if p.is_dir()) if base.exists() else []
        if not runs:
            raise RecipeError(f"--resume: no earlier run of {recipe.name!r} under {base}; give --out DIR")
        return runs[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d, i = base / stamp, 1
    while d.exists():
        d, i = base / f"{stamp}-{i}", i + 1
    return d


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path | None = None,
    seeds: Sequence[int] | None = None,
    resume: bool = False,
    runs_root: str | Path = "runs",
    teacher_cache: str | Path | None = None,
    progress: bool | None = None,
    console: Any = None,
    quiet: bool = False,
    source: str = "recipe",
    report: bool = True,
) -> dict[str, Any]:
    """Validate deeply, train the teacher (cached), then each seed's scratch (if `baseline`) and distilled
    students; write `summary.json` and `report.html`; return the summary."""
    from still.recipes.validate import validate_recipe

    log = _Log(console, quiet)
    runs_root = Path(runs_root)
    cache_root = Path(teacher_cache) if teacher_cache is not None else runs_root / ".teachers"
    seeds = list(seeds) if seeds else [recipe.seed]
    validate_recipe(recipe, source)  # taps, views and shapes: before any training
    run_dir = resolve_run_dir(recipe, out_dir, resume, runs_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    log(f"run directory: {run_dir}")
    t_start = time.perf_counter()
    train = build_dataset(recipe.data, "train")
    test = build_dataset(recipe.data, recipe.eval.split)
    if is_embedding_recipe(recipe):
        return _run_embedding(recipe, run_dir, seeds, train, resume, progress, log, t_start, report)
    teacher_model, store, t_info = prepare_teacher(recipe, train, test, run_dir, cache_root, progress, log)
    summary: dict[str, Any] = {
        "recipe": recipe.name, "run_dir": str(run_dir), "seeds": seeds, "metrics": list(recipe.eval.metrics),
        "data": {"name": recipe.data.name or recipe.data.factory, "train": len(train), "test": len(test),
                 "split": recipe.eval.split},
        "latency": LATENCY_NOTE.format(threads=torch.get_num_threads()),
        "final_weights": "last step (no checkpoint selection on the test split)",
    }
    if teacher_model is not None:
        summary["teacher"] = {**_measure(teacher_model, test, recipe, recipe.teacher.inputs), **t_info}
    elif t_info:
        summary["teacher"] = t_info
    student_train = student_subset(train, recipe.student.train_subset)
    if student_train is not train:
        summary["data"]["student_train"] = len(student_train)
        log(f"students train on a fixed subset of {len(student_train)} of the {len(train)} training samples")
    variants = (["scratch"] if recipe.baseline else []) + ["distilled"]
    results: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    for seed in seeds:
        for v in variants:
            results[v][seed] = _train_variant(recipe, v, seed, student_train, test, teacher_model, store,
                                              run_dir / f"seed{seed}" / v, resume, progress, log)
    for v in variants:
        summary[v] = _aggregate(results[v])
    if recipe.baseline:
        primary = recipe.eval.metrics[0] if recipe.eval.metrics else None
        if primary:
            summary["delta"] = {primary: summary["distilled"]["mean"][primary] - summary["scratch"]["mean"][primary]}
    summary["wall_s"] = time.perf_counter() - t_start
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if report:
        from still.report import write_report

        write_report(run_dir)
    return summary


# -- sentence-embedding recipes ---------------------------------------------------------------------
EMBEDDING_NOTE = ("held-out WordNet synsets (lemma → definition R@1/R@10), 12-category fortunes probe, agreement "
                  "with the teacher on held-out KJV verses; sent/s on {n} held-out definitions, batch {bs}, warmed up, "
                  "interleaved with the teacher, {threads} threads")


def is_embedding_recipe(recipe: Recipe) -> bool:
    """True when the recipe's eval metrics are embedding metrics (`still.integrations.embedding_eval`);
    mixing them with logits metrics (accuracy, ...) is an error."""
    from still.registry import METRICS

    emb = [m for m in recipe.eval.metrics if m in METRICS and METRICS.entry(m).meta.get("task") == "embedding"]
    if emb and len(emb) != len(recipe.eval.metrics):
        other = [m for m in recipe.eval.metrics if m not in emb]
        raise RecipeError(f"eval.metrics: embedding metrics {emb} cannot be mixed with logits metrics {other}")
    return bool(emb)


def _embedding_teacher(recipe: Recipe, log: _Log) -> Any:
    """The recipe's teacher as a cached `STTeacher` (a sentence-transformers model serving one view)."""
    from still.integrations.sentence_transformers import STTeacher
    from still.paths import cache_root

    spec = recipe.teacher
    if spec is None or spec.model is None:
        raise RecipeError("teacher: an embedding recipe needs a teacher model (st_model with a path)")
    if spec.train is not None or spec.store is not None:
        raise RecipeError("teacher: an embedding teacher is used as it is (no train section, no store)")
    if len(spec.views) != 1 or next(iter(spec.views.values())) not in ("", "sentence_embedding"):
        raise RecipeError(f"teacher.views: an embedding teacher serves one view of its sentence embedding "
                          f"(e.g. {{embedding: ''}}); got {spec.views}")
    model = seeded_model(spec.model, "teacher.model", recipe.seed)
    if spec.weights:
        load_weights(model, spec.weights, "teacher.weights")
    st = getattr(model, "st", None)
    if st is None:
        raise RecipeError(f"teacher.model: {spec.model.name or spec.model.factory} is not a sentence-transformers "
                          f"model (use st_model / st_layer_dropped / st_static)")
    return STTeacher(st, view=next(iter(spec.views)), cache_dir=cache_root("embeddings"))


def _run_embedding(recipe: Recipe, run_dir: Path, seeds: list[int], train: Any, resume: bool,
                   progress: bool | None, log: _Log, t_start: float, report: bool) -> dict[str, Any]:
    """Embedding distillation: cached teacher embeddings, engine training per seed, the student saved as a
    sentence-transformers directory (`seed<k>/distilled/model/`), embedding metrics for teacher and students."""
    from still.integrations import embedding_eval as ee
    from still.integrations.sentence_transformers import st_encode
    from still.metrics import count_parameters

    if recipe.baseline:
        raise RecipeError("baseline: embedding recipes have no scratch baseline (the student's init is the "
                          "teacher's or model2vec's); set baseline: false")
    texts = getattr(train, "texts", None)
    if texts is None:
        raise RecipeError(f"data: an embedding recipe needs a text data set with .texts; got {type(train).__name__}")
    teacher = _embedding_teacher(recipe, log)
    t0 = time.perf_counter()
    flat = train.flat_texts() if hasattr(train, "flat_texts") else list(texts)  # groups (pairs) flattened
    detail = f" on {len(train)} groups ({len(flat)} texts)" if len(flat) != len(train) else f" on {len(train)} texts"
    teacher.precompute(flat)
    log(f"[bold]teacher[/]: {len(teacher.cache)} embeddings cached in {teacher.cache.path} "
        f"({time.perf_counter() - t0:.0f} s for this data)")
    bs = recipe.eval.batch_size
    suite = ee.EvalSuite.build(ee.RECIPE_SUITE["wordnet_pairs"], ee.RECIPE_SUITE["fortunes_per_class"],
                               ee.RECIPE_SUITE["kjv_verses"])
    suite_texts = suite.lemmas + suite.definitions + suite.kjv + (
        suite.fortunes_train.texts + suite.fortunes_test.texts if "fortunes_probe" in recipe.eval.metrics else [])
    teacher.precompute(suite_texts)
    metrics = list(recipe.eval.metrics)
    t_fast = lambda t: st_encode(teacher.model, t, bs)  # noqa: E731  uncached: what throughput times
    t_row = ee.evaluate_embedder(suite, [m for m in metrics if m != "throughput"], teacher.encode)
    t_row.update(parameters=count_parameters(teacher.model), source=f"{recipe.teacher.model.name} (frozen)")
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        out = run_dir / f"seed{seed}" / "distilled"
        reused = _finished(out, resume, seed, "distilled", log)
        if reused is not None:
            per_seed[seed] = reused
            continue
        student, train_s = _fit_student(recipe, "distilled", seed, train, out, resume, progress, log,
                                        teacher_for=lambda parts, s: teacher, detail=detail)
        student = student.eval()
        if hasattr(student, "save"):
            student.save(out / "model")  # SentenceTransformer(out / "model") loads it
        enc = (lambda t, s=student: s.encode(t, bs)) if hasattr(student, "encode") else None
        if enc is None:
            raise RecipeError("student.model: the embedding metrics need a student with encode(texts) (an STStudent)")
        res = ee.evaluate_embedder(suite, metrics, enc, reference=teacher.encode, fast_reference=t_fast)
        res.update(parameters=count_parameters(student), train_s=train_s, seed=seed)
        res.update({m: res[k] for m, k in ee.PRIMARY.items() if m in metrics and k in res})  # by metric name too
        if "wordnet_r1" in res and t_row.get("wordnet_r1"):
            res["r1_of_teacher"] = res["wordnet_r1"] / t_row["wordnet_r1"]
        (out / "result.json").write_text(json.dumps(res, indent=2))
        per_seed[seed] = res
    tps = [r["reference_sent_per_s"] for r in per_seed.values() if "reference_sent_per_s" in r]
    if tps:
        from still.bench import mean_std

        t_row["sent_per_s"] = mean_std(tps)[0]
        t_row["x_teacher"] = 1.0
    if "wordnet_r1" in t_row:
        t_row["r1_of_teacher"] = 1.0
    shown = [k for k in ("wordnet_r1", "wordnet_r10", "r1_of_teacher", "fortunes_acc", "kjv_cosine", "kjv_spearman",
                         "sent_per_s", "x_teacher") if any(k in r for r in [t_row, *per_seed.values()])]
    summary: dict[str, Any] = {
        "recipe": recipe.name, "run_dir": str(run_dir), "seeds": seeds, "task": "embedding", "metrics": shown,
        "eval_metrics": metrics,
        "data": {"name": recipe.data.name or recipe.data.factory, "train": len(train),
                 "test": {**ee.RECIPE_SUITE, "split": "held-out"}},
        "latency": EMBEDDING_NOTE.format(n=ee.THROUGHPUT["texts"], bs=bs, threads=torch.get_num_threads()),
        "final_weights": "last step (no checkpoint selection on the test split)",
        "teacher": t_row, "distilled": _aggregate(per_seed),
        "student_dirs": {str(s): str(run_dir / f"seed{s}" / "distilled" / "model") for s in per_seed},
        "wall_s": time.perf_counter() - t_start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if report:
        from still.report import write_report

        write_report(run_dir)
    return summary


_FORMATS = {"latency_s": (1e3, ".3f"), "parameters": (1, ",.0f"), "sent_per_s": (1, ",.0f"), "x_teacher": (1, ".1f"),
            "reference_sent_per_s": (1, ",.0f"), "r1_of_teacher": (100, ".0f")}
_HEADERS = {"sent_per_s": "sent/s", "x_teacher": "× teacher", "r1_of_teacher": "% teacher R@1",
            "wordnet_r1": "WordNet R@1", "wordnet_r10": "WordNet R@10", "fortunes_acc": "fortunes probe",
            "kjv_cosine": "KJV cos", "kjv_spearman": "KJV Spearman"}


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the teacher / scratch / distilled table (mean ± std over seeds)."""
    metrics = summary.get("metrics", [])
    n = len(summary.get("seeds", []))
    emb = summary.get("task") == "embedding"
    header = ["model"] + [_HEADERS.get(m, m) if emb else m for m in metrics] + (
        ["parameters"] if emb else ["parameters", "latency (ms/sample)"])
    rows = []
    labels = {"teacher": "teacher", "scratch": "student (scratch)", "distilled": "student (distilled)"}
    for v in VARIANTS:
        if v not in summary:
            continue
        s = summary[v]
        mean, std = (s, None) if v == "teacher" else (s["mean"], s["std"])
        row = [labels[v] + ("" if v == "teacher" or n < 2 else f" ×{n}")]
        for k in metrics + (["parameters"] if emb else ["parameters", "latency_s"]):
            if k not in mean:
                row.append("–")
                continue
            scale, fmt = _FORMATS.get(k, (1, ".4f"))
            val = f"{mean[k] * scale:{fmt}}"
            if std is not None and n > 1 and k != "parameters":
                val += f" ± {std[k] * scale:{fmt}}"
            row.append(val)
        rows.append(row)
    return header, rows


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """Print the teacher vs student table with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    header, rows = summary_rows(summary)
    n = len(summary.get("seeds", []))
    table = Table(title=f"{summary['recipe']}: test {', '.join(summary.get('metrics', []))}"
                        + (f" (mean ± std over {n} seeds)" if n > 1 else ""))
    for h in header:
        table.add_column(h, justify="left" if h == "model" else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    if "delta" in summary:
        k, d = next(iter(summary["delta"].items()))
        console.print(f"distilled − scratch {k}: {d:+.4f}")
    console.print(f"{'evaluation' if summary.get('task') == 'embedding' else 'latency'}: {summary.get('latency', '')}")
    if summary.get("student_dirs"):
        console.print("students (sentence-transformers directories): " + ", ".join(summary["student_dirs"].values()))
    console.print(f"run directory: {summary['run_dir']} (report.html, summary.json)")


__all__ = ["run_recipe", "prepare_teacher", "teacher_cache_key", "resolve_run_dir", "summary_rows", "print_summary",
           "is_embedding_recipe"]
