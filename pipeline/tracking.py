"""MLflow: where the store is, how runs are named and tagged, and what is logged (rank zero only).

The store is ``sqlite:///<project root>/mlflow.db`` with artifacts under ``<project root>/mlartifacts``
unless ``MLFLOW_TRACKING_URI`` says otherwise. The project root is ``$VPIPE_ROOT``, else DVC's
``$DVC_ROOT`` (set inside ``dvc repro`` and ``dvc exp run``), else the current directory. The URI is
always explicit and absolute: Lightning's MLFlowLogger would otherwise fall back to ``./mlruns``.

Training outputs (``models/``, ``metrics/``, ``plots/``) go to the *workspace* instead: the current
directory inside a DVC stage, else ``$VPIPE_ROOT``, else the current directory. The two differ under ``dvc exp run --queue``: DVC runs
the stage in a temporary copy of the repository (the working directory) but points ``$DVC_ROOT`` at
the repository itself, so outputs land where DVC collects them and the run lands in the one store.

Lineage (:func:`lineage_tags`): every run is tagged with what it was trained on. The stores' own
``meta.json`` content hashes and cache keys describe exactly the data that was read. Inside a DVC
stage the ``dvc.lock`` hashes of the input stores are tagged too: DVC writes a stage's lock entry as
soon as the stage finishes, so while ``train@X`` runs, the entries of the upstream ``features``/
``extract`` stages describe the stores it reads (the train stage's own entry, written after it
finishes, is not there yet). Outside DVC the lock may describe an older repro, so it is not tagged.
Training configs are tracked by DVC as params (values, not hashes): their MD5 is tagged instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
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


class TrackingError(RuntimeError):
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
        rewritten = ["dvc.lock", *dvc_lock_outs(project_root())]
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in rewritten))
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
            f"or unset it to use the project's store sqlite:///{project_root() / 'mlflow.db'}") from err


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


def mlflow_logger(experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None,
                  run_id: str | None = None):
    """An MLFlowLogger on this project's store, experiment ``experiment``, best checkpoint logged at the
    end; with ``run_id``, logging continues that run (a resumed fit)."""
    from pytorch_lightning.loggers import MLFlowLogger

    uri = tracking_uri()
    ensure_store(uri)  # before the logger: its client opens the store (on every rank) as it is made
    return MLFlowLogger(
        experiment_name=experiment, run_name=run_name, tracking_uri=uri, tags=None if run_id else tags,
        # A server stores artifacts where it is configured to (``--serve-artifacts``), not on this machine.
        artifact_location=None if uri.startswith(("http://", "https://")) else (artifact_root() / experiment).as_uri(),
        log_model=True, run_id=run_id,
    )


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _meta(store: str | os.PathLike) -> dict:
    import json

    try:
        return json.loads((Path(store) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def dvc_lock_outs(root: Path) -> dict[str, tuple[str, str]]:
    """``path → (hash, stage)`` for every stage output recorded in ``root/dvc.lock``."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    import yaml

    outs = {}
    for stage, entry in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).items():
        for out in entry.get("outs") or []:
            digest = out.get("md5") or out.get(out.get("hash", ""), "")
            outs[os.path.normpath(out["path"])] = (str(digest), stage)
    return outs


def lineage_tags(features: str | None = None, frames: str | None = None, configs: list[str] = (),
                 grids: str | None = None) -> dict[str, str]:
    """Tags naming the inputs of a training run: stores (path, content hash, cache key, extraction
    parameters), their ``dvc.lock`` hashes inside a DVC stage, and the config files with their MD5."""
    tags: dict[str, str] = {}
    if grids:
        tags["data.grids"] = str(grids)
        tags["data.grids.content_hash"] = str(_meta(grids).get("content_hash", ""))
    frames_hash = None
    if features:
        meta = _meta(features)
        tags["data.features"] = str(features)
        for key, tag in (("content_hash", "content_hash"), ("cache_key", "cache_key"), ("backbone", "backbone"),
                         ("pool", "pool")):
            if meta.get(key) is not None:
                tags[f"data.features.{tag}"] = str(meta[key])
        frames = frames or meta.get("frames")
        frames_hash = meta.get("frames_hash")  # what the features were computed from
    if frames:
        meta = _meta(frames)
        tags["data.frames"] = str(frames)
        if frames_hash or meta.get("content_hash"):
            tags["data.frames.content_hash"] = str(frames_hash or meta["content_hash"])
        if meta.get("params"):
            tags["data.frames.params"] = ", ".join(f"{k}={v}" for k, v in meta["params"].items())
    if os.environ.get("DVC_STAGE"):
        root = workspace()
        outs = dvc_lock_outs(root)
        for role, path in (("features", features), ("frames", frames), ("grids", grids)):
            if path:
                rel = os.path.normpath(os.path.relpath(Path(path).resolve(), root))
                if rel in outs:
                    tags[f"dvc.lock.{role}"] = f"{outs[rel][0]} ({outs[rel][1]})"
    if configs:
        files = [Path(c) for c in configs]
        tags["config"] = ", ".join(str(c) for c in configs)
        tags["config.md5"] = ", ".join(_md5(f) if f.is_file() else "?" for f in files)
    return tags


