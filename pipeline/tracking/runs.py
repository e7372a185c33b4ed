"""MLflow: where the store is, how runs are named and tagged, and what is logged (rank zero only).

The store is ``sqlite:///<project root>/mlflow.db`` with artifacts under ``<project root>/mlartifacts``
unless ``MLFLOW_TRACKING_URI`` says otherwise. The project root is ``$VPIPE_ROOT``, else DVC's
``$DVC_ROOT`` (set inside ``dvc repro`` and ``dvc exp run``), else the current directory. The URI is
always explicit and absolute: Lightning's MLFlowLogger would otherwise fall back to ``./mlruns``.

Training outputs (``models/``, ``metrics/``, ``plots/``) go to the *workspace* instead: the current
directory inside a DVC stage, else ``$VPIPE_ROOT``, else the current directory. The two differ under ``dvc exp run --queue``: DVC runs
the stage in a temporary copy of the repository (the working directory) but points ``$DVC_ROOT`` at
the repository itself, so outputs land where DVC collects them and the run lands in the one store.

What a run read (lineage tags, input datasets) is recorded by :mod:`pipeline.tracking.inputs`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path

from pipeline import compat
from pipeline.media.errors import UserError
from pipeline.tracking.workspace import project_root


class TrackingError(RuntimeError, UserError):
    """The tracking server cannot be used; the message names the URI."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def artifact_root() -> Path:
    return project_root() / "mlartifacts"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_tags(**extra: str) -> dict[str, str]:
    """Lineage tags for a training run: git commit and dirty flag, DVC stage, host, plus ``extra``
    (the world size is tagged once the trainer knows it)."""
    tags = {"host": socket.gethostname()}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git_commit"] = commit
        # Dirty: a tracked file differs from the commit, other than what `dvc repro` itself rewrites as
        # stages finish (dvc.lock and the stage outputs it records, such as metrics/NAME.json), so a
        # plain repro of a clean commit is not dirty while a `dvc exp run -S` (which edits params) is.
        from pipeline.tracking.inputs import dvc_lock_outs

        rewritten = ["dvc.lock", *dvc_lock_outs(project_root())]
        changed = _git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in rewritten)
        )
        tags["git_dirty"] = str(bool(changed))
    for env, tag in (("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_exp_name")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags.update({k: str(v) for k, v in extra.items()})
    return tags


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingError` unless the HTTP tracking server at ``uri`` answers within ``timeout``.

    Any HTTP answer counts (even 401: the server is there). Without this check MLflow's client retries
    a dead server for minutes, and only once training has already started.
    """
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"MLflow tracking server {uri} does not answer ({reason}); start it, fix MLFLOW_TRACKING_URI, "
            f"or unset it to use the project's store sqlite:///{project_root() / 'mlflow.db'}"
        ) from err


def ensure_store(uri: str) -> None:
    """Check an HTTP server answers, or create a SQLite store's schema now, once (under a file lock beside
    the database), before the training process opens it."""
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    if uri.startswith("sqlite:///"):
        import mlflow
        from filelock import FileLock

        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        # One process at a time: the ranks of a torchrun/SLURM job (or jobs started together) on a new
        # store would all create its schema at once and collide (duplicate column, table exists). The
        # first creates it; the others find it made.
        with FileLock(f"{db}.lock"):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)


def mlflow_logger(
    experiment: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
    cls=None,
):
    """An MLFlowLogger (or ``cls``, a subclass such as :class:`pipeline.tracking.lineage.RunLogger`) on this
    project's store, experiment ``experiment``, best checkpoint logged at the end; with ``run_id``,
    logging continues that run (a resumed fit)."""
    from pytorch_lightning.loggers import MLFlowLogger

    uri = tracking_uri()
    ensure_store(uri)  # before the logger: its client opens the store (on every rank) as it is made
    return (cls or MLFlowLogger)(
        experiment_name=experiment,
        run_name=run_name,
        tracking_uri=uri,
        tags=None if run_id else tags,
        # A server stores artifacts where it is configured to (``--serve-artifacts``), not on this machine.
        artifact_location=None
        if uri.startswith(("http://", "https://"))
        else (artifact_root() / experiment).as_uri(),
        log_model=True,
        run_id=run_id,
    )


def run_logger(trainer):
    """The trainer's MLFlowLogger, or None (an untracked run, such as the debug overlay's)."""
    from pytorch_lightning.loggers import MLFlowLogger

    return next((logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)), None)


def registry_client():
    """An MlflowClient on this project's store whose model registry is explicit too: the registry URI
    is ``$MLFLOW_REGISTRY_URI`` or the tracking URI, never a value left in MLflow's global state."""
    import mlflow

    uri = tracking_uri()
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` → ``{"a/b": 1}`` (lists and other values stay whole)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def readable_params(flat: dict[str, object]) -> dict[str, object]:
    """Config params as the UI shows them: ``model/head/hidden_size`` for
    ``model/init_args/head/init_args/hidden_size``, ``model/head`` for its ``class_path``; the list of
    config files as plain paths."""
    params = {}
    for key, value in flat.items():
        key = key.replace("/init_args/", "/").removesuffix("/class_path")
        if key == "config" and isinstance(value, list):  # jsonargparse Paths: each as it was given
            value = ", ".join(str(path) for path in value)
        params[key] = value
    return params


def global_rank() -> int:
    """This process's rank, from the launcher's environment (torchrun, SLURM, Lightning's own DDP launch)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return int(os.environ.get("NODE_RANK", 0) or 0) * int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1) + int(
        os.environ.get("LOCAL_RANK", 0) or 0
    )


class SystemMetrics:
    """MLflow's system metrics (CPU and memory, disk, network; GPU utilisation and memory when NVML is
    there) sampled every ``interval`` seconds into run ``run_id`` as ``system/...`` while the context
    is open; nothing when ``enabled`` is False or on a rank other than 0."""

    def __init__(self, run_id: str | None, enabled: bool = True, interval: float = 2.0, resume: bool = False):
        self.run_id = run_id if enabled and global_rank() == 0 else None
        self.interval, self.resume = interval, resume
        self.monitor = None

    def __enter__(self) -> SystemMetrics:
        if self.run_id:
            uri = tracking_uri()
            self.monitor = compat.start_system_metrics(self.run_id, self.interval, self.resume, uri)
        return self

    def __exit__(self, *exc) -> None:
        if self.monitor is not None:
            # With the samples taken since the last were logged: a job shorter than one interval has one.
            compat.stop_system_metrics(self.monitor)
            self.monitor = None


@contextlib.contextmanager
def job_run(
    experiment: str,
    run_name: str,
    params: dict[str, object],
    stores: list[str],
    context: str,
    system_metrics: bool = True,
):
    """An MLflow run around a job that is not a Lightning fit (``vpipe features``), on rank zero only:
    its parameters, its input stores as datasets (context ``context``), system metrics while it runs;
    FINISHED or FAILED at the end. Yields ``(client, run_id)``, or None on the other ranks."""
    if global_rank() != 0:
        yield None
        return
    from mlflow.entities import Param

    from pipeline.tracking import timings
    from pipeline.tracking.inputs import lineage_tags, log_datasets

    with timings.phase("mlflow"):
        uri = tracking_uri()
        ensure_store(uri)
        client = registry_client()
        found = client.get_experiment_by_name(experiment)
        location = (
            None if uri.startswith(("http://", "https://")) else (artifact_root() / experiment).as_uri()
        )
        experiment_id = (
            found.experiment_id if found else client.create_experiment(experiment, artifact_location=location)
        )
        run = client.create_run(
            experiment_id,
            run_name=run_name,
            tags=run_tags(**lineage_tags(frames=stores[0] if stores else None)),
        )
    with timings.phase("logging"):
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        log_datasets(client, run.info.run_id, stores, context)
    status = "FAILED"
    try:
        with SystemMetrics(run.info.run_id, system_metrics):
            yield client, run.info.run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)
