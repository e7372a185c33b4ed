"""What a training run records about itself (Lightning callbacks, plugins and its logger): its resolved
config (:class:`LogConfigToMLflow`), its input stores and system metrics (:class:`RunInputs`), its MLflow
run id and inference recipe inside every checkpoint (:class:`RunIdInCheckpoint`,
:class:`InferenceRecipe`), checkpoints written atomically (:class:`AtomicCheckpointIO`), and the MLflow
logger whose calls :mod:`pipeline.tracking.timings` tells apart from training (:class:`RunLogger`)."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from pipeline.tracking import inputs, timings
from pipeline.tracking import runs as tracking


class RunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, its time accounted for (``$VPIPE_TIMINGS``): opening the run is MLflow
    set-up, what it logs (params, metrics, checkpoints at the end) is logging."""

    opened = False  # whether `experiment` has returned once (the run is open on rank zero)

    @property
    def experiment(self):
        if self.opened:
            return super().experiment
        with timings.phase("mlflow"):
            experiment = super().experiment
        self.opened = True
        return experiment

    def log_hyperparams(self, params) -> None:
        with timings.phase("logging"):
            super().log_hyperparams(params)

    def log_metrics(self, metrics, step: int | None = None) -> None:
        with timings.phase("logging"):
            super().log_metrics(metrics, step)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        with timings.phase("logging"):
            super().after_save_checkpoint(checkpoint_callback)

    def finalize(self, status: str = "success") -> None:
        with timings.phase("logging"):
            super().finalize(status)


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

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if (logger := tracking.run_logger(trainer)) is not None and trainer.is_global_zero:
            checkpoint[self.KEY] = logger.run_id


class RunInputs(Callback):
    """On rank zero of a tracked run: the stores the data module reads as the run's datasets (a feature
    store with the frame store it came from; context ``training`` for fit, ``evaluation`` otherwise), and
    MLflow's system metrics while each stage runs (``system_metrics: false`` turns them off)."""

    def __init__(self, system_metrics: bool = True):
        self.system_metrics = system_metrics
        self.monitor: tracking.SystemMetrics | None = None
        self.logged = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logger = tracking.run_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        with timings.phase("logging"):
            self._start(trainer, logger, stage)

    def _start(self, trainer: pl.Trainer, logger, stage: str) -> None:
        if not self.logged:
            stores = [
                s
                for s in (
                    *inputs.data_inputs(trainer.datamodule),
                    getattr(trainer.datamodule, "inputs", {}).get("grids"),
                )
                if s
            ]
            inputs.log_datasets(
                logger.experiment, logger.run_id, stores, "training" if stage == "fit" else "evaluation"
            )
            self.logged = True
        self.monitor = tracking.SystemMetrics(
            logger.run_id, self.system_metrics, resume=stage != "fit"
        ).__enter__()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            with timings.phase("logging"):
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
        init.update(
            {
                k: v
                for k, v in pl_module.hparams.items()
                if k in accepted
                and isinstance(v, int | float | str | bool | list)
                and not isinstance(init.get(k), dict)
            }
        )
        config["init_args"] = init
        features, frames = inputs.data_inputs(dm)
        features_meta = inputs.read_meta(features) if features else None
        frames = frames or (features_meta or {}).get("frames")
        self.recipe = {
            "task": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "model": config,
            "input": "features" if features else "frames",
            "classes": list(getattr(dm, "classes", [])),
            "num_segments": getattr(dm, "num_segments", None),
            "modality": getattr(dm, "modality", "rgb"),
            "features_meta": features_meta,
            # Features computed straight from videos (vpipe features --manifest) carry the frame-store
            # meta their frames would have had: how to decode new videos like them.
            "frames_meta": (inputs.read_meta(frames) if frames else None)
            or (features_meta or {}).get("frames_meta"),
        }

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if self.recipe is not None:
            checkpoint[self.KEY] = self.recipe


class LogConfigToMLflow(SaveConfigCallback):
    """Logs the resolved config as ``config.yaml`` and as flattened params (rank zero only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with timings.phase("logging"):
            self._log_config(trainer)

    def _log_config(self, trainer: pl.Trainer) -> None:
        if (logger := tracking.run_logger(trainer)) is not None:
            text = self.parser.dump(self.config, skip_none=False)
            params = tracking.readable_params(tracking.flatten(self.config.as_dict()))
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
