"""Resampling a video in time and space, as arithmetic on times and sizes: no decoding here.

Frame-rate rule (``fps=F``): output frame ``k`` stands for presentation time ``t_k = start + k / F``
on the stream's own clock, where time 0 is the first decoded frame (so streams whose timestamps
start late come out right) and ``start`` is ``start_sec`` (default 0). It is served by the last
decoded frame whose presentation time is ``<= t_k`` (sample and hold, as a display would show it).
Output frames are produced while ``t_k`` lies before the end of the last frame shown (its time plus
its duration) and before ``end_sec``. ``fps=0`` keeps every frame. Times are presentation times
(:mod:`pipeline.media.video` reads them from ``frame.pts * stream.time_base``, never from frame indices), so
variable-frame-rate files are resampled by when their frames are shown.

Also here: which frames no output sample shows (the decoder may leave them undecoded), ``N`` frames
spread uniformly over a video (``max_frames``), and the output size as ``--size`` spells it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

# Times closer than this are equal: float rounding of pts × time_base must not add or drop a frame.
EPS = 1e-6

Frame = TypeVar("Frame")


class SampleAndHold:
    """The frame-rate rule for one video: :meth:`select` turns timed frames into output frames.

    Args:
        fps: output frame rate; 0 keeps every frame.
        start: first output time, relative to the first frame.
        end: no output at or after this time, relative to the first frame; None: no limit.

    Once :meth:`select` is exhausted, ``count`` and ``duration_sec`` describe the output, and
    ``empty`` is True when no frame was taken at all (none before ``end``; at ``fps=0``, none from
    ``start`` on either).
    """

    def __init__(self, fps: float, start: float = 0.0, end: float | None = None):
        self.fps, self.start, self.end = fps, start, end
        self.count, self.duration_sec, self.empty = 0, 0.0, True

    def select(self, timed: Iterable[tuple[float, float, Frame]]) -> Iterator[Frame]:
        """``(time, duration, frame)`` in presentation order → the frame each output sample shows.

        A frame held for several samples comes out once per sample, as the same object, so the
        caller converts it once.
        """
        held: Frame | None = None  # last frame shown so far, for sample and hold
        held_end = 0.0
        k = 0  # next output index
        first = None
        for t, duration, frame in timed:
            if self.end is not None and t >= self.end:
                break
            if self.fps == 0:
                if t < self.start:
                    continue
                yield frame
                first = t if first is None else first
                held_end, k = t + duration, k + 1
                continue
            while held is not None and self.start + k / self.fps < t - EPS:
                yield held
                k += 1
            held, held_end = frame, t + duration
            first = t if first is None else first
        if self.fps and held is not None:
            end = held_end if self.end is None else min(held_end, self.end)
            while self.start + k / self.fps < end - EPS:
                yield held
                k += 1
        self.empty = first is None and held is None
        self.count = k
        self.duration_sec = round(
            k / self.fps if self.fps else max(0.0, held_end - max(self.start, first or 0.0)), 6
        )


def shows_nothing(t: float, t_next: float, fps: float, start: float = 0.0) -> bool:
    """True when no output time ``start + k / fps`` falls between ``t`` and ``t_next`` (a frame shown
    from ``t`` until the next one at ``t_next`` then serves no output sample)."""
    k = max(0, math.ceil((t - EPS - start) * fps))
    return not start + k / fps < t_next - EPS


def uniform_indices(count: int, keep: int | None) -> np.ndarray:
    """``keep`` indices spread uniformly over ``range(count)`` (all when ``keep`` is None or larger)."""
    if not keep or keep >= count:
        return np.arange(count)
    return np.round(np.linspace(0, count - 1, keep)).astype(np.int64)


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
