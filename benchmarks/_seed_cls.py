"""Classification seed methods (issue 6B) on Fashion-MNIST subsets: each method's student vs the same
student from scratch vs plain KD (T = 4, α = 0.9), same data, student and budget; test accuracy as
mean ± std over seeds.

Teachers: `fmnist_cnn` trained (CE, seed 0, cosine LR) on the *pool*: every Fashion-MNIST training
image outside the students' subset and DHO's validation images (56.5k by default), so no teacher has
seen a student image or its label. Trained once and cached (`$STILL_CACHE/bench/models`, keyed by
data, model and budget). Students see only their subset (the small-transfer-set setting of Hinton et
al. 2015, sec. 3, where KD helps: see the demo).

- TRG, LLaVA-KD: student `small_cnn` 8-16-32; tokens are the 7×7 feature maps (`features.2`, 49
  tokens) of both.
- DHO (1 % and 10 % labels): the pool teacher plays the paper's external VLM; the students see the
  semi-supervised subset (labelled samples repeated to balance the batches). Scratch = CE on the labelled part only;
  plain KD = 0.9·KD on all + 0.1·CE on labelled; DHO's mix (α, β) is picked on a held-out labelled
  validation set (500 training images outside both pools), never on the test split.
- DeGLA: `fmnist_captions` (two items side by side, caption [a, LEFT_OF, b], negatives swapped /
  replaced); `dual_encoder_tiny` pretrained once with plain CLIP, then fine-tuned per seed with plain
  CLIP ("scratch" column), NegCLIP = hard negatives without anchor ("plain KD" column: DeGLA has no
  external teacher, NegCLIP is the baseline it improves on) and DeGLA (EMA anchor, decay 0.9996).
  Metrics: compositional accuracy (true caption beats both negatives) and 90-way caption retrieval
  (the general ability the anchor should keep).
- LELP: binary Fashion-MNIST (tops {0, 2, 4, 6} vs the rest); teacher `fmnist_cnn` (2 classes, same pool), student
  an MLP (32 hidden) with a 2·5-way subclass head; LELP uses no label (α = 0, as in the paper).

Used by `benchmarks/seed_methods.py`: `rows(quick, seeds) -> list[dict]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

TASK = "Fashion-MNIST {n} train"
METRIC = "accuracy"
CLAIMS = {
    "kd_t1": "not a seed paper: Hinton KD at T = 1, α = 0.5, a check on the plain-KD column (T = 4, α = 0.9)",
    "trg": "CIFAR-100 R32x4→R8x4 77.23 vs KD 73.33 [A]",
    "llava_kd": "MLLM 1B student: +avg over 10 benchmarks vs SFT [A]; relation term ablation +0.6",
    "dho_1pct": "ImageNet 1% labels: +3.0 top-1 over the best semi-supervised KD baseline [A]",
    "dho_10pct": "ImageNet 10% labels: +0.1 to +1.9 top-1 over baselines [A]",
    "lelp": "Sentiment140 binary +0.88 over best baseline, +1.18 over KD [A]",
    "degla": "ARO/VALSE/SugarCrepe compositional +3.5 avg over prior SOTA, zero-shot +13.0 over NegCLIP-style [A]",
    "degla_retrieval": "keeps general (zero-shot) ability that hard-negative fine-tuning loses [A]",
}
TOPS = [[0, 2, 4, 6], [1, 3, 5, 7, 8, 9]]


@dataclass
class Budget:
    train: int = 3000
    test: int = 2000
    epochs: int = 15
    teacher_epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    max_steps: int | None = None
    pool: int | None = None            # teacher images (default: all the rest of the 60k)
    lr_schedule: str = "cosine"
    degla_epochs: int = 3              # DeGLA's dual encoder: CLIP pre-training (+2) and each fine-tuning


QUICK = Budget(train=256, test=128, epochs=1, teacher_epochs=1, batch_size=32, max_steps=4, pool=512, degla_epochs=1)


class ClsBench:
    def __init__(self, b: Budget) -> None:
        from still.data.base import TensorDataset
        from still.registry import DATASETS

        self.b = b
        full = DATASETS.build("fashion_mnist", split="train")
        perm = torch.from_numpy(__import__("numpy").random.default_rng(0).permutation(len(full)))
        pick = lambda idx: TensorDataset(full.x[idx], full.y[idx], 10, "fashion_mnist", {})  # noqa: E731
        self.train = pick(perm[: b.train])
        self.val = pick(perm[b.train : b.train + 500])  # DHO's mix selection
        end = None if b.pool is None else b.train + 500 + b.pool
        self.pool = pick(perm[b.train + 500 : end])    # the teachers' images, disjoint from both
        self.test = DATASETS.build("fashion_mnist", split="test", subset=b.test)
        self._teachers: dict[str, torch.nn.Module] = {}
        self.teacher_info: dict[str, dict[str, Any]] = {}

    def fit(self, model: torch.nn.Module, objective: Any, data: Any, seed: int, teacher: Any = None,
            views: dict[str, str] | None = None, epochs: int | None = None, batch_size: int | None = None,
            lr: float | None = None) -> torch.nn.Module:
        from _seed_common import fit

        b = self.b
        return fit(model, objective, data, seed, epochs=epochs or b.epochs, batch_size=batch_size or b.batch_size,
                   lr=lr or b.lr, max_steps=b.max_steps, teacher=teacher, views=views, lr_schedule=b.lr_schedule)

    @staticmethod
    @torch.no_grad()
    def acc(model: torch.nn.Module, data: Any) -> float:
        model.eval()
        pred = torch.cat([model(data.x[i : i + 512]).argmax(-1) for i in range(0, len(data), 512)])
        return float((pred == data.y).float().mean())

    def teacher(self, kind: str) -> torch.nn.Module:
        from still.methods.base import build_method
        from still.registry import MODELS

        from still.bench import cached_model

        if kind not in self._teachers:
            b = self.b
            data = {"pool": self.pool, "binary": self.binary("pool")}[kind]
            key = {"part": "seed_cls", "kind": kind, "model": "fmnist_cnn", "n": len(data), "train": b.train,
                   "pool": b.pool, "epochs": b.teacher_epochs, "batch": 128, "lr": 2e-3, "schedule": b.lr_schedule,
                   "max_steps": b.max_steps, "first": float(data.x[:64].sum()), "labels": int(data.y.sum())}

            def build() -> torch.nn.Module:
                torch.manual_seed(0)
                return MODELS.build("fmnist_cnn", num_classes=data.num_classes)

            fit = lambda m: self.fit(m, build_method("scratch").objective(), data, 0,  # noqa: E731
                                     epochs=b.teacher_epochs, batch_size=128, lr=2e-3)
            self._teachers[kind], self.teacher_info[kind] = cached_model(key, build, fit, name=f"seed_cls_{kind}")
        return self._teachers[kind]

    def binary(self, split: str) -> Any:
        from still.data.base import TensorDataset

        ds = {"train": self.train, "pool": self.pool, "test": self.test}[split]
        y = torch.zeros_like(ds.y)
        for c in TOPS[1]:
            y[ds.y == c] = 1
        return TensorDataset(ds.x, y, 2, "fashion_mnist_tops", {})

    def semi(self, fraction: float) -> Any:
        """self.train with a stratified `fraction` of labels kept (rest -100), labelled samples repeated
        to balance the batches (the same rule as the `semi_supervised` dataset with balance=True)."""
        import numpy as np

        from still.data.base import TensorDataset

        rng = np.random.default_rng(0)
        y = self.train.y.clone()
        keep = np.zeros(len(y), dtype=bool)
        for c in range(10):
            idx = np.flatnonzero(self.train.y.numpy() == c)
            if len(idx):
                keep[rng.choice(idx, size=max(1, int(round(fraction * len(idx)))), replace=False)] = True
        y[torch.from_numpy(~keep)] = -100
        lab = np.flatnonzero(keep)
        reps = max(0, int((~keep).sum()) // max(1, len(lab)) - 1)
        idx = torch.from_numpy(lab).repeat(reps)
        return TensorDataset(torch.cat([self.train.x, self.train.x[idx]]), torch.cat([y, y[idx]]), 10, "semi", {})


def degla_results(b: Budget, seeds: list[int]) -> dict[str, list[float]]:
    """Pretrain once (CLIP), fine-tune per seed with clip / negclip / degla; compositional and retrieval accuracy."""
    import copy

    from still.methods.base import build_method
    from still.registry import DATASETS, MODELS

    n_tr, n_te = (256, 128) if b.max_steps else (min(2000, b.train), 1000)
    tr = DATASETS.build("fmnist_captions", split="train", num_samples=n_tr)
    te = DATASETS.build("fmnist_captions", split="test", num_samples=n_te)
    pairs = torch.tensor([[a, 10, c] for a in range(10) for c in range(10) if a != c])

    def fit(m: torch.nn.Module, method: str, epochs: int, seed: int, lr: float) -> torch.nn.Module:
        from _seed_common import fit as fit_

        spec = build_method(method)
        t = spec.wrap_teacher(None, m) if spec.wrap_teacher else None
        return fit_(m, spec.objective(), tr, seed, epochs=epochs, batch_size=b.batch_size, lr=lr,
                    max_steps=b.max_steps, teacher=t, views=spec.student_views, inputs=["x", "text", "neg"])

    @torch.no_grad()
    def scores(m: torch.nn.Module) -> tuple[float, float]:
        comp = float((m(te.x, te.text, te.neg).argmax(-1) == 0).float().mean())
        v = torch.nn.functional.normalize(m.image(te.x), dim=-1)
        c = torch.nn.functional.normalize(m.encode_text(pairs), dim=-1)
        truth = (pairs.unsqueeze(0) == te.text.unsqueeze(1)).all(-1).float().argmax(-1)
        return comp, float(((v @ c.T).argmax(-1) == truth).float().mean())

    torch.manual_seed(0)
    pre = fit(MODELS.build("dual_encoder_tiny"), "clip", b.degla_epochs + 2, 0, b.lr)
    out: dict[str, list[float]] = {}
    out["pretrained"], out["pretrained_retrieval"] = map(lambda v: [v], scores(pre))
    for seed in seeds:
        for key, method in (("scratch_degla", "clip"), ("kd_degla", "negclip"), ("degla", "degla")):
            torch.manual_seed(seed)
            comp, ret = scores(fit(copy.deepcopy(pre).train(), method, b.degla_epochs, seed, b.lr / 3))
            out.setdefault(key, []).append(comp)
            out.setdefault(key.replace("degla", "degla_retrieval"), []).append(ret)
    return out


def _student(seed: int, name: str = "small_cnn", **kw: Any) -> torch.nn.Module:
    from still.registry import MODELS

    torch.manual_seed(seed)
    if name == "small_cnn":
        kw.setdefault("channels", [8, 16, 32])
    return MODELS.build(name, **kw)


def rows(quick: bool, seeds: list[int], budget: Budget | None = None, degla: bool = True) -> list[dict[str, Any]]:
    """One dict per method: scratch / kd / method accuracy mean ± std over `seeds`, the claim, a verdict.

    `budget` overrides the default (full) or QUICK budget; `degla=False` leaves the DeGLA rows out.
    """
    from _seed_common import row
    from still.losses.teacher_shaping import dho_select_mix
    from still.methods.base import build_method
    from still.teachers.base import LiveTeacher

    b = budget or (QUICK if quick else Budget())
    bench = ClsBench(b)
    res: dict[str, list[float]] = {}
    add = lambda k, v: res.setdefault(k, []).append(v)  # noqa: E731
    tok = {"logits": "", "tokens": "features.2"}
    main = pool = bench.teacher("pool")  # one teacher, disjoint from every student's images
    bench.teacher_info["main"] = bench.teacher_info["pool"]
    binary = bench.teacher("binary")
    bin_train, bin_test = bench.binary("train"), bench.binary("test")
    teacher_acc = {"main": bench.acc(main, bench.test), "pool": bench.acc(pool, bench.test),
                   "binary": bench.acc(binary, bin_test)}
    semis = {f: bench.semi(f) for f in (0.01, 0.1)}
    kd = build_method("kd", temperature=4.0, alpha=0.9)  # Hinton's setting, the table's plain-KD column
    kd_t1 = build_method("kd", temperature=1.0, alpha=0.5)  # a low-temperature check of that baseline
    for seed in seeds:
        add("scratch", bench.acc(bench.fit(_student(seed), build_method("scratch").objective(), bench.train, seed),
                                 bench.test))
        add("kd", bench.acc(bench.fit(_student(seed), kd.objective(), bench.train, seed,
                                      LiveTeacher(main, {"logits": ""})), bench.test))
        add("kd_t1", bench.acc(bench.fit(_student(seed), kd_t1.objective(), bench.train, seed,
                                         LiveTeacher(main, {"logits": ""})), bench.test))
        for m in ("trg", "llava_kd"):
            spec = build_method(m)
            add(m, bench.acc(bench.fit(_student(seed), spec.objective(), bench.train, seed, LiveTeacher(main, tok),
                                       tok), bench.test))
        for f, data in semis.items():
            k = f"{int(f * 100)}pct"
            add(f"scratch_{k}", bench.acc(bench.fit(_student(seed), build_method("scratch").objective(), data, seed),
                                          bench.test))
            add(f"kd_{k}", bench.acc(bench.fit(_student(seed), kd.objective(), data, seed,
                                               LiveTeacher(pool, {"logits": ""})), bench.test))
            spec = build_method("dho")
            torch.manual_seed(seed)
            from still.registry import MODELS

            st = MODELS.build("dual_head", backbone="small_cnn", backbone_params={"channels": [8, 16, 32]})
            bench.fit(st, spec.objective(), data, seed, LiveTeacher(pool, {"logits": ""}), spec.student_views)
            dho_select_mix(st, bench.val.x, bench.val.y)
            add(f"dho_{k}", bench.acc(st, bench.test))
        mlp = dict(name="mlp", num_classes=2, hidden=[32])
        add("scratch_bin", bench.acc(bench.fit(_student(seed, **mlp), build_method("scratch").objective(), bin_train,
                                               seed), bin_test))
        add("kd_bin", bench.acc(bench.fit(_student(seed, **mlp), kd.objective(), bin_train, seed,
                                          LiveTeacher(binary, {"logits": ""})), bin_test))
        spec = build_method("lelp", subclasses=5)
        lt = spec.wrap_teacher(LiveTeacher(binary, {"logits": "", "subclass_logits": ""}), None)
        spec.prepare(lt, None, bin_train)  # the pipeline does not call prepare yet
        st = _student(seed, "subclass_student", backbone="mlp", num_classes=2, subclasses=5,
                      backbone_params={"hidden": [32]})
        add("lelp", bench.acc(bench.fit(st, spec.objective(), bin_train, seed, lt, spec.student_views), bin_test))
    if degla:
        res.update(degla_results(b, seeds))
        teacher_acc["degla"] = res["pretrained"][0]
        teacher_acc["degla_retrieval"] = res["pretrained_retrieval"][0]
    out = []
    n = b.train
    layout = [("kd_t1", "scratch", "kd", f"{TASK.format(n=n)}, 10 classes", "main"),
              ("trg", "scratch", "kd", f"{TASK.format(n=n)}, 10 classes", "main"),
              ("llava_kd", "scratch", "kd", f"{TASK.format(n=n)}, 10 classes", "main"),
              ("dho_1pct", "scratch_1pct", "kd_1pct", f"{TASK.format(n=n)}, 1% labelled", "pool"),
              ("dho_10pct", "scratch_10pct", "kd_10pct", f"{TASK.format(n=n)}, 10% labelled", "pool"),
              ("lelp", "scratch_bin", "kd_bin", f"{TASK.format(n=n)}, binary tops vs rest", "binary"),
              ("degla", "scratch_degla", "kd_degla", "fmnist_captions: compositional acc (vs CLIP / NegCLIP)", "degla"),
              ("degla_retrieval", "scratch_degla_retrieval", "kd_degla_retrieval",
               "fmnist_captions: 90-way caption retrieval (vs CLIP / NegCLIP)", "degla_retrieval")]
    for m, sk, kk, task, tk in layout:
        if m in res:
            cols = {"scratch_column": "CLIP fine-tuning", "kd_column": "NegCLIP"} if m.startswith("degla") else {}
            out.append(row(m, task, METRIC, res, (sk, kk, m), CLAIMS[m], teacher_acc[tk], **cols,
                           teacher_source=bench.teacher_info.get(tk, {}).get("source")))
    return out
