"""``vpipe ui``: the MLflow UI (an ``mlflow server``) on this project's store, bound to 127.0.0.1.

The server reads runs and registered models from the project's SQLite store and serves artifacts:
those of runs trained here (experiments keep absolute ``file://…/mlartifacts/NAME`` locations, read
from disk) and those uploaded through it by clients that train against it over HTTP
(``--serve-artifacts``, stored under ``mlartifacts/``). The UI has no authentication: keep it local
(an SSH tunnel reaches it from elsewhere: ``ssh -L 5000:127.0.0.1:5000 HOST``).
"""

from __future__ import annotations

import sys

from pipeline import tracking


def command(host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line for this project's store."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking.tracking_uri(),
            "--serve-artifacts", "--artifacts-destination", tracking.artifact_root().as_uri(),
            "--host", host, "--port", str(port), "--workers", str(workers)]


def serve(host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> None:
    """Replace this process with the MLflow server (Ctrl-C stops it)."""
    import os

    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise SystemExit(f"vpipe ui: MLFLOW_TRACKING_URI is the tracking server {uri}: it serves its own UI; open it "
                         "in a browser (or unset MLFLOW_TRACKING_URI for the project's store)")
    tracking.ensure_store(uri)
    tracking.artifact_root().mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C stops it", file=sys.stderr, flush=True)
    cmd = command(host, port, workers)
    os.execv(cmd[0], cmd)
