"""Video decoding and encoding with PyAV: the only module of the package that imports ``av``.

Frame-rate resampling rule (``fps=F``): output frame ``k`` stands for presentation time
``t_k = start + k / F`` on the stream's own clock, where time 0 is the first decoded frame (so
streams whose timestamps start late come out right) and ``start`` is ``start_sec`` (default 0).
It is served by the last decoded frame whose presentation time is ``<= t_k`` (sample and hold, as a
display would show it). Output frames are produced while ``t_k`` lies before the end of the last
frame shown (its time plus its duration) and before ``end_sec``. ``fps=0`` keeps every frame.
Times come from ``frame.pts * stream.time_base``, never from frame indices, so variable-frame-rate
files are resampled by when their frames are shown. Only frames that are emitted are scaled and
converted (one libswscale pass each: scaling and RGB conversion together).

Rotation metadata (the display matrix) is applied, so phone videos come out upright; ``size`` is
the size after rotation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Jester's frame rate; image sequences take theirs from the manifest's `fps` column or --image-fps.
DEFAULT_IMAGE_FPS = 12.0
# Times closer than this are equal: float rounding of pts × time_base must not add or drop a frame.
EPS = 1e-6


@dataclass(frozen=True)
class DecodedVideo:
    """Frames of one video after resampling and scaling."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    src_fps: float  # the stream's average rate as the container declares it
    fps: float  # the rate of `frames` (src_fps when every frame is kept)
    duration_sec: float  # time span the frames cover


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


