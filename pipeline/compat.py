"""The one place where the project uses what Lightning and MLflow do not publish.

Each function or class below wraps one private or internal thing of a library for which no public
API does the same; its docstring names the thing and the versions tested. ``tests/test_compat.py``
runs each against the installed library, so an upgrade that changes one fails there (not in the
middle of a training run), and checks that none of these names is used anywhere else in
``pipeline/``. ``pyproject.toml`` pins the ranges tested: pytorch-lightning 2.6 (2.6.6 tested),
mlflow 3.17 (3.17.2 tested); jsonargparse's error texts were read with 4.53.0.

It imports nothing of the package, so any layer may import it, and each library only inside the
function that uses it: the MLflow server app (:mod:`pipeline.mlflow_app`) reads a setting here
without loading torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# jsonargparse ------------------------------------------------------------------------------------


def jsonargparse_keys(chain: list[BaseException]) -> tuple[list[str], str | None]:
    """The option a jsonargparse parse error is about, which it publishes only in its messages: the
    ``Parser key "..."`` of each level (``init_args`` below a ``Problem with given class_path '...'``),
    and that class path. ``chain``: the error and those behind it, outermost first. Tested with
    jsonargparse 4.53.0."""
    import re

    keys: list[str] = []
    class_path = None
    for err in chain:
        if key := re.match(r'Parser key "([^"]+)":', str(err)):
            if not keys or keys[-1] != key[1]:
                keys.append(key[1])
        elif given := re.match(r"Problem with given class_path '([^']+)'", str(err)):
            class_path = given[1]
            keys.append("init_args")
    return keys, class_path


def jsonargparse_reason(text: str) -> str:
    """A jsonargparse reason (one line) as a person reads it: ``<class 'a.b.C'>`` as ``C``, and
    ``Expected a X. Got value: Y`` as ``expected X, got Y``. Tested with jsonargparse 4.53.0."""
    import re

    text = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", text)
    return re.sub(r"^Expected an? (.+?)\. Got value: (.*)$", r"expected \1, got \2", text)


# Lightning ---------------------------------------------------------------------------------------


def checkpoint_class_path(hparams: dict) -> str | None:
    """The model class a checkpoint's ``hyper_parameters`` record, when LightningCLI instantiated the
    model in subclass mode: the private key ``_class_path`` that LightningCLI's instantiator
    (``pytorch_lightning.cli._InstantiatorFn``) stores beside the init arguments. None otherwise.
    Tested with pytorch-lightning 2.6.6."""
    return hparams.get("_class_path")


class CheckpointHparams:
    """A LightningCLI mixin (listed before ``LightningCLI``): the model config that ``--ckpt_path``'s
    hyperparameters give goes through :meth:`checkpoint_model`, which a subclass overrides.

    Wraps ``LightningCLI._parse_ckpt_path``, a private method that ``LightningCLI.__init__`` calls right
    after ``parse_arguments`` (before the seed and the classes), which has no public hook, and the
    private keys ``_class_path`` and ``_instantiator`` that LightningCLI stores in a model's
    hyperparameters. Tested with pytorch-lightning 2.6.6."""

    def checkpoint_model(self, class_path: str | None, hparams: dict) -> dict:
        """The ``model`` config from a checkpoint's hyperparameters (``class_path``: the class it records,
        see :func:`checkpoint_class_path`; ``hparams``: the rest). Lightning's rule by default: all of them,
        as the class's ``dict_kwargs`` when there is a class path."""
        return hparams if class_path is None else {"class_path": class_path, "dict_kwargs": hparams}

    def _parse_ckpt_path(self) -> None:
        import torch

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = checkpoint_class_path(hparams)
        hparams.pop("_class_path", None)
        model = self.checkpoint_model(class_path, hparams)
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)


