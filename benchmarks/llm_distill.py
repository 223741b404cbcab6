"""LLM distillation on real text: distilled vs scratch students, divergences, on-policy, DDK, store vs live.

    python benchmarks/llm_distill.py --quick     # < 60 s: byte-level teacher trained here (no model files)
    python benchmarks/llm_distill.py             # Gemma-3-270M teacher (still[llm-gemma]), KJV/fortunes/
                                                 # WordNet/pydoc, sub-vocabulary head, top-k cache on disk
    python benchmarks/llm_distill.py --record-only   # only record the teacher's top-k cache (reused by content)

Budget knobs: --steps (students), --live-steps (live-teacher row, and a store row at the same budget),
--onpolicy-steps (GKD / SCRG rows); env LLM_TRAIN_CHARS, LLM_TEST_BLOCKS, LLM_STUDENT_DIM/LAYERS, LLM_THREADS.
Rows trained on a reduced budget say so in their "steps" column.

Every student has ≤ 1/10 of the teacher's parameters and the same token budget (steps × batch × block).
Perplexities are on held-out blocks of each domain over the distillation support (the sub-vocabulary,
in-vocabulary targets; the quick run has the full byte vocabulary). The run directory
(`runs/llm_distill/<time>/`) gets `report.json` and `samples.md` (greedy generations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from still.bench import emit_json, fmt_mean_std, markdown_table, mean_std, write_section  # noqa: E402
from still.data.lm_text import ByteTokenizer, DOMAINS, LMBlocks, available_domains, domain_blocks  # noqa: E402
from still.integrations.causal_lm import (CausalLMTeacher, SubVocab, SubVocabCollate, num_parameters,  # noqa: E402
                                          student_from_config, tokenizer_hash)
from still.integrations.lm_loop import (lm_perplexity, record_topk, sample_generations, topk_store_teacher,  # noqa: E402
                                        student_head_fn, teacher_head_fn, train_lm)
from still.losses.llm_span import word_span_ids, word_starts_from_tokenizer  # noqa: E402
from still.methods.llm import LMDistillConfig  # noqa: E402
from still.paths import cache_root  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _split_val(train: LMBlocks, per_domain: int) -> tuple[LMBlocks, LMBlocks]:
    """Carve DDK's per-domain validation blocks off the end of each domain's training blocks."""
    val, rest = [], []
    for d in range(len(train.domains)):
        idx = train.domain_indices(d).tolist()
        val += idx[-per_domain:]
        rest += idx[:-per_domain]
    return train.select(sorted(rest)), train.select(sorted(val))


def setup(quick: bool, out: Path) -> dict:
    domains = [d for d in DOMAINS if d in available_domains()]
    if quick:
        tok = ByteTokenizer()
        block, chars = 64, 12_000
        train = domain_blocks(domains, tok, "train", block, chars)
        test = domain_blocks(domains, tok, "test", block, 3_000, max_blocks=8)
        tcfg = dict(model_type="llama", vocab_size=259, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
        tmodel = student_from_config(tcfg, seed=123)
        t0 = time.perf_counter()
        train_lm(tmodel, train, LMDistillConfig(steps=120, lr=4e-3, ce_weight=1.0, kd_weight=0.0, batch_size=16))
        teacher_info = {"name": "byte-level Llama trained here (CE, 120 steps)", "train_s": time.perf_counter() - t0}
        print(f"teacher trained in {teacher_info['train_s']:.1f} s", file=sys.stderr, flush=True)
        scfg = {**tcfg, "hidden_size": 24, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 2}
        teacher = CausalLMTeacher(tmodel, topk=16, tokenizer=tok)
        return dict(tok=tok, domains=domains, train=train, test=test, teacher=teacher, tmodel=tmodel, scfg=scfg,
                    collate=None, kd_rows=259, sub=None, to_t=None, to_s=None, decode=tok.decode, k=16,
                    teacher_info=teacher_info, allowed=256, block=block)
    from still.integrations.causal_lm import GEMMA_NOTICE, load_gemma3_270m

    t0 = time.perf_counter()
    tmodel, tok = load_gemma3_270m()
    torch.manual_seed(0)
    load_s = time.perf_counter() - t0
    block = 64
    train_full = domain_blocks(domains, tok, "train", block, int(os.environ.get("LLM_TRAIN_CHARS", 40_000)))
    test_full = domain_blocks(domains, tok, "test", block, 12_000, max_blocks=int(os.environ.get("LLM_TEST_BLOCKS", 20)))
    sub = SubVocab.from_corpus(train_full.blocks, len(tok), always=[tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
                               unk_full=tok.unk_token_id if tok.unk_token_id is not None else 0)
    t1 = time.perf_counter()
    sub.measure_dropped_mass(tmodel, test_full.blocks[::3][:4])
    teacher = CausalLMTeacher(tmodel, rows=sub.ids, topk=32, tokenizer=tok)
    K = len(sub.ids)
    dim, layers = int(os.environ.get("LLM_STUDENT_DIM", 192)), int(os.environ.get("LLM_STUDENT_LAYERS", 4))
    scfg = dict(model_type="llama", vocab_size=K + 1, hidden_size=dim, intermediate_size=3 * dim, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
    info = {"name": "Gemma-3-270M (GGUF Q4_K_M dequantised to fp32)", "load_s": load_s, "licence": GEMMA_NOTICE,
            "sub_vocab": K, "dropped_mass": sub.dropped_mass, "dropped_mass_s": time.perf_counter() - t1,
            "tokenizer_hash": tokenizer_hash(tok)}
    return dict(tok=tok, domains=domains, train=train_full, test=test_full, teacher=teacher, tmodel=tmodel, scfg=scfg,
                collate=SubVocabCollate(sub), kd_rows=K, sub=sub, to_t=sub.decode, to_s=sub.encode,
                decode=lambda ids: tok.decode(sub.decode(ids)), k=32, teacher_info=info, allowed=K, block=block)


def unigram_ppl(train: LMBlocks, test: LMBlocks, encode, rows: int) -> dict[str, float]:
    """Held-out perplexity of the training targets' unigram distribution (add-one smoothed) over the first
    `rows` ids (student ids: `encode` maps the blocks' ids), in-vocabulary targets only, per domain: the
    level of a student that learnt nothing but token frequencies."""
    enc = encode or (lambda x: x)
    tr = enc(train.blocks)[:, 1:].flatten()
    tr = tr[tr < rows]
    lp = torch.log((torch.bincount(tr, minlength=rows)[:rows].double() + 1) / (len(tr) + rows))
    res, tot, cnt = {}, 0.0, 0
    te_all = enc(test.blocks)[:, 1:]
    for d in test.domains:
        te = te_all[test.domain_indices(d)].flatten()
        te = te[te < rows]
        res[d] = math.exp(float(-lp[te].mean()))
        tot, cnt = tot - float(lp[te].sum()), cnt + len(te)
    res["all"] = math.exp(tot / max(cnt, 1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--live-steps", type=int, default=None, help="steps of the live-teacher row (default: --steps)")
    ap.add_argument("--onpolicy-steps", type=int, default=None, help="steps of the GKD / SCRG rows (default: --steps)")
    ap.add_argument("--record-only", action="store_true", help="record the teacher's top-k cache, then stop")
    ap.add_argument("--onpolicy-warm", type=int, default=0, metavar="N",
                    help="only the on-policy-from-a-distilled-start table: N store-FKL steps, then N more steps of "
                         "FKL / GKD / SCRG from that checkpoint (its own BENCHMARKS.md section)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    ap.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md",
                    help="the BENCHMARKS.md to write (runs/ goes beside it)")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("LLM_THREADS", 1)))
    t_start = time.perf_counter()
    a.root = a.benchmarks_md.resolve().parent
    out = a.root / "runs" / "llm_distill" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    S = setup(a.quick, out)
    S["train_all"] = S["train"]
    steps = a.steps or (40 if a.quick else 200)
    a.live_steps = a.live_steps or steps
    a.onpolicy_steps = a.onpolicy_steps or steps
    bs = 8
    train, val = _split_val(S["train"], 2 if a.quick else 3)
    S["train"] = train
    test, collate, kd_rows = S["test"], S["collate"], S["kd_rows"]
    teacher: CausalLMTeacher = S["teacher"]
    t_params = num_parameters(S["tmodel"])
    ws = word_starts_from_tokenizer(S["tok"], S["sub"].ids if S["sub"] is not None else None)
    span_fn = lambda ids: word_span_ids(ids, ws)  # noqa: E731
    base = dict(steps=steps, batch_size=bs, lr=2e-3, kd_rows=kd_rows, allowed_gen_rows=S["allowed"],
                prompt_len=16, gen_len=16, warmup_steps=max(2, steps // 20))

    # the teacher: held-out perplexity, then its top-k recorded once
    tp = lm_perplexity(teacher_head_fn(teacher), test, collate, kd_rows)
    cache = cache_root("llm_topk") / (  # a teacher-signal store ("-store": older caches were another format)
        f"{teacher.fingerprint()}-{train.fingerprint()}-k{S['k']}-store")
    timing = cache.with_name(cache.name + ".seconds.json")
    t0 = time.perf_counter()
    cached = (cache / "manifest.json").exists() and timing.exists()
    if not cached:
        record_topk(teacher, train, cache, k=S["k"], collate=collate, batch_size=8)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    record_s = json.loads(timing.read_text())["seconds"]
    store = topk_store_teacher(cache, teacher.fingerprint(), train.fingerprint())
    print(f"[{time.perf_counter() - t_start:6.0f}s] teacher ppl {tp['all']:.2f} ({', '.join(f'{d} {tp[d]:.1f}' for d in S['domains'])}); "
          f"top-k of {len(train)} blocks recorded in {record_s:.1f} s{' (cached)' if cached else ''}", file=sys.stderr, flush=True)
    if a.record_only:
        return
    S["unigram"] = unigram_ppl(train, test, S["to_s"], kd_rows)

    vp = lm_perplexity(teacher_head_fn(teacher), val, collate, kd_rows)
    val_tppl = [vp[d] for d in val.domains]
    runs: dict[str, dict] = {}

    def run(name: str, seed: int, teacher_obj, offline=None, **kw) -> dict:
        st = student_from_config(S["scfg"], seed=seed)
        cfg = LMDistillConfig(**{**base, "seed": seed, **kw})
        cfg.warmup_steps = max(2, cfg.steps // 20)
        r = train_lm(st, train, cfg, teacher=teacher_obj, collate=collate, to_teacher_ids=S["to_t"],
                     to_student_ids=S["to_s"], ddk_eval=val, ddk_teacher_ppl=val_tppl, span_fn=span_fn, offline_teacher=offline)
        r["ppl"] = lm_perplexity(student_head_fn(st), test, collate, kd_rows)
        r["model"] = st
        r["steps"] = cfg.steps
        st_t = r["step_times"]
        r["mean_step_s"] = sum(st_t) / max(len(st_t), 1)
        r["train_s"] = sum(st_t)
        runs[f"{name}/{seed}"] = r
        print(f"[{time.perf_counter() - t_start:6.0f}s] {name} seed {seed}: ppl {r['ppl']['all']:.2f} "
              f"step {r['median_step_s']:.3f}s", file=sys.stderr, flush=True)
        return r

    if a.onpolicy_warm:
        return onpolicy_warm(a, S, train, teacher, store, base, span_fn, t_start)
    seeds = list(range(a.seeds))
    plan = []
    for sd in seeds:
        plan += [("scratch", sd, None, None, dict(kd_weight=0.0, ce_weight=1.0)),
                 ("fkl", sd, store, None, dict(divergence="forward_kl"))]
    ls, ops = a.live_steps, a.onpolicy_steps
    plan += [("rkl", 0, store, None, dict(divergence="reverse_kl")),
             ("jsd", 0, store, None, dict(divergence="jsd", beta=0.5)),
             ("uniform", 0, store, None, dict(kd_weight=0.2, ce_weight=1.0)),
             ("ddk", 0, store, None, dict(kd_weight=0.2, ce_weight=1.0, ddk=True, ddk_every=max(5, steps // 6))),
             ("gkd", 0, teacher, store, dict(divergence="jsd", beta=0.5, on_policy=0.5, steps=ops)),
             ("scrg", 0, teacher, store, dict(divergence="forward_kl", scrg=True, on_policy=0.5, span_weight=1.0,
                                              steps=ops))]
    if ops != steps:  # the off-policy reference at the on-policy rows' budget
        plan.append(("fkl_op", 0, store, None, dict(divergence="forward_kl", steps=ops)))
    plan.append(("live", 0, teacher, None, dict(divergence="forward_kl", steps=ls)))
    if ls != steps and ls != ops:
        plan.append(("fkl_live", 0, store, None, dict(divergence="forward_kl", steps=ls)))
    for k, (name, sd, t_obj, off, kw) in enumerate(plan):
        run(name, sd, t_obj, off, **kw)
        pending = [f"{n}/{x}" for n, x, *_ in plan[k + 1:]]
        render(a, S, runs, seeds, tp, record_s, cached, steps, bs, base, t_params, out, t_start, pending)


def onpolicy_warm(a, S, train, teacher, store, base, span_fn, t_start) -> None:
    """GKD / SCRG as their papers run them, from a student that already learnt something (here: N steps of
    store forward KL), against N more store-FKL steps from the same checkpoint."""
    import copy

    n, test, collate, kd_rows = a.onpolicy_warm, S["test"], S["collate"], S["kd_rows"]
    kw = dict(teacher=None, collate=collate, to_teacher_ids=S["to_t"], to_student_ids=S["to_s"], span_fn=span_fn)

    def cfg(**x):
        return LMDistillConfig(**{**base, "steps": n, "warmup_steps": max(2, n // 20), **x})

    st0 = student_from_config(S["scfg"], seed=0)
    train_lm(st0, train, cfg(divergence="forward_kl"), **{**kw, "teacher": store})
    p0 = lm_perplexity(student_head_fn(st0), test, collate, kd_rows)
    print(f"[{time.perf_counter() - t_start:6.0f}s] warm start (FKL {n} steps): ppl {p0['all']:.2f}", file=sys.stderr, flush=True)
    doms = S["domains"] + ["all"]
    rows = [[f"start: forward KL (store), {n} steps", "-", *[f"{p0[d]:.2f}" for d in doms], "-", "-", "-", "-"]]
    plan = [("+ forward KL (store)", store, None, dict(divergence="forward_kl")),
            ("+ GKD λ=0.5, JSD(0.5)", teacher, store, dict(divergence="jsd", beta=0.5, on_policy=0.5)),
            ("+ SCRG + span, λ=0.5", teacher, store, dict(divergence="forward_kl", scrg=True, on_policy=0.5, span_weight=1.0))]
    for name, t_obj, off, x in plan:
        st = copy.deepcopy(st0)
        r = train_lm(st, train, cfg(**x), **{**kw, "teacher": t_obj, "offline_teacher": off})
        p = lm_perplexity(student_head_fn(st), test, collate, kd_rows)
        tt = r["step_times"]
        rows.append([name, str(n), *[f"{p[d]:.2f}" for d in doms], f"{r['median_step_s']:.3f}",
                     f"{sum(tt) / len(tt):.3f}", str(r["on_policy_steps"]), str(r["scrg_corrected"])])
        print(f"[{time.perf_counter() - t_start:6.0f}s] {name}: ppl {p['all']:.2f}", file=sys.stderr, flush=True)
    md = (f"Same teacher, student, data and sub-vocabulary as the \"LLM distillation\" section; seed 0. The student "
          f"first trains {n} steps with forward KL + 0.5 CE from the top-{S['k']} store, then each row continues "
          f"{n} more steps from that checkpoint (fresh warm-up + cosine schedule). GKD and SCRG score the student's "
          f"generations ({base['gen_len']} tokens after a {base['prompt_len']}-token prompt) with the live teacher and take "
          f"their off-policy steps from the store. Wall time {time.perf_counter() - t_start:.0f} s, 1 thread, shared CPU.\n\n"
          + markdown_table(["method", "extra steps", *doms, "median s/step", "mean s/step", "on-policy steps",
                            "SCRG corrections"], rows))
    print(md, file=sys.stderr)
    if not a.no_write:
        write_section("LLM distillation: on-policy from a distilled start", md, path=a.benchmarks_md,
                      command="LLM_TRAIN_CHARS=%s LLM_TEST_BLOCKS=%s python benchmarks/llm_distill.py --onpolicy-warm %d"
                      % (os.environ.get("LLM_TRAIN_CHARS", 40000), os.environ.get("LLM_TEST_BLOCKS", 20), n))


def render(a, S, runs, seeds, tp, record_s, cached, steps, bs, base, t_params, out, t_start, pending) -> None:
    """Tables from the runs finished so far (missing ones shown as "…"), written to BENCHMARKS.md + report."""
    def ppl(k: str, d: str) -> str:
        return f"{runs[k]['ppl'][d]:.2f}" if k in runs else "…"

    def col(k: str, f: str) -> str:
        return (f"{runs[k][f]:.3f}" if isinstance(runs[k][f], float) else str(runs[k][f])) if k in runs else "…"

    ls, ops = a.live_steps, a.onpolicy_steps
    uni = S.get("unigram", {})

    s_params = num_parameters(runs["scratch/0"]["model"])
    doms = S["domains"] + ["all"]
    rows = []
    for d in doms:
        sc = [runs[f"scratch/{x}"]["ppl"][d] for x in seeds if f"scratch/{x}" in runs]
        di = [runs[f"fkl/{x}"]["ppl"][d] for x in seeds if f"fkl/{x}" in runs]
        rows.append([d, f"{tp[d]:.2f}", f"{uni[d]:.1f}" if d in uni else "-",
                     fmt_mean_std(sc, 2) if sc else "…", fmt_mean_std(di, 2) if di else "…",
                     ("yes" if mean_std(di)[0] < mean_std(sc)[0] else "no") if sc and di else "…"])
    n_sc = sum(f"scratch/{x}" in runs for x in seeds)
    n_di = sum(f"fkl/{x}" in runs for x in seeds)
    t1 = markdown_table(["domain", "teacher", "unigram", f"scratch ({n_sc} seeds)", f"distilled FKL ({n_di} seeds)",
                         "distilled < scratch"], rows)
    meth = [("forward KL (store)", "fkl/0", steps), ("reverse KL (store)", "rkl/0", steps),
            ("JSD(0.5) (store)", "jsd/0", steps)]
    if ops != steps:
        meth.append(("forward KL (store), on-policy rows' budget", "fkl_op/0", ops))
    meth += [("GKD λ=0.5, JSD(0.5) (live on generations, store off-policy)", "gkd/0", ops),
             ("SCRG + span, λ=0.5 (live on generations, store off-policy)", "scrg/0", ops)]
    t2 = markdown_table(["method", "steps", *doms, "median s/step", "mean s/step", "on-policy steps", "SCRG corrections"],
                        [[m, str(n) + (" (reduced)" if n != steps else ""), *[ppl(k, d) for d in doms],
                          col(k, "median_step_s"), col(k, "mean_step_s"), col(k, "on_policy_steps"),
                          col(k, "scrg_corrected")] for m, k, n in meth])
    worst = {k: max(runs[k]["ppl"][d] for d in S["domains"]) for k in ("uniform/0", "ddk/0") if k in runs}
    wdom = {k: max(S["domains"], key=lambda d: runs[k]["ppl"][d]) for k in worst}
    nd = len(S["domains"])
    t3 = markdown_table(["sampler", *doms, "worst domain", "final domain weights"],
                        [[n, *[ppl(k, d) for d in doms], f"{wdom[k]} {worst[k]:.2f}" if k in worst else "…",
                          ", ".join(f"{x:.2f}" for x in (runs[k]["ddk_weights"] or [[1 / nd] * nd])[-1]) if k in runs else "…"]
                         for n, k in (("uniform", "uniform/0"), ("DDK", "ddk/0"))])
    k_ls = "fkl/0" if ls == steps else ("fkl_op/0" if ls == ops else "fkl_live/0")
    rec = f"record {record_s:.0f} s once" + (" (cached by an earlier run)" if cached else "")
    t4_rows = [["live teacher (fused sub-vocab head)", str(ls), col("live/0", "median_step_s"), ppl("live/0", "all"), "-"],
               [f"top-{S['k']} store (disk)", str(ls), col(k_ls, "median_step_s"), ppl(k_ls, "all"), rec]]
    if ls != steps:
        t4_rows.append([f"top-{S['k']} store (disk), full budget", str(steps), col("fkl/0", "median_step_s"),
                        ppl("fkl/0", "all"), rec])
    t4_rows.append(["no teacher (scratch)", str(steps), col("scratch/0", "median_step_s"), ppl("scratch/0", "all"), "-"])
    t4 = markdown_table(["teacher signal", "steps", "median s/step", "ppl (all)", "one-off cost"], t4_rows)
    speed = {"teacher": tp["tokens_per_s"], "student": runs["scratch/0"]["ppl"]["tokens_per_s"]}
    gens: dict[str, list] = {}
    if not pending:
        prompts = torch.stack([S["test"][int(S["test"].domain_indices(d)[0])]["input_ids"][: base["prompt_len"]]
                               for d in S["domains"]])
        if S["sub"] is not None:
            gens["teacher"] = sample_generations(S["tmodel"], prompts, S["tok"].decode, 20, rows=S["sub"].ids)
            sp = S["sub"].encode(prompts)
        else:
            gens["teacher"] = sample_generations(S["tmodel"], prompts, S["decode"], 20, allowed_rows=S["allowed"])
            sp = prompts
        for k in ("scratch/0", "fkl/0", "gkd/0", "scrg/0"):
            gens[k] = sample_generations(runs[k]["model"], sp, S["decode"], 20, allowed_rows=S["allowed"])
    info = S["teacher_info"]
    tokens = steps * bs * S["block"]
    head = (f"Teacher: {info['name']}, {t_params / 1e6:.2f}M parameters; student: Llama "
            f"{S['scfg']['num_hidden_layers']}×{S['scfg']['hidden_size']}, {s_params / 1e6:.2f}M parameters "
            f"(ratio {s_params / t_params:.3f}); budget {steps} steps × {bs} × {S['block']} tokens = {tokens:,} tokens "
            f"per student ({steps * bs / len(S['train']):.1f} epochs of the training blocks); domains "
            f"{', '.join(S['domains'])}; {len(S['train'])} training blocks (each BOS + {S['block'] - 1} tokens of "
            f"documents joined by blank lines), {len(S['test'])} held-out blocks.")
    if ls != steps or ops != steps:
        head += (f" Reduced budgets (the live teacher costs a full Gemma forward per step on 1 CPU thread): live-teacher "
                 f"row {ls} steps, GKD/SCRG rows {ops} steps, each beside a store run at the same budget.")
    head += (" \"unigram\": the training targets' frequencies (add-one), the level of a student that learnt nothing else."
             " s/step: median (and mean) over the steps of one run, 1 thread, on a CPU shared with other jobs.")
    if S["sub"] is not None:
        head += (f" Sub-vocabulary: {info['sub_vocab']:,} ids of {len(S['tok']):,} (the training corpus's tokens); "
                 f"teacher mass outside it {100 * info['dropped_mass']:.1f}% (measured on held-out blocks); "
                 f"perplexities are over the sub-vocabulary (in-vocab targets).")
    if pending:
        head += f" **Partial**: runs still pending when this was written: {', '.join(pending)} (shown as …)."
    parts = [head,
             "**Distilled vs scratch** (held-out perplexity, mean ± std over seeds; forward KL + 0.5 CE from the top-k store):\n\n" + t1,
             "**Divergences and on-policy methods** (seed 0, same data; each row's budget in its steps column):\n\n" + t2,
             "**DDK vs uniform domain sampling** (CE + 0.2·KL, seed 0):\n\n" + t3,
             "**Store vs live teacher** (forward KL + 0.5 CE, seed 0):\n\n" + t4,
             f"Throughput (held-out forward): teacher {speed['teacher']:.0f} tok/s, student {speed['student']:.0f} tok/s. "
             f"Wall time so far {time.perf_counter() - t_start:.0f} s (shared 2-core machine). Generations: "
             f"`{out.relative_to(a.root)}/samples.md` (runs/ is not committed)."]
    if gens:
        parts.append("Sample (greedy, 20 tokens): " + "; ".join(
            f"**{k}**: “{gens[k][0]['prompt']}” → “{gens[k][0]['continuation']}”" for k in ("teacher", "scratch/0", "fkl/0")))
    if not a.quick:
        parts.append("Settings: LLM_TRAIN_CHARS=%s per domain, LLM_TEST_BLOCKS=%s per domain, student dim %s × %s layers."
                     % (os.environ.get("LLM_TRAIN_CHARS", 40000), os.environ.get("LLM_TEST_BLOCKS", 20),
                        S["scfg"]["hidden_size"], S["scfg"]["num_hidden_layers"]))
    md = "\n\n".join(parts)
    report = {"teacher": info, "teacher_ppl": tp, "params": {"teacher": t_params, "student": s_params},
              "steps": steps, "tokens_per_student": tokens, "record_s": record_s, "speed": speed, "pending": pending,
              "runs": {k: {kk: vv for kk, vv in v.items() if kk not in ("model", "losses", "step_times")}
                       for k, v in runs.items()}, "generations": gens}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    if gens:
        (out / "samples.md").write_text("\n".join(
            f"## {k}\n\n" + "\n".join(f"- “{g['prompt']}” → “{g['continuation']}”" for g in v) + "\n"
            for k, v in gens.items()))
    if not a.no_write:
        env = " ".join(f"{k}={os.environ[k]}" for k in ("LLM_TRAIN_CHARS", "LLM_TEST_BLOCKS", "LLM_STUDENT_DIM",
                                                         "LLM_STUDENT_LAYERS", "LLM_THREADS") if k in os.environ)
        args = [x for x in sys.argv[1:]]
        if "--benchmarks-md" in args:
            i = args.index("--benchmarks-md")
            del args[i : i + 2]
        cmd = " ".join([env, "python benchmarks/llm_distill.py", *args]).strip()
        write_section("LLM distillation" + (" (quick)" if a.quick else ""), md, command=cmd, path=a.benchmarks_md)
    if pending:
        return
    print(md, file=sys.stderr)
    emit_json({"quick": a.quick, "params_ratio": s_params / t_params, "teacher_ppl": tp["all"],
               "scratch_ppl": mean_std([runs[f"scratch/{x}"]["ppl"]["all"] for x in seeds])[0],
               "distilled_ppl": mean_std([runs[f"fkl/{x}"]["ppl"]["all"] for x in seeds])[0],
               "distilled_beats_scratch_all_domains": all(r[-1] == "yes" for r in rows),
               **{f"{k.split('/')[0]}_ppl": runs[k]["ppl"]["all"] for k in ("rkl/0", "jsd/0", "gkd/0", "scrg/0")},
               "uniform_worst": worst["uniform/0"], "ddk_worst": worst["ddk/0"],
               "live_s_per_step": runs["live/0"]["median_step_s"], "store_s_per_step": runs["fkl/0"]["median_step_s"],
               "seconds": time.perf_counter() - t_start})


if __name__ == "__main__":
    main()
