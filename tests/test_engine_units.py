"""Unit tests of still.engine's pieces: sampler, LR schedule, config checks, RNG state, teacher hooks,
loggers, set-up errors."""

from __future__ import annotations

import importlib.util
import math
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from still import LiveTeacher, Objective, Teacher, Term
from still.engine import InMemoryDataset, RankBatchSampler, TrainConfig, train
from still.engine import checkpoint as ckpt
from still.engine.data import collate, epoch_permutation
from still.engine.loop import Plan, lr_factor
from still.losses.classic import hinton_kd
from still.objective import ShapeMismatchError

_spec = importlib.util.spec_from_file_location("digits_kd", Path(__file__).parent / "_engine_scripts" / "digits_kd.py")
digits_kd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits_kd)


def _kd_objective() -> Objective:
    return Objective([Term("kd", partial(hinton_kd, temperature=2.0), student="logits", teacher="logits")])


# -- sampler ------------------------------------------------------------------------------------------
def test_rank_slices_tile_the_one_process_global_batches() -> None:
    one = list(RankBatchSampler(103, 8, seed=3, epoch=2))
    r0 = list(RankBatchSampler(103, 4, seed=3, epoch=2, rank=0, world_size=2))
    r1 = list(RankBatchSampler(103, 4, seed=3, epoch=2, rank=1, world_size=2))
    assert len(one) == len(r0) == len(r1) == 103 // 8  # the incomplete last batch is dropped
    for b, a0, a1 in zip(one, r0, r1):
        assert b == a0 + a1
    flat = [i for b in one for i in b]
    assert len(set(flat)) == len(flat) == 12 * 8


def test_sampler_start_skips_exactly_the_done_batches_and_epochs_differ() -> None:
    full = list(RankBatchSampler(50, 5, seed=0, epoch=1))
    assert list(RankBatchSampler(50, 5, seed=0, epoch=1, start=4)) == full[4:]
    assert len(RankBatchSampler(50, 5, seed=0, epoch=1, start=4)) == 6
    assert not torch.equal(epoch_permutation(50, 0, 0), epoch_permutation(50, 0, 1))
    assert torch.equal(epoch_permutation(50, 0, 1), epoch_permutation(50, 0, 1))
    assert sorted(epoch_permutation(50, 7, 3).tolist()) == list(range(50))


def test_in_memory_dataset_batched_fetch_and_collate() -> None:
    ds = InMemoryDataset(x=torch.arange(12.0).reshape(6, 2), y=torch.arange(6))
    one = ds[4]
    assert one["x"].tolist() == [8.0, 9.0] and int(one["index"]) == 4
    b = collate(ds.__getitems__([5, 1]))
    assert b["x"].shape == (2, 2) and b["y"].tolist() == [5, 1] and b["index"].tolist() == [5, 1]
    stacked = collate([ds[5], ds[1]])
    assert all(torch.equal(stacked[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="differ in length"):
        InMemoryDataset(x=torch.zeros(3), y=torch.zeros(4))


def test_plan_counts_steps_and_refuses_too_little_data() -> None:
    p = Plan.make(100, TrainConfig(batch_size=8, grad_accum=3, epochs=2), world=2)
    assert (p.global_batch, p.steps_per_epoch, p.batches_per_epoch, p.total_steps) == (16, 2, 6, 4)
    assert Plan.make(100, TrainConfig(batch_size=8, max_steps=50), world=1).total_steps == 50
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        Plan.make(10, TrainConfig(batch_size=8, grad_accum=2), world=1)


# -- LR schedule and config --------------------------------------------------------------------------
def test_lr_factor_warmup_then_shapes() -> None:
    f = lr_factor(TrainConfig(lr_schedule="cosine", warmup_steps=10), 110)
    assert [f(0), f(5), f(10)] == [0.0, 0.5, 1.0]
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    lin = lr_factor(TrainConfig(lr_schedule="linear"), 100)
    assert lin(0) == 1.0 and lin(25) == pytest.approx(0.75)
    step = lr_factor(TrainConfig(lr_schedule="step", lr_milestones=(0.5, 0.75), lr_gamma=0.1), 100)
    assert [step(10), step(50), step(80)] == pytest.approx([1.0, 0.1, 0.01])
    assert lr_factor(TrainConfig(), 100)(99) == 1.0
    frac = lr_factor(TrainConfig(lr_schedule="cosine", warmup_steps=1 / 11), 110)  # a fraction: 10 of 110 steps
    assert [frac(k) for k in (0, 5, 10, 60)] == [f(k) for k in (0, 5, 10, 60)]
    assert lr_factor(TrainConfig(warmup_steps=0.05), 99)(3) == pytest.approx(3 / 4)  # int(0.05 * 99) = 4
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="warmup_steps"):
            TrainConfig(warmup_steps=bad)


def test_the_scheduler_drives_the_optimizer_lr(tmp_path: Path) -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)
    cfg = TrainConfig(max_steps=8, batch_size=32, lr=0.1, optimizer="sgd", lr_schedule="linear", warmup_steps=2,
                      log_every=1, progress=False)
    res = train(student, _kd_objective(), digits_kd.synthetic(), cfg, teacher=LiveTeacher(teacher, {"logits": ""}))
    f = lr_factor(cfg, 8)
    assert [r["lr"] for r in res.history] == pytest.approx([0.1 * f(s) for s in range(8)])


