"""Video decoding and encoding with PyAV: the only module of the package that imports ``av``.

Frame-rate resampling rule (``decode(..., fps=F)``): output frame ``k`` stands for presentation
time ``t_k = t_0 + k / F``, where ``t_0`` is the time of the first decoded frame (so streams whose
timestamps do not start at 0 come out right). It is served by the last decoded frame whose
presentation time is ``<= t_k`` (sample-and-hold, as a display would show it). Output frames are
produced while ``t_k`` lies before the end of the last decoded frame. ``fps=0`` keeps every frame.
Times come from ``frame.pts * stream.time_base``, never from frame indices, so variable-frame-rate
files are resampled by when their frames are shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


@dataclass(frozen=True)
class DecodedVideo:
    """Frames of one video after resampling and scaling."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    src_fps: float  # the stream's average rate as the container declares it
    fps: float  # the rate of `frames` (src_fps when every frame is kept)
    duration_sec: float  # span of the decoded frames: last end - first start


def parse_size(size: str | int | None) -> tuple[int, int] | None:
    """``"112"`` → (112, 112); ``"160x120"`` → (160, 120) as (width, height); None keeps the size."""
    if size is None or size == "" or size == 0 or size == "0":
        return None
    text = str(size).lower()
    if "x" in text:
        w, h = text.split("x", 1)
        wh = int(w), int(h)
    else:
        wh = int(text), int(text)
    if wh[0] <= 0 or wh[1] <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return wh


def versions() -> dict[str, str]:
    """PyAV and FFmpeg library versions, recorded in store metadata."""
    return {"pyav": av.__version__, "ffmpeg": ".".join(map(str, av.library_versions.get("libavcodec", ())))}


def decode(
    path: str | os.PathLike,
    *,
    fps: float = 0.0,
    size: tuple[int, int] | None = None,
    start_sec: float | None = None,
    end_sec: float | None = None,
    threads: int = 1,
) -> DecodedVideo:
    """Decode a video file to RGB frames.

    Args:
        path: the video file.
        fps: output frame rate; 0 keeps every decoded frame.
        size: (width, height) of the output; the whole frame is scaled (no crop). None keeps it.
        start_sec: drop frames shown before this time (relative to the stream's first frame).
        end_sec: drop frames shown at or after this time (relative to the stream's first frame).
        threads: decoder threads (slice threading: safe inside worker processes).

    Raises:
        ValueError: the file has no video stream or no decodable frame (message names the file).
        av.FFmpegError / OSError: the container cannot be opened or read.
    """
    path = Path(path)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        stream.thread_count = max(1, threads)
        time_base = stream.time_base or Fraction(1, 1)
        src_fps = float(stream.average_rate or stream.guessed_rate or 0.0)

        out: list[np.ndarray] = []
        held: np.ndarray | None = None  # last frame shown so far (for sample-and-hold)
        t0: float | None = None
        next_k = 0
        last_t = last_dur = 0.0
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * time_base)
            if t0 is None:
                t0 = t
            rel = t - t0
            if start_sec is not None and rel < start_sec and fps == 0:
                continue
            if end_sec is not None and rel >= end_sec:
                break
            last_dur = float(frame.duration * time_base) if frame.duration else (1.0 / src_fps if src_fps else 0.0)
            last_t = rel
            rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1]) if size else frame.to_ndarray(format="rgb24")
            if fps == 0:
                out.append(rgb)
                continue
            origin = start_sec or 0.0
            # Emit every output time t_k that lies before this frame's start: the held frame serves it.
            while held is not None and origin + next_k / fps < rel:
                out.append(held)
                next_k += 1
            held = rgb
            if rel < origin:  # before the clip start: keep as the held frame only
                continue
        if fps and held is not None:
            origin = start_sec or 0.0
            end = last_t + max(last_dur, 1e-6)
            if end_sec is not None:
                end = min(end, end_sec)
            while origin + next_k / fps < end:
                out.append(held)
                next_k += 1
    if not out:
        raise ValueError(f"{path}: no decodable video frame")
    first = start_sec or 0.0
    duration = (last_t + last_dur) - first if fps == 0 else len(out) / fps
    return DecodedVideo(np.stack(out), src_fps, float(fps or src_fps), round(max(duration, 0.0), 6))


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    *,
    codec: str = "libx264",
    crf: int = 20,
    preset: str = "veryfast",
) -> None:
    """Encode RGB frames ``(T, H, W, 3)`` uint8 to a video file (H.264 in MP4 by default).

    Width and height must be even for yuv420p. Encoding is deterministic: the same frames give the
    same bytes.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": preset}
        # One encoder thread: output bytes must not depend on the machine's core count.
        stream.thread_count = 1
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
