"""Rollout pictures: how a forecaster's predictions look next to the truth.

:func:`draw_rollouts`, for a fixed set of test windows: ``rollout.png`` (rows: input, truth,
prediction) and ``rollout.gif`` (truth on the left, context then prediction on the right), each step
drawn by the forecaster's ``render`` (frames: :func:`to_uint8`, or traffic flows as heat maps:
:func:`heat_map`). :class:`pipeline.tracking.callbacks.ForecastReport` draws them after testing and every
``picture_every_n_epochs`` validations, beside the per-step table ``horizons.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

SCALE = 2  # pictures show each pixel as SCALE × SCALE


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``(..., C, H, W)`` floats in [0, 1] → ``(..., H, W, 3)`` uint8 RGB (grayscale repeated)."""
    array = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    array = np.moveaxis(array, -3, -1)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def heat_map(grids: torch.Tensor) -> np.ndarray:
    """``(..., C, H, W)`` non-negative values (traffic flows) → ``(..., H, C*W + C - 1, 3)`` uint8: the
    channels side by side (inflow | outflow), coloured with matplotlib's ``inferno`` map from 0 to the
    largest value given, one white column between them."""
    from matplotlib import colormaps

    values = grids.detach().float().cpu().clamp(min=0)
    values = (values / values.max().clamp(min=1e-6)).numpy()
    colours = (colormaps["inferno"](values)[..., :3] * 255).round().astype(np.uint8)  # (..., C, H, W, 3)
    gap = np.full((*colours.shape[:-4], colours.shape[-3], 1, 3), 255, np.uint8)
    parts = [colours[..., c, :, :, :] for c in range(colours.shape[-4])]
    return np.concatenate([x for part in parts for x in (part, gap)][:-1], axis=-2)


def _upscale(image: np.ndarray) -> np.ndarray:
    return image.repeat(SCALE, axis=-3).repeat(SCALE, axis=-2)


def rollout_png(path: Path, context: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> None:
    """A grid per window ``(N, T, H, W, 3)`` uint8: rows input (the context), truth, prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, c, k = len(context), context.shape[1], truth.shape[1]
    h, w = context.shape[2:4]
    cols, gap = max(c, k), 2
    fig, axes = plt.subplots(
        n, 1, figsize=(1 + 0.55 * cols * w / 32, 0.55 * 3 * n * h / 32 + 0.4), squeeze=False
    )
    for i, ax in enumerate(axes[:, 0]):
        mosaic = np.full((3 * (h + gap), cols * (w + gap), 3), 96, np.uint8)
        for r, row in enumerate((context[i], truth[i], pred[i])):
            for j, frame in enumerate(row):
                mosaic[r * (h + gap) : r * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = frame
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_yticks(
            [(r + 0.5) * (h + gap) for r in range(3)],
            [f"input 1..{c}" if c > 1 else "input 1", f"truth {c + 1}..{c + k}", "prediction"],
            fontsize=8,
        )
        ax.set_xticks([])
        ax.set_title(f"test window {i}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rollout_gif(
    path: Path, context: np.ndarray, truth: np.ndarray, pred: np.ndarray, fps: float = 5.0
) -> None:
    """An animation: per window, truth on the left; on the right the context (green bar), then the
    prediction (red bar)."""
    from PIL import Image

    n, c, k = len(context), context.shape[1], truth.shape[1]
    h, w = context.shape[2:4]
    bar, gap = 3, 2
    shown_truth = np.concatenate([context, truth], 1)  # (N, T, H, W, 3)
    shown_model = np.concatenate([context, pred], 1)
    images = []
    for t in range(c + k):
        canvas = np.full((n * (h + bar + gap), 2 * w + gap, 3), 64, np.uint8)
        for i in range(n):
            top = i * (h + bar + gap)
            canvas[top : top + bar, w + gap :] = (0, 200, 0) if t < c else (220, 0, 0)
            canvas[top + bar : top + bar + h, :w] = shown_truth[i, t]
            canvas[top + bar : top + bar + h, w + gap :] = shown_model[i, t]
        images.append(Image.fromarray(_upscale(canvas)))
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def pictures_of(module: pl.LightningModule) -> int:
    """Test windows a forecaster draws (its ``pictures`` argument; 0 for those that have no pictures)."""
    return int(getattr(module.hparams, "pictures", 0) or 0) if hasattr(module, "render") else 0


def draw_rollouts(module: pl.LightningModule, batch: dict, folder: Path) -> list[Path]:
    """Roll out the windows of ``batch`` and draw ``rollout.png`` and ``rollout.gif`` into ``folder``
    (the steps drawn by the forecaster's ``render``: ``(B, T, C, H, W)`` → ``(B, T, H', W', 3)`` uint8)."""
    context, horizon = module.hparams.context, module.hparams.horizon
    x = batch["x"].to(module.device)
    cond = batch["cond"].to(module.device) if batch.get("cond") is not None else None
    was_training = module.training
    module.eval()
    with torch.no_grad():
        pred = module.rollout(x[:, :context], horizon, cond)
    module.train(was_training)
    # Rendered together: a colour scale (heat maps) is the same for the input, the truth and the prediction.
    pictures = module.render(torch.cat([x[:, : context + horizon], pred], 1))
    frames = [
        pictures[:, :context],
        pictures[:, context : context + horizon],
        pictures[:, context + horizon :],
    ]
    folder.mkdir(parents=True, exist_ok=True)
    rollout_png(folder / "rollout.png", *frames)
    rollout_gif(folder / "rollout.gif", *frames)
    return [folder / "rollout.png", folder / "rollout.gif"]
