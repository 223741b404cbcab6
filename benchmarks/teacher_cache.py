"""Teacher-signal store: fidelity of top-k records, students trained from a store, and step time.

    python benchmarks/teacher_cache.py [--quick]

1. Fidelity: for k in {1, 8, 32, 128} (k < V), the bytes per sample/token of a recorded top-k view, the
   KL(teacher || reconstruction) and the cosine between the student's gradient under the stored and the
   dense teacher. Teachers: a CNN trained here on Fashion-MNIST (V = 10; its weights are cached under
   $STILL_CACHE/bench) and Gemma-3-270M's LM head (V = 262,144) over its own final hidden states on KJV
   text (the hidden states are recorded once by the full run and cached; `--quick` reuses them or skips).
2. Accuracy of a student distilled from the live teacher vs from stores (3 seeds, still.engine).
3. Median step time of (a) the student alone (CE), (b) KD with the live teacher, (c) KD from the store.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from still.bench import emit_json, fmt_mean_std, interleaved_median, markdown_table, mean_std, write_section  # noqa: E402
from still.paths import cache_root  # noqa: E402
from still.teachers.base import LiveTeacher, Teacher  # noqa: E402
from still.teachers.store import StoreTeacher, write_store  # noqa: E402

CACHE = cache_root("bench", "teacher_cache")
KS = (1, 8, 32, 128)


class TeacherCNN(nn.Module):
    """conv32-conv64-fc128 (~4.2M MACs per image)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class StudentCNN(nn.Module):
    """conv8-conv16-fc (~0.29M MACs per image)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(16 * 7 * 7, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward on `x` (conv and linear layers), per sample."""
    total = [0]

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total[0] // len(x)


def fmnist(split: str, n: int | None) -> Any:
    from still.data.vision import fashion_mnist

    return fashion_mnist(split=split, subset=n, subset_seed=0)


def fmnist_teacher(quick: bool) -> tuple[nn.Module, str]:
    """The CNN teacher, trained with CE (Adam, batch 128) once and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    n, epochs = (10000, 1) if quick else (60000, 2)
    key = hashlib.sha256(f"TeacherCNN-v1-n{n}-e{epochs}-seed0-{torch.__version__}".encode()).hexdigest()[:12]
    path = CACHE / f"fmnist_cnn_{key}.safetensors"
    model = TeacherCNN()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), f"cached {path.name}"
    data = fmnist("train", n)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in torch.randperm(len(data)).split(128):
            loss = F.cross_entropy(model(data.x[i]), data.y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), f"trained here ({n} images, {epochs} epochs, {time.perf_counter() - t0:.0f} s)"


def accuracy(model: nn.Module, data: Any) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(data.x[i:i + 1000]).argmax(-1) for i in range(0, len(data), 1000)])
    return float((pred == data.y).float().mean())


def grad_cos(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    fa, fb = torch.cat([g.reshape(-1) for g in a]), torch.cat([g.reshape(-1) for g in b])
    return float(F.cosine_similarity(fa.double(), fb.double(), dim=0))


def kl_rows(logp_t: torch.Tensor, logq: torch.Tensor) -> float:
    """Mean over rows of KL(p_t || q), both given as log-probabilities (..., V)."""
    return float((logp_t.exp() * (logp_t - logq)).sum(-1).mean())


class ArrayTeacher(Teacher):
    """Serves precomputed teacher logits (N, V) by batch["index"] (so the LM head runs once, not per k)."""

    def __init__(self, logits: torch.Tensor, fp: str) -> None:
        self.logits, self._fp, self.view_specs = logits, fp, {"logits": ""}

    def views(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: self.logits[batch["index"]] for n in names}

    def fingerprint(self) -> str:
        return self._fp


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i)}

    def fingerprint(self) -> str:
        return f"rows{self.n}"


def store_bytes(path: Path, rows: int) -> float:
    """Bytes on disk per row: every shard and the index, headers included."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / rows


