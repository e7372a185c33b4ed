"""``vpipe forecast``: decode the first frames of a video (or one still image) the way a frame
forecaster was trained (frame rate, size, grayscale, all kept in its checkpoint), roll out, write
context + prediction. The pictures drawn during training are :mod:`pipeline.media.pictures`'.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline import compat
from pipeline.media.errors import UserError
from pipeline.media.pictures import to_uint8


class ForecastError(RuntimeError, UserError):
    """A video or checkpoint ``vpipe forecast`` cannot use; the message names the file and the reason."""


def load_frame_forecaster(ckpt: str | os.PathLike):
    """The :class:`pipeline.systems.conv_forecaster.FrameForecaster` of a checkpoint, on the CPU, in eval mode."""
    from pipeline.systems.conv_forecaster import FrameForecaster

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
        kind = task or compat.checkpoint_class_path(hparams) or "not a LightningModule checkpoint"
        raise ForecastError(
            f"{path}: not a frame forecaster ({kind}); vpipe forecast needs a checkpoint of "
            "pipeline.systems.conv_forecaster.FrameForecaster, e.g. models/nextframe_convlstm/best.ckpt"
        )
    return FrameForecaster.load_from_checkpoint(path, map_location="cpu").eval()


def read_context(video: str | os.PathLike, video_format: dict, count: int) -> np.ndarray:
    """The first ``count`` frames of ``video`` as ``(count, H, W, 3)`` uint8, decoded like the
    frame store the model was trained on (same ``fps``, size and codec)."""
    from pipeline.media.codecs import as_stored
    from pipeline.media.video import Decoder

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
    return as_stored(np.stack(frames), video_format)


def write_frames(out: Path, frames: np.ndarray, fps: float) -> None:
    """``(T, H, W, 3)`` uint8 to an MP4 (H.264) or an animated GIF, chosen by the suffix."""
    if out.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(out, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return
    from pipeline.media.video import write_video

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
    from pipeline.media.images import IMAGE_SUFFIXES

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