@pytest.mark.parametrize("field,value,match", [
    ("optimizer", "lion", "adamw | adam | sgd"), ("lr_schedule", "poly", "constant"),
    ("mixed_precision", "fp8", "bf16"), ("best_mode", "up", "max"), ("grad_accum", 0, ">= 1"),
    ("eval_every", 0, "None or an integer"), ("lr", 0.0, "positive"),
])
def test_config_rejects_bad_values_naming_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}=.*{match}"):
        TrainConfig(**{field: value})


# -- RNG state --------------------------------------------------------------------------------------
def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and np.array_equal(want[2], got[2])
    assert want[3] == got[3]


# -- teacher hooks and teacher state ------------------------------------------------------------------
class EmaSelfTeacher(Teacher):
    """Self-distillation through the hooks: reads the student's views, updates an EMA after each step."""

    uses_student_views = True

    def __init__(self) -> None:
        self.view_specs = {"logits": ""}
        self.ema = torch.zeros(10)
        self.calls = {"views": 0, "after_step": 0}

    def views(self, batch, names, student_views=None):
        assert student_views is not None and "logits" in student_views
        self.calls["views"] += 1
        return {"logits": student_views["logits"].detach() * 0.5 + self.ema}

    def after_step(self, student: nn.Module) -> None:
        self.calls["after_step"] += 1
        self.ema = 0.9 * self.ema + 0.1 * student[-1].bias.detach()

    def fingerprint(self) -> str:
        return "ema"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ema": self.ema.clone()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.ema = sd["ema"].clone()


def test_teacher_hooks_and_teacher_state_in_the_checkpoint(tmp_path: Path) -> None:
    _, student = digits_kd.models(0, dropout=0.0)
    t = EmaSelfTeacher()
    cfg = TrainConfig(max_steps=6, batch_size=32, progress=False)
    train(student, _kd_objective(), digits_kd.synthetic(), cfg, teacher=t, out_dir=tmp_path)
    assert t.calls["after_step"] == 6
    assert t.calls["views"] == 6 + 1  # one validation batch, then one per step
    saved = ckpt.load_tensors(tmp_path / "checkpoints" / "last", "teacher")
    assert saved is not None and torch.equal(saved["ema"], t.ema) and t.ema.abs().sum() > 0
    t2 = EmaSelfTeacher()
    _, student2 = digits_kd.models(0, dropout=0.0)
    train(student2, _kd_objective(), digits_kd.synthetic(), TrainConfig(max_steps=8, batch_size=32, progress=False),
          teacher=t2, out_dir=tmp_path, resume=True)
    assert t2.calls["after_step"] == 2  # resumed at step 6, with the saved EMA


# -- set-up errors, before any training --------------------------------------------------------------
def test_setup_errors_surface_before_the_first_step() -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)
    data, lt = digits_kd.synthetic(), LiveTeacher(teacher, {"logits": "", "hidden": "1"})
    cfg = TrainConfig(max_steps=2, batch_size=32, progress=False)
    hint = Objective([Term("hint", digits_kd.mse, student="hidden", teacher="hidden", shape_check="same")])
    with pytest.raises(ShapeMismatchError, match="hint.*32.*96"):
        train(student, hint, data, cfg, teacher=lt, student_views={"hidden": "1"})
    with pytest.raises(ValueError, match=r"student view\(s\) \['hidden'\]"):
        train(student, hint, data, cfg, teacher=lt, student_views={"logits": ""})
    with pytest.raises(ValueError, match="no teacher was given"):
        train(student, _kd_objective(), data, cfg)
    with pytest.raises(ValueError, match="resume=True needs the out_dir"):
        train(student, _kd_objective(), data, cfg, teacher=lt, resume=True)