class Decoder:
    """Streams the RGB frames of one video; use as a context manager, then iterate.

    Args:
        path: the video file.
        fps: output frame rate; 0 keeps every decoded frame.
        size: (width, height) of the output after rotation; the whole frame is scaled (no crop).
        start_sec: first output time, relative to the stream's first frame.
        end_sec: no output at or after this time, relative to the stream's first frame.
        threads: decoder threads; frame threading when above 1 (spawned worker processes only:
            frame threading has hung inside forked DataLoader workers, PyAV #1962).

    After iteration, ``count`` and ``duration_sec`` describe what was produced. Errors name the file.
    """

    def __init__(self, path: str | os.PathLike, *, fps: float = 0.0, size: tuple[int, int] | None = None,
                 start_sec: float | None = None, end_sec: float | None = None, threads: int = 1,
                 image_fps: float = DEFAULT_IMAGE_FPS):
        self.path, self.fps, self.size = Path(path), float(fps), size
        self.start, self.end, self.threads = float(start_sec or 0.0), end_sec, threads
        self.image_fps = float(image_fps)
        self.count, self.duration_sec, self.src_fps = 0, 0.0, 0.0
        self.container = None
        self._reformatter = VideoReformatter()

    def __enter__(self) -> Decoder:
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file")
        if self.path.is_dir():  # an image sequence (e.g. Jester): the images in natural order
            self.images = sorted((p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
            if not self.images:
                raise ValueError(f"{self.path}: a folder without images ({', '.join(IMAGE_SUFFIXES)})")
            if self.image_fps <= 0:
                raise ValueError(f"{self.path}: an image sequence needs a frame rate > 0, got {self.image_fps}")
            self.src_fps = self.image_fps
            return self
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise ValueError(f"{self.path}: empty file (0 bytes)")
        self.container = av.open(str(self.path))
        try:
            if not self.container.streams.video:
                kinds = ", ".join(sorted({s.type for s in self.container.streams})) or "none"
                raise ValueError(f"{self.path}: no video stream (streams: {kinds})")
            self.stream = self.container.streams.video[0]
            self.stream.thread_type = "AUTO" if self.threads > 1 else "SLICE"
            self.stream.thread_count = max(1, self.threads)
            self.src_fps = float(self.stream.average_rate or self.stream.guessed_rate or 0.0)
        except BaseException:
            self.container.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.container is not None:
            self.container.close()

    def _timed_frames(self) -> Iterator[tuple[float, float, av.VideoFrame]]:
        """(time since the first frame, duration, frame) in presentation order, seconds."""
        if self.container is None:
            for i, image in enumerate(self.images):
                try:
                    with av.open(str(image)) as container:
                        frame = next(container.decode(video=0))
                except (av.FFmpegError, StopIteration) as err:
                    raise ValueError(f"{image}: not a readable image ({err})") from err
                yield i / self.image_fps, 1.0 / self.image_fps, frame
            return
        time_base = self.stream.time_base or Fraction(1, 90000)
        step = 1.0 / self.src_fps if self.src_fps else 0.04
        t0 = previous = None
        for frame in self.container.decode(self.stream):
            if frame.pts is not None:
                t = float(frame.pts * time_base)
            else:  # no timestamp: assume the declared rate
                t = 0.0 if previous is None else previous + step
            t0 = t if t0 is None else t0
            previous = t
            yield t - t0, float(frame.duration * time_base) if frame.duration else step, frame

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        turns = int(round((frame.rotation or 0) / 90)) % 4  # counter-clockwise quarter turns
        w, h = (None, None) if self.size is None else self.size if turns % 2 == 0 else self.size[::-1]
        # One reformatter for the whole video: it keeps its libswscale context between frames
        # (frame.to_ndarray would build a new one per frame). AREA averages properly when shrinking.
        image = self._reformatter.reformat(frame, format="rgb24", width=w, height=h, interpolation="AREA").to_ndarray()
        return np.ascontiguousarray(np.rot90(image, turns)) if turns else image

    def __iter__(self) -> Iterator[np.ndarray]:
        held: av.VideoFrame | None = None  # last frame shown so far, for sample and hold
        held_rgb: np.ndarray | None = None
        held_end = 0.0
        k = 0  # next output index
        first = None
        for t, duration, frame in self._timed_frames():
            if self.end is not None and t >= self.end:
                break
            if self.fps == 0:
                if t < self.start:
                    continue
                yield self._rgb(frame)
                first = t if first is None else first
                held_end, k = t + duration, k + 1
                continue
            while held is not None and self.start + k / self.fps < t - EPS:
                if held_rgb is None:
                    held_rgb = self._rgb(held)
                yield held_rgb
                k += 1
            held, held_rgb, held_end = frame, None, t + duration
            first = t if first is None else first
        if self.fps and held is not None:
            end = held_end if self.end is None else min(held_end, self.end)
            while self.start + k / self.fps < end - EPS:
                if held_rgb is None:
                    held_rgb = self._rgb(held)
                yield held_rgb
                k += 1
        if first is None and held is None:
            raise ValueError(f"{self.path}: no decodable video frame")
        self.count = k
        self.duration_sec = round(k / self.fps if self.fps else max(0.0, held_end - max(self.start, first or 0.0)), 6)


def natural_key(path: Path) -> list:
    """``img2.jpg`` before ``img10.jpg``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def uniform_indices(count: int, keep: int | None) -> np.ndarray:
    """``keep`` indices spread uniformly over ``range(count)`` (all when ``keep`` is None or larger)."""
    if not keep or keep >= count:
        return np.arange(count)
    return np.round(np.linspace(0, count - 1, keep)).astype(np.int64)


def decode(path: str | os.PathLike, *, fps: float = 0.0, size: tuple[int, int] | None = None, start_sec: float | None = None,
           end_sec: float | None = None, max_frames: int | None = None, threads: int = 1,
           image_fps: float = DEFAULT_IMAGE_FPS) -> DecodedVideo:
    """Decode a whole video into memory (see :class:`Decoder`); ``max_frames`` keeps N frames uniformly.

    Raises:
        FileNotFoundError, ValueError, av.FFmpegError: the message names the file.
    """
    with Decoder(path, fps=fps, size=size, start_sec=start_sec, end_sec=end_sec, threads=threads, image_fps=image_fps) as decoder:
        frames = list(decoder)
    if not frames:
        raise ValueError(f"{path}: no frame between start_sec={start_sec} and end_sec={end_sec}")
    frames = np.stack(frames)[uniform_indices(len(frames), max_frames)]
    return DecodedVideo(frames, decoder.src_fps, fps or decoder.src_fps, decoder.duration_sec)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    *,
    codec: str = "libx264",
    crf: int = 20,
    preset: str = "veryfast",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    rotation: int = 0,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
) -> None:
    """Encode RGB frames ``(T, H, W, 3)`` uint8 to a video file (H.264 in MP4 by default).

    ``rotation`` writes display-matrix metadata (degrees counter-clockwise); ``pts`` with
    ``time_base`` gives each frame its own timestamp (variable frame rate, late starts).
    With one encoder thread and no macroblock tree the output bytes depend only on the input.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        # mbtree off: with it, libx264 (as bundled with PyAV 18.1) did not repeat its bytes for the same
        # frames, even twice in one process; the embedded datasets must be byte-identical per seed.
        opts = {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"} if codec == "libx264" else {}
        stream.options = {**opts, **(options or {})}
        stream.thread_count = 1
        if time_base is not None:
            stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
