"""Forecasts for people: rollout pictures, and ``vpipe forecast``.

- :func:`draw_rollouts`: for a fixed set of test windows, ``rollout.png`` (rows: input, truth,
  prediction) and ``rollout.gif`` (truth on the left, context then prediction on the right), each
  step drawn by the forecaster's ``render`` (frames, or traffic flows as heat maps:
  :func:`heat_map`). :class:`pipeline.callbacks.ForecastReport` draws them after testing and every
  ``picture_every_n_epochs`` validations, beside the per-step table ``horizons.csv``.
- :func:`forecast`: decode the first frames of a video (or one still image) the way a frame
  forecaster was trained (frame rate, size, grayscale, all kept in its checkpoint), roll out, write
  context + prediction.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

SCALE = 2  # pictures show each pixel as SCALE × SCALE


class ForecastError(RuntimeError):
    """A video or checkpoint ``vpipe forecast`` cannot use; the message names the file and the reason."""


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


def load_frame_forecaster(ckpt: str | os.PathLike):
    """The :class:`pipeline.conv_forecasting.FrameForecaster` of a checkpoint, on the CPU, in eval mode."""
    from pipeline.conv_forecasting import FrameForecaster

    path = Path(ckpt)
    if not path.is_file():
        raise ForecastError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: zip, pickle and EOF errors alike
        raise ForecastError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    task = (checkpoint.get("vpipe") or {}).get("task") if isinstance(checkpoint, dict) else None
    if not hparams.get("video_format") or not {"cell", "hidden_channels", "patch_size"} <= set(hparams):
        kind = task or hparams.get("_class_path") or "not a LightningModule checkpoint"
        raise ForecastError(
            f"{path}: not a frame forecaster ({kind}); vpipe forecast needs a checkpoint of "
            "pipeline.conv_forecasting.FrameForecaster, e.g. models/nextframe_convlstm/best.ckpt"
        )
    return FrameForecaster.load_from_checkpoint(path, map_location="cpu").eval()


def read_context(video: str | os.PathLike, video_format: dict, count: int) -> np.ndarray:
    """The first ``count`` frames of ``video`` as ``(count, H, W, 3)`` uint8, decoded like the
    frame store the model was trained on (same ``fps`` and size)."""
    from pipeline.video import Decoder

    size = (int(video_format["width"]), int(video_format["height"]))
    frames: list[np.ndarray] = []
    try:
        with Decoder(video, fps=float(video_format.get("fps", 0.0)), size=size) as decoder:
            for frame in decoder:
                frames.append(frame)
                if len(frames) == count:
                    break
    except Exception as err:  # FileNotFoundError, ValueError, av errors: all mean "cannot use this file"
        text = str(err)
        raise ForecastError(
            text if text.startswith(str(video)) else f"{video}: cannot be decoded ({text})"
        ) from err
    if len(frames) < count:
        rate = video_format.get("fps") or "its native"
        raise ForecastError(
            f"{video}: has {len(frames)} frames at {rate} fps, fewer than the {count} context frames asked for"
        )
    return np.stack(frames)


def write_frames(out: Path, frames: np.ndarray, fps: float) -> None:
    """``(T, H, W, 3)`` uint8 to an MP4 (H.264) or an animated GIF, chosen by the suffix."""
    if out.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(out, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return
    from pipeline.video import write_video

    if frames.shape[1] % 2 or frames.shape[2] % 2:  # yuv420p needs even sides: repeat the last row / column
        frames = np.pad(
            frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge"
        )
    write_video(out, frames, fps)


def forecast(
    video: str | os.PathLike,
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    context: int | None = None,
    steps: int | None = None,
) -> dict:
    """Decode the first ``context`` frames of ``video``, predict ``steps`` more with the frame
    forecaster in ``ckpt`` and write the context followed by the prediction to ``out`` (.mp4 or .gif).

    ``context`` and ``steps`` default to the model's training window. A still image (PNG, JPEG, ...)
    is a context of one frame: a video from one still, best with a forecaster trained from one frame
    (``configs/still_convlstm.yaml``). Returns what was written (``note``: a caveat, if any).

    Raises:
        ForecastError: a missing or unreadable video or checkpoint, a checkpoint that is not a frame
            forecaster, a video shorter than ``context``, or an output suffix other than .mp4/.gif.
    """
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    out = Path(out)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise ForecastError(f"{out}: the output must end in .mp4 or .gif")
    from pipeline.images import IMAGE_SUFFIXES

    model = load_frame_forecaster(ckpt)
    video_format = model.hparams.video_format
    still = Path(video).suffix.lower() in IMAGE_SUFFIXES
    if still and (context or 1) != 1:
        raise ForecastError(f"{video}: a still image is one frame of context, not {context}")
    context = 1 if still else context or model.hparams.context
    steps = steps or model.hparams.horizon
    if context < 1 or steps < 1:
        raise ForecastError(f"--context and --steps must be at least 1, got {context} and {steps}")
    note = ""
    if context < model.hparams.context:
        note = (
            f"{ckpt} was trained on {model.hparams.context} context frames; from {context} its forecast is a guess "
            "(a forecaster trained from one frame: configs/still_convlstm.yaml)"
        )
    frames = read_context(video, video_format, context)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255).unsqueeze(0)  # (1, N, 3, H, W)
    if video_format.get("grayscale", True):
        x = rgb_to_grayscale(x)
    with torch.no_grad():
        pred = model.rollout(x, steps)
    shown = np.concatenate([to_uint8(x[0]), to_uint8(pred[0])])
    out.parent.mkdir(parents=True, exist_ok=True)
    fps = float(video_format.get("rate") or video_format.get("fps") or 10.0)
    write_frames(out, shown, fps)
    return {
        "out": str(out),
        "context": context,
        "steps": steps,
        "fps": fps,
        "size": list(shown.shape[1:3]),
        "note": note,
    }
