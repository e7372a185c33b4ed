"""Training entry point: LightningCLI with this project's recipe.

``vpipe fit -c configs/NAME.yaml`` trains, then tests the best checkpoint, then writes
``metrics/NAME.json``; checkpoints go to ``models/NAME/{best,last}.ckpt``, per-epoch curves to
``plots/NAME/epochs.csv``, and everything into one MLflow run of experiment NAME.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from pipeline import tracking


class LogConfigToMLflow(SaveConfigCallback):
    """Logs the resolved config as ``config.yaml`` and as flattened params (rank zero only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                text = self.parser.dump(self.config, skip_none=False)
                logger.experiment.log_text(logger.run_id, text, "config.yaml")
                logger.log_hyperparams(self.config.as_dict())


class EpochCSV(Callback):
    """Rewrites ``path`` (for ``dvc plots``) after every training epoch: one row per epoch, every
    epoch-level ``train/`` and ``val/`` metric (validation runs before ``on_train_epoch_end``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        self.rows.append({"epoch": trainer.current_epoch, **metrics})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)


class VPipeCLI(LightningCLI):
    """LightningCLI plus: a ``name`` per experiment, links from data to model, MLflow, fit → test → metrics."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", required=True, help="experiment name: models/NAME, metrics/NAME.json, MLflow experiment")
        parser.add_argument("--monitor", default="val/acc", help="metric that selects the best checkpoint")
        parser.add_argument("--monitor_mode", default="max", choices=["min", "max"])
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_dim", "model.init_args.input_dim", apply_on="instantiate")

    @property
    def experiment(self) -> str:
        return self._get(self.config, "name")

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        root = tracking.project_root()
        name = self.experiment
        config = self._get(self.config_init, "trainer", default={})
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if self.subcommand == "fit":
            callbacks += [
                ModelCheckpoint(dirpath=root / "models" / name, filename="best", monitor=self._get(self.config, "monitor"),
                                mode=self._get(self.config, "monitor_mode"), save_last=True, enable_version_counter=False),
                EpochCSV(root / "plots" / name / "epochs.csv"),
            ]
        if config.get("logger") in (None, True):
            tags = tracking.run_tags(feature_cache_key=getattr(self.datamodule, "cache_key", ""))
            kwargs["logger"] = tracking.mlflow_logger(name, run_name=f"{name}-{self.subcommand}", tags=tags)
        return self._instantiate_trainer({**config, **kwargs}, callbacks)

    def after_fit(self) -> None:
        """Test the best checkpoint and write ``metrics/NAME.json``."""
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")
        if self.trainer.is_global_zero:
            path = tracking.project_root() / "metrics" / f"{self.experiment}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            metrics = {k: round(float(v), 6) for k, v in sorted(results[0].items())}
            path.write_text(json.dumps(metrics, indent=2) + "\n")


def cli_main(args: list[str] | None = None) -> VPipeCLI:
    return VPipeCLI(
        pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_callback=LogConfigToMLflow, args=args, seed_everything_default=0,
        parser_kwargs={"default_env": False},
    )
