"""MLflow: where the store is, how runs are named and tagged, and what is logged (rank zero only).

The store is ``sqlite:///<project root>/mlflow.db`` with artifacts under ``<project root>/mlartifacts``
unless ``MLFLOW_TRACKING_URI`` says otherwise. The project root is ``$VPIPE_ROOT``, else DVC's
``$DVC_ROOT`` (set inside ``dvc repro``), else the current directory. The URI is always explicit
and absolute: Lightning's MLFlowLogger would otherwise fall back to ``./mlruns``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path


def project_root() -> Path:
    return Path(os.environ.get("VPIPE_ROOT") or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


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
        tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    for env, tag in (("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_exp_name")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags.update({k: str(v) for k, v in extra.items()})
    return tags


def ensure_store(uri: str) -> None:
    """Create the backend store's schema now, once, before any training process opens it."""
    if uri.startswith("sqlite:///"):
        import mlflow

        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def mlflow_logger(experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None,
                  run_id: str | None = None):
    """An MLFlowLogger on this project's store, experiment ``experiment``, best checkpoint logged at the
    end; with ``run_id``, logging continues that run (a resumed fit)."""
    from pytorch_lightning.loggers import MLFlowLogger

    uri = tracking_uri()
    ensure_store(uri)
    return MLFlowLogger(
        experiment_name=experiment, run_name=run_name, tracking_uri=uri, tags=None if run_id else tags,
        artifact_location=(artifact_root() / experiment).as_uri(), log_model=True, run_id=run_id,
    )
