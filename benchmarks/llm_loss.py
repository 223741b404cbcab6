"""LLM distillation loss: naive PyTorch vs TRL vs Liger (chunked, pure torch) vs still's chunked engine.

Each contender computes the loss *including the lm-head GEMMs* from hidden states (N, Hs) / (N, Ht) and
head weights (V, Hs) / (V, Ht), forward + backward (gradients for the student's hidden states and head),
with ~10% of the tokens ignored (labels = -100). Memory: peak bytes of live tensors created during one
step (`still.bench.PeakMemory`, a TorchDispatchMode; inputs and weights are not counted). Time: median of
interleaved repetitions. Goals (issue 3): still's peak ≤ 1/5 of naive; still's peak grows ≤ 1.3× when N
grows 4×; still's time ≤ 1.15× naive, for forward KL and JSD(0.5).

    python benchmarks/llm_loss.py            # N=4096, Hs=512, Ht=1024, V=32k and 128k (minutes on 2 CPU cores)
    python benchmarks/llm_loss.py --quick    # a small shape, < 60 s; the same ratios as JSON on the last line

Naive variants whose estimated peak exceeds `--max-naive-gb` are skipped (and said so): at N=4096 and
V=128k, naive JSD needs ≈ 13 fp32 copies of (N, V) ≈ 26 GB.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from still.bench import PeakMemory, emit_json, interleaved_median, markdown_table, write_section  # noqa: E402
from still.losses.chunked import chunked_distill_loss, default_chunk_size  # noqa: E402

# fp32 (N, V) copies alive at the peak (measured at the quick shape), used only to skip runs that would not fit
PEAK_COPIES = {("naive", "forward_kl"): 8, ("naive", "jsd"): 13, ("trl", "forward_kl"): 10, ("trl", "jsd"): 17}


def make_inputs(n: int, hs: int, ht: int, v: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    return {
        "hs": torch.randn(n, hs, generator=g).to(dtype).requires_grad_(),
        "ws": (torch.randn(v, hs, generator=g) / math.sqrt(hs)).to(dtype).requires_grad_(),
        "ht": torch.randn(n, ht, generator=g).to(dtype),
        "wt": (torch.randn(v, ht, generator=g) / math.sqrt(ht)).to(dtype),
        "labels": labels,
    }


def _zero(x: dict[str, torch.Tensor]) -> None:
    x["hs"].grad = x["ws"].grad = None


def naive_step(x: dict[str, torch.Tensor], div: str) -> Callable[[], float]:
    """What one writes without a framework: full logits, fp32 log-softmax, masked mean."""

    def step() -> float:
        _zero(x)
        zs = (x["hs"] @ x["ws"].t()).float()
        with torch.no_grad():
            zt = (x["ht"] @ x["wt"].t()).float()
        m = x["labels"] != -100
        ls, lt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
        if div == "forward_kl":
            rows = (lt.exp() * (lt - ls)).sum(-1)
        else:
            lm = torch.logaddexp(lt + math.log(0.5), ls + math.log(0.5))
            rows = 0.5 * (lt.exp() * (lt - lm)).sum(-1) + 0.5 * (ls.exp() * (ls - lm)).sum(-1)
        loss = (rows * m).sum() / m.sum().clamp_min(1)
        loss.backward()
        return float(loss.detach())

    return step


def trl_step(x: dict[str, torch.Tensor], div: str) -> Callable[[], float] | None:
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except Exception:  # noqa: BLE001 - an optional contender
        return None

    def step() -> float:
        _zero(x)
        zs = x["hs"] @ x["ws"].t()
        with torch.no_grad():
            zt = x["ht"] @ x["wt"].t()
        loss = GKDTrainer.generalized_jsd_loss(zs[None].float(), zt[None].float(), labels=x["labels"][None],
                                               beta=0.0 if div == "forward_kl" else 0.5)
        loss.backward()
        return float(loss.detach())

    return step


def liger_step(x: dict[str, torch.Tensor], div: str) -> Callable[[], float] | None:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception:  # noqa: BLE001
        return None
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0 if div == "forward_kl" else 0.5,
                                 compiled=False)

    def step() -> float:
        _zero(x)
        loss = fn(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"])
        loss.backward()
        return float(loss.detach())

    return step


CHUNK: int | None = None  # --chunk-size (None: the engine default, ~32 MiB of fp32 logits, >= 128 tokens)


def still_step(x: dict[str, torch.Tensor], div: str) -> Callable[[], float]:
    params = {"beta": 0.5} if div == "jsd" else {}

    def step() -> float:
        _zero(x)
        loss = chunked_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], labels=x["labels"], divergence=div,
                                    divergence_params=params, chunk_size=CHUNK)
        loss.backward()
        return float(loss.detach())

    return step


def gemm_floor(x: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The four lm-head GEMMs alone (student fwd, teacher fwd, grad_h, grad_W): the compute floor."""

    def step() -> None:
        with torch.no_grad():
            zs = x["hs"] @ x["ws"].t()
            zt = x["ht"] @ x["wt"].t()
            zs @ x["ws"], zs.t() @ x["hs"]
            del zt

    return step


