"""Where lmforge keeps things between runs: trained example models, host probes, calibration, tuning studies.

`$LMFORGE_CACHE` if set, else `~/.cache/lmforge`. Every file under it can be deleted; it is rebuilt.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the lmforge cache, e.g. `cache_dir("models")`."""
    root = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