# ------------------------------------------------------------------------------------------------ 1. fidelity

def fidelity_fmnist(teacher: nn.Module, student: nn.Module, work: Path, n: int) -> list[dict[str, Any]]:
    data = fmnist("test", n)
    live = LiveTeacher(teacher, {"logits": ""})
    z_t = live.views({"x": data.x}, ["logits"])["logits"]
    logp_t = torch.log_softmax(z_t, -1)
    batch = {"x": data.x, "index": torch.arange(len(data))}
    rows = []
    for k in [k for k in KS if k < 10] + [10]:
        out = write_store(live, data, work / f"fm_k{k}", topk={"logits": k}, shard_size=4096)
        st = StoreTeacher(out)
        tk = st.views(batch, ["logits"])["logits"]
        rec = {m: tk.dense(m) for m in ("uniform", "renormalize")}
        row = {"teacher": "Fashion-MNIST CNN", "V": 10, "k": k, "bytes": st.manifest["bytes_per_position"]["logits"],
               "disk_bytes": store_bytes(out, len(data)), "bound": k * (math.ceil(math.log2(10)) + 16) / 8 + 16,
               "kl": kl_rows(logp_t, rec["uniform"]), "missing": float(tk.missing.mean())}
        for t in (1.0, 4.0):
            gs = []
            for target in (z_t, rec["uniform"], rec["renormalize"]):
                loss = _kd(student(data.x), target, t)
                gs.append(torch.autograd.grad(loss, list(student.parameters())))
            row[f"cos_u_T{t:g}"], row[f"cos_r_T{t:g}"] = grad_cos(gs[0], gs[1]), grad_cos(gs[0], gs[2])
        rows.append(row)
    return rows


def _kd(z_s: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    from still.registry import LOSSES

    return LOSSES.build("kd", temperature=t)(z_s, teacher)


def lm_hidden(n_tokens: int, allow_compute: bool) -> tuple[torch.Tensor, str] | None:
    """Gemma-3-270M's final hidden states (N, 640) (the lm_head's input) on KJV text; cached."""
    from safetensors.torch import load_file, save_file

    path = CACHE / f"gemma3_270m_kjv_hidden_{n_tokens}.safetensors"
    if not path.exists():
        bigger = sorted(CACHE.glob("gemma3_270m_kjv_hidden_*.safetensors"), key=lambda p: int(p.stem.split("_")[-1]))
        bigger = [p for p in bigger if int(p.stem.split("_")[-1]) >= n_tokens]
        if bigger:
            return load_file(str(bigger[0]))["hidden"][:n_tokens], f"cached {bigger[0].name}"
        if not allow_compute:
            return None
        from still.data.lm_text import domain_texts
        from still.integrations.causal_lm import load_gemma3_270m
        from still.taps import forward_with_views

        model, tok = load_gemma3_270m()
        text = " ".join(domain_texts("kjv", "train")[:200])
        seq = 64
        ids = tok(text, return_tensors="pt").input_ids[0, : n_tokens].reshape(-1, seq)
        with torch.no_grad():
            _, v = forward_with_views(model, {"input_ids": ids}, {"h": "lm_head@input"}, detach=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"hidden": v["h"].reshape(-1, v["h"].shape[-1]).contiguous(), "input_ids": ids.contiguous()}, str(path))
        del model
    return load_file(str(path))["hidden"], f"cached {path.name}"


def lm_head_weight() -> torch.Tensor:
    from safetensors import safe_open

    from still.integrations.causal_lm import gemma3_270m_dir

    with safe_open(str(gemma3_270m_dir() / "model.safetensors"), "pt") as f:
        name = "lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight"
        return f.get_tensor(name).float()


