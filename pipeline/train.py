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

import csv
import importlib
import inspect
import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.logger import _convert_params, _flatten_dict
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.model_helpers import is_overridden

from pipeline import tracking
from pipeline.forecast import ForecastReport


class CommandError(ValueError):
    """A training command cannot run as given; the message says why and what to run instead."""


class LogConfigToMLflow(SaveConfigCallback):
    """Logs the resolved config as ``config.yaml`` and as flattened params (rank zero only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                text = self.parser.dump(self.config, skip_none=False)
                params = tracking.readable_params(_flatten_dict(_convert_params(self.config.as_dict())))
                logged = logger.experiment.get_run(logger.run_id).data.params
                if logged:  # a resumed run: MLflow params are immutable, so keep the first and add new keys
                    logger.experiment.log_text(logger.run_id, text, "config-resumed.yaml")
                    params = {k: v for k, v in params.items() if k not in logged}
                else:
                    logger.experiment.log_text(logger.run_id, text, "config.yaml")
                if params:
                    logger.log_hyperparams(params)
                # Known only now: the launcher sets up the other ranks after the logger exists.
                logger.experiment.set_tag(logger.run_id, "world_size", str(trainer.world_size))


class EpochCSV(Callback):
    """Rewrites ``path`` (for ``dvc plots``) after every training epoch: one row per epoch, every
    epoch-level ``train/`` and ``val/`` metric (validation runs before ``on_train_epoch_end``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path and self.path.is_file():  # resumed: keep the epochs before the checkpoint
            with open(self.path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < trainer.current_epoch]

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # With check_val_every_n_epoch > 1, val/ values of an epoch without validation would be the last ones again.
        every = trainer.check_val_every_n_epoch
        stages = ("train/", "val/") if not every or (trainer.current_epoch + 1) % every == 0 else ("train/",)
        metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith(stages)}
        self.rows.append({"epoch": trainer.current_epoch, **metrics})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)


class ConfusionReport(Callback):
    """After testing: the confusion matrix as a PNG, per-class precision/recall/F1 as a CSV, and one
    ``actual,predicted`` row per test clip (for ``dvc plots``' confusion template), in ``folder`` and
    as MLflow artifacts."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        matrix = getattr(pl_module, "test_confusion", None)
        if matrix is None:
            return
        classes = list(getattr(trainer.datamodule, "classes", range(len(matrix))))
        matrix = matrix.numpy().astype(int)
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "predictions.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["actual", "predicted"])
            for i, j in zip(*matrix.nonzero(), strict=True):
                writer.writerows([[classes[i], classes[j]]] * matrix[i, j])
        with open(self.folder / "per_class.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["class", "precision", "recall", "f1", "support"])
            for i, name in enumerate(classes):
                tp, predicted, support = matrix[i, i], matrix[:, i].sum(), matrix[i].sum()
                precision = tp / predicted if predicted else 0.0
                recall = tp / support if support else 0.0
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
                writer.writerow([name, f"{precision:.4f}", f"{recall:.4f}", f"{f1:.4f}", support])
        self._png(matrix, classes)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                for name in ("confusion.png", "per_class.csv", "predictions.csv"):
                    logger.experiment.log_artifact(logger.run_id, str(self.folder / name), "test")

    def _png(self, matrix, classes) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        size = 2 + 0.45 * len(classes)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        image = ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        for i in range(len(classes)):
            for j in range(len(classes)):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if matrix[i, j] > matrix.max() / 2 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(self.folder / "confusion.png", dpi=100)
        plt.close(fig)


class PredictionCSV(Callback):
    """After ``vpipe predict``: ``path`` holds one ``video_id,label,predicted,score`` row per video
    (``label`` the store's, ``score`` the softmax probability of the predicted class), sorted by video id,
    gathered from every rank and written atomically by rank zero; also an MLflow artifact."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[tuple[str, str, str, float]] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        classes = list(trainer.datamodule.classes)
        self.rows += [(video, classes[y], classes[p], score) for video, y, p, score in
                      zip(outputs["video_id"], outputs["y"].tolist(), outputs["predicted"].tolist(), outputs["score"].tolist(),
                          strict=True)]

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self.rows
        if trainer.world_size > 1:  # each rank predicted its own videos (an unrepeated sampler): join them
            import torch

            parts: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, rows)
            rows = [row for part in parts for row in part]
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["video_id", "label", "predicted", "score"])
            writer.writerows((video, label, predicted, f"{score:.6f}") for video, label, predicted, score in sorted(rows))
        os.replace(tmp, self.path)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(self.path), "predict")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place: a job killed while
    saving leaves the previous ``last.ckpt`` intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class RunIdInCheckpoint(Callback):
    """Stores the MLflow run id in every checkpoint, so a resumed fit continues the same run."""

    KEY = "mlflow_run_id"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                checkpoint[self.KEY] = logger.run_id


