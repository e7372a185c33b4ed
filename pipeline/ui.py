"""``vpipe ui``: the MLflow UI (an ``mlflow server``) on this project's store, bound to 127.0.0.1.

The server reads runs and registered models from the project's SQLite store and serves artifacts:
those of runs trained here (experiments keep absolute ``file://…/mlartifacts/NAME`` locations, read
from disk) and those uploaded through it by clients that train against it over HTTP
(``--serve-artifacts``, stored under ``mlartifacts/``). The UI has no authentication: keep it local
(an SSH tunnel reaches it from elsewhere: ``ssh -L 5000:127.0.0.1:5000 HOST``). It prints the URLs of the
runs tables (``?workflowType=machine_learning``: MLflow 3 opens on its GenAI views otherwise).
MLflow's usage telemetry is off for the processes ``vpipe`` starts (``MLFLOW_DISABLE_TELEMETRY=true``
unless the environment sets it: ``MLFLOW_DISABLE_TELEMETRY=false`` opts in).

The server runs MLflow's app without the assistant (``--app-name vpipe``, :mod:`pipeline.mlflow_app`):
MLflow 3.17 has no setting that turns the assistant off for local clients, and its API can run commands
on this machine. A port already taken stops it with one line, before MLflow starts.
"""

from __future__ import annotations

import sys

from pipeline.tracking import runs as tracking


def command(host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line for this project's store."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking.tracking_uri(),
        "--serve-artifacts",
        "--artifacts-destination",
        tracking.artifact_root().as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--app-name",
        "vpipe",
    ]


def urls(base: str) -> list[tuple[str, str]]:
    """``(name, URL)`` of the experiment list and of each experiment of this project's store, opening the
    runs table (MLflow 3's UI shows GenAI views unless ``workflowType=machine_learning`` is asked for)."""
    from mlflow.exceptions import MlflowException

    view = "workflowType=machine_learning"
    found = [("experiments", f"{base}/#/experiments?{view}")]
    try:
        experiments = tracking.registry_client().search_experiments(order_by=["name ASC"])
    except MlflowException:
        experiments = []
    found += [
        (e.name, f"{base}/#/experiments/{e.experiment_id}?{view}") for e in experiments if e.name != "Default"
    ]
    return found


def port_taken(host: str, port: int) -> str:
    """Why ``host:port`` cannot be listened on (empty when it can)."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
            )  # as the server will: only a listener counts
            sock.bind((host, port))
    except OSError as err:
        return err.strerror or str(err)
    return ""


def serve(host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> None:
    """Replace this process with the MLflow server (Ctrl-C stops it)."""
    import os

    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise SystemExit(
            f"vpipe ui: MLFLOW_TRACKING_URI is the tracking server {uri}: it serves its own UI; open it "
            "in a browser (or unset MLFLOW_TRACKING_URI for the project's store)"
        )
    taken = port_taken(host, port)
    if taken:
        raise SystemExit(
            f"vpipe ui: port {port} on {host} is taken ({taken}): another vpipe ui? Choose one with --port"
        )
    tracking.ensure_store(uri)
    tracking.artifact_root().mkdir(parents=True, exist_ok=True)
    base = f"http://{host}:{port}"
    print(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it. The runs tables:", file=sys.stderr)
    for name, url in urls(base):
        print(f"  {name:24s} {url}", file=sys.stderr)
    sys.stderr.flush()
    cmd = command(host, port, workers)
    os.execv(cmd[0], cmd)
