"""Where lmforge keeps things between runs: trained example models, host probes, calibration, tuning studies.

`$LMFORGE_CACHE` if set, else `~/.cache/lmforge`. Every file under it can be deleted; it is rebuilt.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the lmforge cache, e.g. `cache_dir("models")`."""
    root = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def import_file(name: str, path: Path):
    """The Python file at `path` imported as module `name` (once: a second call returns sys.modules[name]); a file
    that fails to import leaves no half-made module behind. For generated code kept here (the Triton
    elementwise kernels) and for a module loaded without its package's __init__."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