def test_resume_refuses_a_different_global_batch(tmp_path: Path) -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)
    lt = LiveTeacher(teacher, {"logits": ""})
    train(student, _kd_objective(), digits_kd.synthetic(), TrainConfig(max_steps=3, batch_size=32, progress=False),
          teacher=lt, out_dir=tmp_path)
    with pytest.raises(ValueError, match="global_batch=32.*global_batch=16"):
        train(student, _kd_objective(), digits_kd.synthetic(), TrainConfig(max_steps=6, batch_size=16, progress=False),
              teacher=lt, out_dir=tmp_path, resume=True)


# -- loggers and precision ------------------------------------------------------------------------------
def test_tensorboard_event_files_and_mlflow_error(tmp_path: Path) -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)
    lt = LiveTeacher(teacher, {"logits": ""})
    train(student, _kd_objective(), digits_kd.synthetic(), TrainConfig(max_steps=3, batch_size=32, progress=False,
          log_every=1, tensorboard=True), teacher=lt, out_dir=tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(ImportError, match="mlflow.*not installed"):
            train(student, _kd_objective(), digits_kd.synthetic(),
                  TrainConfig(max_steps=1, batch_size=32, progress=False, mlflow=True), teacher=lt)


def test_bf16_autocast_run_is_finite_and_learns() -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)
    res = train(student, _kd_objective(), digits_kd.synthetic(),
                TrainConfig(max_steps=20, batch_size=32, lr=1e-2, log_every=1, progress=False, mixed_precision="bf16"),
                teacher=LiveTeacher(teacher, {"logits": ""}))
    totals = [r["total"] for r in res.history]
    assert all(math.isfinite(v) for v in totals) and totals[-1] < totals[0]
    # the next fp32 run in the same process is not blocked by accelerate's global state
    res = train(student, _kd_objective(), digits_kd.synthetic(), TrainConfig(max_steps=2, batch_size=32, progress=False),
                teacher=LiveTeacher(teacher, {"logits": ""}))
    assert res.steps == 2


