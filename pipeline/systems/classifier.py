"""The classification system (a LightningModule): :class:`Classifier` owns loss, metrics, optimiser and
logging around a plain temporal head (:mod:`pipeline.models.heads`), over cached features or, with a
``backbone``, over frames end to end. The forecasting systems are in :mod:`pipeline.systems.forecaster` and
:mod:`pipeline.systems.conv_forecaster`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from pipeline.datasets.clips import Batch, PredictBatch
from pipeline.systems.optim import WarmupCosineAdamW, decay_groups


class Classifier(WarmupCosineAdamW, pl.LightningModule):
    """Clip classification with a temporal head over per-frame features.

    Two modes, chosen by config. Cached (``backbone: null``, with
    :class:`~pipeline.datasets.clips.FeatureDataModule`): the head reads features from the feature store.
    End to end (``backbone: NAME``, with :class:`~pipeline.datasets.clips.FrameDataModule`): a trainable timm
    backbone encodes each uint8 frame and is trained jointly with the head (LRCN).

    Args:
        head: builds the head from ``(input_dim, num_classes)``; in a config, a ``class_path`` such as
            ``pipeline.models.heads.GRUHead`` with its other ``init_args``.
        input_dim: features per step (linked from the data module; end to end, None: the backbone's).
        num_classes: classes (linked from the data module).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        backbone: end to end: the timm model that encodes frames (random init unless ``backbone_weights``).
        backbone_weights: a local ``.safetensors``/``.pth`` file to start the backbone from.
        backbone_input_size: side the frames are resized to before the backbone (default: the model's own).
        backbone_pool: ``avg`` (one vector per frame) or ``grid`` (``C*G*G`` per frame, for the Row LSTM).
        backbone_grid: G for ``backbone_pool: grid``.
        backbone_lr: the backbone's learning rate (default: ``lr``).
    """

    def __init__(
        self,
        head: Callable[[int, int], nn.Module],
        input_dim: int | None = None,
        num_classes: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_epochs: int = 1,
        label_smoothing: float = 0.0,
        backbone: str | None = None,
        backbone_weights: str | None = None,
        backbone_input_size: int | None = None,
        backbone_pool: Literal["avg", "grid"] = "avg",
        backbone_grid: int = 4,
        backbone_lr: float | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["head"])
        self.encoder: nn.Module | None = None
        if backbone:
            from pipeline.models import (
                backbone as timm_backbone,  # timm is imported by end-to-end models only
            )

            model, _ = timm_backbone.create(backbone, weights=backbone_weights, seed=None)  # global RNG
            prep = timm_backbone.preprocessing(model, backbone_input_size)
            self.encoder = timm_backbone.FrameEncoder(model.train(), prep, backbone_pool, backbone_grid)
            input_dim = self.encoder.output_dim
        if (input_dim or 0) <= 0 or (num_classes or 0) <= 0:
            raise ValueError(
                f"input_dim and num_classes must be positive, got {input_dim} and {num_classes}"
                + ("" if backbone else "; end-to-end training from a frame store needs `backbone: NAME`")
            )
        self.head = head(input_dim, num_classes)
        # One metric object per stage, so values never mix between stages (and sync correctly under DDP).
        # (ModuleDict keys may not shadow nn.Module attributes such as `train`, hence the suffix.)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": torchmetrics.MetricCollection(
                    {
                        # Inputs come from this class, so the per-update argument checks are skipped (they cost a sync).
                        "acc": torchmetrics.Accuracy(
                            "multiclass", num_classes=num_classes, validate_args=False
                        ),
                        "f1": torchmetrics.F1Score(
                            "multiclass", num_classes=num_classes, average="macro", validate_args=False
                        ),
                        # top-5 only where it says something, and not per training step (it costs a sort).
                        **(
                            {
                                "acc_top5": torchmetrics.Accuracy(
                                    "multiclass", num_classes=num_classes, top_k=5, validate_args=False
                                )
                            }
                            if num_classes > 5 and stage != "train"
                            else {}
                        ),
                        # No compute groups: torchmetrics merges metrics whose states match after the first batch
                        # (top-1 and top-5 accuracy do when every top-1 guess in it is right) and then reports one's
                        # value as the other's; micro accuracy and macro F1 cannot share a state either.
                    },
                    prefix=f"{stage}/",
                    compute_groups=False,
                )
                for stage in ("train", "val", "test")
            }
        )
        # Loss as a sample-weighted mean, synced over ranks like the other metrics.
        self.losses = nn.ModuleDict(
            {f"{stage}_loss": torchmetrics.MeanMetric() for stage in ("train", "val", "test")}
        )
        self.confusion = torchmetrics.ConfusionMatrix("multiclass", num_classes=num_classes)
        self.test_confusion: torch.Tensor | None = (
            None  # (true, predicted) counts of the last test, all ranks
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)`` of features ``(B, T, D)``, or of uint8 frames ``(B, T, H, W, 3)`` end to end."""
        if self.encoder is not None:
            if x.dtype != torch.uint8 or x.dim() != 5:
                raise ValueError(
                    f"an end-to-end model takes uint8 frames (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}"
                )
            x = self.encoder(x.flatten(0, 1)).flatten(1).unflatten(0, x.shape[:2])
        elif x.dtype == torch.uint8:
            raise ValueError("this model reads cached features; frames need a model with `backbone: NAME`")
        return self.head(x)

    def _step(self, batch: Batch, stage: str) -> torch.Tensor:
        """Loss and metric updates; their values are logged once per epoch (see :meth:`on_train_epoch_start`, :meth:`_log_epoch`)."""
        logits = self(batch["x"])
        loss = F.cross_entropy(
            logits, batch["y"], label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0
        )
        # update(), not forward(): only epoch values are logged, so no per-batch value is computed.
        self.metrics[f"{stage}_metrics"].update(logits.detach(), batch["y"])
        self.losses[f"{stage}_loss"].update(loss.detach(), len(batch["y"]))
        return loss if stage == "train" else logits

    def _log_epoch(self, stage: str) -> None:
        # compute() synchronises over ranks (each sample counted once), hence no sync_dist here.
        metrics, mean = self.metrics[f"{stage}_metrics"], self.losses[f"{stage}_loss"]
        values = {f"{stage}/loss": mean.compute(), **metrics.compute()}
        self.log_dict(values, prog_bar=True, sync_dist=False)
        metrics.reset()
        mean.reset()

    def on_train_epoch_start(self) -> None:
        # The training metrics are handed to Lightning once per epoch, not per step (each self.log
        # costs about a millisecond of bookkeeping): it keeps the Metric objects, which
        # training_step updates, and computes (synced over ranks) and resets them when the epoch
        # ends, before any on_train_epoch_end hook reads them (the per-epoch CSV does).
        self.log("train/loss", self.losses["train_loss"], on_step=False, on_epoch=True)
        self.log_dict(self.metrics["train_metrics"], on_step=False, on_epoch=True)

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

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> dict:
        """Per clip: ``predicted`` class index ``(B,)`` and its softmax probability ``score`` ``(B,)``,
        beside the batch's ``video_id`` and true ``y`` (``vpipe predict`` writes them to a CSV)."""
        score, predicted = self(batch["x"]).float().softmax(-1).max(-1)
        return {"video_id": batch["video_id"], "y": batch["y"], "predicted": predicted, "score": score}

    def param_groups(self) -> list[dict]:
        """The head's groups, and end to end the backbone's, at ``backbone_lr`` (as a scale of ``lr``)."""
        hp = self.hparams
        groups = decay_groups(self.head, hp.weight_decay)
        if self.encoder is not None:
            groups += decay_groups(self.encoder, hp.weight_decay, (hp.backbone_lr or hp.lr) / hp.lr)
        return groups
