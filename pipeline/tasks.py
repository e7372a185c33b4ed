"""LightningModules: the systems that own loss, metrics, optimiser and logging around a plain head."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from pipeline.data import Batch


class Classifier(pl.LightningModule):
    """Clip classification with a temporal head over per-frame features.

    Args:
        head: builds the head from ``(input_dim, num_classes)``; in a config, a ``class_path`` such as
            ``pipeline.heads.GRUHead`` with its other ``init_args``.
        input_dim: features per step (linked from the data module).
        num_classes: classes (linked from the data module).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        head: Callable[[int, int], nn.Module],
        input_dim: int = 0,
        num_classes: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_epochs: int = 1,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["head"])
        if input_dim <= 0 or num_classes <= 0:
            raise ValueError(f"input_dim and num_classes must be positive, got {input_dim} and {num_classes}")
        self.head = head(input_dim, num_classes)
        # One metric object per stage, so values never mix between stages (and sync correctly under DDP).
        # (ModuleDict keys may not shadow nn.Module attributes such as `train`, hence the suffix.)
        self.metrics = nn.ModuleDict({
            f"{stage}_metrics": torchmetrics.MetricCollection({
                "acc": torchmetrics.Accuracy("multiclass", num_classes=num_classes),
                "f1": torchmetrics.F1Score("multiclass", num_classes=num_classes, average="macro"),
                # top-5 only where it says something, and not per training step (it costs a sort).
                **({"acc_top5": torchmetrics.Accuracy("multiclass", num_classes=num_classes, top_k=5)}
                   if num_classes > 5 and stage != "train" else {}),
            }, prefix=f"{stage}/")
            for stage in ("train", "val", "test")
        })
        # Loss as a sample-weighted mean, synced over ranks like the other metrics.
        self.losses = nn.ModuleDict({f"{stage}_loss": torchmetrics.MeanMetric() for stage in ("val", "test")})
        self.confusion = torchmetrics.ConfusionMatrix("multiclass", num_classes=num_classes)
        self.test_confusion: torch.Tensor | None = None  # (true, predicted) counts of the last test, all ranks

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(x, mask)

    def _step(self, batch: Batch, stage: str) -> torch.Tensor:
        """Loss and metric updates; evaluation values are logged once per epoch (see :meth:`_log_epoch`)."""
        logits = self(batch["x"], batch["mask"])
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
        metrics = self.metrics[f"{stage}_metrics"]
        if stage == "train":
            # Logged through Lightning, which reduces them when the epoch ends, before any
            # on_train_epoch_end hook reads them (the per-epoch CSV does).
            metrics(logits.detach(), batch["y"])
            self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["y"]), sync_dist=True)
            self.log_dict(metrics, on_step=False, on_epoch=True)
            return loss
        metrics.update(logits, batch["y"])
        self.losses[f"{stage}_loss"].update(loss, len(batch["y"]))
        return logits

    def _log_epoch(self, stage: str) -> None:
        # compute() synchronises over ranks (each sample counted once), hence no sync_dist here.
        metrics, mean = self.metrics[f"{stage}_metrics"], self.losses[f"{stage}_loss"]
        values = {f"{stage}/loss": mean.compute(), **metrics.compute()}
        self.log_dict(values, prog_bar=True, sync_dist=False)
        metrics.reset()
        mean.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self._step(batch, "test")
        self.confusion.update(logits.argmax(-1), batch["y"])

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        self.test_confusion = self.confusion.compute().cpu()
        self.confusion.reset()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(total - 1, self.hparams.warmup_epochs * steps_per_epoch)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
