"""What a training run writes for people (Lightning callbacks, rank zero; also MLflow artifacts of the
run when it is tracked): per-epoch curves (:class:`EpochCSV`), a classifier's confusion matrix and
per-class scores (:class:`ConfusionReport`), predictions (:class:`PredictionCSV`), a forecaster's
per-step table and rollout pictures (:class:`ForecastReport`) and a captioner's captions
(:class:`CaptionReport`); :func:`fit_callbacks` and :func:`report_callbacks` are the sets
``vpipe fit|test`` adds. What a run records about itself is in :mod:`pipeline.tracking.lineage`."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from pipeline.media.pictures import draw_rollouts, pictures_of
from pipeline.tracking import runs as tracking
from pipeline.tracking import timings
from pipeline.tracking.lineage import InferenceRecipe


def fit_callbacks(models: Path, plots: Path, monitor: str, mode: str, model_config: dict) -> list[Callback]:
    """What ``vpipe fit`` adds: ``models/NAME/best.ckpt`` (the best ``monitor`` value, by ``mode``),
    ``last.ckpt`` after every epoch, improved or not (resume from it; ``save_last`` only copies when a
    best is saved), ``plots/NAME/epochs.csv`` and the inference recipe in the checkpoints."""
    return [
        ModelCheckpoint(
            dirpath=models, filename="best", monitor=monitor, mode=mode, enable_version_counter=False
        ),
        ModelCheckpoint(
            dirpath=models, filename="last", enable_version_counter=False, save_on_train_epoch_end=True
        ),
        EpochCSV(plots / "epochs.csv"),
        InferenceRecipe(model_config),
    ]


def report_callbacks(plots: Path, model: pl.LightningModule) -> list[Callback]:
    """What ``vpipe fit`` and ``vpipe test`` add: the test report of the model's kind, in ``plots/NAME``
    (each report skips the models of other kinds)."""
    reports = [ConfusionReport(plots), ForecastReport(plots)]
    if type(model).__module__ == "pipeline.systems.captioner":
        reports.append(CaptionReport(plots))
    return reports


class CaptionReport(pl.Callback):
    """After a captioner's test: ``folder/captions.csv`` (video id, label, generated, the nearest-neighbour
    baselines' captions, references), also an MLflow table artifact ``captions.json`` the run page shows."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @timings.timed("logging")  # report files and MLflow artifacts
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples = getattr(
            pl_module, "samples", None
        )  # a pipeline.systems.captioner.Captioner's last test captions
        if not samples or not trainer.is_global_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "captions.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(samples[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(samples)
        table = {key: [s[key] for s in samples] for key in samples[0]}
        if (logger := tracking.run_logger(trainer)) is not None:
            logger.experiment.log_table(logger.run_id, data=table, artifact_file="captions.json")


def _log_artifacts(trainer: pl.Trainer, paths: list[Path], artifact_path: str) -> None:
    if (logger := tracking.run_logger(trainer)) is not None:
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


class ForecastReport(Callback):
    """Per-horizon CSV and rollout pictures of forecasters, in ``folder`` and in MLflow (rank zero)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @rank_zero_only
    @timings.timed("logging")  # report files and MLflow artifacts
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = getattr(pl_module.hparams, "picture_every_n_epochs", 0) if pictures_of(pl_module) else 0
        if trainer.sanity_checking or not every or (trainer.current_epoch + 1) % every:
            return
        if tracking.run_logger(trainer) is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            paths = draw_rollouts(
                pl_module, trainer.datamodule.examples(pl_module.hparams.pictures), Path(tmp)
            )
            _log_artifacts(trainer, paths, f"epochs/epoch_{trainer.current_epoch:03d}")

    @rank_zero_only
    @timings.timed("logging")  # report files and MLflow artifacts
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tables = getattr(pl_module, "test_horizons", None)
        if tables is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = [self.folder / "horizons.csv"]
        with open(paths[0], "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            names = list(pl_module.test_horizon_names)
            baselines = [who for who in tables if who != "model"]
            writer.writerow(["horizon", *names, *(f"{who}_{m}" for who in baselines for m in names)])
            for k in range(len(tables["model"])):
                values = [v for who in ("model", *baselines) for v in tables[who][k].tolist()]
                writer.writerow([k + 1, *(f"{v:.6g}" for v in values)])
        if pictures_of(pl_module):
            paths += draw_rollouts(
                pl_module, trainer.datamodule.examples(pl_module.hparams.pictures), self.folder
            )
        _log_artifacts(trainer, paths, "test")


# vpipe forecast


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
    @timings.timed("logging")  # report files and MLflow artifacts
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
        self._per_class(matrix, classes)
        self._png(matrix, classes)
        if (logger := tracking.run_logger(trainer)) is not None:
            for name in ("confusion.png", "per_class.csv", "predictions.csv"):
                logger.experiment.log_artifact(logger.run_id, str(self.folder / name), "test")

    def _per_class(self, matrix, classes) -> None:
        """``per_class.csv``: torchmetrics' precision, recall and F1 of each class (``average=None``)."""
        from torchmetrics.functional.classification import (
            multiclass_f1_score,
            multiclass_precision,
            multiclass_recall,
        )

        counts = torch.from_numpy(matrix).flatten()
        target = torch.arange(len(classes)).repeat_interleave(len(classes)).repeat_interleave(counts)
        preds = torch.arange(len(classes)).repeat(len(classes)).repeat_interleave(counts)
        values = [
            metric(preds, target, num_classes=len(classes), average=None, zero_division=0).tolist()
            for metric in (multiclass_precision, multiclass_recall, multiclass_f1_score)
        ]
        with open(self.folder / "per_class.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["class", "precision", "recall", "f1", "support"])
            for i, name in enumerate(classes):
                writer.writerow([name, *(f"{v[i]:.4f}" for v in values), int(matrix[i].sum())])

    def _png(self, matrix, classes) -> None:
        """``confusion.png``: torchmetrics' own drawing of the matrix (rows actual, columns predicted)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchmetrics.classification import MulticlassConfusionMatrix

        size = 2 + 0.45 * len(classes)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        MulticlassConfusionMatrix(num_classes=len(classes)).plot(
            torch.from_numpy(matrix), ax=ax, labels=classes
        )
        ax.tick_params(axis="x", labelrotation=60)
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

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        classes = list(trainer.datamodule.classes)
        self.rows += [
            (video, classes[y], classes[p], score)
            for video, y, p, score in zip(
                outputs["video_id"],
                outputs["y"].tolist(),
                outputs["predicted"].tolist(),
                outputs["score"].tolist(),
                strict=True,
            )
        ]

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
            writer.writerows(
                (video, label, predicted, f"{score:.6f}") for video, label, predicted, score in sorted(rows)
            )
        os.replace(tmp, self.path)
        if (logger := tracking.run_logger(trainer)) is not None:
            logger.experiment.log_artifact(logger.run_id, str(self.path), "predict")
