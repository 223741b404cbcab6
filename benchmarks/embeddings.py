"""Sentence-embedding distillation from real pretrained teachers (all-MiniLM-L6-v2, all-mpnet-base-v2).

Questions (issue 5), each measured in one run:
1. A transformer student (2 of MiniLM's layers, FFN pruned to half) vs its MiniLM teacher: throughput ratio and
   share of MiniLM's R@1 on held-out WordNet.
2. A static student (mean of per-token vectors) trained by still from MiniLM's embeddings vs model2vec's own
   `distill` of MiniLM at the same size (vocabulary × 256), side by side, and vs MiniLM's throughput: one
   initialised by PCA of MiniLM's input embeddings, one initialised from that run's model2vec output.
3. A 6-layer student (MiniLM-initialised) distilled from MPNet vs off-the-shelf MiniLM.
4. Multi-teacher (MiniLM + MPNet, one projection head each) vs each single teacher, same student.

Training text: WordNet glosses of training synsets plus their first lemmas (subsets, see the table), and
unlabeled fortunes (probe items removed) for the static students;
evaluation on held-out synsets never trained on, fortunes (12 categories) and held-out KJV verses.
Teacher embeddings are cached on disk (`~/.cache/still/embeddings`), so a rerun encodes nothing twice.

    python benchmarks/embeddings.py --quick        # a smoke run (~40 s CPU once the caches exist); prints, writes nothing
    python benchmarks/embeddings.py                # the full run (hours on 2 shared cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import dataclasses
from dataclasses import dataclass, asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from still.bench import emit_json, markdown_table, mean_std, override_fields, write_section  # noqa: E402
from still.paths import cache_root  # noqa: E402

CACHE = cache_root()
WRITE_QUICK = False  # --quick --write: let the smoke run replace the BENCHMARKS.md section
STATIC_ROW = "still static (256-d, PCA init) ← MiniLM"
M2V_ROW = "still static (256-d, model2vec init, cosine) ← MiniLM"


@dataclass
class Config:
    n_train: int = 16000          # WordNet training synsets for the static students
    static_fortunes: int = 6000   # + unlabeled fortunes for the static students (probe items excluded; ~5.5k remain)
    n_train_tf: int = 3000        # ... for the transformer students (MiniLM teacher) when tf_text == "tf"
    tf_text: str = "wordnet"      # the 2-layer <- MiniLM student's text: "wordnet" (the static students' synsets,
    #                               no fortunes), "static" (with the fortunes) or "tf" (n_train_tf synsets)
    tf_minilm_lr: float = 3e-4    # its AdamW lr (1e-4 with 3,000 synsets gave 79 % of MiniLM's R@1)
    tf_minilm_epochs: int = 2     # its epochs (1 epoch of "static" at 3e-4: 87 %, 1 seed)
    n_train_mpnet: int = 4000     # ... for MPNet / multi-teacher students (MPNet encodes ~45 sent/s on one core)
    pairs: bool = True            # transformer students: each synset's lemma and gloss share a batch (in-batch
    #                               score-KL then sees the teacher's word -> definition scores; distill_pairs)
    pair_ablation: bool = True    # also the unpaired ("shuffled texts") 2-layer <- MiniLM and 6-layer <- MPNet rows
    eval_pairs: int = 1000        # held-out (lemma, definition) pairs, one synset per lemma
    kjv: int = 500                # held-out KJV verses for agreement
    fortunes_per_class: int = 100
    seeds: int = 3
    static_epochs: int = 2
    static_lr: float = 3e-3
    static_m2v: bool = True       # a static student initialised from model2vec's distill output, trained by still
    m2v_epochs: int = 3
    m2v_lr: float = 1.5e-3
    mpnet_epochs: int = 2         # the MPNet / multi-teacher runs see fewer synsets, so more epochs
    tf_lr: float = 1e-4
    batch_size: int = 64
    throughput_texts: int = 128
    model2vec: bool = True
    mpnet: bool = True
    seed_start: int = 0           # > 0: add seeds seed_start..seeds-1 to the part's saved rows (see --seed-start)
    six_layer: bool = True        # the MPNet 6-layer row (False: keep its saved figures)
    only_transformer: bool = False  # minilm part: rerun the 2-layer <- MiniLM row only (keep the others' figures)
    multi_rows: bool = True       # the three single/multi-teacher 2-layer rows (False: keep their saved figures)
    threads: int = 1


QUICK = Config(n_train=200, static_fortunes=100, n_train_tf=200, n_train_mpnet=0, eval_pairs=100, kjv=50,
               fortunes_per_class=12, seeds=1, static_epochs=2, tf_minilm_epochs=1, throughput_texts=64, model2vec=False,
               static_m2v=False, mpnet=False, pair_ablation=False, threads=2)
UNPAIRED = " (shuffled texts)"  # the suffix of a transformer row trained without (lemma, gloss) batches


def suite_texts(suite) -> list[str]:
    return suite.lemmas + suite.definitions + suite.fortunes_train.texts + suite.fortunes_test.texts + suite.kjv


def load_everything(cfg: Config, progress: bool = True, only: str | None = None):
    from still.integrations import sentence_transformers as sti
    from still.integrations.embedding_eval import EvalSuite

    suite = EvalSuite.build(cfg.eval_pairs, cfg.fortunes_per_class, cfg.kjv)
    from still.data.text import distill_corpus, distill_pairs

    texts = distill_corpus(cfg.n_train, fortunes_n=cfg.static_fortunes)  # held-out texts excluded
    texts_tf = distill_corpus(cfg.n_train_tf)
    pairs_mp = distill_pairs(cfg.n_train_mpnet) if cfg.n_train_mpnet > 0 else []
    texts_mp = distill_corpus(cfg.n_train_mpnet) if cfg.n_train_mpnet > 0 else []
    mp_all = list(dict.fromkeys(texts_mp + [x for p in pairs_mp for x in p]))
    emb_cache = CACHE / "embeddings"
    enc = {}
    minilm = sti.STTeacher("minilm", view="minilm", cache_dir=emb_cache)
    mpnet = sti.STTeacher("mpnet", view="mpnet", cache_dir=emb_cache) if cfg.mpnet else None
    if only in (None, "minilm"):
        t0 = time.perf_counter()
        minilm.precompute(suite_texts(suite) + mp_all + texts_tf + texts, progress=progress)
        enc["minilm"] = time.perf_counter() - t0
    if mpnet is not None and only in (None, "mpnet"):  # held-out WordNet and KJV and the training texts
        t0 = time.perf_counter()
        mpnet.precompute(suite.lemmas + suite.definitions + suite.kjv + mp_all, progress=progress)
        enc["mpnet"] = time.perf_counter() - t0
    corpora = {"static": texts, "tf": texts_tf, "mpnet": texts_mp, "mpnet_pairs": pairs_mp,
               "wordnet": distill_corpus(cfg.n_train),  # the static students' synsets, no fortunes (short texts)
               "wordnet_pairs": distill_pairs(cfg.n_train), "tf_pairs": distill_pairs(cfg.n_train_tf)}
    return suite, corpora, minilm, mpnet, enc


def objective_for(teachers: dict[str, float], head_cosine: bool, kl_weight: float = 1.0, rel_weight: float = 1.0):
    """Terms per teacher view: DiSCo score-KL and relation on the student's own space (any width),
    plus a cosine term through a linear projection head when `head_cosine`."""
    from still.objective import Objective, Term
    from still.registry import LOSSES

    terms = []
    for view, w in teachers.items():
        if kl_weight:
            terms.append(Term(f"score_kl_{view}", LOSSES.build("score_kl", temperature=0.05), student="embedding",
                              teacher=view, weight=w * kl_weight))
        if rel_weight:
            terms.append(Term(f"relation_{view}", LOSSES.build("embedding_relation"), student="embedding",
                              teacher=view, weight=w * rel_weight))
        if head_cosine:
            terms.append(Term(f"cosine_{view}", LOSSES.build("embedding_cosine"), student="embedding",
                              teacher=view, weight=w, adapter="linear"))
    return Objective(terms)


def run_all(cfg: Config, suite, texts, minilm, mpnet, enc, quick: bool, t_start: float, part: str = "all") -> None:
    """Run the experiments of `part` ("minilm": questions 1-2, "mpnet": 3-4, "all"), save their figures
    to `~/.cache/still/bench/embeddings_<part>.json`, and write the section from every saved part
    (two parts can run as two processes; each measures MiniLM's throughput as its own reference)."""
    from still.integrations import sentence_transformers as sti
    from still.integrations.embedding_eval import throughput
    from still.models.text import count_parameters, layer_dropped_student, static_student

    kjv_t = {"minilm": suite.encode_kjv(minilm.encode)}
    tag = "quick" if quick else part
    prev_file = CACHE / "bench" / f"embeddings_{tag}.json"
    # --seed-start: the saved rows' earlier seeds are kept (their quality figures; throughput is re-measured
    # for the rows run here) and rows not run here are carried over as they were saved
    carry = cfg.seed_start or cfg.only_transformer
    prev_d = json.loads(prev_file.read_text()) if carry and prev_file.exists() else {}
    prev = prev_d.get("results", {})
    results: dict[str, dict] = {}   # name -> {"runs": [metrics], "params": int, "encode": fn, "teacher": str}

    def record(name, metrics, params, encode, teacher, seconds=None):
        r = results.setdefault(name, {"runs": [], "params": params, "encode": encode, "teacher": teacher, "train_s": []})
        r["runs"].append(metrics)
        r["encode"] = encode
        if seconds is not None:
            r["train_s"].append(seconds)
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
        save(None)  # partial figures (no throughput yet), so an interrupted run still leaves what it measured

    def save(tp):
        base = "all-MiniLM-L6-v2 (teacher)"
        saved = {k: {"runs": v["runs"], "params": v["params"], "train_s": v["train_s"],
                     "sent_per_s": tp[k] if tp else None, "x_minilm": tp[k] / tp[base] if tp else None}
                 for k, v in results.items()}
        for k, v in prev.items():
            if k not in saved:
                saved[k] = {**v, "carried": True}
            elif cfg.seed_start and v["train_s"] and saved[k]["train_s"]:  # a trained row: earlier seeds first
                saved[k] = {**saved[k], "runs": v["runs"] + saved[k]["runs"],
                            "train_s": v["train_s"] + saved[k]["train_s"]}
        out_dir = CACHE / "bench"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"embeddings_{'quick' if quick else part}.json").write_text(json.dumps(
            {"results": saved, "enc": enc, "seconds": time.perf_counter() - t_start, "complete": tp is not None,
             "cfg": asdict(cfg), "argv": " ".join(["python", "benchmarks/embeddings.py", *sys.argv[1:]]),
             "prev_argv": ([prev_d.get("argv")] + prev_d.get("prev_argv", [])) if prev_d else []}))

    record("all-MiniLM-L6-v2 (teacher)", suite.evaluate(minilm.encode), count_parameters(minilm.model),
           lambda t: sti.st_encode(minilm.model, t, cfg.batch_size), "minilm")
    m2v_dir = None
    do_minilm, do_mpnet = part in ("all", "minilm"), part in ("all", "mpnet") and mpnet is not None
    do_static = do_minilm and not cfg.only_transformer
    if cfg.model2vec and do_static:
        import tempfile

        from model2vec import StaticModel
        from model2vec.distill import distill

        t0 = time.perf_counter()
        m2v = distill(model_name=str(sti.minilm_path()), pca_dims=256, device="cpu")
        m2v_s = time.perf_counter() - t0
        m2v_dir = Path(tempfile.mkdtemp(prefix="m2v_"))
        m2v.save_pretrained(str(m2v_dir))
        m2v = StaticModel.from_pretrained(str(m2v_dir))
        enc_m2v = lambda t: m2v.encode(list(t), batch_size=cfg.batch_size)  # noqa: E731
        record("model2vec distill (256-d, no training)", suite.evaluate(enc_m2v, kjv_t["minilm"]),
               int(m2v.embedding.size), enc_m2v, "minilm", m2v_s)

    def train_eval(name, make, teachers, tview, texts_, epochs, lr, bs, head_cosine, teacher_obj, wd=0.01,
                   fortunes=True, kl=1.0, rel=1.0):
        for seed in range(cfg.seed_start, cfg.seeds):
            torch.manual_seed(seed)
            student = make()
            obj = objective_for(teachers, head_cosine, kl, rel)
            res = sti.distill_embeddings(student, obj, texts_, teacher_obj, epochs=epochs, batch_size=bs, lr=lr,
                                         weight_decay=wd, seed=seed)
            m = suite.evaluate(lambda t: student.encode(t, cfg.batch_size), kjv_t[tview], fortunes=fortunes)
            record(name, m, count_parameters(student), lambda t, s=student: s.encode(t, cfg.batch_size), tview,
                   res["seconds"])
        return student

    # (2) static students, MiniLM teacher
    if do_static:
        train_eval("still static (256-d, PCA init) ← MiniLM",
                   lambda: static_student("minilm", dim=256, init="pca"), {"minilm": 1.0}, "minilm",
                   texts["static"], cfg.static_epochs, cfg.static_lr, 128, False, minilm, wd=0.0)
    if do_static and cfg.static_m2v and m2v_dir is not None:
        # model2vec's distill output as the init, trained by still with cosine to MiniLM through a linear head
        # (score-KL / relation raise R@1 but lower the fortunes probe below the init's)
        train_eval(M2V_ROW, lambda: static_student("minilm", dim=256, init="model2vec", model2vec_path=str(m2v_dir)),
                   {"minilm": 1.0}, "minilm", texts["static"], cfg.m2v_epochs, cfg.m2v_lr, 128, True, minilm, wd=0.0,
                   kl=0.0, rel=0.0)
    def tf_corpus(key: str, paired: bool):
        """The transformer students' text: (lemma, gloss) groups when `paired`, else shuffled texts."""
        if not paired:
            return texts[key]
        if key == "static":
            raise SystemExit("--set tf_text=static has no (lemma, gloss) pairs (the fortunes have none): "
                             "add --set pairs=false")
        return texts[f"{key}_pairs"]

    variants = [cfg.pairs] + ([False] if cfg.pairs and cfg.pair_ablation else [])  # paired rows first
    # (1) transformer student, MiniLM teacher: 2 of its 6 layers, FFN pruned to 768 of 1536 neurons
    if do_minilm:
        for paired in variants:
            train_eval("still 2-layer, FFN 768 ← MiniLM" + ("" if paired else UNPAIRED),
                       lambda: layer_dropped_student("minilm", keep=2, ffn_width=768), {"minilm": 1.0}, "minilm",
                       tf_corpus(cfg.tf_text, paired), cfg.tf_minilm_epochs, cfg.tf_minilm_lr, cfg.batch_size,
                       True, minilm)
    if do_mpnet:
        # MPNet's cache is first read here, so a `--prepare mpnet` running alongside can fill it meanwhile
        kjv_t["mpnet"] = suite.encode_kjv(mpnet.encode)
        record("all-mpnet-base-v2 (teacher)", suite.evaluate(mpnet.encode, kjv_t["minilm"], fortunes=False),
               count_parameters(mpnet.model), lambda t: sti.st_encode(mpnet.model, t, cfg.batch_size), "mpnet")
        both = sti.TeacherGroup([minilm, mpnet])
        # (3) a 6-layer student (MiniLM's architecture and init) distilled from MPNet
        if cfg.six_layer:
            for paired in variants:
                train_eval("still 6-layer ← MPNet" + ("" if paired else UNPAIRED),
                           lambda: layer_dropped_student("minilm", keep=list(range(6))), {"mpnet": 1.0}, "mpnet",
                           tf_corpus("mpnet", paired), cfg.mpnet_epochs, cfg.tf_lr, cfg.batch_size, False, mpnet,
                           fortunes=False)
        # (4) single vs multi teacher, same 2-layer student and data
        rows = [("MiniLM", {"minilm": 1.0}, "minilm", minilm), ("MPNet", {"mpnet": 1.0}, "mpnet", mpnet),
                ("MiniLM + MPNet", {"minilm": 0.5, "mpnet": 0.5}, "mpnet", both)] if cfg.multi_rows else []
        for label, tw, tv, tobj in rows:
            train_eval(f"still 2-layer, FFN 768 ← {label} [{cfg.n_train_mpnet} synsets]" + ("" if cfg.pairs else UNPAIRED),
                       lambda: layer_dropped_student("minilm", keep=2, ffn_width=768), tw, tv,
                       tf_corpus("mpnet", cfg.pairs), cfg.mpnet_epochs, cfg.tf_lr, cfg.batch_size, True, tobj)
    # throughput: same texts, same batch size, warmed up, interleaved
    tp_texts = suite.definitions[: cfg.throughput_texts]
    tp = throughput({k: v["encode"] for k, v in results.items()}, tp_texts, repeats=3)
    save(tp)
    merge_and_report(cfg, [tag] if quick or part == "all" else ["minilm", "mpnet"], enc, quick)


