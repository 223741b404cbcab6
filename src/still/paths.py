"""Where still keeps what it computes once: `$STILL_CACHE` (default `~/.cache/still`).

Read at call time, so a process (or a test) that sets `STILL_CACHE` after importing still is obeyed.
Sub-folders: `embeddings` (teacher embedding caches), `models` (assembled or converted models),
`text_embeddings`, `bench` (benchmark teachers and figures), `gemma-3-270m`, `llm_topk`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(*parts: str) -> Path:
    """`$STILL_CACHE/<parts...>` (default `~/.cache/still/<parts...>`); not created."""
    return Path(os.environ.get("STILL_CACHE") or Path.home() / ".cache" / "still").expanduser().joinpath(*parts)


__all__ = ["cache_root"]