def peak(fn: Callable[[], Any]) -> tuple[int, float, float]:
    """(peak live bytes, the step's value, its wall seconds) of one run under the tracker."""
    gc.collect()
    t0 = time.perf_counter()
    with PeakMemory() as m:
        val = fn()
    return m.peak, val, time.perf_counter() - t0


def extrapolated_peak(name: str, div: str, n: int, hs: int, ht: int, v: int, dtype: torch.dtype) -> tuple[float, str]:
    """Peak MB at N=n estimated from real runs at n/16 and n/8: every large tensor of these contenders is
    (N, V) (or of fixed size, e.g. grad_W), so the peak is a + b·N; the fit is checked where a real run exists."""
    pts = []
    for m in (n // 16, n // 8):
        x = make_inputs(m, hs, ht, v, dtype, seed=2)
        f = {"naive": naive_step, "trl": trl_step, "liger": liger_step, "still": still_step}[name](x, div)
        if f is None:
            return float("nan"), "not importable"
        pts.append((m, peak(f)[0] / 2**20))
        del x, f
        gc.collect()
    (n1, p1), (n2, p2) = pts
    est = p1 + (p2 - p1) * (n - n1) / (n2 - n1)
    return est, f"estimate: linear in N from real peaks at N={n1} ({p1:,.0f} MB) and N={n2} ({p2:,.0f} MB)"


def run_shape(n: int, hs: int, ht: int, v: int, dtype: torch.dtype, repeats: int, max_naive_gb: float,
              contenders: list[str], estimate: bool = False) -> dict[str, Any]:
    x = make_inputs(n, hs, ht, v, dtype)
    x_small = make_inputs(n // 4, hs, ht, v, dtype, seed=1)
    out: dict[str, Any] = {"N": n, "V": v, "chunk": CHUNK or default_chunk_size(v, n), "divs": {}}
    for div in ("forward_kl", "jsd"):
        steps: dict[str, Callable[[], Any]] = {}
        skipped: dict[str, str] = {}
        for name in contenders:
            est_gb = PEAK_COPIES.get((name, div), 0) * n * v * 4 / 2**30
            if est_gb > max_naive_gb:
                skipped[name] = f"skipped: estimated peak {est_gb:.1f} GB > --max-naive-gb {max_naive_gb}"
                continue
            f = {"naive": naive_step, "trl": trl_step, "liger": liger_step, "still": still_step}[name](x, div)
            if f is None:
                skipped[name] = "not importable"
                continue
            steps[name] = f
        res: dict[str, Any] = {"skipped": skipped, "peak_mb": {}, "loss": {}, "time_s": {}, "estimated_mb": {}}
        once: dict[str, float] = {}
        for name, f in steps.items():
            b, val, once[name] = peak(f)
            res["peak_mb"][name], res["loss"][name] = b / 2**20, val
            print(f"  {div} {name}: peak {b / 2**20:,.0f} MB, {once[name]:.1f} s", flush=True)
        res["still_peak_mb_quarter_n"] = peak(still_step(x_small, div))[0] / 2**20
        if estimate:  # contenders too large to run: peak extrapolated from smaller N (and checked on run ones)
            for name in list(skipped) + ([c for c in ("naive", "trl") if c in steps]):
                if skipped.get(name, "").startswith("not importable"):
                    continue
                res["estimated_mb"][name] = extrapolated_peak(name, div, n, hs, ht, v, dtype)
        if repeats > 0:
            timed = dict(steps)
            if div == "forward_kl":
                timed["gemm_floor"] = gemm_floor(x)
            res["time_s"] = interleaved_median(timed, repeats=repeats, warmup=0 if n * v > 2**26 else 1)
        else:  # --repeats 0: one run per contender, the one measured for memory (the tracker's cost is per op)
            res["time_s"] = once
        out["divs"][div] = res
        print(f"N={n} V={v} {div}: peak MB {res['peak_mb']}, time s {res['time_s']}, skipped {skipped}", flush=True)
    del x, x_small
    gc.collect()
    return out


def ratios(shape: dict[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = {}
    for div, res in shape["divs"].items():
        p, t = res["peak_mb"], res["time_s"]
        key = f"V{shape['V']}_{div}"
        r[f"{key}_still_peak_growth_4xN"] = p["still"] / res["still_peak_mb_quarter_n"]
        if "naive" in p:
            r[f"{key}_naive_over_still_peak"] = p["naive"] / p["still"]
            r[f"{key}_still_over_naive_time"] = t["still"] / t["naive"]
        for other in ("trl", "liger"):
            if other in t:
                r[f"{key}_{other}_over_still_peak"] = p[other] / p["still"]
                r[f"{key}_still_over_{other}_time"] = t["still"] / t[other]
        for other, (mb, _) in res.get("estimated_mb", {}).items():
            if other in res["skipped"] and mb == mb:
                r[f"{key}_{other}_over_still_peak_estimate"] = mb / p["still"]
        if "gemm_floor" in t:
            r[f"{key}_still_over_gemm_floor_time"] = t["still"] / t["gemm_floor"]
    return r


def markdown(shapes: list[dict[str, Any]], args: argparse.Namespace, all_ratios: dict[str, Any]) -> str:
    rows = []
    for sh in shapes:
        rows.append([sh["N"], sh["V"], "—", f"still chunk = {sh['chunk']} tokens", "—", "—", "—", ""])
        for div, res in sh["divs"].items():
            est = res.get("estimated_mb", {})
            for name in ("naive", "trl", "liger", "still"):
                if name in res["skipped"]:
                    why = res["skipped"][name]
                    if name in est:
                        mb, how = est[name]
                        ratio = f"; {mb / res['peak_mb']['still']:.2f}× still's peak" if "still" in res["peak_mb"] else ""
                        why += f". Peak {how}: **~{mb:,.0f} MB**{ratio}"
                    rows.append([sh["N"], sh["V"], div, name, "—", "—", "—", why])
                    continue
                if name not in res["peak_mb"]:
                    continue
                pk, tm = res["peak_mb"][name], res["time_s"][name]
                vs = ""
                ref = "naive" if "naive" in res["peak_mb"] else "liger" if "liger" in res["peak_mb"] else None
                if ref and name != ref:
                    vs = (f"{res['peak_mb'][ref] / pk:.2f}× less memory than {ref}, "
                          f"{tm / res['time_s'][ref]:.2f}× its time")
                if name in est:
                    vs += f" (check of the N-extrapolation: {est[name][0]:,.0f} MB predicted)"
                rows.append([sh["N"], sh["V"], div, name, f"{pk:,.0f}", f"{tm:.3f}", f"{res['loss'][name]:.5f}", vs])
            if "gemm_floor" in res["time_s"]:
                rows.append([sh["N"], sh["V"], "—", "4 lm-head GEMMs alone", "—", f"{res['time_s']['gemm_floor']:.3f}",
                             "—", "compute floor"])
            rows.append([sh["N"] // 4, sh["V"], div, "still", f"{res['still_peak_mb_quarter_n']:,.0f}", "—", "—",
                         f"peak growth N/4→N: {res['peak_mb']['still'] / res['still_peak_mb_quarter_n']:.2f}×"])
    table = markdown_table(["N", "V", "divergence", "implementation", "peak live MB", "median s", "loss",
                            "vs naive (or Liger where naive does not fit)"], rows)
    goals = []
    for k, v in sorted(all_ratios.items()):
        if k.endswith("naive_over_still_peak"):
            goals.append(f"- {k}: {v:.2f} (goal ≥ 5) {'PASS' if v >= 5 else 'FAIL'}")
        elif k.endswith("naive_over_still_peak_estimate"):
            goals.append(f"- {k}: {v:.2f} (goal ≥ 5; naive too large to run here, its peak estimated) "
                         f"{'PASS (estimate)' if v >= 5 else 'FAIL (estimate)'}")
        elif k.endswith("peak_growth_4xN"):
            goals.append(f"- {k}: {v:.2f} (goal ≤ 1.3) {'PASS' if v <= 1.3 else 'FAIL'}")
        elif k.endswith("still_over_naive_time"):
            goals.append(f"- {k}: {v:.2f} (goal ≤ 1.15) {'PASS' if v <= 1.15 else 'FAIL'}")
    timing = (f"{args.repeats} interleaved repeats (median)" if args.repeats > 0 else
              "time = one run per contender (the run measured for memory; no interleaving, no GEMM-floor row)")
    head = (f"Hidden {args.ht} (teacher) / {args.hs} (student), dtype {args.dtype}, forward+backward including the "
            f"lm-head GEMMs, 10% of tokens ignored, {timing}, "
            f"{torch.get_num_threads()} threads, CPU shared with other jobs (timings are noisy). Liger = "
            "`LigerFusedLinearJSDLoss(compiled=False)` (pure-torch chunked path, runs on CPU; β=0 for forward KL). "
            "TRL = `GKDTrainer.generalized_jsd_loss` on full logits (β=0 for forward KL). No GPU was available for "
            "this run, so the bf16 N=8192, V=128k GPU comparison with Liger's published figures is not here.")
    return head + "\n\n" + table + "\n\nGoals:\n" + "\n".join(goals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--hs", type=int, default=512)
    ap.add_argument("--ht", type=int, default=1024)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved timing repeats; 0: time the single run measured for memory (huge shapes)")
    ap.add_argument("--estimate-skipped", action="store_true",
                    help="for contenders skipped by --max-naive-gb, estimate the peak from real runs at N/16 and N/8")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 2; --quick: 1, because its chunks are tiny and on a shared 2-core "
                         "box OpenMP barriers between many small ops dominate, which says nothing about the engine)")
    ap.add_argument("--max-naive-gb", type=float, default=8.0)
    ap.add_argument("--chunk-size", type=int, default=None, help="still's tokens per chunk (default: the engine's)")
    ap.add_argument("--contenders", nargs="+", default=["naive", "trl", "liger", "still"])
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--section", default=None, help="BENCHMARKS.md section (default: llm_loss, or llm_loss (quick))")
    args = ap.parse_args()
    if args.quick:
        # N/chunk = 16 as at the full shape (4096 / 256), so the memory ratios mean the same thing
        args.tokens, args.vocab, args.hs, args.ht, args.repeats = 1024, [4096], 64, 128, 3
        args.chunk_size = args.chunk_size or 64
    global CHUNK
    CHUNK = args.chunk_size
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    shapes: list[dict[str, Any]] = []
    all_ratios: dict[str, Any] = {}
    for v in args.vocab:  # the section is rewritten after every shape, so a long run keeps what it measured
        shapes.append(run_shape(args.tokens, args.hs, args.ht, v, dtype, args.repeats, args.max_naive_gb,
                                args.contenders, args.estimate_skipped))
        all_ratios.update(ratios(shapes[-1]))
        if not args.no_write:
            write_section(args.section or ("llm_loss (quick)" if args.quick else "llm_loss"),
                          markdown(shapes, args, all_ratios))
    emit_json({"quick": args.quick, "N": args.tokens, "dtype": args.dtype, "gpu": torch.cuda.is_available(),
               **{k: round(v, 4) for k, v in all_ratios.items()}})


if __name__ == "__main__":
    main()
