"""MMC (catalog 5.3) and CMD (catalog 5.4), both RECONSTRUCTED FROM THE ABSTRACT, as momentum
self-distillation pretraining of a tiny ViT (`ssl_vit_tiny`, 16 patches, d = 64) on unlabelled
Fashion-MNIST; representation quality = kNN accuracy (k = 20, cosine, majority vote) of the pooled
embedding on the test split with the training images as the memory. Mean ± std over seeds.

Columns: scratch = the same encoder untrained (random init, same seed); "plain KD" = plain DINO
(student on a random region crop, EMA teacher on the whole image, centring, CLS pooling); method =
MMC (50 % masked student, MIM + global + global→local + contrast) or CMD (gated-attention MIL
pooling, intra- and inter-level terms). Same data, epochs, batch, lr, EMA decay (0.99) and
temperatures (0.1 / 0.04) for all.

Used by `benchmarks/seed_methods.py`: `rows(quick, seeds)`; alone: `python benchmarks/_seed_ssl.py [--quick]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

SECTION = "Seed methods: MMC and CMD (5.3, 5.4), reconstructed from the abstract"
CLAIMS = {"mmc": "top-tier zero-shot segmentation across data sets, no numbers [A]",
          "cmd": "CUB / Cars / Aircraft: up to +10.14% over contemporary, +19.78% over SSL SOTA (top-1, Rank-1) [A]"}


@dataclass
class Budget:
    train: int = 2000
    test: int = 1000
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    max_steps: int | None = None


QUICK = Budget(train=128, test=64, epochs=1, batch_size=32, max_steps=3)


@torch.no_grad()
def embed(model: Any, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.encode(x[i:i + 512])[0] for i in range(0, len(x), 512)])


def knn_accuracy(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20) -> float:
    """Cosine kNN: majority vote of the k nearest training embeddings (ties: lowest class)."""
    a = torch.nn.functional.normalize(train_z, dim=1)
    b = torch.nn.functional.normalize(test_z, dim=1)
    idx = (b @ a.t()).topk(min(k, len(a)), dim=1).indices
    votes = torch.zeros(len(b), int(train_y.max()) + 1).scatter_add_(1, train_y[idx], torch.ones(idx.shape))
    return float((votes.argmax(1) == test_y).float().mean())


def results(b: Budget, seeds: list[int]) -> dict[str, list[float]]:
    from still.engine import TrainConfig, train
    from still.methods.base import build_method
    from still.registry import DATASETS, MODELS

    tr = DATASETS.build("fmnist_regions", split="train", subset=b.train)
    te = DATASETS.build("fashion_mnist", split="test", subset=b.test)
    variants = {"dino": ("dino_sd", {}, {"x": "region"}), "mmc": ("mmc", {"mask_ratio": 0.5}, ["x"]),
                "cmd": ("cmd", {"pool": "mil"}, ["x", "region"])}
    res: dict[str, list[float]] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        st = MODELS.build("ssl_vit_tiny")
        res.setdefault("scratch", []).append(knn_accuracy(embed(st, tr.x), tr.y, embed(st, te.x), te.y))
        for name, (method, kw, inputs) in variants.items():
            torch.manual_seed(seed)
            st = MODELS.build("ssl_vit_tiny", **kw)
            spec = build_method(method)
            cfg = TrainConfig(epochs=b.epochs, max_steps=b.max_steps, batch_size=b.batch_size, lr=b.lr, seed=seed,
                              progress=False, eval_every_epochs=None, log_every=10_000)
            train(st, spec.objective(), tr, cfg, teacher=spec.wrap_teacher(None, st),
                  student_views=spec.student_views, student_inputs=inputs)
            res.setdefault(name, []).append(knn_accuracy(embed(st, tr.x), tr.y, embed(st, te.x), te.y))
    return res


def _verdict(sm: float, ss: float, km: float, ks: float, mm: float, ms: float, n: int) -> str:
    """Higher is better; "beats" = the means differ by more than the two stds together."""
    if n < 2:
        return "no verdict (1 seed)"
    vs_scratch = ("beats the untrained encoder" if mm > sm + ss + ms
                  else "below the untrained encoder" if mm < sm - ss - ms
                  else "ties the untrained encoder (within std)")
    if mm > km + ks + ms:
        return "beats plain DINO; " + vs_scratch
    if mm >= km - ks - ms:
        return "ties plain DINO (within std); " + vs_scratch
    return "does not beat plain DINO here; " + vs_scratch


def rows(quick: bool, seeds: list[int], budget: Budget | None = None) -> list[dict[str, Any]]:
    from still.bench import mean_std

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    b = budget or (QUICK if quick else Budget())
    t0 = time.perf_counter()
    try:
        res = results(b, seeds)
    finally:
        torch.set_num_threads(threads)
    sm, ss = mean_std(res["scratch"])
    km, ks = mean_std(res["dino"])
    out = []
    for m in ("mmc", "cmd"):
        mm, ms = mean_std(res[m])
        out.append({"method": m, "task": f"Fashion-MNIST {b.train} unlabelled, kNN probe (reconstructed from the "
                    "abstract)", "metric": "kNN accuracy", "scratch_mean": sm, "scratch_std": ss, "kd_mean": km,
                    "kd_std": ks, "method_mean": mm, "method_std": ms, "paper_claim": CLAIMS[m],
                    "verdict": _verdict(sm, ss, km, ks, mm, ms, len(seeds)), "seeds": len(seeds), "teacher": None,
                    "kd_column": "plain DINO", "scratch_column": "untrained encoder"})
    wall = time.perf_counter() - t0
    for r in out:
        r["wall_s_part"] = wall
    return out


def write_rows(rows_: list[dict[str, Any]], note: str = "") -> str:
    from still.bench import markdown_table, write_section

    pct = lambda m, s: f"{100 * m:.2f} ± {100 * s:.2f}"  # noqa: E731
    header = ["method", "task", "untrained encoder", "plain DINO", "method", "paper's claim", "verdict"]
    table = [[r["method"], r["task"], pct(r["scratch_mean"], r["scratch_std"]), pct(r["kd_mean"], r["kd_std"]),
              pct(r["method_mean"], r["method_std"]), r["paper_claim"], r["verdict"]] for r in rows_]
    md = (f"{note}kNN accuracy (%), mean ± std over {rows_[0]['seeds'] if rows_ else 0} seeds; wall "
          f"{rows_[0]['wall_s_part'] if rows_ else 0:.0f} s at 1 thread. Both methods are reconstructed from "
          "their abstracts (no code, full texts not read): what is measured is our reading of them, at toy "
          "scale. Setup in benchmarks/_seed_ssl.py.\n\n" + markdown_table(header, table))
    write_section(SECTION, md, command="python benchmarks/_seed_ssl.py")
    return md


if __name__ == "__main__":
    import argparse
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from still.bench import emit_json

    ap = argparse.ArgumentParser(description="MMC / CMD seed methods alone")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args()
    bud = QUICK if args.quick else Budget()
    bud.epochs = args.epochs or bud.epochs
    got = rows(args.quick, list(range(args.seeds or (1 if args.quick else 3))), bud)
    for r in got:
        print(json.dumps(r))
    if not args.no_write and not args.quick:  # a quick run is a smoke test: print only
        write_rows(got, "Quick smoke run: not a result. " if args.quick else f"Budget: {bud}. ")
    emit_json({"part": "ssl", "rows": got})
