"""Training entry point: LightningCLI with this project's recipe.

``vpipe fit -c configs/NAME.yaml`` trains, then tests the best checkpoint, then writes
``metrics/NAME.json``; checkpoints go to ``models/NAME/{best,last}.ckpt``, per-epoch curves to
``plots/NAME/epochs.csv``, and everything into one MLflow run of experiment NAME.

``vpipe validate|test|predict -c configs/NAME.yaml`` evaluate ``models/NAME/best.ckpt`` unless
``--ckpt_path`` names another checkpoint (``last`` means ``models/NAME/last.ckpt``), and refuse to run
when it does not exist: untrained weights would overwrite ``metrics/NAME.json`` with chance values.
``vpipe predict`` writes ``predictions/NAME-SPLIT.csv`` (see :class:`PredictionCSV`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_warn

from pipeline import compat
from pipeline.media.errors import UserError
from pipeline.tracking import inputs, timings
from pipeline.tracking import runs as tracking
from pipeline.tracking.callbacks import PredictionCSV, fit_callbacks, report_callbacks
from pipeline.tracking.lineage import (
    AtomicCheckpointIO,
    LogConfigToMLflow,
    RunIdInCheckpoint,
    RunInputs,
    RunLogger,
)
from pipeline.tracking.workspace import workspace


class CommandError(ValueError, UserError):
    """A training command cannot run as given; the message says why and what to run instead."""


class VPipeCLI(compat.CheckpointHparams, LightningCLI):
    """LightningCLI plus: a ``name`` per experiment, links from data to model, MLflow, fit → test → metrics."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--name", required=True, help="experiment name: models/NAME, metrics/NAME.json, MLflow experiment"
        )
        parser.add_argument("--monitor", default="val/acc", help="metric that selects the best checkpoint")
        parser.add_argument("--monitor_mode", default="max", choices=["min", "max"])
        parser.add_argument(
            "--export_backbone",
            type=bool,
            default=False,
            help="the backbone stage: after fit, validate the best checkpoint (the test split is never "
            "read) and write its CNN to models/NAME/backbone.safetensors + backbone.json",
        )
        parser.add_argument(
            "--system_metrics",
            type=bool,
            default=True,
            help="log MLflow's system metrics (CPU, memory; GPU when present) during the run, on rank zero",
        )
        parser.add_argument(
            "--predict_split",
            default="test",
            choices=["train", "val", "test", "all"],
            help="vpipe predict: the split whose videos are predicted (predictions/NAME-SPLIT.csv)",
        )
        # A progress bar on a terminal; none in logs (dvc repro, SLURM, CI), where it would fill them with redraws.
        parser.set_defaults({"trainer.enable_progress_bar": sys.stderr.isatty()})
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_dim", "model.init_args.input_dim", apply_on="instantiate")
        # Forecasting data modules (pipeline.datasets.sequences.SequenceDataModule) also give the window and the
        # video format; a link whose source or target a class lacks is skipped.
        # pipeline.datasets.caption_clips.CaptionDataModule gives the vocabulary.
        for key in ("context", "horizon", "video_format", "vocabulary", "covariates", "scale"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    @property
    def experiment(self) -> str:
        return self._setting(self.config, "name")

    def _setting(self, config, key: str, default=None):
        """``key`` of the running subcommand's part of ``config`` (of ``config`` itself without one)."""
        return config.get(str(self.subcommand), config).get(key, default)

    def checkpoint_model(self, class_path: str | None, hparams: dict) -> dict:
        """As LightningCLI's (the checkpoint's hyperparameters become the model's arguments), less the
        ones its class does not take: values linked from a data module that this model has no use for
        (``num_classes`` for a captioner) would otherwise fail `vpipe test|validate|predict`."""
        if class_path is not None:
            module, _, name = class_path.rpartition(".")
            accepted = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
                hparams = {k: v for k, v in hparams.items() if k in accepted}
        return super().checkpoint_model(class_path, hparams)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand in ("validate", "test", "predict"):
            # Before LightningCLI reads the checkpoint's hyperparameters, which it does for a given path only.
            self.config[subcommand].ckpt_path = self._evaluated_checkpoint(
                subcommand, self.config[subcommand]
            )

    @staticmethod
    def _evaluated_checkpoint(subcommand: str, config) -> str | None:
        """The checkpoint validate, test and predict evaluate: ``--ckpt_path`` (``best`` and ``last`` name
        ``models/NAME/{best,last}.ckpt``), by default ``models/NAME/best.ckpt``; it must exist."""
        ckpt = config.get("ckpt_path")
        if ckpt == "hpc" or "://" in str(ckpt):  # Lightning's SLURM auto-requeue checkpoint; remote storage
            return ckpt
        models = workspace() / "models" / config.get("name")
        path = models / f"{ckpt or 'best'}.ckpt" if ckpt in (None, "best", "last") else Path(ckpt)
        if not path.is_file():
            configs = " ".join(f"-c {c}" for c in config.get("config") or []) or "-c configs/NAME.yaml"
            raise CommandError(
                f"no checkpoint at {path}: vpipe {subcommand} evaluates trained weights, not a random "
                f"initialisation; train first with `vpipe fit {configs}`, or give --ckpt_path PATH"
            )
        return str(path)

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        root = workspace()
        name = self.experiment
        if self.subcommand == "predict" and type(self.model).predict_step is pl.LightningModule.predict_step:
            raise CommandError(
                f"{type(self.model).__qualname__} has no predict step: vpipe predict writes the class "
                "predictions of a pipeline.systems.classifier.Classifier; roll out a forecaster with "
                "`vpipe forecast VIDEO --ckpt CKPT --out OUT.mp4`"
            )
        config = self._setting(self.config_init, "trainer", default={})
        callbacks = []  # after the config's; LightningCLI adds its own (the config saver) after these
        if self.subcommand == "fit":
            monitor = (self._setting(self.config, "monitor"), self._setting(self.config, "monitor_mode"))
            model_config = self._setting(self.config, "model").as_dict()
            callbacks += fit_callbacks(root / "models" / name, root / "plots" / name, *monitor, model_config)
        if self.subcommand in ("fit", "test"):
            callbacks += report_callbacks(root / "plots" / name, self.model)
        if self.subcommand == "predict":
            split = self._setting(self.config, "predict_split")
            self.datamodule.predict_split = split
            callbacks.append(PredictionCSV(root / "predictions" / f"{name}-{split}.csv"))
        if config.get("logger") in (None, True):
            with timings.phase("mlflow"):
                kwargs["logger"] = self._logger(root, name)
            callbacks += [RunIdInCheckpoint(), RunInputs(self._setting(self.config, "system_metrics"))]
        if not config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if config.get("strategy") == "ddp" and getattr(self.model, "unused_parameters", False):
            # DDP waits for a gradient of every parameter unless told some may have none.
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        given = config.get("callbacks")  # none, one or a list, as LightningCLI takes them
        kwargs["callbacks"] = [
            *([] if given is None else given if isinstance(given, list) else [given]),
            *callbacks,
        ]
        return super().instantiate_trainer(**kwargs)

    def _logger(self, root: Path, name: str):
        """The run's MLFlowLogger, with its lineage tags (the git commit, the stores and configs read)."""
        configs = [str(c) for c in self._setting(self.config, "config", default=None) or []]
        tags = tracking.run_tags(
            feature_cache_key=getattr(self.datamodule, "cache_key", ""),
            **inputs.lineage_tags(
                *inputs.data_inputs(self.datamodule),
                configs,
                grids=getattr(self.datamodule, "inputs", {}).get("grids"),
            ),
        )
        run_id = self._resumed_run_id(root / "models" / name) if self.subcommand == "fit" else None
        # Under `dvc exp run` the run is named after the DVC experiment, so a sweep's runs tell apart.
        run_name = os.environ.get("DVC_EXP_NAME") if self.subcommand == "fit" else None
        return tracking.mlflow_logger(
            name, run_name=run_name or f"{name}-{self.subcommand}", tags=tags, run_id=run_id, cls=RunLogger
        )

    def after_instantiate_classes(self) -> None:
        if self.subcommand is not None:  # LightningCLI runs it next
            timings.start_work()  # start-up is over: the garbage collector runs again
            timings.switch("work")  # the phases of what follows: training and testing, MLflow logging

    def _resumed_run_id(self, models: Path) -> str | None:
        """The MLflow run of the checkpoint a fit resumes from (``--ckpt_path last`` or a path), if any."""
        ckpt = self._setting(self.config, "ckpt_path")
        path = (
            models / "last.ckpt"
            if ckpt == "last"
            else Path(ckpt)
            if ckpt and ckpt not in ("best", "hpc")
            else None
        )
        if path is None or not path.is_file():
            return None
        # mmap: only the run id is needed here; Lightning reads the weights when it restores them.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(RunIdInCheckpoint.KEY)

    def after_fit(self) -> None:
        """Test the best checkpoint, write ``metrics/NAME.json``, register the best checkpoint in MLflow
        (with ``export_backbone``: :meth:`export_backbone` instead)."""
        if self._setting(self.config, "export_backbone"):
            self.export_backbone()
            return
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        if not best:  # no validation ran (e.g. max_epochs below check_val_every_n_epoch): the last weights
            best = str(workspace() / "models" / self.experiment / "last.ckpt")
            rank_zero_warn(
                f"{self.experiment}: no validation ran, so no best checkpoint; testing and registering {best}"
            )
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
        metrics = self.after_test()
        if (logger := tracking.run_logger(self.trainer)) is not None and self.trainer.is_global_zero and best:
            with timings.phase("logging"):
                self._register(logger, Path(best), metrics)

    def _register(self, logger, best: Path, metrics: dict[str, float]) -> None:
        """The best checkpoint as a new version of the registered model NAME, linked from the run."""
        tags = {
            k: v
            for k, v in logger.experiment.get_run(logger.run_id).data.tags.items()
            if k in ("git_commit", "git_dirty", "dvc_stage", "dvc_exp_name", "data.features.cache_key")
        }
        from pipeline.inference import serving  # mlflow.pyfunc and pandas: only when a model is registered

        version = serving.register_best(
            logger.experiment, self.experiment, logger.run_id, best, metrics, tags
        )
        logger.experiment.set_tag(logger.run_id, "registered_model", f"models:/{self.experiment}/{version}")

    def export_backbone(self) -> None:
        """The backbone stage's ending: validate the best checkpoint, then write its CNN (no classifier) to
        ``models/NAME/backbone.safetensors`` with a card ``backbone.json`` (name, input size, modality,
        frame store hash, objective, val metrics) and the val metrics to ``metrics/NAME.json``. The test
        split stays unseen: the temporal heads trained on these features report on it."""
        from pipeline.models import backbone

        model, dm = self.model, self.datamodule
        if getattr(model, "encoder", None) is None:
            raise ValueError(
                f"{self.experiment}: export_backbone needs a model with `backbone: NAME` (trained end to end)"
            )
        self.trainer.validate(model, datamodule=dm, ckpt_path="best")  # loads the best weights into model
        metrics = self._write_metrics("val/")
        if not self.trainer.is_global_zero:
            return
        store = dm.store_meta
        card = {
            "backbone": model.hparams.backbone,
            "input_size": int(model.encoder.prep.input_size[0]),
            "modality": getattr(dm, "modality", "rgb"),
            "frames": str(dm.store.root),
            "frames_content_hash": store.get("content_hash"),
            "num_segments": dm.num_segments,
            "objective": f"clip classification, {type(model.head).__name__} over {dm.num_segments} segments",
            "classes": list(dm.classes),
            "best_epoch": self._best_epoch(),
            "val": metrics,
        }
        path = workspace() / "models" / self.experiment / "backbone.safetensors"
        card = backbone.save(model.encoder.model, path, card)
        if (logger := tracking.run_logger(self.trainer)) is not None:
            with timings.phase("logging"):
                for file in (path, backbone.card_path(path)):
                    logger.experiment.log_artifact(logger.run_id, str(file), "backbone")
                logger.experiment.set_tag(logger.run_id, "backbone.weights_sha256", card["weights_sha256"])

    def _best_epoch(self) -> int | None:
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        if not best:
            return None
        return int(torch.load(best, map_location="cpu", weights_only=True, mmap=True).get("epoch", -1))

    def after_test(self) -> dict[str, float]:
        """Write the test metrics to ``metrics/NAME.json``; returns them."""
        return self._write_metrics("test/")

    def _write_metrics(self, prefix: str) -> dict[str, float]:
        """The metrics named ``prefix...`` (synced over all ranks), rounded, to ``metrics/NAME.json`` and the
        MLflow run, on rank zero; returns them."""
        metrics = {
            k: round(float(v), 6)
            for k, v in sorted(self.trainer.callback_metrics.items())
            if k.startswith(prefix)
        }
        if self.trainer.is_global_zero:
            path = workspace() / "metrics" / f"{self.experiment}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics, indent=2) + "\n")
            if (logger := tracking.run_logger(self.trainer)) is not None:
                with timings.phase("logging"):  # the file's values, not float32's
                    logger.log_metrics(metrics, step=self.trainer.global_step)
        return metrics


def cli_main(args: list[str] | None = None, exit_on_error: bool = True) -> VPipeCLI:
    """``vpipe fit|validate|test|predict ARGS``; ``exit_on_error=False``: a bad option or config raises
    jsonargparse's ``ArgumentError`` (:func:`pipeline.cli.main` prints it as one line) instead of exiting."""
    timings.switch("config")
    # Subnormal floats (below 1.2e-38: gates and cell states of saturated recurrent cells, their
    # gradients) take the CPU's slow path, up to 4x slower per step; they are flushed to zero instead.
    torch.set_flush_denormal(True)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return VPipeCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LogConfigToMLflow,
            args=args,
            seed_everything_default=0,
            parser_kwargs={"default_env": False, "exit_on_error": exit_on_error},
        )
    finally:
        timings.switch("other")
        if os.environ.get("MLFLOW_TRACKING_URI") != previous:
            # mlflow.set_tracking_uri (the logger calls it) exports the run's store to the environment,
            # where a later run in this process (of another VPIPE_ROOT) would take it for its own.
            import mlflow

            mlflow.set_tracking_uri(previous)
