"""pipeline/compat.py against the installed Lightning and MLflow: each test fails when the private or
internal thing an adapter wraps changes behaviour (pyproject.toml pins the ranges these pass on), and
no name the adapter wraps is used anywhere else."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.demos.boring_classes import BoringModel

from pipeline import compat

ROOT = Path(__file__).resolve().parents[1]

# What pipeline/compat.py wraps; no other module of the project may name it.
PRIVATE = {
    "LightningCLI._parse_ckpt_path": r"\b_parse_ckpt_path\b",
    "LightningCLI._get": r"\._get\(",
    "LightningCLI._parser": r"\._parser\(",
    "LightningCLI._instantiate_trainer": r"\b_instantiate_trainer\b",
    "LightningCLI._run_subcommand": r"\b_run_subcommand\b",
    "hyperparameter key _class_path": r"\b_class_path\b",
    "hyperparameter key _instantiator": r"\b_instantiator\b",
    "Trainer.fit_loop (private _FitLoop)": r"\bfit_loop\b",
    "MLFlowLogger._initialized": r"\._initialized\b",
    "pytorch_lightning.utilities.model_helpers": r"\bmodel_helpers\b|\bis_overridden\b",
    "SystemMetricsMonitor": r"\bsystem_metrics_monitor\b|\bSystemMetricsMonitor\b",
    "jsonargparse Path's repr": r"Path_fs?r\(",
    "jsonargparse's error texts": r"Parser key \"|Problem with given class_path|Got value:",
    "mlflow.utils": r"\bmlflow\.utils\b|\bmlflow_tags\b|\bwarn_dependency_requirement_mismatches\b",
    "_MLFLOW_STATIC_PREFIX": r"_MLFLOW_STATIC_PREFIX",
    "mlflow.server.fastapi_app": r"\bfastapi_app\b",
}


def private_uses(text: str) -> list[str]:
    return [name for name, pattern in PRIVATE.items() if re.search(pattern, text)]


def test_no_private_name_outside_the_adapter():
    files = [p for d in ("pipeline", "bench", "data_scripts") for p in sorted((ROOT / d).rglob("*.py"))]
    found = {
        str(p.relative_to(ROOT)): uses
        for p in files
        if p != ROOT / "pipeline" / "compat.py" and (uses := private_uses(p.read_text()))
    }
    assert not found, found
    assert set(private_uses((ROOT / "pipeline" / "compat.py").read_text())) >= {
        "LightningCLI._parse_ckpt_path",
        "hyperparameter key _class_path",
        "Trainer.fit_loop (private _FitLoop)",
        "SystemMetricsMonitor",
        "mlflow.utils",
        "_MLFLOW_STATIC_PREFIX",
        "mlflow.server.fastapi_app",
    }


def test_the_private_name_check_sees_each_use():
    assert private_uses(
        "callbacks = [self._get(self.config_init, c) for c in self._parser(s).callback_keys]"
    ) == [
        "LightningCLI._get",
        "LightningCLI._parser",
    ]
    assert private_uses("trainer.fit_loop.total_batch_idx") == ["Trainer.fit_loop (private _FitLoop)"]
    assert private_uses('hparams.get("_class_path")') == ["hyperparameter key _class_path"]
    assert (
        private_uses("compat.checkpoint_class_path(hparams); class_path; torch.distributed.is_initialized()")
        == []
    )


# Lightning ---------------------------------------------------------------------------------------


def quiet_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


class Tiny(BoringModel):
    """A model with one hyperparameter, built by LightningCLI in subclass mode."""

    def __init__(self, width: int = 1):
        super().__init__()
        self.save_hyperparameters()


class Stop(Exception):
    """Raised where LightningCLI would instantiate the classes: the tests need the parsed config only."""


@pytest.fixture
def tiny_checkpoint(tmp_path, monkeypatch) -> Path:
    """A checkpoint of ``Tiny(width=3)`` as ``vpipe fit`` writes one: the model built by LightningCLI."""
    monkeypatch.setattr(sys, "argv", ["vpipe"])
    cli = LightningCLI(
        pl.LightningModule,
        subclass_mode_model=True,
        run=False,
        save_config_callback=None,
        seed_everything_default=False,
        args=["--model", f"{__name__}.Tiny", "--model.width", "3", "--trainer.logger", "false"],
    )
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(cli.model)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    return tmp_path / "tiny.ckpt"


def parsed_until_instantiation(cls, ckpt: Path) -> tuple[object, list[str]]:
    """``cls(...)`` on ``vpipe validate --ckpt_path CKPT``, stopped before the classes: (the CLI, its steps)."""
    steps: list[str] = []
    seen: list = []

    class Recording(cls):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            steps.append("parse_arguments")

        def checkpoint_model(self, class_path, hparams):
            steps.append(f"checkpoint_model {class_path} {sorted(hparams.items())}")
            return super().checkpoint_model(class_path, hparams)

        def before_instantiate_classes(self) -> None:
            steps.append("before_instantiate_classes")
            seen.append(self)
            raise Stop

    with pytest.raises(Stop):
        Recording(
            pl.LightningModule,
            subclass_mode_model=True,
            save_config_callback=None,
            seed_everything_default=False,
            args=["validate", "--model", f"{__name__}.Tiny", "--ckpt_path", str(ckpt)],
        )
    return seen[0], steps


def test_lightningcli_records_the_class_path_and_instantiator(tiny_checkpoint):
    hparams = torch.load(tiny_checkpoint, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert compat.checkpoint_class_path(hparams) == f"{__name__}.Tiny"
    assert set(hparams) == {"_class_path", "_instantiator", "width"} and hparams["width"] == 3
    assert compat.checkpoint_class_path({"width": 3}) is None  # a model built without LightningCLI


def test_checkpoint_hook_runs_where_lightningcli_reads_the_checkpoint(tiny_checkpoint, monkeypatch):
    """LightningCLI calls the private ``_parse_ckpt_path`` once, after ``parse_arguments`` and before the
    classes; the adapter's default ``checkpoint_model`` gives the config Lightning's own reading gives."""
    monkeypatch.setattr(sys, "argv", ["vpipe"])

    class WithHook(compat.CheckpointHparams, LightningCLI):
        pass

    cli, steps = parsed_until_instantiation(WithHook, tiny_checkpoint)
    assert steps == [
        "parse_arguments",
        f"checkpoint_model {__name__}.Tiny [('width', 3)]",
        "before_instantiate_classes",
    ]
    assert cli.config.validate.model.class_path == f"{__name__}.Tiny"
    assert cli.config.validate.model.init_args.width == 3  # the checkpoint's, not the default 1

    class Plain(LightningCLI):  # Lightning's own _parse_ckpt_path
        def checkpoint_model(self, class_path, hparams):  # never called: only the adapter calls it
            raise AssertionError

    plain, plain_steps = parsed_until_instantiation(Plain, tiny_checkpoint)
    assert plain_steps == ["parse_arguments", "before_instantiate_classes"]
    assert plain.config.validate.model.as_dict() == cli.config.validate.model.as_dict()


def test_setup_train_data_loads_what_estimated_stepping_batches_skips(tmp_path):
    """``configure_optimizers`` runs before Lightning loads the training loader; with ``max_epochs=-1``
    the public ``estimated_stepping_batches`` answers without loading it, the adapter loads it."""
    seen = {}

    class Probe(BoringModel):
        def configure_optimizers(self):
            trainer = self.trainer
            seen["before"] = trainer.train_dataloader
            seen["estimated"] = trainer.estimated_stepping_batches
            seen["after_estimate"] = trainer.train_dataloader
            compat.setup_train_data(trainer)
            seen["batches"] = trainer.num_training_batches
            loader = trainer.train_dataloader
            compat.setup_train_data(trainer)  # loaded: nothing more
            seen["same"] = trainer.train_dataloader is loader
            return super().configure_optimizers()

    trainer = quiet_trainer(tmp_path, max_epochs=-1, max_steps=2, limit_train_batches=5, limit_val_batches=0)
    trainer.fit(Probe())
    assert seen["before"] is None and seen["after_estimate"] is None and seen["estimated"] == 2
    assert seen["batches"] == 5 and seen["same"]
    assert trainer.global_step == 2  # the fit goes on over the loader loaded early


class TwoStepsPerBatch(BoringModel):
    """Manual optimisation with two optimiser steps per batch (as a forecaster's truncated BPTT chunks)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for _ in range(2):
            loss = self.step(batch)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.seen.append((compat.total_batch_idx(self.trainer), self.trainer.global_step))


def test_total_batch_idx_counts_batches_across_epochs_and_resumes(tmp_path):
    model = TwoStepsPerBatch()
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(model)
    assert [i for i, _ in model.seen] == [0, 1, 2, 3, 4, 5]
    assert [s for _, s in model.seen] == [2, 4, 6, 8, 10, 12]  # global_step counts optimiser steps

    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = TwoStepsPerBatch()
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(resumed, ckpt_path=tmp_path / "two.ckpt")
    assert [i for i, _ in resumed.seen] == [6, 7, 8]


# MLflow ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store with one experiment: (uri, client, experiment id)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('compat-store') / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    return uri, client, client.create_experiment("compat")


@contextlib.contextmanager
def fluent(uri: str):
    """MLflow's global tracking URI set to ``uri`` for the fluent API, then put back."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def system_steps(client, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]


def test_system_metrics_of_a_short_job_and_a_resumed_one(store):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    monitor = compat.start_system_metrics(run_id, interval=60, resume=False, tracking_uri=uri)
    time.sleep(0.3)  # the first sample is taken at once; the next would come after 60 s
    compat.stop_system_metrics(monitor)
    assert system_steps(client, run_id) == [0]  # the sample taken since the last logging is logged
    assert "system/system_memory_usage_megabytes" in client.get_run(run_id).data.metrics

    monitor = compat.start_system_metrics(run_id, interval=60, resume=True, tracking_uri=uri)
    time.sleep(0.3)
    compat.stop_system_metrics(monitor)
    assert system_steps(client, run_id) == [0, 1]  # resumed: after the run's last step

    # Why stop_system_metrics logs the last samples itself: MLflow's own stop drops them.
    dropped = client.create_run(experiment).info.run_id
    monitor = compat.start_system_metrics(dropped, interval=60, resume=False, tracking_uri=uri)
    time.sleep(0.3)
    monitor.finish()
    assert system_steps(client, dropped) == []


def test_dataset_input_is_what_log_input_logs(store):
    uri, client, experiment = store
    with fluent(uri), mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_input(mlflow.data.from_numpy(np.arange(3), source="file:///tmp/x", name="d"), "training")
    [logged] = client.get_run(run.info.run_id).inputs.dataset_inputs
    other = client.create_run(experiment).info.run_id
    client.log_inputs(other, datasets=[compat.dataset_input(logged.dataset, "training")])
    [ours] = client.get_run(other).inputs.dataset_inputs
    assert ours.dataset == logged.dataset
    assert [(t.key, t.value) for t in ours.tags] == [(t.key, t.value) for t in logged.tags]
    assert [t.value for t in ours.tags] == ["training"]


def test_link_model_version_is_what_register_model_records(store):
    uri, client, experiment = store
    first = client.create_logged_model(experiment)
    with fluent(uri):
        registered = mlflow.register_model(f"models:/{first.model_id}", "compat-model")
    theirs = client.get_logged_model(first.model_id).tags

    second = client.create_logged_model(experiment)
    with fluent(uri):  # the client resolves a `models:/` source through MLflow's global URI
        version = client.create_model_version(
            "compat-model", f"models:/{second.model_id}", model_id=second.model_id
        )
    compat.link_model_version(client, second.model_id, version.name, version.version)
    ours = client.get_logged_model(second.model_id).tags
    assert set(ours) == set(theirs) and len(ours) == 1
    [key] = ours
    assert json.loads(theirs[key]) == [{"name": "compat-model", "version": registered.version}]
    assert json.loads(ours[key]) == [{"name": "compat-model", "version": version.version}]
    compat.link_model_version(client, second.model_id, "another", "7")  # a second version: appended
    assert json.loads(client.get_logged_model(second.model_id).tags[key])[1] == {
        "name": "another",
        "version": "7",
    }


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str]) -> list[str]:
        return model_input


def test_skip_requirement_check_silences_the_mismatch_warning(tmp_path):
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("mlflow.utils.requirements_utils")
    logger.addHandler(handler)
    try:
        mlflow.pyfunc.save_model(tmp_path / "a", python_model=Echo(), pip_requirements=["numpy==0.0.1"])
        assert any("numpy" in m and "mismatch" in m for m in messages)  # what MLflow does by default
        messages.clear()
        with compat.skip_requirement_check():
            mlflow.pyfunc.save_model(tmp_path / "b", python_model=Echo(), pip_requirements=["numpy==0.0.1"])
        assert not any("mismatch" in m for m in messages)
    finally:
        logger.removeHandler(handler)
    assert "numpy==0.0.1" in (tmp_path / "b" / "requirements.txt").read_text()  # still recorded


def test_the_server_app_and_prefix_are_what_mlflow_server_runs(monkeypatch):
    import mlflow.server
    from mlflow.server import handlers

    monkeypatch.setenv(handlers.STATIC_PREFIX_ENV_VAR, "/mlflow")
    assert compat.mlflow_static_prefix() == "/mlflow"
    monkeypatch.delenv(handlers.STATIC_PREFIX_ENV_VAR)
    assert compat.mlflow_static_prefix() == ""
    # `mlflow server` without --app-name runs this app under uvicorn.
    assert '"mlflow.server.fastapi_app:app"' in inspect.getsource(mlflow.server._run_server)
    app = compat.mlflow_asgi_app()
    assert app is sys.modules["mlflow.server.fastapi_app"].app and callable(app)


# jsonargparse: public API only -------------------------------------------------------------------


def test_config_files_are_logged_as_given(tmp_path, monkeypatch):
    """The ``config`` param: each jsonargparse ``Path`` by its public ``str()``, not its repr."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from pipeline.tracking.runs import flatten, readable_params

    monkeypatch.chdir(tmp_path)
    Path("a.yaml").write_text("x: 2\n")
    Path("b.yaml").write_text("y: 3\n")
    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--x", type=int, default=1)
    parser.add_argument("--y", type=int, default=1)
    config = parser.parse_args(["--config", "a.yaml", "--config", "b.yaml"])
    params = readable_params(flatten(config.as_dict()))
    assert params["config"] == "a.yaml, b.yaml" and params["x"] == 2 and params["y"] == 3


def test_jsonargparse_errors_name_their_option_in_the_text_read():
    """A nested option of the wrong type and a class path that does not exist, as a real jsonargparse
    parser reports them: the adapter finds the option's keys, the class path and the reason."""
    from jsonargparse import ArgumentParser
    from pytorch_lightning import LightningModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--trainer.max_epochs", type=int)
    parser.add_argument("--model", type=LightningModule)

    def chain(args: list[str]) -> list[BaseException]:
        with pytest.raises(Exception) as caught:
            parser.parse_args(args)
        found, err = [], caught.value
        while err is not None and all(err is not e for e in found):
            found.append(err)
            err = err.__cause__ or err.__context__
        return found

    wrong = chain(["--trainer.max_epochs", "abc"])
    assert compat.jsonargparse_keys(wrong) == (["trainer.max_epochs"], None)
    assert compat.jsonargparse_reason(str(wrong[-1]).splitlines()[0]) == "expected int, got abc"
    missing = chain(["--model", '{"class_path": "pipeline.systems.nope.Classifier"}'])
    keys, class_path = compat.jsonargparse_keys(missing)
    assert class_path == "pipeline.systems.nope.Classifier" and keys[0] == "model"
    assert compat.jsonargparse_reason("<class 'pipeline.systems.classifier.Classifier'> x") == "Classifier x"
