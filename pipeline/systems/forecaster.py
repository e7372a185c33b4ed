"""Forecasting systems (LightningModules): predict the next steps of a sequence. :class:`Forecaster`
holds what they share (teacher forcing, scheduled sampling, truncated BPTT, rollouts, per-step
metrics beside baselines); :class:`FeatureForecaster` forecasts cached CNN features. The
convolutional ones over frames and grids are in :mod:`pipeline.systems.conv_forecaster`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from pipeline import compat
from pipeline.datasets.sequences import SequenceBatch
from pipeline.models.cores import FeatureRecurrentCore, detach_state
from pipeline.systems.optim import WarmupCosineAdamW


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


class Forecaster(WarmupCosineAdamW, pl.LightningModule):
    """What the forecasters share: the training loop over a sequence (teacher forcing, scheduled
    sampling, truncated backpropagation through time with manual optimisation), autoregressive
    rollouts, and per-horizon test metrics beside the copy-last-frame baseline on the same windows.

    A batch is a :class:`pipeline.datasets.sequences.SequenceBatch` of ``context + horizon`` steps. Training step
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

    def _setup(self, core: nn.Module) -> None:
        """What every forecaster's ``__init__`` ends with, once its hyperparameters are saved: the checks
        of the shared ones, its ``core``, and the metric objects."""
        if self.hparams.tbptt_steps is not None and self.hparams.tbptt_steps < 1:
            raise ValueError(f"tbptt_steps must be at least 1 or None, got {self.hparams.tbptt_steps}")
        self.core = core
        horizon, count = self.hparams.horizon, len(self.METRICS)
        self.losses = nn.ModuleDict(
            {f"{stage}_loss": torchmetrics.MeanMetric() for stage in ("train", "val", "test")}
        )
        self.horizons = nn.ModuleDict(
            {
                f"{stage}_{who}": HorizonMeans(horizon, count)
                for stage in ("val", "test")
                for who in ("model", *self.BASELINES)
            }
        )
        self.test_horizons: dict[str, torch.Tensor] | None = (
            None  # per-step test metrics of the last test, all ranks
        )
        self.test_horizon_names: tuple[str, ...] = self.METRICS  # their columns

    # Subclasses define these two.
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, K, ...)`` predictions and truths → ``(B, K, len(METRICS))`` per-sample values."""
        raise NotImplementedError

    def baselines(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """Each baseline's forecast of the horizon steps of ``batch`` (one per :attr:`BASELINES`)."""
        x, context = batch["x"], self.hparams.context
        return {"copy_last": x[:, context - 1 : context].expand(-1, self.hparams.horizon, *x.shape[2:])}

    def metric_table(self, table: torch.Tensor) -> tuple[tuple[str, ...], torch.Tensor]:
        """Names and columns reported from the per-step means of :meth:`sample_metrics` ``(horizon,
        len(METRICS))``; a subclass may derive more (a root of a mean square)."""
        return self.METRICS, table

    def _core_step(self, x: torch.Tensor, state, forecasting: bool, cond: torch.Tensor | None):
        return (
            self.core.step(x, state, forecasting)
            if cond is None
            else self.core.step(x, state, forecasting, cond)
        )

    def teacher_forcing_prob(self) -> float:
        start, epochs = self.hparams.teacher_forcing, self.hparams.scheduled_sampling_epochs
        return start if not epochs else start * max(0.0, 1.0 - self.current_epoch / epochs)

    def chunk_losses(
        self, x: torch.Tensor, teacher_forcing: float = 1.0, cond: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
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
                pred, state = self._core_step(
                    step_input, state, t >= context - 1, None if cond is None else cond[:, t]
                )
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
            pred, state = self._core_step(
                context[:, t], state, t == n - 1, None if cond is None else cond[:, t]
            )
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
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.hparams.gradient_clip, gradient_clip_algorithm="norm"
                )
            optimizer.step()
            losses.append(loss.detach())
        scheduler.step_update(compat.total_batch_idx(self.trainer) + 1)  # per batch, not per chunk
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
            _, overall = self.metric_table(
                means.mean(0, keepdim=True)
            )  # a root of the mean, not a mean of roots
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


class FeatureForecaster(Forecaster):
    """Next-step prediction in feature space: cached CNN features of frames 1..t → frame t + 1's,
    rolled out ``horizon`` steps autoregressively (see :class:`Forecaster` for training and metrics).

    The core is :class:`pipeline.models.cores.FeatureRecurrentCore` (a residual RNN, LSTM or GRU). Metrics
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

    def __init__(
        self,
        input_dim: int | None = None,
        context: int = 8,
        horizon: int = 4,
        cell: Literal["rnn", "lstm", "gru"] = "gru",
        hidden_size: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        loss: Literal["mse", "cosine"] = "mse",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_epochs: int = 1,
        tbptt_steps: int | None = None,
        gradient_clip: float | None = 1.0,
        teacher_forcing: float = 1.0,
        scheduled_sampling_epochs: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if (input_dim or 0) <= 0:
            raise ValueError(f"input_dim must be positive (the data module gives it), got {input_dim}")
        self._setup(FeatureRecurrentCore(input_dim, cell, hidden_size, num_layers, dropout))

    def chunk_losses(
        self, x: torch.Tensor, teacher_forcing: float = 1.0, cond: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        if self.training and self.core.scale == 0 and x.shape[1] > 1:
            change = self.core.mean_square_change(x.detach())
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(
                    change
                )  # the same scale on every rank: the mean over their first batches
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
