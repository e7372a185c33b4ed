"""Where a process's project lives: the MLflow store's root and the folder training outputs go to."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """Where the MLflow store lives."""
    return Path(os.environ.get("VPIPE_ROOT") or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def workspace() -> Path:
    """Where training outputs go: inside a DVC stage its working directory (where DVC collects the
    outputs), else ``$VPIPE_ROOT``, else the working directory."""
    if os.environ.get("DVC_STAGE"):
        return Path.cwd().resolve()
    return Path(os.environ.get("VPIPE_ROOT") or os.getcwd()).resolve()
