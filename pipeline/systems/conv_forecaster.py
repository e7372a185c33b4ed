"""Convolutional forecasting systems: :class:`FrameForecaster` (next frames in pixel space) and
:class:`GridForecaster` (traffic-flow grids), both over the ConvLSTM/ConvGRU encoder–forecaster
:class:`pipeline.models.cores.ConvRecurrentCore`; training, rollouts and metrics are
:class:`pipeline.systems.forecaster.Forecaster`'s."""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

from pipeline.datasets.sequences import SequenceBatch
from pipeline.models.cores import ConvRecurrentCore
from pipeline.systems.forecaster import Forecaster


def _gaussian_blur_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n, n)`` matrix ``M`` with ``M @ v`` = ``v`` reflect-padded by 5 then convolved with the SSIM
    Gaussian (window 11, σ 1.5): the blur along one axis as a matrix product."""
    x = torch.arange(11, dtype=dtype, device=device) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    rows = torch.arange(n, device=device).view(-1, 1).expand(-1, 11)
    cols = (rows + torch.arange(11, device=device) - 5).abs()  # reflected at 0 ...
    cols = torch.where(
        cols > n - 1, 2 * (n - 1) - cols, cols
    )  # ... and at n - 1 (needs n > 5, as F.pad's reflect)
    return torch.zeros(n, n, dtype=dtype, device=device).index_put_(
        (rows, cols), g.expand(n, -1), accumulate=True
    )


def gaussian_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
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
    (:class:`pipeline.models.cores.ConvRecurrentCore`); see :class:`Forecaster` for training and metrics.

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
            starting from copy-last; see :class:`pipeline.models.cores.ConvRecurrentCore`).
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

    def __init__(
        self,
        input_dim: int = 1,
        context: int = 10,
        horizon: int = 10,
        video_format: dict | None = None,
        cell: Literal["lstm", "gru"] = "lstm",
        hidden_channels: list[int] | None = None,
        kernel_sizes: int | list[int] = 5,
        patch_size: int = 4,
        share_weights: bool = False,
        output: Literal["sigmoid", "residual"] = "sigmoid",
        l1_weight: float = 0.0,
        ssim_weight: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_epochs: int = 1,
        tbptt_steps: int | None = None,
        gradient_clip: float | None = 1.0,
        teacher_forcing: float = 1.0,
        scheduled_sampling_epochs: int | None = None,
        pictures: int = 4,
        picture_every_n_epochs: int = 5,
    ):
        super().__init__()
        hidden_channels = list(hidden_channels or [64, 64])
        self.save_hyperparameters()  # reads the locals: hidden_channels as resolved above
        self._setup(
            ConvRecurrentCore(
                input_dim, cell, hidden_channels, kernel_sizes, patch_size, share_weights, output
            )
        )

    def render(self, frames: torch.Tensor):
        """``(..., C, H, W)`` frames → ``(..., H, W, 3)`` uint8 pictures."""
        from pipeline.media.pictures import to_uint8

        return to_uint8(frames)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(..., C, H, W)`` predicted and true frames → one number."""
        loss = F.mse_loss(pred, target)
        if self.hparams.l1_weight:
            loss = loss + self.hparams.l1_weight * F.l1_loss(pred, target)
        if self.hparams.ssim_weight:
            loss = loss + self.hparams.ssim_weight * (
                1 - gaussian_ssim(pred.flatten(0, -4), target.flatten(0, -4))
            )
        return loss

    def sample_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        b, k = pred.shape[:2]
        err = (pred - target).flatten(2)  # (B, K, C*H*W)
        frames_p, frames_t = pred.flatten(0, 1).float(), target.flatten(0, 1).float()  # (B*K, C, H, W)
        ssim = gaussian_ssim(
            frames_p, frames_t, reduction="none"
        )  # torchmetrics' SSIM, ~10x cheaper on a CPU
        psnr = peak_signal_noise_ratio(
            frames_p, frames_t, data_range=1.0, reduction="none", dim=(1, 2, 3)
        ).clamp(max=100.0)
        return torch.stack(
            [
                err.pow(2).mean(-1),
                err.pow(2).sum(-1),
                err.abs().mean(-1),
                err.abs().sum(-1),
                ssim.view(b, k),
                psnr.view(b, k),
            ],
            -1,
        )


class GridForecaster(Forecaster):
    """Traffic-flow forecasting: the ConvLSTM/ConvGRU encoder–forecaster over multi-channel float grids
    (inflow and outflow per city cell, :class:`pipeline.datasets.flows.GridDataModule`), the next ``horizon``
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

    def __init__(
        self,
        input_dim: int = 2,
        covariates: int = 0,
        scale: float = 1.0,
        context: int = 4,
        horizon: int = 4,
        cell: Literal["lstm", "gru"] = "lstm",
        hidden_channels: list[int] | None = None,
        kernel_sizes: int | list[int] = 3,
        patch_size: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_epochs: int = 1,
        tbptt_steps: int | None = None,
        gradient_clip: float | None = 1.0,
        teacher_forcing: float = 0.0,
        scheduled_sampling_epochs: int | None = None,
        pictures: int = 4,
        picture_every_n_epochs: int = 0,
    ):
        super().__init__()
        hidden_channels = list(hidden_channels or [32, 32])
        self.save_hyperparameters()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self._setup(
            ConvRecurrentCore(
                input_dim, cell, hidden_channels, kernel_sizes, patch_size, False, "residual", covariates
            )
        )

    def _core_step(self, x: torch.Tensor, state, forecasting: bool, cond: torch.Tensor | None):
        c = self.hparams.input_dim
        before, after = cond[:, -2 * c : -c], cond[:, -c:]  # historical averages of slots t and t + 1
        anomaly, state = self.core.step(x - before, state, forecasting, cond)
        return anomaly + after, state

    def baselines(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        return {**super().baselines(batch), "historical_average": batch["history"][:, self.hparams.context :]}

    def render(self, grids: torch.Tensor):
        """``(..., C, H, W)`` scaled flows → heat maps, the channels side by side."""
        from pipeline.media.pictures import heat_map

        return heat_map(grids)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target)

    def sample_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        err = (pred - target).flatten(2).float() * self.hparams.scale  # flow units
        return torch.stack([err.pow(2).mean(-1), err.abs().mean(-1)], -1)

    def metric_table(self, table: torch.Tensor) -> tuple[tuple[str, ...], torch.Tensor]:
        return ("rmse", *self.METRICS), torch.cat([table[:, :1].sqrt(), table], 1)