class RunInputs(Callback):
    """On rank zero of a tracked run: the stores the data module reads as the run's datasets (a feature
    store with the frame store it came from; context ``training`` for fit, ``evaluation`` otherwise), and
    MLflow's system metrics while each stage runs (``system_metrics: false`` turns them off)."""

    def __init__(self, system_metrics: bool = True):
        self.system_metrics = system_metrics
        self.monitor: tracking.SystemMetrics | None = None
        self.logged = False

    @staticmethod
    def _logger(trainer: pl.Trainer) -> MLFlowLogger | None:
        return next((logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)), None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logger = self._logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        if not self.logged:
            stores = [s for s in (*tracking.data_inputs(trainer.datamodule), getattr(trainer.datamodule, "grids", None)) if s]
            tracking.log_datasets(logger.experiment, logger.run_id, stores, "training" if stage == "fit" else "evaluation")
            self.logged = True
        self.monitor = tracking.SystemMetrics(logger.run_id, self.system_metrics, resume=stage != "fit").__enter__()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.__exit__(None, None, None)
            self.monitor = None


class InferenceRecipe(Callback):
    """Stores in every checkpoint (``checkpoint["vpipe"]``) what inference on a new video needs:
    the model's config with its linked values, the class names, the clip length, and the ``meta.json``
    of the frame store (decoding: fps, size) and of the feature store (backbone, weights, input size,
    pooling), so ``vpipe classify`` repeats the preprocessing the model was trained on."""

    KEY = "vpipe"

    def __init__(self, model_config: dict):
        self.model_config = model_config
        self.recipe: dict | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        config = json.loads(json.dumps(self.model_config, default=str))
        # Values linked from the data module (input_dim, num_classes, ...) are known only now.
        # Only the model's own arguments: a link whose target it lacks (num_classes for a captioner) is left out.
        accepted = inspect.signature(type(pl_module).__init__).parameters
        init = {k: v for k, v in config.get("init_args", {}).items() if k in accepted}
        init.update({k: v for k, v in pl_module.hparams.items() if k in accepted and isinstance(v, int | float | str | bool | list)
                     and not isinstance(init.get(k), dict)})
        config["init_args"] = init
        features, frames = tracking.data_inputs(dm)
        features_meta = tracking._meta(features) if features else None
        frames = frames or (features_meta or {}).get("frames")
        self.recipe = {
            "task": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}", "model": config,
            "input": "features" if features else "frames", "classes": list(getattr(dm, "classes", [])),
            "num_segments": getattr(dm, "num_segments", None), "modality": getattr(dm, "modality", "rgb"),
            "features_meta": features_meta,
            "frames_meta": tracking._meta(frames) if frames else None,
        }

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.recipe is not None:
            checkpoint[self.KEY] = self.recipe


