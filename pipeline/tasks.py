"""LightningModules: the systems that own loss, metrics, optimiser and logging around a plain head:
:class:`Classifier`, and the forecasters :class:`FeatureForecaster`, :class:`FrameForecaster` and
:class:`GridForecaster`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from pipeline.data import Batch, PredictBatch, SequenceBatch
from pipeline.heads import ConvRecurrentForecaster, FeatureRecurrentCore, detach_state


def adamw_warmup_cosine(module: pl.LightningModule, lr: float, weight_decay: float, warmup_epochs: int,
                        params: list[dict] | None = None) -> dict:
    """AdamW with a linear warm-up over ``warmup_epochs`` then a cosine decay to zero, stepped per batch,
    over ``params`` (parameter groups, each may set its own ``lr``; default: all of ``module``'s).

    An epoch is the optimiser steps of one pass over the training loader (its batches, after
    ``limit_train_batches``, over ``accumulate_grad_batches``). The decay ends at the run's last step:
    ``max_steps`` when set, else ``max_epochs`` epochs, whichever comes first. A run of unbounded length
    (``max_epochs: -1`` without ``max_steps``, e.g. stopped by ``max_time`` or early stopping) has no
    last step to decay towards: after the warm-up the learning rate stays constant at its peak.
    """
    optimizer = torch.optim.AdamW(module.parameters() if params is None else params, lr=lr, weight_decay=weight_decay)
    trainer = module.trainer
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # what estimated_stepping_batches does; needed for the epoch length
    if trainer.num_training_batches == float("inf"):
        raise ValueError("warmup_epochs needs a training loader with a length (an iterable dataset has none); "
                         "set warmup_epochs: 0")
    steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
    total = trainer.estimated_stepping_batches  # max_steps, or epochs × steps_per_epoch; inf when unbounded
    warmup = warmup_epochs * steps_per_epoch
    if total != float("inf"):
        total = max(1, int(total))
        warmup = min(total - 1, warmup)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if total == float("inf"):
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Classifier(pl.LightningModule):
    """Clip classification with a temporal head over per-frame features.

    Two modes, chosen by config. Cached (``backbone: null``, with
    :class:`~pipeline.data.FeatureDataModule`): the head reads features from the feature store.
    End to end (``backbone: NAME``, with :class:`~pipeline.data.FrameDataModule`): a trainable timm
    backbone encodes each uint8 frame and is trained jointly with the head (LRCN).

    Args:
        head: builds the head from ``(input_dim, num_classes)``; in a config, a ``class_path`` such as
            ``pipeline.heads.GRUHead`` with its other ``init_args``.
        input_dim: features per step (linked from the data module; end to end, the backbone's).
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
        input_dim: int = 0,
        num_classes: int = 0,
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
            from pipeline import backbone as timm_backbone  # timm is imported by end-to-end models only

            model, _ = timm_backbone.create(backbone, weights=backbone_weights, seed=None)  # global RNG
            prep = timm_backbone.preprocessing(model, backbone_input_size)
            self.encoder = timm_backbone.FrameEncoder(model.train(), prep, backbone_pool, backbone_grid)
            input_dim = self.encoder.output_dim
        if input_dim <= 0 or num_classes <= 0:
            raise ValueError(f"input_dim and num_classes must be positive, got {input_dim} and {num_classes}"
                             + ("" if backbone else "; end-to-end training from a frame store needs `backbone: NAME`"))
        self.head = head(input_dim, num_classes)
        # One metric object per stage, so values never mix between stages (and sync correctly under DDP).
        # (ModuleDict keys may not shadow nn.Module attributes such as `train`, hence the suffix.)
        self.metrics = nn.ModuleDict({
            f"{stage}_metrics": torchmetrics.MetricCollection({
                # Inputs come from this class, so the per-update argument checks are skipped (they cost a sync).
                "acc": torchmetrics.Accuracy("multiclass", num_classes=num_classes, validate_args=False),
                "f1": torchmetrics.F1Score("multiclass", num_classes=num_classes, average="macro", validate_args=False),
                # top-5 only where it says something, and not per training step (it costs a sort).
                **({"acc_top5": torchmetrics.Accuracy("multiclass", num_classes=num_classes, top_k=5, validate_args=False)}
                   if num_classes > 5 and stage != "train" else {}),
            # No compute groups: torchmetrics merges metrics whose states match after the first batch
            # (top-1 and top-5 accuracy do when every top-1 guess in it is right) and then reports one's
            # value as the other's; micro accuracy and macro F1 cannot share a state either.
            }, prefix=f"{stage}/", compute_groups=False)
            for stage in ("train", "val", "test")
        })
        # Loss as a sample-weighted mean, synced over ranks like the other metrics.
        self.losses = nn.ModuleDict({f"{stage}_loss": torchmetrics.MeanMetric() for stage in ("train", "val", "test")})
        self.confusion = torchmetrics.ConfusionMatrix("multiclass", num_classes=num_classes)
        self.test_confusion: torch.Tensor | None = None  # (true, predicted) counts of the last test, all ranks

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)`` of features ``(B, T, D)``, or of uint8 frames ``(B, T, H, W, 3)`` end to end."""
        if self.encoder is not None:
            if x.dtype != torch.uint8 or x.dim() != 5:
                raise ValueError(f"an end-to-end model takes uint8 frames (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
            x = self.encoder(x.flatten(0, 1)).flatten(1).unflatten(0, x.shape[:2])
        elif x.dtype == torch.uint8:
            raise ValueError("this model reads cached features; frames need a model with `backbone: NAME`")
        return self.head(x, mask)

    def _step(self, batch: Batch, stage: str) -> torch.Tensor:
        """Loss and metric updates; their values are logged once per epoch (see :meth:`on_train_epoch_start`, :meth:`_log_epoch`)."""
        logits = self(batch["x"], batch["mask"])
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
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
        score, predicted = self(batch["x"], batch["mask"]).float().softmax(-1).max(-1)
        return {"video_id": batch["video_id"], "y": batch["y"], "predicted": predicted, "score": score}

    def configure_optimizers(self):
        groups = [{"params": [p for n, p in self.named_parameters() if not n.startswith("encoder.")]}]
        if self.encoder is not None:
            groups.append({"params": list(self.encoder.parameters()), "lr": self.hparams.backbone_lr or self.hparams.lr})
        return adamw_warmup_cosine(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_epochs, groups)


# Forecasting: predict the next steps of a sequence (frames or their cached features).


class HorizonMeans(torchmetrics.Metric):
    """Means over samples of per-sample values, kept per predicted step: ``update((B, horizon, M))``,
    ``compute() → (horizon, M)``. Sums are reduced over ranks, so each sample counts once."""

    full_state_update = False

    def __init__(self, horizon: int, metrics: int):
        super().__init__()
        self.add_state("total", torch.zeros(horizon, metrics), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total += values.float().sum(0)
        self.count += values.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


class Forecaster(pl.LightningModule):
    """What the forecasters share: the training loop over a sequence (teacher forcing, scheduled
    sampling, truncated backpropagation through time with manual optimisation), autoregressive
    rollouts, and per-horizon test metrics beside the copy-last-frame baseline on the same windows.

    A batch is a :class:`pipeline.data.SequenceBatch` of ``context + horizon`` steps. Training step
    ``t`` reads step ``t`` and predicts step ``t + 1``, for every t (the loss covers the context steps
    too). From the first future step on, with probability ``1 - p`` per window, the model reads its
    own previous prediction instead of the truth, where ``p`` starts at ``teacher_forcing`` and
    decays linearly to zero over ``scheduled_sampling_epochs`` (Bengio et al. 2015; None keeps it).

    With ``tbptt_steps = k`` the steps are cut into chunks of ``k``: after each chunk the loss is
    backpropagated, the optimiser steps, and the recurrent state (and the prediction fed onward) is
    detached, so no gradient crosses a chunk boundary. ``None`` (or ``k`` ≥ the sequence) is full BPTT.

    Validation and test roll out ``horizon`` steps from the ``context`` steps, feeding predictions
    back; ``val/loss`` is the loss of that rollout. Test metrics: ``test/NAME`` averaged over the
    horizon, ``test/hKK/NAME`` at step KK, and the same under ``test/BASELINE/`` for each baseline on
    the same windows (:meth:`baselines`: ``copy_last`` repeats the last context step).

    A batch may carry ``cond`` ``(B, T - 1, ...)``: what is known in advance when step t is read to
    predict step t + 1 (the time of day of step t + 1), handed to the core beside each step read, in
    the future steps too.
    """

    METRICS: tuple[str, ...] = ()
    BASELINES: tuple[str, ...] = ("copy_last",)
    core: nn.Module

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False  # truncated BPTT: several optimiser steps per batch

    @property
    def unused_parameters(self) -> bool:
        """Whether a training backward pass can leave parameters without a gradient: a truncated-BPTT
        chunk that lies wholly in the context never runs the forecasting stack (or, past it, the
        encoder). The trainer then starts DDP with ``find_unused_parameters``."""
        k = self.hparams.tbptt_steps
        return k is not None and k < self.hparams.context + self.hparams.horizon - 1

    def _metric_objects(self) -> None:
        horizon, count = self.hparams.horizon, len(self.METRICS)
        self.losses = nn.ModuleDict({f"{stage}_loss": torchmetrics.MeanMetric() for stage in ("train", "val", "test")})
        self.horizons = nn.ModuleDict({f"{stage}_{who}": HorizonMeans(horizon, count)
                                       for stage in ("val", "test") for who in ("model", *self.BASELINES)})
        self.test_horizons: dict[str, torch.Tensor] | None = None  # per-step test metrics of the last test, all ranks
        self.test_horizon_names: tuple[str, ...] = self.METRICS  # their columns

    # Subclasses define these two.
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, K, ...)`` predictions and truths → ``(B, K, len(METRICS))`` per-sample values."""
        raise NotImplementedError

    def _core_step(self, x: torch.Tensor, state, forecasting: bool, cond: torch.Tensor | None):
        c = self.hparams.input_dim
        before, after = cond[:, -2 * c : -c], cond[:, -c:]  # historical averages of slots t and t + 1
        anomaly, state = self.core.step(x - before, state, forecasting, cond)
        return anomaly + after, state

    def baselines(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """Each baseline's forecast of the horizon steps of ``batch`` (one per :attr:`BASELINES`)."""
        x, context = batch["x"], self.hparams.context
        return {"copy_last": x[:, context - 1 : context].expand(-1, self.hparams.horizon, *x.shape[2:])}

    def metric_table(self, table: torch.Tensor) -> tuple[tuple[str, ...], torch.Tensor]:
        """Names and columns reported from the per-step means of :meth:`sample_metrics` ``(horizon,
        len(METRICS))``; a subclass may derive more (a root of a mean square)."""
        return self.METRICS, table

    def _core_step(self, x: torch.Tensor, state, forecasting: bool, cond: torch.Tensor | None):
        return self.core.step(x, state, forecasting) if cond is None else self.core.step(x, state, forecasting, cond)

    def teacher_forcing_prob(self) -> float:
        start, epochs = self.hparams.teacher_forcing, self.hparams.scheduled_sampling_epochs
        return start if not epochs else start * max(0.0, 1.0 - self.current_epoch / epochs)

    def chunk_losses(self, x: torch.Tensor, teacher_forcing: float = 1.0,
                     cond: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """The loss of each truncated-BPTT chunk of the sequence ``x`` (B, T, ...), in order; the state
        carried into the next chunk is detached once the caller has taken the loss."""
        steps, context = x.shape[1] - 1, self.hparams.context
        k = self.hparams.tbptt_steps or steps
        state = pred = None
        for start in range(0, steps, k):
            end, preds = min(start + k, steps), []
            for t in range(start, end):
                step_input = x[:, t]
                if t >= context and teacher_forcing < 1.0:
                    truth = torch.rand(x.shape[0], device=x.device) < teacher_forcing
                    step_input = torch.where(truth.view(-1, *[1] * (step_input.ndim - 1)), step_input, pred)
                pred, state = self._core_step(step_input, state, t >= context - 1, None if cond is None else cond[:, t])
                preds.append(pred)
            # One loss over the chunk's steps (the mean of the per-step losses): one batched SSIM, not one per step.
            yield self.loss(torch.stack(preds, 1), x[:, start + 1 : end + 1])
            state, pred = detach_state(state), pred.detach()

    def rollout(self, context: torch.Tensor, steps: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Context ``(B, N, ...)`` → the ``steps`` following steps ``(B, steps, ...)``, each prediction
        fed back; ``cond`` ``(B, ≥ N + steps - 1, ...)``: what is known at every step read."""
        state = pred = None
        n = context.shape[1]
        for t in range(n):
            pred, state = self._core_step(context[:, t], state, t == n - 1, None if cond is None else cond[:, t])
        preds = [pred]
        for t in range(n, n + steps - 1):
            pred, state = self._core_step(pred, state, True, None if cond is None else cond[:, t])
            preds.append(pred)
        return torch.stack(preds, 1)

    def training_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        losses = []
        for loss in self.chunk_losses(batch["x"], self.teacher_forcing_prob(), batch.get("cond")):
            optimizer.zero_grad()
            self.manual_backward(loss)
            if self.hparams.gradient_clip:
                self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip, gradient_clip_algorithm="norm")
            optimizer.step()
            losses.append(loss.detach())
        scheduler.step()
        self.losses["train_loss"].update(torch.stack(losses).mean(), len(batch["x"]))

    def on_train_epoch_start(self) -> None:
        # Handed to Lightning once per epoch, as the Classifier does (see Classifier.on_train_epoch_start).
        self.log("train/loss", self.losses["train_loss"], on_step=False, on_epoch=True)

    def _evaluate(self, batch: SequenceBatch, stage: str) -> None:
        x, context, horizon = batch["x"], self.hparams.context, self.hparams.horizon
        truth = x[:, context : context + horizon]
        pred = self.rollout(x[:, :context], horizon, batch.get("cond"))
        self.losses[f"{stage}_loss"].update(self.loss(pred, truth), len(x))
        self.horizons[f"{stage}_model"].update(self.sample_metrics(pred, truth))
        for who, baseline in self.baselines(batch).items():
            self.horizons[f"{stage}_{who}"].update(self.sample_metrics(baseline, truth))

    def _log_epoch(self, stage: str) -> None:
        # compute() synchronises over ranks (each sample counted once), hence no sync_dist here.
        values = {f"{stage}/loss": self.losses[f"{stage}_loss"].compute()}
        tables = {}
        for who in ("model", *self.BASELINES):
            prefix = f"{stage}/" if who == "model" else f"{stage}/{who}/"
            means = self.horizons[f"{stage}_{who}"].compute()  # (horizon, metrics)
            self.horizons[f"{stage}_{who}"].reset()
            names, table = self.metric_table(means)
            _, overall = self.metric_table(means.mean(0, keepdim=True))  # a root of the mean, not a mean of roots
            tables[who] = table
            for j, name in enumerate(names):
                values[prefix + name] = overall[0, j]
                if stage == "test":
                    values.update({f"{prefix}h{k + 1:02d}/{name}": table[k, j] for k in range(len(table))})
        self.log_dict(values, prog_bar=False, sync_dist=False)
        if stage == "test":
            self.test_horizons = {who: table.cpu() for who, table in tables.items()}
            self.test_horizon_names = names
        self.losses[f"{stage}_loss"].reset()

    def validation_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_epochs)


class FeatureForecaster(Forecaster):
    """Next-step prediction in feature space: cached CNN features of frames 1..t → frame t + 1's,
    rolled out ``horizon`` steps autoregressively (see :class:`Forecaster` for training and metrics).

    The core is :class:`pipeline.heads.FeatureRecurrentCore` (a residual RNN, LSTM or GRU). Metrics
    per step: ``mse`` (mean over feature dimensions) and ``cos`` (cosine similarity).

    Args:
        input_dim: features per step (linked from the data module).
        context: steps given (linked from the data module).
        horizon: steps predicted at evaluation (linked from the data module).
        cell: ``rnn``, ``lstm`` or ``gru``.
        hidden_size: recurrent units.
        num_layers: stacked recurrent layers.
        dropout: between stacked layers.
        loss: ``mse``, or ``cosine`` (one minus the cosine similarity).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up before the cosine decay.
        tbptt_steps: truncated BPTT chunk length (None: full BPTT).
        gradient_clip: clip the gradient norm to this (manual optimisation clips here, not in the Trainer).
        teacher_forcing: starting probability of reading the true step during the future steps.
        scheduled_sampling_epochs: epochs over which that probability decays to zero (None: constant).
    """

    METRICS = ("mse", "cos")

    def __init__(self, input_dim: int = 0, context: int = 8, horizon: int = 4, cell: Literal["rnn", "lstm", "gru"] = "gru",
                 hidden_size: int = 256, num_layers: int = 1, dropout: float = 0.0, loss: Literal["mse", "cosine"] = "mse",
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_epochs: int = 1, tbptt_steps: int | None = None,
                 gradient_clip: float | None = 1.0, teacher_forcing: float = 1.0, scheduled_sampling_epochs: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        if input_dim <= 0:
            raise ValueError(f"input_dim must be positive, got {input_dim}")
        if tbptt_steps is not None and tbptt_steps < 1:
            raise ValueError(f"tbptt_steps must be at least 1 or None, got {tbptt_steps}")
        self.core = FeatureRecurrentCore(input_dim, cell, hidden_size, num_layers, dropout)
        self._metric_objects()

    def chunk_losses(self, x: torch.Tensor, teacher_forcing: float = 1.0,
                     cond: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        if self.training and self.core.scale == 0 and x.shape[1] > 1:
            change = self.core.mean_square_change(x.detach())
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(change)  # the same scale on every rank: the mean over their first batches
                change /= torch.distributed.get_world_size()
            self.core.calibrate(change)
        yield from super().chunk_losses(x, teacher_forcing, cond)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "cosine":
            return 1 - F.cosine_similarity(pred, target, dim=-1).mean()
        return F.mse_loss(pred, target)

    def sample_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mse = (pred - target).pow(2).mean(-1)
        return torch.stack([mse, F.cosine_similarity(pred, target, dim=-1)], -1)


def _gaussian_blur_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n, n)`` matrix ``M`` with ``M @ v`` = ``v`` reflect-padded by 5 then convolved with the SSIM
    Gaussian (window 11, σ 1.5): the blur along one axis as a matrix product."""
    x = torch.arange(11, dtype=dtype, device=device) - 5
    g = torch.exp(-x**2 / (2 * 1.5**2))
    g = g / g.sum()
    rows = torch.arange(n, device=device).view(-1, 1).expand(-1, 11)
    cols = (rows + torch.arange(11, device=device) - 5).abs()  # reflected at 0 ...
    cols = torch.where(cols > n - 1, 2 * (n - 1) - cols, cols)  # ... and at n - 1 (needs n > 5, as F.pad's reflect)
    return torch.zeros(n, n, dtype=dtype, device=device).index_put_((rows, cols), g.expand(n, -1), accumulate=True)


def gaussian_ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
                  reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """SSIM of ``(N, C, H, W)`` images as torchmetrics computes it (Gaussian window 11, σ 1.5,
    reflected borders, variances clamped at zero), averaged over everything (``mean``) or per image
    (``none``: ``(N,)``). The separable blur is two matrix products (``M_h @ X @ M_w^T``): on a CPU
    several times cheaper, forward and backward, than torchmetrics' 2-D (or two 1-D depthwise)
    convolutions."""
    if min(pred.shape[-2:]) <= 5:
        raise ValueError(f"SSIM needs images larger than 5 pixels per side, got {tuple(pred.shape[-2:])}")
    c = pred.shape[1]
    maps = torch.cat([pred, target, pred * pred, target * target, pred * target], 1)  # (N, 5C, H, W)
    blur_h = _gaussian_blur_matrix(maps.shape[-2], maps.dtype, maps.device)
    blur_w = _gaussian_blur_matrix(maps.shape[-1], maps.dtype, maps.device)
    maps = blur_h @ maps @ blur_w.T
    mp, mt, pp, tt, pt = maps.split(c, 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_p, var_t = (pp - mp * mp).clamp(min=0), (tt - mt * mt).clamp(min=0)
    ssim = (2 * mp * mt + c1) * (2 * (pt - mp * mt) + c2) / ((mp * mp + mt * mt + c1) * (var_p + var_t + c2))
    return ssim.flatten(1).mean(1) if reduction == "none" else ssim.mean()


class FrameForecaster(Forecaster):
    """Next-frame prediction in pixel space with a ConvLSTM or ConvGRU encoder–forecaster
    (:class:`pipeline.heads.ConvRecurrentForecaster`); see :class:`Forecaster` for training and metrics.

    Frames are in [0, 1]. The loss is the MSE per pixel, plus ``l1_weight`` times the mean absolute
    error and ``ssim_weight`` times ``1 - SSIM`` of each frame when set: the MSE alone is minimised by
    a grey haze wherever a digit may be, which SSIM (computed on local contrast) punishes hard; the
    other two terms favour black where nothing is likely. Metrics per predicted frame (``hKK``) and averaged: ``mse`` and ``mae`` per
    pixel; ``mse_frame`` and ``mae_frame`` summed over one frame's pixels (the Moving MNIST
    convention of published tables such as OpenSTL's: values in [0, 1], summed over H × W, averaged
    over frames); ``ssim`` and ``psnr`` (as torchmetrics computes them, data range 1; SSIM by
    :func:`gaussian_ssim`, PSNR capped at 100 dB where a frame is reproduced exactly).

    Args:
        input_dim: channels per frame, 1 for grayscale (linked from the data module).
        context: frames given (linked from the data module).
        horizon: frames predicted (linked from the data module).
        video_format: how the frames were extracted (linked from the data module; ``vpipe forecast``
            decodes new videos the same way).
        cell: ``lstm`` (ConvLSTM) or ``gru`` (ConvGRU).
        hidden_channels: channels of each stacked layer (default ``[64, 64]``).
        kernel_sizes: one kernel size, or one per layer.
        patch_size: pixels folded into channels per side (see the forecaster).
        share_weights: one recurrent stack for the encoder and the forecaster.
        output: ``sigmoid`` (a frame in [0, 1]) or ``residual`` (the change from the frame read,
            starting from copy-last; see :class:`pipeline.heads.ConvRecurrentForecaster`).
        l1_weight: weight of the mean absolute error in the loss.
        ssim_weight: weight of ``1 - SSIM`` in the loss.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up before the cosine decay.
        tbptt_steps: truncated BPTT chunk length (None: full BPTT).
        gradient_clip: clip the gradient norm to this (manual optimisation clips here, not in the Trainer).
        teacher_forcing: starting probability of reading the true frame during the future steps.
        scheduled_sampling_epochs: epochs over which that probability decays to zero (None: constant).
        pictures: test windows drawn in the rollout pictures.
        picture_every_n_epochs: also draw them after every N-th validation (0: only after testing).
    """

    METRICS = ("mse", "mse_frame", "mae", "mae_frame", "ssim", "psnr")

    def __init__(self, input_dim: int = 1, context: int = 10, horizon: int = 10, video_format: dict | None = None,
                 cell: Literal["lstm", "gru"] = "lstm", hidden_channels: list[int] | None = None,
                 kernel_sizes: int | list[int] = 5, patch_size: int = 4, share_weights: bool = False,
                 output: Literal["sigmoid", "residual"] = "sigmoid",
                 l1_weight: float = 0.0, ssim_weight: float = 0.0, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_epochs: int = 1, tbptt_steps: int | None = None,
                 gradient_clip: float | None = 1.0, teacher_forcing: float = 1.0, scheduled_sampling_epochs: int | None = None,
                 pictures: int = 4, picture_every_n_epochs: int = 5):
        super().__init__()
        hidden_channels = list(hidden_channels or [64, 64])
        self.save_hyperparameters()  # reads the locals: hidden_channels as resolved above
        if tbptt_steps is not None and tbptt_steps < 1:
            raise ValueError(f"tbptt_steps must be at least 1 or None, got {tbptt_steps}")
        self.core = ConvRecurrentForecaster(input_dim, cell, hidden_channels, kernel_sizes, patch_size, share_weights, output)
        self._metric_objects()

    def render(self, frames: torch.Tensor):
        """``(..., C, H, W)`` frames → ``(..., H, W, 3)`` uint8 pictures."""
        from pipeline.forecast import to_uint8

        return to_uint8(frames)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(..., C, H, W)`` predicted and true frames → one number."""
        loss = F.mse_loss(pred, target)
        if self.hparams.l1_weight:
            loss = loss + self.hparams.l1_weight * F.l1_loss(pred, target)
        if self.hparams.ssim_weight:
            loss = loss + self.hparams.ssim_weight * (1 - gaussian_ssim(pred.flatten(0, -4), target.flatten(0, -4)))
        return loss

    def sample_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        b, k = pred.shape[:2]
        err = (pred - target).flatten(2)  # (B, K, C*H*W)
        frames_p, frames_t = pred.flatten(0, 1).float(), target.flatten(0, 1).float()  # (B*K, C, H, W)
        ssim = gaussian_ssim(frames_p, frames_t, reduction="none")  # torchmetrics' SSIM, ~10x cheaper on a CPU
        psnr = peak_signal_noise_ratio(frames_p, frames_t, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp(max=100.0)
        return torch.stack([err.pow(2).mean(-1), err.pow(2).sum(-1), err.abs().mean(-1), err.abs().sum(-1),
                            ssim.view(b, k), psnr.view(b, k)], -1)


class GridForecaster(Forecaster):
    """Traffic-flow forecasting: the ConvLSTM/ConvGRU encoder–forecaster over multi-channel float grids
    (inflow and outflow per city cell, :class:`pipeline.grids.GridDataModule`), the next ``horizon``
    slots from the last ``context``; see :class:`Forecaster` for training and metrics.

    Grids arrive divided by ``scale`` (the training split's largest flow), so the loss is the MSE of
    that [0, 1] range. The core works on anomalies, the departure of a slot from its historical
    average: it reads slot t's anomaly with what is known of slot t + 1 (``covariates``: time of day,
    day type, the historical averages of both slots) and predicts slot t + 1's anomaly as a change
    from slot t's (``residual``), so that an untrained model forecasts "today stays as far from the
    usual as it is now" and learns how that departure fades or grows.
    Metrics per slot, in flow units (TaxiBJ's convention): ``rmse`` (the root of the mean square error
    over every cell, channel and window), ``mse`` and ``mae``. Baselines on the same windows:
    ``copy_last`` and ``historical_average`` (the same slot on the data module's ``history_days``
    previous days, averaged).

    Args:
        input_dim: channels per grid (linked from the data module).
        covariates: known channels per slot (linked from the data module).
        scale: flow units per 1.0 of the model's input (linked from the data module).
        context: slots given (linked from the data module).
        horizon: slots predicted (linked from the data module).
        cell: ``lstm`` (ConvLSTM) or ``gru`` (ConvGRU).
        hidden_channels: channels of each stacked layer (default ``[32, 32]``).
        kernel_sizes: one kernel size, or one per layer.
        patch_size: cells folded into channels per side.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up before the cosine decay.
        tbptt_steps: truncated BPTT chunk length (None: full BPTT).
        gradient_clip: clip the gradient norm to this.
        teacher_forcing: starting probability of reading the true slot during the future steps.
        scheduled_sampling_epochs: epochs over which that probability decays to zero (None: constant).
        pictures: test windows drawn as heat maps in the rollout pictures.
        picture_every_n_epochs: also draw them after every N-th validation (0: only after testing).
    """

    METRICS = ("mse", "mae")
    BASELINES = ("copy_last", "historical_average")

    def __init__(self, input_dim: int = 2, covariates: int = 0, scale: float = 1.0, context: int = 4, horizon: int = 4,
                 cell: Literal["lstm", "gru"] = "lstm", hidden_channels: list[int] | None = None,
                 kernel_sizes: int | list[int] = 3, patch_size: int = 2, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_epochs: int = 1, tbptt_steps: int | None = None, gradient_clip: float | None = 1.0,
                 teacher_forcing: float = 0.0, scheduled_sampling_epochs: int | None = None, pictures: int = 4,
                 picture_every_n_epochs: int = 0):
        super().__init__()
        hidden_channels = list(hidden_channels or [32, 32])
        self.save_hyperparameters()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if tbptt_steps is not None and tbptt_steps < 1:
            raise ValueError(f"tbptt_steps must be at least 1 or None, got {tbptt_steps}")
        self.core = ConvRecurrentForecaster(input_dim, cell, hidden_channels, kernel_sizes, patch_size, False,
                                            "residual", covariates)
        self._metric_objects()

    def _core_step(self, x: torch.Tensor, state, forecasting: bool, cond: torch.Tensor | None):
        c = self.hparams.input_dim
        before, after = cond[:, -2 * c : -c], cond[:, -c:]  # historical averages of slots t and t + 1
        anomaly, state = self.core.step(x - before, state, forecasting, cond)
        return anomaly + after, state

    def baselines(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        return {**super().baselines(batch), "historical_average": batch["history"][:, self.hparams.context :]}

    def render(self, grids: torch.Tensor):
        """``(..., C, H, W)`` scaled flows → heat maps, the channels side by side."""
        from pipeline.forecast import heat_map

        return heat_map(grids)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target)

    def sample_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        err = (pred - target).flatten(2).float() * self.hparams.scale  # flow units
        return torch.stack([err.pow(2).mean(-1), err.abs().mean(-1)], -1)

    def metric_table(self, table: torch.Tensor) -> tuple[tuple[str, ...], torch.Tensor]:
        return ("rmse", *self.METRICS), torch.cat([table[:, :1].sqrt(), table], 1)