def fidelity_lm(work: Path, n_tokens: int, allow_compute: bool,
                ks: Sequence[int] = KS) -> tuple[list[dict[str, Any]], str]:
    got = lm_hidden(n_tokens, allow_compute)
    if got is None:
        return [], "skipped: no cached Gemma hidden states (run the full benchmark once to record them)"
    h, src = got
    w = lm_head_weight()  # (V, 640), tied embeddings; Gemma-3 has no final logit soft-capping
    V = w.shape[0]
    z_t = h @ w.t()
    logp_t = torch.log_softmax(z_t, -1)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(h.shape[1], 128, generator=g))
    z_s = (h @ q @ q.t()) @ w.t()  # student: the teacher's head over a 128-d projection of its hidden state
    teacher = ArrayTeacher(z_t, "gemma3-270m-head:" + hashlib.sha256(h.numpy().tobytes()).hexdigest()[:12])
    del z_t
    temps = (1.0, 2.0)
    p_s = {t: torch.softmax(z_s / t, -1) for t in temps}
    del z_s
    g_d = {t: p_s[t] - torch.softmax(logp_t / t, -1) for t in temps}  # d KL / d z_s, up to the factor T
    rows = []
    for k in ks:
        out = write_store(teacher, Rows(len(h)), work / f"lm_k{k}", topk={"logits": k}, shard_size=128, batch_size=64)
        st = StoreTeacher(out)
        tk = st.views({"index": torch.arange(len(h))}, ["logits"])["logits"]
        row = {"teacher": "Gemma-3-270M head", "V": V, "k": k, "bytes": st.manifest["bytes_per_position"]["logits"],
               "disk_bytes": store_bytes(out, len(h)), "bound": k * (math.ceil(math.log2(V)) + 16) / 8 + 16,
               "missing": float(tk.missing.mean())}
        for mode, tag in (("uniform", "u"), ("renormalize", "r")):
            rec = tk.dense(mode)
            if mode == "uniform":
                row["kl"] = kl_rows(logp_t, rec)
            for t in temps:
                row[f"cos_{tag}_T{t:g}"] = grad_cos([g_d[t]], [p_s[t] - torch.softmax(rec / t, -1)])
            del rec
        rows.append(row)
    return rows, f"{len(h)} tokens of KJV text, hidden states {src}"


# ------------------------------------------------------------------------------------------------ 2. accuracy

def objective(kd: bool) -> Any:
    from still.objective import Objective, Term
    from still.registry import LOSSES

    terms = [Term("ce", LOSSES.build("ce"), student="logits", target="y", weight=0.1 if kd else 1.0)]
    if kd:
        terms.append(Term("kd", LOSSES.build("kd", temperature=4.0), student="logits", teacher="logits", weight=0.9))
    return Objective(terms)


def accuracy_runs(teacher: nn.Module, train: Any, test: Any, work: Path, seeds: Sequence[int],
                  epochs: int, quick: bool) -> tuple[dict[str, list[float]], nn.Module]:
    """Test accuracy per seed of the student distilled from each source; also the seed-0 live student."""
    from still.engine import TrainConfig, train as fit

    live = LiveTeacher(teacher, {"logits": ""})
    sources: dict[str, Any] = {"live teacher": live}
    for k in (1,) if quick else (1, 4):
        out = write_store(live, train, work / f"train_k{k}", topk={"logits": k}, shard_size=4096)
        sources[f"store top-{k}"] = StoreTeacher(out, topk="dense")
    out = write_store(live, train, work / "train_dense", dtype="float16", shard_size=4096)
    sources["store dense fp16"] = StoreTeacher(out)
    if not quick:
        sources["student alone (CE)"] = None
    res: dict[str, list[float]] = {k: [] for k in sources}
    first: nn.Module | None = None
    for seed in seeds:
        for name, src in sources.items():
            torch.manual_seed(seed)
            student = StudentCNN()
            fit(student, objective(src is not None), train, teacher=src, student_views={"logits": ""},
                config=TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, seed=seed, progress=False,
                                   eval_every_epochs=None, log_every=1000))
            res[name].append(accuracy(student, test))
            if first is None:
                first = student
    assert first is not None
    return res, first


