"""Store writers as separate processes: SIGKILL + resume, parallel ranks, Ray Data; all byte-identical."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import store_writer as sw  # noqa: E402

from still.teachers.store import write_store  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "store_writer.py"
ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=True)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def assert_same_store(a: Path, b: Path) -> None:
    """Byte-identical shards and index; the same manifest except its timestamp."""
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == sorted(p.name for p in b.glob("*.safetensors")) and len(files) > 1
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb
    assert not list(b.glob(".*tmp*")), "temp files left behind"


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _write_here(out: Path, **kw) -> list[int]:
    """The writer of tests/scripts/store_writer.py, in this process (single-threaded like the script)."""
    wrote: list[int] = []
    with one_thread():
        write_store(sw.make_teacher(), sw.Digits(96), out, on_shard=lambda i: wrote.append(i["shard"]),
                    **sw.STORE_KW, **kw)
    return wrote


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single writer (in this process; the other writers run as subprocesses)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    assert _write_here(out) == list(range(6)) and (out / "manifest.json").exists()
    return out


def test_resume_after_sigkill_gives_identical_store(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = _run(out, "--sleep", "0.4", wait=False)
    deadline = time.time() + 60
    while not (out / "shard-00001.json").exists():  # two shards complete, then kill -9 mid-run
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in out.glob("shard-*.json"))
    assert 2 <= len(done) < 6
    # every shard under its final name is complete (it has a sidecar), so it is kept on resume
    for p in out.glob("shard-*.safetensors"):
        assert p.with_suffix(".json").exists() or p.stat().st_size == 0, p
    kept = {n: (out / n.replace(".json", ".safetensors")).stat().st_mtime_ns for n in done}
    res = _run(out)
    assert "finalized" in res.stdout
    rewritten = [line.split()[1] for line in res.stdout.splitlines() if line.endswith("written")]
    assert len(rewritten) == 6 - len(done)  # completed shards were skipped ...
    for n, mtime in kept.items():  # ... and kept untouched
        assert (out / n.replace(".json", ".safetensors")).stat().st_mtime_ns == mtime
    assert_same_store(reference, out)


def test_a_truncated_unfinished_shard_is_rewritten(reference: Path, tmp_path: Path) -> None:
    """A shard file without its sidecar (a writer died between the two) is not trusted."""
    import shutil

    out = tmp_path / "trunc"
    shutil.copytree(reference, out)
    for name in ("manifest.json", "index.safetensors", "shard-00003.json"):
        (out / name).unlink(missing_ok=True)
    (out / "shard-00003.safetensors").write_bytes(b"partial")
    (out / ".shard-00004.safetensors.tmp-99999").write_bytes(b"junk")  # a dead writer's temp file
    assert _write_here(out) == [3]
    assert_same_store(reference, out)


def test_two_parallel_writers_equal_one(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "par"
    procs = [_run(out, "--rank", str(r), "--world", "2", wait=False) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    wrote = [sorted(int(line.split()[1]) for line in o[0].splitlines() if line.endswith("written")) for o in outs]
    assert wrote == [[0, 2, 4], [1, 3, 5]]  # rank r writes shards r, r + 2, ...
    assert any("finalized" in o[0] for o in outs)
    assert_same_store(reference, out)


@pytest.mark.slow  # a local Ray instance takes ~30 s to start and run on 2 shared cores
def test_ray_data_writer_equals_one_writer(reference: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    import functools

    from still.teachers.cache_cmd import write_store_ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{SCRIPT.parent}:{ROOT / 'src'}", "OMP_NUM_THREADS": "1"}})
    try:
        out = write_store_ray(sw.make_teacher, functools.partial(sw.Digits, 96), tmp_path / "ray",
                              concurrency=1, **sw.STORE_KW)
    finally:
        ray.shutdown()
    assert_same_store(reference, out)
