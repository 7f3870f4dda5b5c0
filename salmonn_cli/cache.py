"""Where salmonn keeps what it builds for the user: $XDG_CACHE_HOME/salmonn (default ~/.cache/salmonn)."""
from __future__ import annotations

import os
from pathlib import Path


def salmonn_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "salmonn"
