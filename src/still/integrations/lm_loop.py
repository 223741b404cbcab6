"""The LM distillation loop, held-out evaluation, and a top-k teacher cache.

>>> res = train_lm(student, train, LMDistillConfig(steps=100), teacher=teacher, collate=SubVocabCollate(sub))
>>> lm_perplexity(lambda b: lm_head_outputs(student, b), test, collate, kd_rows=K)   # {"kjv": 41.2, ...}
>>> record_topk(teacher, train, path, k=32, collate=collate); topk_store_teacher(path, teacher_fp, data_fp)

`train_lm` is a plain loop (AdamW, warm-up + cosine, gradient clipping), because on-policy methods
generate inside the step; token-level methods can equally run through `still.engine` or the
`transformers.Trainer` subclass (`still.integrations.transformers_trainer.DistillTrainer`).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import default_collate

from still.integrations.causal_lm import LMHeadOutputs, lm_head_outputs
from still.losses.llm_span import lm_kd, span_kd
from still.methods.llm import DDKSampler, LMDistillConfig, generate, scrg_sequences
from still.teachers.base import Teacher

if TYPE_CHECKING:
    from still.teachers.store import StoreTeacher


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def lm_perplexity(head_fn: Callable[[Mapping[str, torch.Tensor]], LMHeadOutputs], data: Any,
                  collate: Callable | None = None, kd_rows: int | None = None, batch_size: int = 8,
                  per_domain: bool = True, max_blocks: int | None = None) -> dict[str, float]:
    """Held-out perplexity `exp(mean NLL)` of next tokens, per domain (and "all").

    The distribution is the softmax over the first `kd_rows` head rows, and only targets `< kd_rows`
    count (with a sub-vocabulary: in-vocabulary tokens, teacher and student on the same support).
    Also returns `"tokens_per_s"` (forward throughput) and `"in_vocab"` (fraction of targets scored).
    """
    collate = collate or default_collate
    n = len(data) if max_blocks is None else min(len(data), max_blocks)
    nll: dict[int, float] = {}
    cnt: dict[int, int] = {}
    total_tok, scored, t0 = 0, 0, time.perf_counter()
    for i in range(0, n, batch_size):
        b = collate([data[j] for j in range(i, min(n, i + batch_size))])
        out = head_fn(b)
        rows = kd_rows or out.weight.shape[0]
        tgt = b["labels"][:, 1:]
        h = out.hidden[:, :-1]
        for r in range(len(tgt)):
            z = (h[r] @ out.weight[:rows].t()).float()
            if out.bias is not None:
                z = z + out.bias[:rows]
            lp = torch.log_softmax(z, -1)
            ok = tgt[r] < rows
            v = -lp[ok].gather(1, tgt[r][ok][:, None]).sum()
            d = int(b["domain"][r]) if per_domain and "domain" in b else 0
            nll[d] = nll.get(d, 0.0) + float(v)
            cnt[d] = cnt.get(d, 0) + int(ok.sum())
            scored += int(ok.sum())
            total_tok += int(tgt[r].numel())
    secs = time.perf_counter() - t0
    names = getattr(data, "domains", None) or ["all"]
    res = {names[d] if d < len(names) else str(d): math.exp(nll[d] / max(cnt[d], 1)) for d in sorted(nll)}
    res["all"] = math.exp(sum(nll.values()) / max(sum(cnt.values()), 1))
    res["tokens_per_s"] = total_tok / max(secs, 1e-9)
    res["in_vocab"] = scored / max(total_tok, 1)
    return res


def student_head_fn(student: nn.Module) -> Callable[[Mapping[str, torch.Tensor]], LMHeadOutputs]:
    def fn(b: Mapping[str, torch.Tensor]) -> LMHeadOutputs:
        student.eval()
        return lm_head_outputs(student, b)

    return fn


def teacher_head_fn(teacher: Teacher) -> Callable[[Mapping[str, torch.Tensor]], LMHeadOutputs]:
    return lambda b: teacher.views(b, ["lm"])["lm"]


# ---------------------------------------------------------------------------------------------------
# Top-k cache of a teacher: the teacher-signal store
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def record_topk(teacher: Teacher, data: Any, path: str | Path, k: int = 32, collate: Callable | None = None,
                batch_size: int = 8, data_fingerprint: str | None = None, shard_size: int = 1024) -> Path:
    """Run `teacher` once over `data` and record its `"topk"` view (`TopKLogits`, the teacher's own chunked
    top-k: no `(B, T, V)` tensor) into the teacher-signal store at `path` (`still.teachers.store`: sharded,
    atomic, resumable, checksummed; indices bit-packed, log-probs fp16, the missing mass as recorded).
    `k` may be at most the teacher's own top-k. Returns `path`; serve it with `topk_store_teacher`."""
    from still.teachers.store import write_store

    if "topk" not in teacher.view_specs:
        raise KeyError(f"{type(teacher).__name__} serves no 'topk' view (views: {teacher.available_views()})")
    out = write_store(teacher, data, path, views=["topk"], topk={"topk": k}, dtype="float16", batch_size=batch_size,
                      shard_size=shard_size, collate_fn=collate or default_collate, data_fingerprint=data_fingerprint,
                      preprocessing={"recorded_by": "still.integrations.lm_loop.record_topk"})
    assert out is not None  # one process writes every shard, so it finalises the store
    return out


