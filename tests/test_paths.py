"""`still.paths.cache_root` follows `$STILL_CACHE` at call time; the caches built on it do too."""

from pathlib import Path

from still.bench import cache_dir
from still.paths import cache_root


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and cache_root("bench", "x") == tmp_path / "c" / "bench" / "x"
    assert cache_dir("models") == tmp_path / "c" / "bench" / "models" and cache_dir("models").is_dir()
    monkeypatch.setenv("STILL_CACHE", "")  # empty means unset
    assert cache_root() == Path.home() / ".cache" / "still"
    monkeypatch.delenv("STILL_CACHE")
    assert cache_root("embeddings") == Path.home() / ".cache" / "still" / "embeddings"