class VPipeCLI(LightningCLI):
    """LightningCLI plus: a ``name`` per experiment, links from data to model, MLflow, fit → test → metrics."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", required=True, help="experiment name: models/NAME, metrics/NAME.json, MLflow experiment")
        parser.add_argument("--monitor", default="val/acc", help="metric that selects the best checkpoint")
        parser.add_argument("--monitor_mode", default="max", choices=["min", "max"])
        parser.add_argument("--export_backbone", type=bool, default=False,
                            help="the backbone stage: after fit, validate the best checkpoint (the test split is never "
                                 "read) and write its CNN to models/NAME/backbone.safetensors + backbone.json")
        parser.add_argument("--system_metrics", type=bool, default=True,
                            help="log MLflow's system metrics (CPU, memory; GPU when present) during the run, on rank zero")
        parser.add_argument("--predict_split", default="test", choices=["train", "val", "test", "all"],
                            help="vpipe predict: the split whose videos are predicted (predictions/NAME-SPLIT.csv)")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_dim", "model.init_args.input_dim", apply_on="instantiate")
        # Forecasting data modules (pipeline.data.SequenceDataModule) also give the window and the
        # video format; a link whose source or target a class lacks is skipped.
        # pipeline.captioning.CaptionDataModule gives the vocabulary.
        for key in ("context", "horizon", "video_format", "vocabulary", "covariates", "scale"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    @property
    def experiment(self) -> str:
        return self._get(self.config, "name")

    def _parse_ckpt_path(self) -> None:
        """As LightningCLI's (the checkpoint's hyperparameters become the model's arguments), less the
        ones its class does not take: values linked from a data module that this model has no use for
        (``num_classes`` for a captioner) would otherwise fail `vpipe test|validate|predict`."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            class_path = hparams.pop("_class_path")
            module, _, name = class_path.rpartition(".")
            accepted = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
                hparams = {k: v for k, v in hparams.items() if k in accepted}
            hparams = {"class_path": class_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand in ("validate", "test", "predict"):
            # Before LightningCLI reads the checkpoint's hyperparameters, which it does for a given path only.
            self.config[subcommand].ckpt_path = self._evaluated_checkpoint(subcommand, self.config[subcommand])

    @staticmethod
    def _evaluated_checkpoint(subcommand: str, config) -> str | None:
        """The checkpoint validate, test and predict evaluate: ``--ckpt_path`` (``best`` and ``last`` name
        ``models/NAME/{best,last}.ckpt``), by default ``models/NAME/best.ckpt``; it must exist."""
        ckpt = config.get("ckpt_path")
        if ckpt == "hpc" or "://" in str(ckpt):  # Lightning's SLURM auto-requeue checkpoint; remote storage
            return ckpt
        models = tracking.workspace() / "models" / config.get("name")
        path = models / f"{ckpt or 'best'}.ckpt" if ckpt in (None, "best", "last") else Path(ckpt)
        if not path.is_file():
            configs = " ".join(f"-c {c}" for c in config.get("config") or []) or "-c configs/NAME.yaml"
            raise CommandError(f"no checkpoint at {path}: vpipe {subcommand} evaluates trained weights, not a random "
                               f"initialisation; train first with `vpipe fit {configs}`, or give --ckpt_path PATH")
        return str(path)

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        root = tracking.workspace()
        name = self.experiment
        if self.subcommand == "predict" and not is_overridden("predict_step", self.model):
            raise CommandError(f"{type(self.model).__qualname__} has no predict step: vpipe predict writes the class "
                               "predictions of a pipeline.tasks.Classifier; roll out a forecaster with "
                               "`vpipe forecast VIDEO --ckpt CKPT --out OUT.mp4`")
        config = self._get(self.config_init, "trainer", default={})
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if self.subcommand == "fit":
            callbacks += [
                ModelCheckpoint(dirpath=root / "models" / name, filename="best", monitor=self._get(self.config, "monitor"),
                                mode=self._get(self.config, "monitor_mode"), save_last=False, enable_version_counter=False),
                # last.ckpt after every epoch, improved or not (save_last only copies when a best is saved): resume from it.
                ModelCheckpoint(dirpath=root / "models" / name, filename="last", save_top_k=1, enable_version_counter=False,
                                save_on_train_epoch_end=True),
                EpochCSV(root / "plots" / name / "epochs.csv"),
                InferenceRecipe(self._get(self.config, "model").as_dict()),
            ]
        if self.subcommand in ("fit", "test"):
            callbacks += [ConfusionReport(root / "plots" / name), ForecastReport(root / "plots" / name)]
            if type(self.model).__module__ == "pipeline.captioning":  # imported for captioners only (DVC deps)
                from pipeline.captioning import CaptionReport

                callbacks.append(CaptionReport(root / "plots" / name))
        if self.subcommand == "predict":
            split = self._get(self.config, "predict_split")
            self.datamodule.predict_split = split
            callbacks.append(PredictionCSV(root / "predictions" / f"{name}-{split}.csv"))
        if config.get("logger") in (None, True):
            configs = [str(c) for c in self._get(self.config, "config", default=None) or []]
            tags = tracking.run_tags(feature_cache_key=getattr(self.datamodule, "cache_key", ""),
                                     **tracking.lineage_tags(*tracking.data_inputs(self.datamodule), configs,
                                                             grids=getattr(self.datamodule, "grids", None)))
            run_id = self._resumed_run_id(root / "models" / name) if self.subcommand == "fit" else None
            # Under `dvc exp run` the run is named after the DVC experiment, so a sweep's runs tell apart.
            run_name = os.environ.get("DVC_EXP_NAME") if self.subcommand == "fit" else None
            kwargs["logger"] = tracking.mlflow_logger(name, run_name=run_name or f"{name}-{self.subcommand}", tags=tags,
                                                      run_id=run_id)
            callbacks += [RunIdInCheckpoint(), RunInputs(self._get(self.config, "system_metrics"))]
        if not config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if config.get("strategy") == "ddp" and getattr(self.model, "unused_parameters", False):
            # DDP waits for a gradient of every parameter unless told some may have none.
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        return self._instantiate_trainer({**config, **kwargs}, callbacks)

    def _resumed_run_id(self, models: Path) -> str | None:
        """The MLflow run of the checkpoint a fit resumes from (``--ckpt_path last`` or a path), if any."""
        ckpt = self._get(self.config, "ckpt_path")
        path = models / "last.ckpt" if ckpt == "last" else Path(ckpt) if ckpt and ckpt not in ("best", "hpc") else None
        if path is None or not path.is_file():
            return None
        import torch

        # mmap: only the run id is needed here; Lightning reads the weights when it restores them.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(RunIdInCheckpoint.KEY)

    def after_fit(self) -> None:
        """Test the best checkpoint, write ``metrics/NAME.json``, register the best checkpoint in MLflow
        (with ``export_backbone``: :meth:`export_backbone` instead)."""
        if self._get(self.config, "export_backbone"):
            self.export_backbone()
            return
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        if not best:  # no validation ran (e.g. max_epochs below check_val_every_n_epoch): the last weights
            best = str(tracking.workspace() / "models" / self.experiment / "last.ckpt")
            rank_zero_warn(f"{self.experiment}: no validation ran, so no best checkpoint; testing and registering {best}")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
        metrics = self.after_test()
        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger) and self.trainer.is_global_zero and best:
                tags = {k: v for k, v in logger.experiment.get_run(logger.run_id).data.tags.items()
                        if k in ("git_commit", "git_dirty", "dvc_stage", "dvc_exp_name", "data.features.cache_key")}
                version = tracking.register_best(logger.experiment, self.experiment, logger.run_id, Path(best), metrics, tags)
                logger.experiment.set_tag(logger.run_id, "registered_model", f"models:/{self.experiment}/{version}")

    def export_backbone(self) -> None:
        """The backbone stage's ending: validate the best checkpoint, then write its CNN (no classifier) to
        ``models/NAME/backbone.safetensors`` with a card ``backbone.json`` (name, input size, modality,
        frame store hash, objective, val metrics) and the val metrics to ``metrics/NAME.json``. The test
        split stays unseen: the temporal heads trained on these features report on it."""
        from pipeline import backbone

        model, dm = self.model, self.datamodule
        if getattr(model, "encoder", None) is None:
            raise ValueError(f"{self.experiment}: export_backbone needs a model with `backbone: NAME` (trained end to end)")
        self.trainer.validate(model, datamodule=dm, ckpt_path="best")  # loads the best weights into model
        metrics = {k: round(float(v), 6) for k, v in sorted(self.trainer.callback_metrics.items()) if k.startswith("val/")}
        if not self.trainer.is_global_zero:
            return
        root = tracking.workspace()
        store = dm.store_meta
        card = {"backbone": model.hparams.backbone, "input_size": int(model.encoder.prep.input_size[0]),
                "modality": getattr(dm, "modality", "rgb"), "frames": str(dm.store.root),
                "frames_content_hash": store.get("content_hash"), "num_segments": dm.num_segments,
                "objective": f"clip classification, {type(model.head).__name__} over {dm.num_segments} segments",
                "classes": list(dm.classes), "best_epoch": self._best_epoch(), "val": metrics}
        path = root / "models" / self.experiment / "backbone.safetensors"
        card = backbone.save(model.encoder.model, path, card)
        out = root / "metrics" / f"{self.experiment}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.log_metrics(metrics, step=self.trainer.global_step)
                for file in (path, backbone.card_path(path)):
                    logger.experiment.log_artifact(logger.run_id, str(file), "backbone")
                logger.experiment.set_tag(logger.run_id, "backbone.weights_sha256", card["weights_sha256"])

    def _best_epoch(self) -> int | None:
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        if not best:
            return None
        import torch

        return int(torch.load(best, map_location="cpu", weights_only=True, mmap=True).get("epoch", -1))

    def after_test(self) -> dict[str, float]:
        """Write the test metrics (synced over all ranks) to ``metrics/NAME.json`` on rank zero; returns them."""
        metrics = {k: round(float(v), 6) for k, v in sorted(self.trainer.callback_metrics.items()) if k.startswith("test/")}
        if self.trainer.is_global_zero:
            path = tracking.workspace() / "metrics" / f"{self.experiment}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics, indent=2) + "\n")
            for logger in self.trainer.loggers:
                if isinstance(logger, MLFlowLogger):  # the values of the file, not float32's 0.30000001 (same step)
                    logger.log_metrics(metrics, step=self.trainer.global_step)
        return metrics


def cli_main(args: list[str] | None = None) -> VPipeCLI:
    # Subnormal floats (below 1.2e-38: gates and cell states of saturated recurrent cells, their
    # gradients) take the CPU's slow path, up to 4x slower per step; they are flushed to zero instead.
    torch.set_flush_denormal(True)
    return VPipeCLI(
        pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_callback=LogConfigToMLflow, args=args, seed_everything_default=0,
        parser_kwargs={"default_env": False},
    )