# -- evaluation cadence, best checkpoint, resuming a finished run -----------------------------------------
def test_eval_every_steps_best_min_mode_and_resume_of_a_finished_run(tmp_path: Path) -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)
    lt = LiveTeacher(teacher, {"logits": ""})
    scores = iter([5.0, 3.0, 4.0, 6.0, 7.0, 8.0])  # best (lowest) at the 2nd evaluation
    cfg = TrainConfig(max_steps=12, batch_size=32, eval_every=4, eval_every_epochs=None, best_metric="loss",
                      best_mode="min", progress=False)
    res = train(student, _kd_objective(), digits_kd.synthetic(), cfg, teacher=lt,
                eval_fn=lambda m: {"acc": 0.0, "loss": next(scores)}, out_dir=tmp_path)
    evals = [r for r in res.history if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert res.best_eval == {"step": 8, "acc": 0.0, "loss": 3.0} and res.final_eval["loss"] == 4.0
    assert ckpt.read_state(tmp_path / "checkpoints" / "best")["step"] == 8
    again = train(student, _kd_objective(), digits_kd.synthetic(), cfg, teacher=lt,
                  eval_fn=lambda m: {"acc": 0.0, "loss": 99.0}, out_dir=tmp_path, resume=True)
    assert again.steps == 12 and again.final_eval == {"acc": 0.0, "loss": 4.0} and again.best_eval["step"] == 8
    assert again.history == res.history
    with pytest.warns(UserWarning, match="earlier run"):
        train(student, _kd_objective(), digits_kd.synthetic(), TrainConfig(max_steps=2, batch_size=32, progress=False),
              teacher=lt, out_dir=tmp_path)
    assert not (tmp_path / "checkpoints" / "best").exists()


def test_in_process_loader_and_worker_dataloader_give_the_same_batches() -> None:
    from still.engine.data import make_loader

    mem = InMemoryDataset(x=torch.randn(40, 3), y=torch.arange(40))
    plain = [{"x": mem.tensors["x"][i], "y": mem.tensors["y"][i], "index": torch.tensor(i)} for i in range(40)]
    kw = dict(seed=5, epoch=1, start=1, rank=1, world_size=2)
    fast = list(make_loader(mem, 4, **kw))
    workers = list(make_loader(mem, 4, num_workers=1, **kw))
    listed = list(make_loader(plain, 4, **kw))  # no __getitems__: samples are stacked by default_collate
    assert len(fast) == len(workers) == len(listed) == 40 // 8 - 1
    for a, b, c in zip(fast, workers, listed):
        for k in ("x", "y", "index"):
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


class KwStudent(nn.Module):
    """A student called with a keyword argument: `forward(features=(B, 64)) -> {"logits": (B, 10)}`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(features)}


def test_student_inputs_dict_outputs_and_load_student(tmp_path: Path) -> None:
    from still.engine import load_student

    teacher, _ = digits_kd.models(0, dropout=0.0)
    student = KwStudent()
    train(student, _kd_objective(), digits_kd.synthetic(), TrainConfig(max_steps=4, batch_size=32, progress=False),
          teacher=LiveTeacher(teacher, {"logits": ""}), student_views={"logits": "[logits]"},
          student_inputs={"features": "x"}, out_dir=tmp_path)
    fresh = KwStudent()
    load_student(tmp_path / "checkpoints" / "last", fresh)
    assert torch.equal(fresh.fc.weight, student.fc.weight)


def test_progress_bar_shows_live_loss_terms(capsys) -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)
    train(student, _kd_objective(), digits_kd.synthetic(), TrainConfig(max_steps=6, batch_size=32, log_every=2),
          teacher=LiveTeacher(teacher, {"logits": ""}))
    err = capsys.readouterr().err
    assert "6/6" in err and "kd=" in err and "total=" in err


def test_iterable_data_is_refused_with_a_clear_error() -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"x": torch.zeros(64)}

    with pytest.raises(TypeError, match="map-style data set"):
        train(student, _kd_objective(), Stream(), TrainConfig(max_steps=1, progress=False),
              teacher=LiveTeacher(teacher, {"logits": ""}))


def test_hot_path_shortcuts_match_the_general_code() -> None:
    """The engine's per-step shortcuts give what the general code gives: `InMemoryDataset.gather` (index_select)
    = `__getitems__`; a subclass's own `__getitems__` is still used; `to_device` on the CPU returns a new flat
    dict of the same tensors; `LossWindow.matrix` (one stack) = the per-value path (mixed dtypes and shapes)."""
    from still.engine.data import InProcessLoader, to_device
    from still.engine.logging import LossWindow

    ds = InMemoryDataset(x=torch.randn(10, 3, 2), y=torch.arange(10), index=torch.arange(10) * 7)
    ix = torch.tensor([4, 0, 9])
    got, ref = ds.gather(ix), ds.__getitems__(ix)
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)

    class Marked(InMemoryDataset):
        def __getitems__(self, idx):  # noqa: ANN001, ANN204
            return {**super().__getitems__(idx), "marked": torch.ones(len(idx))}

    sampler = RankBatchSampler(10, 2)
    assert all("marked" in b for b in InProcessLoader(Marked(x=torch.randn(10, 2)), sampler, collate))
    batch = {"x": torch.randn(2, 3), "y": torch.zeros(2)}
    moved = to_device(batch, torch.device("cpu"))
    assert moved is not batch and list(moved) == list(batch) and all(moved[k] is batch[k] for k in batch)
    nested = to_device({"a": [torch.ones(1)], "b": 3}, torch.device("cpu"))
    assert torch.equal(nested["a"][0], torch.ones(1)) and nested["b"] == 3

    class OneProcess:
        num_processes = 1

    steps = [[[torch.tensor(float(s + m + k)) for k in range(3)] for m in range(2)] for s in range(4)]
    fast = LossWindow(["a", "b", "total"])
    for s, v in enumerate(steps):
        fast.add(s, v, 0.1, None)
    mixed = LossWindow(["a", "b", "total"])
    for s, v in enumerate(steps):  # bf16 and (1,)-shaped values take the general path
        mixed.add(s, [[m[0].to(torch.bfloat16), m[1].reshape(1), m[2]] for m in v], 0.1, None)
    w_fast, w_mixed = fast.matrix(OneProcess()), mixed.matrix(OneProcess())
    assert w_fast.shape == (4, 3) and torch.equal(w_fast, w_mixed)
    assert torch.equal(w_fast[:, 0], torch.tensor([0.5, 1.5, 2.5, 3.5]))


def test_live_teacher_views_are_detached_eval_and_unknown_names_fail() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    teacher = LiveTeacher(net, {"logits": "", "hidden": "0"})
    net.train()  # someone switched it back: views still run it in eval mode
    x = torch.randn(5, 3)
    v = teacher.views({"x": x}, ["logits", "hidden"])
    assert not net.training and not v["logits"].requires_grad and v["hidden"].shape == (5, 4)
    torch.testing.assert_close(v["logits"], net(x))
    with pytest.raises(KeyError, match=r"no view\(s\) \['feat'\]; it serves \['hidden', 'logits'\]"):
        teacher.views({"x": x}, ["logits", "feat"])