def merge_and_report(cfg: Config, parts: list[str], enc: dict, quick: bool) -> None:
    """Merge the saved figures of `parts` (the MiniLM part wins for rows both have) and write the section."""
    out_dir = CACHE / "bench"
    merged: dict[str, dict] = {}
    secs = 0.0
    for p in parts:
        f = out_dir / f"embeddings_{p}.json"
        if f.exists():
            d = json.loads(f.read_text())
            secs = max(secs, d["seconds"])
            for k, v in d["results"].items():
                if k not in merged or p == "minilm":
                    merged[k] = v
                enc.update(d["enc"])
            if "cfg" in d:  # the setup line states what each part really ran
                known = {f.name for f in dataclasses.fields(Config)}  # fields of older runs may be gone
                keep = ("n_train_mpnet", "mpnet_epochs") if p == "mpnet" else tuple(
                    k for k in d["cfg"] if k in known and k not in ("n_train_mpnet", "mpnet_epochs"))
                cfg = Config(**{**asdict(cfg), **{k: d["cfg"][k] for k in keep}})
    cmds = []
    for p in parts:
        f = out_dir / f"embeddings_{p}.json"
        if f.exists():
            d = json.loads(f.read_text())
            cmds += [c for c in d.get("prev_argv", []) if c] + [d.get("argv") or f"python benchmarks/embeddings.py --part {p}"]
    report(cfg, merged, enc, quick, secs, cmds)


