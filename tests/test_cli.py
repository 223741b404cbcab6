"""The `still` CLI: list / validate / run / report through `still.cli.main`, and the console script
in a subprocess (a run killed with SIGKILL and continued with `--resume` ends on the same weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from still.cli import main

ROOT = Path(__file__).resolve().parents[1]
STILL = Path(sys.executable).with_name("still")

TINY = {
    "name": "tiny",
    "data": {"name": "digits", "params": {"subset": 128}},
    "teacher": {"model": {"name": "mlp", "params": {"hidden": [32]}},
                "train": {"max_steps": 3, "batch_size": 16, "progress": False}},
    "student": {"model": {"name": "mlp", "params": {"hidden": [8]}}},
    "method": {"name": "kd"},
    "train": {"max_steps": 4, "batch_size": 16, "progress": False, "log_every": 1},
    "eval": {"latency_repeats": 2},
    "baseline": True,
}


def _write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_list_every_kind_and_papers(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "losses"]) == 0
    out = capsys.readouterr().out
    assert "kd" in out and "Hinton" in out and "paper" in out
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "scratch" in out and "Distilling the Knowledge" in out
    for kind in ("adapters", "schedules", "datasets", "models", "metrics"):
        assert main(["list", kind]) == 0
    out = capsys.readouterr().out
    for name in ("conv1x1", "cosine", "fashion_mnist", "fmnist_cnn", "top5"):
        assert name in out
    assert main(["list"]) == 0
    assert "losses (" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["list", "lossez"])


def test_validate_ok_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(ROOT / "recipes" / "digits_fitnets.yaml")]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "teacher view feat: (4, 128)" in out
    bad = dict(TINY, train={"lr": "fast"})
    assert main(["validate", str(_write(tmp_path, bad))]) == 2
    assert "r.yaml: train.lr: expected a number, got 'fast'" in capsys.readouterr().err
    assert main(["validate", str(_write(tmp_path, TINY)), "--set", "method.name=kdd"]) == 2
    err = capsys.readouterr().err
    assert "method.name: unknown method 'kdd'" in err and "'kd'" in err
    assert main(["validate", str(_write(tmp_path, TINY)), "--set", "student.views.logits=classifer"]) == 2
    err = capsys.readouterr().err
    assert "student.views.logits: tap 'classifer'" in err and "classifier" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "no such recipe file" in capsys.readouterr().err


def test_run_then_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = _write(tmp_path, TINY)
    out = tmp_path / "run"
    rc = main(["run", str(recipe), "--out", str(out), "--seeds", "0,1", "--runs-root", str(tmp_path),
               "--set", "train.eval_every=2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "student (distilled)" in printed and "student (scratch)" in printed and "teacher" in printed
    assert "±" in printed and "distilled − scratch accuracy" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["distilled"]["per_seed"]) == {"0", "1"}
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["train"]["eval_every"] == 2  # the --set value is in the resolved recipe
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").exists() and (out / "plots" / "loss_kd.png").exists()
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_optional_commands_say_when_absent(capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    if importlib.util.find_spec("still.teachers.cache_cmd") is None:
        assert main(["cache", "verify", "x"]) == 3
        assert "not available" in capsys.readouterr().err
    if importlib.util.find_spec("still.eval_cmd") is None:
        assert main(["eval"]) == 3
        assert "not available" in capsys.readouterr().err


# ---- the console script, killed and resumed --------------------------------------------------------


class SlowMLP(nn.Module):
    """An MLP whose forward also sleeps, so a run lasts long enough to be killed mid-training."""

    def __init__(self, input_shape: tuple = (1, 8, 8), num_classes: int = 10, delay: float = 0.01) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.delay)
        return self.net(x)


def slow_mlp(**kw: object) -> SlowMLP:
    return SlowMLP(**kw)  # type: ignore[arg-type]


def _state_step(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.skipif(not STILL.exists(), reason=f"console script not installed next to {sys.executable}")
def test_console_script_resume_after_sigkill_reaches_the_same_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = dict(TINY, student={"model": {"factory": "test_cli:slow_mlp", "params": {"delay": 0.02}}},
                train={"max_steps": 60, "batch_size": 16, "progress": False, "checkpoint_every": 10,
                       "eval_every": 20, "log_every": 5})
    recipe = _write(tmp_path, data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        assert main(["run", str(recipe), "--out", str(ref), "--runs-root", str(tmp_path), "--quiet"]) == 0
    finally:
        sys.path.remove(str(ROOT / "tests"))

    out = tmp_path / "killed"
    cmd = [str(STILL), "run", str(recipe), "--out", str(out), "--runs-root", str(tmp_path), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    state = out / "seed0" / "distilled" / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 240
    while _state_step(state) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read().decode()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _state_step(state)
    assert 20 <= killed_at < 60 and not (out / "seed0" / "distilled" / "result.json").exists()
    assert (out / "seed0" / "scratch" / "result.json").exists()  # finished before the kill: reused

    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already finished" not in res.stdout  # --quiet
    for variant in ("scratch", "distilled"):
        a = load_file(str(ref / "seed0" / variant / "student.safetensors"))
        b = load_file(str(out / "seed0" / variant / "student.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{variant} {k} differs after resume from step {killed_at}"
    s_ref = json.loads((ref / "summary.json").read_text())
    s_res = json.loads((out / "summary.json").read_text())
    assert s_ref["distilled"]["mean"]["accuracy"] == s_res["distilled"]["mean"]["accuracy"]