def registry_client():
    """An MlflowClient on this project's store whose model registry is explicit too: the registry URI
    is ``$MLFLOW_REGISTRY_URI`` or the tracking URI, never a value left in MLflow's global state."""
    import mlflow

    uri = tracking_uri()
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def register_best(client, name: str, run_id: str, checkpoint: Path, metrics: dict[str, float],
                  tags: dict[str, str] | None = None) -> str:
    """Log ``checkpoint`` as the run's pyfunc model ``model`` (:mod:`pipeline.serving`: MLflow can load and
    serve it; a forecaster's checkpoint as the artifact folder ``model/``) and register it as a new version of the registered model ``name``, tagged with its headline
    test metrics; returns the version.

    ``models:/NAME/VERSION`` (or ``models:/NAME/latest``) downloads the model folder, whose checkpoint
    carries everything ``vpipe classify`` and ``vpipe caption`` need.
    """
    from mlflow.exceptions import MlflowException

    from pipeline import serving

    if serving.servable(checkpoint):
        info = serving.log_model(checkpoint, run_id)
        source, model_id = info.model_uri, info.model_id
    else:  # forecasters: the checkpoint as is (`vpipe forecast` is its loader)
        client.log_artifact(run_id, str(checkpoint), "model")
        source, model_id = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/model", None
    client = registry_client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"Best checkpoints of the `{name}` training config "
                                                          "(vpipe fit -c configs/{name}.yaml).".replace("{name}", name))
    # The headline metrics (test/acc, test/mse, ...); per-horizon and baseline ones stay on the run.
    headline = {k: v for k, v in metrics.items() if k.count("/") == 1}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in headline.items())
    version = client.create_model_version(
        name, source, run_id=run_id, model_id=model_id, description=f"Test metrics of the best checkpoint: {summary}",
        tags={**{k: str(v) for k, v in headline.items()}, **(tags or {})})
    if model_id:  # the logged model lists its versions (the tag mlflow.register_model sets)
        import json

        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [*linked, {"name": version.name, "version": version.version}])})
    return version.version


def readable_params(flat: dict[str, object]) -> dict[str, object]:
    """Config params as the UI shows them: ``model/head/hidden_size`` for
    ``model/init_args/head/init_args/hidden_size``, ``model/head`` for its ``class_path``; the list of
    config files as plain paths."""
    params = {}
    for key, value in flat.items():
        key = key.replace("/init_args/", "/").removesuffix("/class_path")
        if key == "config" and isinstance(value, str):
            value = value.replace("Path_fsr(", "").replace("Path_fr(", "").replace(")", "")
        params[key] = value
    return params


def data_inputs(datamodule) -> tuple[str | None, str | None]:
    """``(feature store, frame store)`` a data module reads, told apart by their ``meta.json`` kind
    (a frame-store data module may keep its folder under any attribute name)."""
    features = frames = None
    for attribute in ("features", "frames", "root"):
        path = getattr(datamodule, attribute, None)
        kind = _meta(path).get("kind") if isinstance(path, str | os.PathLike) else None
        if kind == "features":
            features = features or str(path)
        elif kind == "frames":
            frames = frames or str(path)
    return features, frames