def _ms(runs, key, digits=3):
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return "–", None
    m, s = mean_std(vals)
    return (f"{m:.{digits}f} ± {s:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"), m


def report(cfg, results, enc, quick, total_s, commands: list[str] | None = None) -> None:
    base = "all-MiniLM-L6-v2 (teacher)"
    r1_base = _ms(results[base]["runs"], "r1")[1]
    rows, figs = [], {"quick": quick, "seconds": round(total_s, 1), "teacher_encode_s": enc}
    for name, r in results.items():
        r1s, r1 = _ms(r["runs"], "r1")
        tp_ok = r.get("sent_per_s") is not None
        row = [name, f"{r['params'] / 1e6:.1f}M", f"{r['sent_per_s']:.0f}" if tp_ok else "–",
               f"{r['x_minilm']:.1f}×" if tp_ok else "–", r1s,
               f"{100 * r1 / r1_base:.0f}%", _ms(r["runs"], "r10")[0], _ms(r["runs"], "fortunes_acc")[0],
               _ms(r["runs"], "kjv_cosine")[0], _ms(r["runs"], "kjv_spearman")[0], len(r["runs"])]
        rows.append(row)
        figs[name] = {"r1": r1, "r10": _ms(r["runs"], "r10")[1], "fortunes": _ms(r["runs"], "fortunes_acc")[1],
                      "sent_per_s": r["sent_per_s"], "x_minilm": r["x_minilm"], "seeds": len(r["runs"]),
                      "train_s": r.get("train_s")}
    table = markdown_table(["model", "params", "sent/s", "× MiniLM", "WordNet R@1", "% MiniLM R@1", "R@10",
                            "fortunes probe", "KJV cos", "KJV Spearman", "seeds"], rows)

    def f(name, key):
        return figs.get(name, {}).get(key)

    goals = []
    tf = max((n for n in figs if isinstance(figs[n], dict) and "← MiniLM" in n and "static" not in n
              and (f(n, "x_minilm") or 0) >= 3), key=lambda n: f(n, "r1"), default=None)
    if tf:
        goals.append(f"- Transformer student ≥ 3× MiniLM's throughput reaching ≥ 90% of its R@1: **{tf}**, "
                     f"{f(tf, 'x_minilm'):.1f}×, {100 * f(tf, 'r1') / r1_base:.0f}% → "
                     f"{'met' if f(tf, 'r1') >= 0.9 * r1_base else 'NOT met'}.")
    else:
        goals.append("- Transformer student ≥ 3× MiniLM's throughput: no transformer student reached 3× → NOT met.")
    m2 = "model2vec distill (256-d, no training)"
    for cand in (STATIC_ROW, M2V_ROW):
        if cand in figs:
            ok = (f(cand, "x_minilm") or 0) >= 100 and f(cand, "r1") >= 0.75 * r1_base
            line = (f"- Static **{cand}**: {f(cand, 'x_minilm') or 0:.0f}× MiniLM, {100 * f(cand, 'r1') / r1_base:.0f}% "
                    f"of its R@1 → {'met' if ok else 'NOT met'} (goal ≥ 100×, ≥ 75%)")
            if m2 in figs:
                beat = f(cand, "r1") > f(m2, "r1") and f(cand, "fortunes") > f(m2, "fortunes")
                line += (f"; vs model2vec distill R@1 {f(cand, 'r1'):.3f} vs {f(m2, 'r1'):.3f}, fortunes "
                         f"{f(cand, 'fortunes'):.3f} vs {f(m2, 'fortunes'):.3f} → {'beats it' if beat else 'does NOT beat it'}")
            goals.append(line + ".")
    mp = max((n for n in figs if n.startswith("still 6-layer ← MPNet")), key=lambda n: f(n, "r1"), default=None)
    if mp:
        goals.append(f"- 6-layer student from MPNet (**{mp}**) R@1 {f(mp, 'r1'):.3f} vs off-the-shelf MiniLM "
                     f"{r1_base:.3f} → {'matches or beats it' if f(mp, 'r1') >= r1_base else 'below it'}.")
    for base in ("still 2-layer, FFN 768 ← MiniLM", "still 6-layer ← MPNet"):
        if base in figs and base + UNPAIRED in figs:
            goals.append(f"- (lemma, gloss) batches vs shuffled texts, same student, data and budget: **{base}** R@1 "
                         f"{f(base, 'r1'):.3f} vs {f(base + UNPAIRED, 'r1'):.3f}.")
    sfx = f" [{cfg.n_train_mpnet} synsets]" + ("" if cfg.pairs else UNPAIRED)
    multi = "still 2-layer, FFN 768 ← MiniLM + MPNet" + sfx
    if multi in figs:
        goals.append(f"- Multi-teacher 2-layer R@1 {f(multi, 'r1'):.3f}, fortunes {f(multi, 'fortunes'):.3f} vs "
                     f"single MiniLM {f('still 2-layer, FFN 768 ← MiniLM' + sfx, 'r1'):.3f} / "
                     f"{f('still 2-layer, FFN 768 ← MiniLM' + sfx, 'fortunes'):.3f} and single MPNet "
                     f"{f('still 2-layer, FFN 768 ← MPNet' + sfx, 'r1'):.3f} / "
                     f"{f('still 2-layer, FFN 768 ← MPNet' + sfx, 'fortunes'):.3f} (same student, data and budget).")
    tf_corpus = {"static": "the static students' text", "wordnet": f"the static students' {cfg.n_train} synsets "
                 "(no fortunes)"}.get(getattr(cfg, "tf_text", "tf"), f"{cfg.n_train_tf} synsets")
    pairing = ("Transformer students (rows without the 'shuffled texts' mark) train on (lemma, gloss) batches: each "
               f"training synset's first lemma and its gloss share a batch ({cfg.batch_size // 2} pairs = "
               f"{cfg.batch_size} texts; `still.data.text.distill_pairs`, `distill_embeddings` groups), so the "
               f"in-batch score-KL carries the teacher's word → definition scores against {cfg.batch_size // 2 - 1} "
               "other definitions and words, as DiSCo distils a "
               "query's scores over its candidates; only the teacher's embeddings are targets (no pair is a label). "
               "'Shuffled texts' rows see the same texts in a plain shuffle. " if cfg.pairs else "")
    setup = (pairing + f"Training text: glosses + first lemmas of {cfg.n_train} (static; also the 2-layer ← MiniLM student's "
             f"when it trains on the static students' text) and "
             f"{cfg.n_train_mpnet} (MPNet / multi-teacher) training WordNet synsets (fixed nested subsets of the "
             f"106k; the 2-core shared CPU makes the full set too slow), plus for the static students "
             f"the first {getattr(cfg, 'static_fortunes', 0)} unlabeled fortunes (hash order; those over 400 characters "
             f"then dropped, ~5.5k remain) drawn from all 43 fortunes files with every item the probe may use removed (`still.data.text.distill_corpus`; texts equal to a held-out definition or "
             f"verse are dropped too). Held-out: {cfg.eval_pairs} WordNet synsets "
             f"(one per lemma, never trained on) for lemma → definition retrieval among all {cfg.eval_pairs} "
             f"definitions; 12 fortunes categories (≤ {cfg.fortunes_per_class} per class, 75/25 split, logistic "
             f"regression on normalised embeddings); {cfg.kjv} held-out KJV verses for agreement with the student's "
             f"teacher (MPNet for MPNet students and the multi-teacher one; cosine only when widths agree). "
             f"Throughput: {cfg.throughput_texts} held-out definitions, batch {cfg.batch_size}, same encode path "
             f"(tokenize + forward, inference mode; model2vec uses its own `encode`), warmed up, median of 3 "
             f"interleaved runs, {cfg.threads} threads. Losses: DiSCo score-KL (τ = 0.05) + in-batch relation MSE "
             f"per teacher, plus cosine through a linear head for transformer students except the MPNet 6-layer. "
             f"Static PCA init: {cfg.static_epochs} epochs, lr {cfg.static_lr}, batch 128; static model2vec init (the "
             f"model2vec row's own vectors, cast to float32): cosine to MiniLM through a linear 256→384 head only "
             f"(no score-KL / relation), {cfg.m2v_epochs} epochs, lr {cfg.m2v_lr}, batch 128; transformers: "
             f"{cfg.mpnet_epochs} epochs for the MPNet / multi-teacher runs, AdamW lr {cfg.tf_lr}, batch {cfg.batch_size} (the 2-layer ← MiniLM row: {cfg.tf_minilm_epochs} epoch(s) at lr {cfg.tf_minilm_lr} on {tf_corpus}). The "
             f"MPNet teacher and the MPNet 6-layer students skip the fortunes probe (CPU time). Mean ± std over the seeds counted in the last column "
             f"(seed = shuffle order and heads; the inits are deterministic). '× MiniLM' is relative to MiniLM timed "
             f"in the same process (the MiniLM-teacher rows and the MPNet rows come from separate processes, the "
             f"parts, run at different times on a CPU shared with other jobs, so absolute sent/s differ between them). Longest part "
             f"{total_s / 60:.1f} min; teacher embeddings come from the on-disk cache "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in enc.items())} to read/encode in this run).")
    carried = [n for n, r in results.items() if r.get("carried")]
    if carried:
        setup += (" Rows whose figures (quality and throughput) were carried over from an earlier run of their part, "
                  "not rerun: " + "; ".join(carried) + ".")
    md = "\n".join([("**Quick smoke run (tiny subsets, 1 seed): not the benchmark's figures.**\n" if quick else ""),
                     table, "", "Goals (issue 5):", *goals, "", setup])
    if commands:
        md += "\n\nFigures made by: " + "; ".join(f"`{c}`" for c in commands) + " (then merged into this section)."
    if quick and not WRITE_QUICK:  # a smoke run never replaces the measured section
        print(md, flush=True)
    else:
        write_section("Sentence embeddings", md)
    emit_json({k: v for k, v in figs.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run on a few hundred sentences (< 60 s, cached)")
    ap.add_argument("--part", choices=["all", "minilm", "mpnet"], default="all",
                    help="run only questions 1-2 (minilm) or 3-4 (mpnet); the section merges the saved parts")
    ap.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from the saved parts")
    ap.add_argument("--seed-start", type=int, default=0,
                    help="add seeds N..--seeds-1 to the part's saved figures (rows not run are carried over)")
    ap.add_argument("--no-6layer", action="store_true", help="skip the MPNet 6-layer row (keep its saved figures)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Config field (repeatable), e.g. --set tf_minilm_epochs=3 --set tf_text=static")
    ap.add_argument("--only-transformer", action="store_true",
                    help="minilm part: rerun only the 2-layer <- MiniLM row, keep the other rows' saved figures")
    ap.add_argument("--no-multi", action="store_true",
                    help="skip the single/multi-teacher 2-layer rows of the MPNet part (keep their saved figures)")
    ap.add_argument("--prepare", choices=["all", "minilm", "mpnet"], help="only encode and cache teacher embeddings")
    ap.add_argument("--write", action="store_true", help="with --quick: write the section to BENCHMARKS.md anyway")
    args = ap.parse_args()
    global WRITE_QUICK
    WRITE_QUICK = args.write
    cfg = QUICK if args.quick else Config()
    if args.seeds:
        cfg = Config(**{**asdict(cfg), "seeds": args.seeds})
    cfg = Config(**{**asdict(cfg), "seed_start": args.seed_start, "six_layer": not args.no_6layer,
                    "only_transformer": args.only_transformer,
                        "multi_rows": not args.no_multi})
    pairs = [item.partition("=") for item in args.set]
    bad = [k + s + v for k, s, v in pairs if not s]
    if bad:
        raise SystemExit(f"--set {bad[0]!r}: expected FIELD=VALUE")
    cfg = override_fields(cfg, {k: v for k, _, v in pairs}, "--set")
    torch.set_num_threads(cfg.threads)
    if args.report_only:
        merge_and_report(cfg, ["quick"] if args.quick else ["minilm", "mpnet"], {}, args.quick)
        return
    t_start = time.perf_counter()
    only = args.prepare if args.prepare not in (None, "all") else (None if args.part == "all" else args.part)
    suite, texts, minilm, mpnet, enc = load_everything(cfg, only=only)
    if args.prepare:
        print(f"cached teacher embeddings in {enc}", flush=True)
        return
    run_all(cfg, suite, texts, minilm, mpnet, enc, quick=args.quick, t_start=t_start, part=args.part)


if __name__ == "__main__":
    main()
