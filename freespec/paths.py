"""Where freespec keeps what it builds once per machine: converted models, kernels, calibrations."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FREESPEC_CACHE``, else ``$XDG_CACHE_HOME/freespec``, else ``~/.cache/freespec``."""
    if explicit := os.environ.get("FREESPEC_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "freespec"