# ------------------------------------------------------------------------------------------------ 3. step time

def step_times(teacher: nn.Module, train: Any, work: Path, repeats: int, steps: int) -> dict[str, float]:
    """Median seconds per training step of each variant (each timed call runs `steps` steps)."""
    live = LiveTeacher(teacher, {"logits": ""})
    store = StoreTeacher(write_store(live, train, work / "time_k8", topk={"logits": 8}, shard_size=4096), topk="dense")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(train), (128,), generator=g) for _ in range(16)]
    state: dict[str, Any] = {}

    def make(kd_source: Any) -> Any:
        torch.manual_seed(0)
        student, obj = StudentCNN(), objective(kd_source is not None)
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        it = [0]

        def step() -> None:
            for _ in range(steps):
                i = batches[it[0] % len(batches)]
                it[0] += 1
                batch = {"x": train.x[i], "y": train.y[i], "index": i}
                tv = kd_source.views(batch, ["logits"]) if kd_source is not None else {}
                out = obj({"logits": student(batch["x"])}, tv, batch)
                opt.zero_grad(set_to_none=True)
                out["total"].backward()
                opt.step()

        state[id(step)] = student
        return step

    med = interleaved_median({"student": make(None), "live": make(live), "store": make(store)},
                             repeats=repeats, warmup=2)
    return {k: v / steps for k, v in med.items()}


# ------------------------------------------------------------------------------------------------ main