def setup_train_data(trainer) -> None:
    """Load the trainer's training dataloader now, if it is not loaded yet, so that
    ``trainer.num_training_batches`` is known (from ``configure_optimizers``, which runs before Lightning
    loads it). Wraps ``trainer.fit_loop.setup_data()``, a method of the private ``_FitLoop``: the public
    ``Trainer.estimated_stepping_batches`` calls it too, but not when ``max_epochs`` is -1.
    Tested with pytorch-lightning 2.6.6."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()


def total_batch_idx(trainer) -> int:
    """The index of the current training batch, counted across epochs (and restored on resume). Wraps
    ``trainer.fit_loop.total_batch_idx`` (private ``_FitLoop``); the public ``trainer.global_step``
    counts optimiser steps instead, several per batch under manual optimisation.
    Tested with pytorch-lightning 2.6.6."""
    return trainer.fit_loop.total_batch_idx


# MLflow ------------------------------------------------------------------------------------------


def start_system_metrics(run_id: str, interval: float, resume: bool, tracking_uri: str):
    """Start sampling MLflow's system metrics (CPU, memory, disk, network; GPU with NVML) every
    ``interval`` seconds into run ``run_id`` of ``tracking_uri``, each sample logged (``system/...``);
    with ``resume``, the steps continue after the run's last. Returns the monitor for
    :func:`stop_system_metrics`.

    Wraps ``mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor`` (an internal module):
    the public ways (``mlflow.start_run(log_system_metrics=True)``, ``mlflow.enable_system_metrics_logging``)
    need MLflow's fluent active run, which Lightning's MLFlowLogger (a client on a run id) and the job
    runs do not open. Tested with mlflow 3.17.2."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=interval,
        samples_before_logging=1,
        resume_logging=resume,
        tracking_uri=tracking_uri,
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop a monitor of :func:`start_system_metrics` and log the samples it took since it last logged:
    ``SystemMetricsMonitor.finish`` drops them, so a job shorter than one interval would show none.
    Wraps ``finish``, ``aggregate_metrics``, ``publish_metrics`` and ``mlflow_logger.flush`` of the
    internal ``SystemMetricsMonitor``. Tested with mlflow 3.17.2."""
    monitor.finish()
    last = monitor.aggregate_metrics()
    if last:
        monitor.publish_metrics(last)
        monitor.mlflow_logger.flush()


def dataset_input(dataset, context: str):
    """``dataset`` (an ``mlflow.entities.Dataset``) as an input of a run in ``context`` (``training``,
    ``evaluation``), for ``MlflowClient.log_inputs``: what the fluent ``mlflow.log_input(dataset,
    context=...)`` logs, for a client on a given run. Wraps the tag name
    ``mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT`` (an internal module). Tested with mlflow 3.17.2."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def link_model_version(client, model_id: str, name: str, version: str) -> None:
    """Record on logged model ``model_id`` that it is version ``version`` of registered model ``name``,
    as ``mlflow.register_model`` does (the UI's logged-model page lists it), for a version created with
    ``client.create_model_version`` on a client with explicit URIs (``mlflow.register_model`` uses
    MLflow's global ones). Wraps the tag ``mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS`` (an internal
    module) and its JSON list of ``{"name", "version"}``. Tested with mlflow 3.17.2."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    client.set_logged_model_tags(
        model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, {"name": name, "version": version}])}
    )


@contextlib.contextmanager
def skip_requirement_check() -> Iterator[None]:
    """Within: MLflow saves a model without comparing its pip requirements with the installed packages
    (the first comparison maps every installed distribution's files to its modules). Wraps
    ``mlflow.utils.environment.warn_dependency_requirement_mismatches`` (an internal module), which has no
    switch: it is replaced for the duration. Tested with mlflow 3.17.2."""
    from mlflow.utils import environment

    check = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if check is None:
        yield
        return
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = check


def mlflow_static_prefix() -> str:
    """The path prefix ``mlflow server --static-prefix`` serves under ('' without one): the private
    environment variable ``_MLFLOW_STATIC_PREFIX`` (``mlflow.server.handlers.STATIC_PREFIX_ENV_VAR``)
    that the server sets for its workers. Tested with mlflow 3.17.2."""
    return os.environ.get("_MLFLOW_STATIC_PREFIX", "")


def mlflow_asgi_app():
    """The ASGI app ``mlflow server`` runs under uvicorn without ``--app-name``:
    ``mlflow.server.fastapi_app.app`` (an internal module). Tested with mlflow 3.17.2."""
    from mlflow.server.fastapi_app import app

    return app