def topk_store_teacher(path: str | Path, teacher_fingerprint: str | None = None,
                       data_fingerprint: str | None = None) -> StoreTeacher:
    """The `StoreTeacher` serving `record_topk`'s `"topk"` view by `batch["index"]`; no model loaded.

    Refuses (`StoreMismatchError`) a store whose manifest names another teacher or data fingerprint than
    the ones given."""
    from still.teachers.store import StoreTeacher

    t = StoreTeacher(path)
    t.check_compatible(teacher_fp=teacher_fingerprint, data_fp=data_fingerprint)
    if "topk" not in t.view_specs:
        raise KeyError(f"store {path} holds no 'topk' view (views: {sorted(t.view_specs)}); record it with record_topk")
    return t


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
def _lr_lambda(cfg: LMDistillConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        p = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    return f


def teacher_view(teacher: Teacher) -> str:
    """The view `train_lm` asks a teacher for: "lm" (live fused head), else "topk", else "logits" (e.g. a
    `still.teachers.store.StoreTeacher` that recorded the "logits" view as top-k)."""
    for name in ("lm", "topk", "logits"):
        if name in teacher.view_specs:
            return name
    raise KeyError(f"{type(teacher).__name__} serves none of the views lm, topk, logits ({teacher.available_views()})")


def train_lm(student: nn.Module, data: Any, cfg: LMDistillConfig, teacher: Teacher | None = None,
             collate: Callable | None = None, to_teacher_ids: Callable[[torch.Tensor], torch.Tensor] | None = None,
             to_student_ids: Callable[[torch.Tensor], torch.Tensor] | None = None, ddk_eval: Any = None,
             ddk_teacher_ppl: Sequence[float] | None = None, offline_teacher: Teacher | None = None, span_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
             log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `student` on `data` (LMBlocks) for `cfg.steps` steps; returns timings, losses and DDK weights.

    `teacher`: a still Teacher serving "lm" (live, `CausalLMTeacher`) or "topk" (`topk_store_teacher`);
    None trains from scratch (CE only). `to_teacher_ids` maps student ids to the teacher's (sub-vocabulary
    students) for generated sequences, `to_student_ids` the reverse (seq-KD); `ddk_eval` (LMBlocks) is DDK's per-domain validation set;
    `offline_teacher` (e.g. the same teacher's top-k store) serves the off-policy steps of on-policy methods,
    so the live teacher only scores generations. `ddk_teacher_ppl` its teacher perplexities per domain (needed when `teacher` is a store, which cannot
    score text); `span_fn(input_ids) -> span_ids` gives the span loss its spans.
    """
    collate = collate or default_collate
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    view = teacher_view(teacher) if teacher is not None else "lm"
    domains = getattr(data, "domain_ids", None)
    n_dom = len(getattr(data, "domains", [0]))
    sampler = DDKSampler(n_dom, cfg.ddk_alpha, cfg.seed) if cfg.ddk else None
    teacher_ppl: list[float] | None = list(ddk_teacher_ppl) if ddk_teacher_ppl is not None else None
    by_dom = [torch.nonzero(domains == d).flatten().tolist() for d in range(n_dom)] if domains is not None else None
    order: list[int] = []
    losses, step_times, on_policy_steps, corrected = [], [], 0, 0
    student.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        if sampler is not None and step % cfg.ddk_every == 0:
            if ddk_eval is None:
                raise ValueError("DDK needs ddk_eval (a per-domain validation LMBlocks)")
            if teacher_ppl is None:
                if teacher is None or "lm" not in teacher.view_specs:
                    raise ValueError("DDK with a store teacher needs ddk_teacher_ppl (the teacher's per-domain ppl)")
                tp = lm_perplexity(teacher_head_fn(teacher), ddk_eval, collate, cfg.kd_rows)
                teacher_ppl = [tp[d] for d in ddk_eval.domains]
            sp = lm_perplexity(student_head_fn(student), ddk_eval, collate, cfg.kd_rows)
            sampler.update([sp[d] for d in ddk_eval.domains], teacher_ppl)
            student.train()
        if sampler is not None and by_dom is not None:
            idx = [rng.choice(by_dom[int(d)]) for d in sampler.sample(cfg.batch_size)]
        else:
            if len(order) < cfg.batch_size:
                perm = list(range(len(data)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = collate([data[i] for i in idx])
        kd_mask = None
        ce_w, kd_w = cfg.ce_weight, cfg.kd_weight
        online = teacher is not None and cfg.on_policy > 0 and rng.random() < cfg.on_policy
        if online or (cfg.seq_kd and teacher is not None):
            prompts = batch["input_ids"][:, : cfg.prompt_len]
            if cfg.seq_kd:
                if not hasattr(teacher, "model"):
                    raise ValueError("seq_kd needs a live teacher model")
                t_prompts = batch.get("teacher_input_ids", batch["input_ids"])[:, : cfg.prompt_len]
                seq = generate(teacher.model, t_prompts, cfg.gen_len, greedy=True, rows=getattr(teacher, "rows", None))
                if to_student_ids is not None:
                    seq = to_student_ids(seq)
            elif cfg.scrg:
                seq, fixed = scrg_sequences(student, teacher, prompts, cfg.gen_len, cfg.scrg_corrections,
                                            cfg.gen_temperature, cfg.allowed_gen_rows, cfg.kd_rows, to_teacher_ids, gen)
                corrected += sum(j >= 0 for j in fixed)
            else:
                seq = generate(student, prompts, cfg.gen_len, cfg.gen_temperature, cfg.allowed_gen_rows, generator=gen)
            student.train()
            batch = {"input_ids": seq, "attention_mask": torch.ones_like(seq), "labels": seq.clone(),
                     "index": batch["index"]}
            if to_teacher_ids is not None:
                batch["teacher_input_ids"] = to_teacher_ids(seq)
            kd_mask = torch.zeros_like(seq, dtype=torch.bool)
            kd_mask[:, cfg.prompt_len :] = True
            if not cfg.seq_kd:
                ce_w = 0.0 if not cfg.scrg else cfg.ce_weight
                on_policy_steps += 1
        s_out = lm_head_outputs(student, batch)
        t_out = None
        src, src_view = teacher, view
        if kd_mask is None and offline_teacher is not None:
            src, src_view = offline_teacher, teacher_view(offline_teacher)
        if src is not None and kd_w:
            t_out = src.views(batch, [src_view])[src_view]
        loss = lm_kd(s_out, t_out, labels=batch["labels"], attention_mask=batch.get("attention_mask"),
                     divergence=cfg.divergence, temperature=cfg.temperature, beta=cfg.beta,
                     kd_weight=kd_w if t_out is not None else 0.0, ce_weight=ce_w, kd_rows=cfg.kd_rows,
                     chunk_size=cfg.chunk_size, kd_mask=kd_mask)
        if cfg.span_weight and t_out is not None and span_fn is not None and hasattr(t_out, "hidden"):
            loss = loss + cfg.span_weight * span_kd(s_out, t_out, span_fn(batch["input_ids"]),
                                                    kd_rows=cfg.kd_rows, chunk_size=cfg.chunk_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        step_times.append(time.perf_counter() - t0)
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log({"step": step, "loss": losses[-1], "sec": step_times[-1]})
    student.eval()
    return {"losses": losses, "step_times": step_times, "on_policy_steps": on_policy_steps,
            "scrg_corrected": corrected, "ddk_weights": sampler.history if sampler else None,
            "median_step_s": sorted(step_times)[len(step_times) // 2] if step_times else 0.0}


@torch.no_grad()
def sample_generations(model: nn.Module, prompts: torch.Tensor, decode: Callable[[torch.Tensor], str],
                       new_tokens: int = 32, allowed_rows: int | None = None,
                       rows: torch.Tensor | None = None) -> list[dict[str, str]]:
    """Greedy continuations of `prompts (B, P)`, decoded: `[{"prompt", "continuation"}]`."""
    seq = generate(model, prompts, new_tokens, greedy=True, allowed_rows=allowed_rows, rows=rows)
    P = prompts.shape[1]
    return [{"prompt": decode(s[:P]), "continuation": decode(s[P:])} for s in seq]
