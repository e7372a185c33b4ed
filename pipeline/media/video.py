"""Video decoding and encoding with PyAV: the only module of the package that imports ``av``.

Frames are resampled to a target rate by the rule in :mod:`pipeline.media.resample` (sample and hold by
presentation time: times come from ``frame.pts * stream.time_base``, never from frame indices).
Only frames that are emitted are scaled and converted (one libswscale pass each: scaling and RGB
conversion together). A folder of images (:mod:`pipeline.media.images`) decodes as a video.

Rotation metadata (the display matrix) is applied, so phone videos come out upright; ``size`` is
the size after rotation.

Decoding does only the work the output needs, with frames identical to decoding everything:
``start_sec`` seeks to the keyframe before it (a late clip costs its length, not its offset), and
when resampling to a lower rate, non-reference frames that no output sample shows are not decoded
(the decoder's ``skip_frame`` is set per packet, from packet timestamps read ahead of the decoder).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.media.images import DEFAULT_IMAGE_FPS, image_sequence
from pipeline.media.resample import SampleAndHold, shows_nothing, uniform_indices

# PyAV's error (a failed open, demux or decode), for the modules that catch it without importing av.
FFmpegError = av.FFmpegError
# Packets read ahead of the decoder: enough to see past any B-frame reordering.
LOOKAHEAD = 32
# A start_sec later than this seeks to the keyframe before it; earlier ones decode from the start.
SEEK_MIN_SEC = 1.0


@dataclass(frozen=True)
class DecodedVideo:
    """Frames of one video after resampling and scaling."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    src_fps: float  # the stream's average rate as the container declares it
    fps: float  # the rate of `frames` (src_fps when every frame is kept)
    duration_sec: float  # time span the frames cover


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
        seek: seek to the keyframe before ``start_sec``; ``skip``: leave unused non-reference frames
            undecoded. Both on by default; off, every frame from the file's start is decoded.

    After iteration, ``count`` and ``duration_sec`` describe what was produced. Errors name the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fps: float = 0.0,
        size: tuple[int, int] | None = None,
        start_sec: float | None = None,
        end_sec: float | None = None,
        threads: int = 1,
        image_fps: float = DEFAULT_IMAGE_FPS,
        seek: bool = True,
        skip: bool = True,
    ):
        self.path, self.fps, self.size = Path(path), float(fps), size
        self.start, self.end, self.threads = float(start_sec or 0.0), end_sec, threads
        self.seek, self.skip = seek, skip
        self.decoded = self.skipped = 0  # frames decoded, packets left undecoded
        self.image_fps = float(image_fps)
        self.count, self.duration_sec, self.src_fps = 0, 0.0, 0.0
        self.container = None
        self._reformatter = VideoReformatter()

    def __enter__(self) -> Decoder:
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file")
        if self.path.is_dir():  # an image sequence (e.g. Jester): the images in natural order
            self.images = image_sequence(self.path, self.image_fps)
            self.src_fps = self.image_fps
            return self
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise ValueError(f"{self.path}: empty file (0 bytes)")
        self.container = av.open(str(self.path))
        try:
            if not self.container.streams.video:
                kinds = ", ".join(sorted({s.type for s in self.container.streams})) or "none"
                raise ValueError(f"{self.path}: no video stream (streams: {kinds})")
            self._use_stream()
            self.src_fps = float(self.stream.average_rate or self.stream.guessed_rate or 0.0)
        except BaseException:
            self.container.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.container is not None:
            self.container.close()

    @property
    def declared_duration(self) -> float | None:
        """The duration in seconds the open file declares for its video stream (else for the whole
        file), from its header: no decoding. None for an image sequence or a file that declares none."""
        if self.container is None:
            return None
        if self.stream.duration is not None and self.stream.time_base:
            return float(self.stream.duration * self.stream.time_base)
        return self.container.duration / av.time_base if self.container.duration is not None else None

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
        self._t0 = None
        frames = self._frames(time_base)
        first = next(frames, None)
        if first is None:
            return
        self._t0 = float(first.pts * time_base) if first.pts is not None else 0.0
        if self.seek and self.start > SEEK_MIN_SEC and first.pts is not None:
            frames = self._after_seek(time_base, first)
        else:
            frames = itertools.chain([first], frames)
        previous = None
        for frame in frames:
            t = (
                float(frame.pts * time_base)
                if frame.pts is not None
                else (self._t0 if previous is None else previous + step)
            )
            previous = t
            yield t - self._t0, float(frame.duration * time_base) if frame.duration else step, frame

    def _use_stream(self) -> None:
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO" if self.threads > 1 else "SLICE"
        self.stream.thread_count = max(1, self.threads)

    def _after_seek(self, time_base, first: av.VideoFrame) -> Iterator[av.VideoFrame]:
        """Frames from the keyframe at or before ``start_sec``. A file that cannot seek there (or lands
        after it) is reopened and decoded from its first frame."""
        target = first.pts + int(self.start / time_base)
        try:
            self.container.seek(target, backward=True, any_frame=False, stream=self.stream)
            frames = self._frames(time_base)
            head = next(frames, None)
            if head is not None and head.pts is not None and head.pts <= target:
                return itertools.chain([head], frames)
        except av.FFmpegError:
            pass
        self.container.close()
        self.container = av.open(str(self.path))
        self._use_stream()
        return self._frames(time_base)

    def _frames(self, time_base) -> Iterator[av.VideoFrame]:
        """Decoded frames from the container's position; non-reference frames that no output sample
        shows are skipped (needs timestamps, a lower output rate and the first frame's time)."""
        ctx = self.stream.codec_context
        ctx.skip_frame = "DEFAULT"
        packets = self.container.demux(self.stream)
        ahead: deque = deque()
        behind: deque = deque(maxlen=LOOKAHEAD)  # pts of packets already sent to the decoder
        while True:
            ahead.extend(itertools.islice(packets, LOOKAHEAD - len(ahead)))  # nothing once demuxed
            if not ahead:
                return
            packet = ahead.popleft()
            unused = self.skip and self.fps > 0 and self._unused(packet, ahead, behind, time_base)
            ctx.skip_frame = "NONREF" if unused else "DEFAULT"
            self.skipped += unused
            if packet.pts is not None:
                behind.append(packet.pts)
            for frame in packet.decode():
                self.decoded += 1
                yield frame

    def _unused(self, packet, ahead, behind, time_base) -> bool:
        """True when no output time falls between this packet's frame and the next frame shown."""
        if self._t0 is None or packet.pts is None or packet.is_keyframe or packet.size == 0:
            return False
        later = [p for p in (*(q.pts for q in ahead), *behind) if p is not None and p > packet.pts]
        if not later:
            return False  # possibly the last frame: its duration ends the video
        t, t_next = float(packet.pts * time_base) - self._t0, float(min(later) * time_base) - self._t0
        return shows_nothing(t, t_next, self.fps, self.start)

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        turns = int(round((frame.rotation or 0) / 90)) % 4  # counter-clockwise quarter turns
        w, h = (None, None) if self.size is None else self.size if turns % 2 == 0 else self.size[::-1]
        # One reformatter for the whole video: it keeps its libswscale context between frames
        # (frame.to_ndarray would build a new one per frame). AREA averages properly when shrinking.
        image = self._reformatter.reformat(
            frame, format="rgb24", width=w, height=h, interpolation="AREA", threads=1
        ).to_ndarray()
        return np.ascontiguousarray(np.rot90(image, turns)) if turns else image

    def __iter__(self) -> Iterator[np.ndarray]:
        clock = SampleAndHold(self.fps, self.start, self.end)
        shown: av.VideoFrame | None = None
        for frame in clock.select(self._timed_frames()):
            if frame is not shown:  # a held frame repeats: converted once
                shown, rgb = frame, self._rgb(frame)
            yield rgb
        if clock.empty:
            raise ValueError(f"{self.path}: no decodable video frame")
        self.count, self.duration_sec = clock.count, clock.duration_sec


def decode(
    path: str | os.PathLike,
    *,
    fps: float = 0.0,
    size: tuple[int, int] | None = None,
    start_sec: float | None = None,
    end_sec: float | None = None,
    max_frames: int | None = None,
    threads: int = 1,
    image_fps: float = DEFAULT_IMAGE_FPS,
) -> DecodedVideo:
    """Decode a whole video into memory (see :class:`Decoder`); ``max_frames`` keeps N frames uniformly.

    Raises:
        FileNotFoundError, ValueError, av.FFmpegError: the message names the file.
    """
    with Decoder(
        path, fps=fps, size=size, start_sec=start_sec, end_sec=end_sec, threads=threads, image_fps=image_fps
    ) as decoder:
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
    With one encoder thread, one conversion thread and no macroblock tree the output bytes depend only
    on the input, whatever the machine's load.
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
            # Converted here on one thread: the encoder's own conversion picks a thread count by
            # itself, and its output then varied with the machine's load.
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt, threads=1)
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