def store_dataset(path: str | os.PathLike):
    """An MLflow dataset entity for a frame, feature or grid store: its folder name (``frames/gestures``), the
    content hash as the digest, the absolute path as the source, and a profile of its videos per split,
    frames and classes; the schema is the per-frame shape and dtype. None when ``path`` is not a store."""
    import csv
    import json

    from mlflow.entities import Dataset

    path = Path(path).resolve()
    meta = _meta(path)
    if meta.get("kind") == "grids":
        schema = {k: meta.get(k) for k in ("kind", "shape", "channels", "slots_per_day", "slot_minutes")}
        return Dataset(name=f"grids/{path.name}", digest=str(meta.get("content_hash") or "")[:32] or "unknown",
                       source_type="local", source=json.dumps({"uri": path.as_uri()}), schema=json.dumps(schema),
                       profile=json.dumps({f"{s}_slots": n for s, n in sorted(meta.get("slots", {}).items())}))
    if meta.get("kind") not in ("frames", "features"):
        return None
    splits: dict[str, int] = {}
    classes: set[str] = set()
    frames = 0
    try:
        with open(path / "index.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                splits[row["split"]] = splits.get(row["split"], 0) + 1
                classes.add(row["label"])
                frames += int(row.get("length") or 0)
    except OSError:
        pass
    profile = {"videos": sum(splits.values()), **{f"{s}_videos": n for s, n in sorted(splits.items())}, "frames": frames,
               "classes": sorted(classes)}
    schema = {"kind": meta["kind"], "dtype": meta.get("dtype", "uint8"),
              "shape_per_frame": meta.get("feature_shape") or meta.get("params", {}).get("size")}
    for key in ("backbone", "pool", "modality", "cache_key"):
        if meta.get(key) is not None:
            schema[key] = meta[key]
    # The digest column holds 36 characters: the first 32 of the SHA-256 content hash.
    return Dataset(name=f"{meta['kind']}/{path.name}", digest=str(meta.get("content_hash") or "")[:32] or "unknown",
                   source_type="local", source=json.dumps({"uri": path.as_uri()}), schema=json.dumps(schema),
                   profile=json.dumps(profile))


def log_datasets(client, run_id: str, stores: list[str | os.PathLike], context: str = "training",
                 with_sources: bool = True) -> list[str]:
    """Log each store as an input of the run (``mlflow.log_input``'s entity, context tag ``context``); a
    feature store brings the frame store it was computed from (unless not ``with_sources``). Returns the
    dataset names logged."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    paths, inputs = [], []
    for store in stores:
        if store and store not in paths:
            paths.append(str(store))
            source = _meta(store).get("frames") if with_sources and _meta(store).get("kind") == "features" else None
            if source and Path(source).is_dir() and source not in paths:
                paths.append(source)
    for path in paths:
        dataset = store_dataset(path)
        if dataset is not None:
            inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return [i.dataset.name for i in inputs]


def global_rank() -> int:
    """This process's rank, from the launcher's environment (torchrun, SLURM, Lightning's own DDP launch)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return int(os.environ.get("NODE_RANK", 0) or 0) * int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1) + int(os.environ.get("LOCAL_RANK", 0) or 0)


class SystemMetrics:
    """MLflow's system metrics (CPU and memory, disk, network; GPU utilisation and memory when NVML is
    there) sampled every ``interval`` seconds into run ``run_id`` as ``system/...`` while the context
    is open; nothing when ``enabled`` is False or on a rank other than 0."""

    def __init__(self, run_id: str | None, enabled: bool = True, interval: float = 2.0, resume: bool = False):
        self.monitor = None
        if run_id and enabled and global_rank() == 0:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                                resume_logging=resume, tracking_uri=tracking_uri())

    def __enter__(self) -> SystemMetrics:
        if self.monitor is not None:
            self.monitor.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            # The monitor drops the samples taken since its last publication when stopped: a job shorter
            # than one interval would show none. Publish them.
            last = self.monitor.aggregate_metrics()
            if last:
                self.monitor.publish_metrics(last)
                self.monitor.mlflow_logger.flush()


@contextlib.contextmanager
def job_run(experiment: str, run_name: str, params: dict[str, object], stores: list[str], context: str,
            system_metrics: bool = True):
    """An MLflow run around a job that is not a Lightning fit (``vpipe features``), on rank zero only:
    its parameters, its input stores as datasets (context ``context``), system metrics while it runs;
    FINISHED or FAILED at the end. Yields ``(client, run_id)``, or None on the other ranks."""
    if global_rank() != 0:
        yield None
        return
    from mlflow.entities import Param

    uri = tracking_uri()
    ensure_store(uri)
    client = registry_client()
    found = client.get_experiment_by_name(experiment)
    location = None if uri.startswith(("http://", "https://")) else (artifact_root() / experiment).as_uri()
    experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location=location)
    run = client.create_run(experiment_id, run_name=run_name, tags=run_tags(**lineage_tags(frames=stores[0] if stores else None)))
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    log_datasets(client, run.info.run_id, stores, context)
    status = "FAILED"
    try:
        with SystemMetrics(run.info.run_id, system_metrics):
            yield client, run.info.run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)