def _ticker() -> Any:
    last = [time.perf_counter()]

    def tick(what: str) -> None:
        now = time.perf_counter()
        print(f"[teacher_cache] {what}: {now - last[0]:.1f} s", file=sys.stderr, flush=True)
        last[0] = now

    return tick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under 60 s on an idle machine")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    ap.add_argument("--write", action="store_true", help="with --quick: write the section anyway (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread gives steadier timings
    t_start = time.perf_counter()
    q = args.quick
    seeds = (0, 1) if q else (0, 1, 2)  # quick: 2 seeds, 2 LM k values, 1000 images (65 s -> < 45 s loaded)
    n_train, epochs, n_fid, n_tok, repeats, steps = (1000, 1, 500, 32, 9, 2) if q else (20000, 2, 10000, 512, 31, 4)
    teacher, teacher_src = fmnist_teacher(q)
    train, test = fmnist("train", n_train), fmnist("test", None if not q else 3000)
    t_acc = accuracy(teacher, test)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tick = _ticker()
        lm_rows, lm_note = fidelity_lm(work, n_tok, allow_compute=not q, ks=(1, 32) if q else KS)
        tick("fidelity lm")
        # the student distilled from the live teacher (seed 0) is the one whose gradients are compared
        acc, trained = accuracy_runs(teacher, train, test, work, seeds, epochs, q)
        tick("accuracy")
        fid = fidelity_fmnist(teacher, trained, work, n_fid)
        tick("fidelity fmnist")
        times = step_times(teacher, train, work, repeats, steps)
        tick("step times")
    x1 = train.x[:2]
    m_t, m_s = macs(teacher, x1), macs(StudentCNN(), x1)
    r_store, r_live_store = times["store"] / times["student"], times["live"] / times["store"]
    all_rows = fid + lm_rows
    size_ok = all(r["bytes"] <= r["bound"] for r in all_rows)

    fid_tab = markdown_table(
        ["teacher", "V", "k", "bytes/token (record)", "bytes/token (disk)", "bound", "KL(t‖rec)", "missing mass",
         "grad cos uniform T=1", "renorm T=1", "uniform T=4/2", "renorm T=4/2"],
        [[r["teacher"], r["V"], r["k"], f"{r['bytes']:.0f}", f"{r['disk_bytes']:.1f}", f"{r['bound']:.1f}",
          f"{r['kl']:.2e}", f"{r['missing']:.2e}", f"{r['cos_u_T1']:.5f}", f"{r['cos_r_T1']:.5f}",
          f"{r.get('cos_u_T4', r.get('cos_u_T2')):.5f}", f"{r.get('cos_r_T4', r.get('cos_r_T2')):.5f}"] for r in all_rows])
    acc_tab = markdown_table(["student trained from", f"test accuracy ({len(seeds)} seeds)"],
                             [[k, fmt_mean_std(v)] for k, v in acc.items()])
    time_tab = markdown_table(
        ["step", "median ms", "ratio"],
        [["(a) student alone (CE)", f"{times['student'] * 1e3:.2f}", "1.00"],
         ["(b) KD, live teacher", f"{times['live'] * 1e3:.2f}", f"{times['live'] / times['student']:.2f}"],
         ["(c) KD from the store (top-8, memory-mapped)", f"{times['store'] * 1e3:.2f}", f"{r_store:.2f}"]])
    goals = markdown_table(["goal", "measured", "met"], [
        ["(c)/(a) ≤ 1.10", f"{r_store:.3f}", "yes" if r_store <= 1.10 else "no"],
        ["(b)/(c) ≥ 1.7", f"{r_live_store:.2f}", "yes" if r_live_store >= 1.7 else "no"],
        ["top-k bytes/token ≤ k·(⌈log2 V⌉+16)/8+16 (every row above)", "see table", "yes" if size_ok else "no"]])
    md = f"""
Teacher: Fashion-MNIST CNN ({teacher_src}; test accuracy {t_acc:.4f}; {m_t:,} MACs/image), student CNN
({m_s:,} MACs/image, teacher/student = {m_t / m_s:.1f}×). LM: Gemma-3-270M's LM head (V = 262,144) on {lm_note};
its student is the same head over a 128-d random projection of the hidden state (gradients w.r.t. the student's
logits). Every store is written with `write_store` and read back through `StoreTeacher`.

**Fidelity** (Fashion-MNIST: {n_fid} test images; k ≥ V = 10 is exact, so k = 10 is shown instead of 32/128).
"bytes/token (record)" counts the view's fields (ids packed to ⌈log2 V⌉ bits, fp16 log-probs, fp32 missing mass);
"(disk)" divides every shard and index file by the rows, headers and sample ids included (a row is an image or a
token). KL at T = 1 to the reconstruction that spreads the missing mass uniformly. Gradient cosines: the student's
gradient (CNN: all parameters of the student distilled from the live teacher, seed 0; LM: logits) under the dense
teacher vs the store's top-k, missing mass spread uniformly or dropped (renormalised); last two columns at T = 4
(CNN) / T = 2 (LM).

{fid_tab}

**Accuracy** of the student CNN (KD T = 4, α = 0.9; {n_train} training images, {epochs} epoch(s), Adam 3e-3, batch
128, still.engine; test on {len(test)} images):

{acc_tab}

**Step time** (batch 128, forward + backward + Adam, one thread; median over {repeats} interleaved rounds of
{steps} steps each):

{time_tab}

{goals}
"""
    if not args.no_write and (not q or args.write):  # a quick run never overwrites the measured section
        write_section("Teacher cache", md)
    print(md)
    emit_json({
        "quick": q, "seconds": time.perf_counter() - t_start, "teacher_acc": t_acc, "macs_ratio": m_t / m_s,
        "step_ms": {k: v * 1e3 for k, v in times.items()}, "store_over_student": r_store,
        "live_over_store": r_live_store, "size_bound_met": size_ok,
        "accuracy": {k: mean_std(v) for k, v in acc.items()},
        "fidelity": [{k: r[k] for k in ("teacher", "k", "bytes", "bound", "kl", "cos_u_T1", "cos_r_T1")} for r in all_rows],
    })


if __name__ == "__main__":
    main()
