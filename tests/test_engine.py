"""End-to-end tests of still.engine: KD on digits, exact resume after SIGKILL, DDP vs 1 process,
NaN handling, atomic checkpoints, gradient accumulation, teacher hooks."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from still import LiveTeacher, Objective, Term
from still.engine import NonFiniteLossError, TrainConfig, train
from still.engine import checkpoint as ckpt
from still.engine.logging import read_metrics
from still.losses.classic import cross_entropy, hinton_kd

SCRIPT = Path(__file__).parent / "_engine_scripts" / "digits_kd.py"
_spec = importlib.util.spec_from_file_location("digits_kd", SCRIPT)
digits_kd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits_kd)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test here (the shared fixture is in conftest.py)."""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if r["split"] == "train"]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


# (a) ----------------------------------------------------------------------------------------------
def test_kd_on_digits_learns_and_writes_run_directory(tmp_path: Path) -> None:
    data = digits_kd.digits()
    x, y = data.tensors["x"], data.tensors["y"]
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    assert _accuracy(teacher, x, y) > 0.97
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    acc0 = _accuracy(student, x, y)
    obj = Objective([Term("kd", partial(hinton_kd, temperature=4.0), student="logits", teacher="logits", weight=0.9),
                     Term("ce", cross_entropy, student="logits", target="y", weight=0.1, shape_check="none")])
    cfg = TrainConfig(epochs=3, batch_size=64, lr=2e-2, log_every=5, progress=False, lr_schedule="cosine",
                      warmup_steps=5)
    res = train(student, obj, data, cfg, teacher=LiveTeacher(teacher, {"logits": ""}),
                eval_fn=lambda m: {"accuracy": _accuracy(m, x, y)}, out_dir=tmp_path)

    assert res.steps == 3 * (len(data) // 64) and res.epochs == 3.0
    assert res.final_eval["accuracy"] > max(acc0 + 0.5, 0.85)
    assert res.best_eval["accuracy"] >= res.final_eval["accuracy"]
    recs = read_metrics(tmp_path)
    assert recs == res.history
    train_recs = [r for r in recs if r["split"] == "train"]
    evals = [r for r in recs if r["split"] == "eval"]
    assert len(evals) == 3 and all(r["eval"] is True for r in evals)  # one per epoch
    for key in ("step", "epoch", "loss/kd", "loss/ce", "weight/kd", "weight/ce", "total", "lr", "samples_per_s"):
        assert key in train_recs[0], key
    assert train_recs[0]["weight/kd"] == pytest.approx(0.9)
    assert train_recs[-1]["total"] < 0.5 * train_recs[0]["total"]
    assert train_recs[-1]["loss/kd"] < train_recs[0]["loss/kd"]
    # the logged total is the weighted sum of the logged terms (both averaged over the window)
    r = train_recs[-1]
    assert r["total"] == pytest.approx(0.9 * r["loss/kd"] + 0.1 * r["loss/ce"], rel=1e-5)
    for kind in ("last", "best"):
        d = tmp_path / "checkpoints" / kind
        for f in ("student.safetensors", "objective.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                  "state.json"):
            assert (d / f).is_file(), (kind, f)
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == res.steps and state["config"]["batch_size"] == 64
    last = load_file(str(tmp_path / "checkpoints" / "last" / "student.safetensors"))
    for k, v in student.state_dict().items():
        assert torch.equal(last[k], v)
    # everything loads under weights_only=True
    for f in ("optimizer", "scheduler", "rng"):
        ckpt.load_pickle(tmp_path / "checkpoints" / "last", f)


# (b) ----------------------------------------------------------------------------------------------
def _poll_step(state_file: Path) -> int:
    try:
        return int(json.loads(state_file.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_then_resume_reaches_the_same_weights(tmp_path: Path) -> None:
    steps = 60
    ref = tmp_path / "ref"
    digits_kd.run(str(ref), steps=steps)  # uninterrupted, in this process, 1 thread
    out = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), str(out), "--steps", str(steps), "--step-delay", "0.04"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state_file = out / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 90
    try:
        while _poll_step(state_file) < 10:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "the training subprocess never wrote a checkpoint"
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _poll_step(state_file)
    assert 0 < killed_at < steps
    done = subprocess.run(cmd[:3] + ["--steps", str(steps), "--resume"], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("student", "objective"):
        a = load_file(str(ref / "checkpoints" / "last" / f"{name}.safetensors"))
        b = load_file(str(out / "checkpoints" / "last" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after resume"
    # metrics.jsonl was cut back to the checkpoint and continued: same records as the reference
    ra, rb = _train_records(ref), _train_records(out)
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    assert [r["total"] for r in ra] == [r["total"] for r in rb]


# (c) ----------------------------------------------------------------------------------------------
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    steps = 20
    one = tmp_path / "one"
    digits_kd.run(str(one), batch_size=32, steps=steps, dropout=0.0, checkpoint_every=None, eval_every=10)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(two), "--batch-size", "16", "--steps", str(steps), "--dropout", "0", "--eval-every", "10"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r1, r2 = _train_records(one), _train_records(two)
    assert len(r1) == len(r2) == steps
    for a, b in zip(r1, r2):
        for key in ("total", "loss/kd", "loss/ce", "loss/hint"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # evaluations: the main process's figures are recorded and followed (rank 1's differ on purpose)
    e1 = [r for r in read_metrics(one) if r["split"] == "eval"]
    e2 = [r for r in read_metrics(two) if r["split"] == "eval"]
    assert [r["step"] for r in e2] == [10, 20]
    assert [r["accuracy"] for r in e2] == pytest.approx([r["accuracy"] for r in e1], rel=1e-6)
    assert (two / "checkpoints" / "best" / "state.json").is_file()
    # the 2-process run sees 2 x 16 samples per step, like the 1-process run
    assert json.loads((two / "checkpoints" / "last" / "state.json").read_text())["global_batch"] == 32
    for name in ("student", "objective"):
        a = load_file(str(one / "checkpoints" / "last" / f"{name}.safetensors"))
        b = load_file(str(two / "checkpoints" / "last" / f"{name}.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


# (d) ----------------------------------------------------------------------------------------------
class NonFiniteAfter(nn.Module):
    """MSE of two views that turns into `value` (nan/inf) from step `at` on."""

    def __init__(self, at: int, value: float) -> None:
        super().__init__()
        self.at, self.value, self.step = at, value, 0

    def set_progress(self, step: int, total: int) -> None:
        self.step = step

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = ((s - t) ** 2).mean()
        return v * self.value if self.step >= self.at else v


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_term_stops_with_name_step_and_checkpoint(tmp_path: Path, value: float) -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)
    obj = digits_kd.objective(adapter=False)
    obj = Objective(obj.terms + [Term("bad_term", NonFiniteAfter(7, value), student="logits", teacher="logits")])
    cfg = TrainConfig(max_steps=20, batch_size=32, log_every=10, checkpoint_every=5, progress=False)
    with pytest.raises(NonFiniteLossError) as e:
        train(student, obj, digits_kd.synthetic(), cfg, teacher=LiveTeacher(teacher, {"logits": ""}), out_dir=tmp_path)
    msg = str(e.value)
    assert "'bad_term'" in msg and "step 7" in msg, msg
    assert str(tmp_path / "checkpoints" / "last") in msg
    # the last good checkpoint is the one from before the bad step, untouched
    assert json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())["step"] == 5
    sd = load_file(str(tmp_path / "checkpoints" / "last" / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_non_finite_without_out_dir_says_so() -> None:
    teacher, student = digits_kd.models(0, dropout=0.0)
    obj = Objective([Term("kd_nan", NonFiniteAfter(0, float("nan")), student="logits", teacher="logits")])
    with pytest.raises(NonFiniteLossError, match=r"'kd_nan'.*step 0.*no checkpoint"):
        train(student, obj, digits_kd.synthetic(), TrainConfig(max_steps=3, batch_size=32, progress=False),
              teacher=LiveTeacher(teacher, {"logits": ""}))


# (e) ----------------------------------------------------------------------------------------------
def test_crash_while_writing_a_checkpoint_keeps_the_previous_last(tmp_path: Path, monkeypatch) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):  # 3 torch.save calls per checkpoint: fail inside the 2nd one
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        digits_kd.run(str(tmp_path), steps=20, checkpoint_every=5)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    last = tmp_path / "checkpoints" / "last"
    assert ckpt.read_state(last)["step"] == 5
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left
    res = digits_kd.run(str(tmp_path), steps=20, checkpoint_every=5, resume=True)
    assert res.steps == 20 and ckpt.read_state(last)["step"] == 20


def test_crash_between_the_two_renames_falls_back_to_the_old_copy(tmp_path: Path, monkeypatch) -> None:
    kw = dict(student={"w": torch.ones(2)}, objective={}, optimizer={}, scheduler={})
    ckpt.write_checkpoint(tmp_path / "last", state={"step": 1}, **kw)
    real_replace, calls = os.replace, {"n": 0}

    def replace(a, b):
        calls["n"] += 1
        if calls["n"] == 2:  # last -> .last.old went through; .tmp -> last "crashes"
            raise OSError("power cut (simulated)")
        return real_replace(a, b)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError):
        ckpt.write_checkpoint(tmp_path / "last", state={"step": 2}, **kw)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    src = ckpt.resolve(tmp_path / "last")
    assert src is not None and ckpt.read_state(src)["step"] == 1
    ckpt.write_checkpoint(tmp_path / "last", state={"step": 3}, **kw)
    assert ckpt.read_state(ckpt.resolve(tmp_path / "last"))["step"] == 3
    assert not (tmp_path / ".last.old").exists()


# (f) ----------------------------------------------------------------------------------------------
class ScaledMSE(nn.Module):
    """A stateful loss with its own parameter: mse(s * scale, t); `scale` starts at 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((s * self.scale - t) ** 2).mean()


def _accum_run(out: Path, batch_size: int, grad_accum: int, lr: float = 3e-3) -> tuple[nn.Module, Objective]:
    teacher, student = digits_kd.models(0, dropout=0.0)
    obj = digits_kd.objective(adapter=True)
    obj = Objective(obj.terms + [Term("scaled", ScaledMSE(), student="logits", teacher="logits", weight=0.1)])
    cfg = TrainConfig(max_steps=12, batch_size=batch_size, grad_accum=grad_accum, lr=lr, clip_grad_norm=1.0,
                      log_every=1, checkpoint_every=6, progress=False)
    train(student, obj, digits_kd.synthetic(), cfg, teacher=LiveTeacher(teacher, {"logits": "", "hidden": "1"}),
          student_views={"logits": "", "hidden": "1"}, out_dir=out)
    return student, obj


def test_grad_accumulation_matches_a_double_batch_and_trains_objective_params(tmp_path: Path) -> None:
    s_big, o_big = _accum_run(tmp_path / "big", 32, 1)
    s_acc, o_acc = _accum_run(tmp_path / "acc", 16, 2)
    for (k, a), b in zip(s_big.state_dict().items(), s_acc.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    for (k, a), b in zip(o_big.state_dict().items(), o_acc.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    r_big, r_acc = _train_records(tmp_path / "big"), _train_records(tmp_path / "acc")
    for a, b in zip(r_big, r_acc):
        assert b["total"] == pytest.approx(a["total"], rel=1e-5)
    # objective parameters (the stateful loss's scale, the lazy adapter) are optimised: with lr -> 0 the
    # adapter keeps its seeded initial weights, with the real lr it moves away from them
    assert float(o_acc.losses["scaled"].scale.detach()) != 1.0
    _, o_still = _accum_run(tmp_path / "still", 16, 2, lr=1e-12)
    w0 = o_still.state_dict()["adapters.hint.inner.weight"]
    assert not torch.allclose(w0, o_acc.state_dict()["adapters.hint.inner.weight"], atol=1e-4)
    saved = load_file(str(tmp_path / "acc" / "checkpoints" / "last" / "objective.safetensors"))
    assert {"losses.scaled.scale", "adapters.hint.inner.weight", "adapters.hint.inner.bias"} <= set(saved)
    n_params = len(list(s_acc.parameters())) + len(list(o_acc.parameters()))
    opt_state = ckpt.load_pickle(tmp_path / "acc" / "checkpoints" / "last", "optimizer")
    assert len(opt_state["state"]) == n_params
