"""``vpipe classify``: a trained classifier on new videos, with the preprocessing it was trained on.

The checkpoint (or registered version) is loaded by :func:`pipeline.checkpoints.load`, with the frame
store's decoding parameters (fps, size) and, for a model over cached features, the feature store's
backbone. Each video is decoded the same way; the clip is sampled like evaluation clips (the centre
frame of each of ``num_segments`` equal segments) and the head gives class probabilities. A model
that consumes frames itself (an end-to-end classifier with a trainable frame encoder) gets the uint8
frames.

``--window W --stride S`` (seconds) classifies every W-second window, every S seconds, while
decoding: memory holds one window, whatever the length of the video.
"""

from __future__ import annotations

import json
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.checkpoints import ClassifyError, fetch, load


def windows(
    path: Path, fps: float, size: tuple[int, int] | None, window: float | None, stride: float | None
) -> Iterator[tuple[float | None, float | None, np.ndarray]]:
    """``(start_sec, end_sec, frames)`` of every window of ``path`` (times None: the whole video).

    A video shorter than one window is one window. Raises ClassifyError naming the file.
    """
    from pipeline.video import Decoder, FFmpegError

    try:
        with Decoder(path, fps=fps, size=size) as decoder:
            rate = fps or decoder.src_fps or 25.0
            if window is None:
                frames = list(decoder)
                if not frames:
                    raise ValueError(f"{path}: no decodable video frame")
                yield None, None, np.stack(frames)
                return
            length, step = max(1, round(window * rate)), max(1, round((stride or window) * rate))
            buffer: deque[np.ndarray] = deque(maxlen=length)
            count = 0
            for frame in decoder:
                buffer.append(frame)
                count += 1
                if count >= length and (count - length) % step == 0:
                    yield (count - length) / rate, count / rate, np.stack(buffer)
            if 0 < count < length:
                yield 0.0, count / rate, np.stack(buffer)
    except ClassifyError:
        raise
    except FFmpegError as err:  # before OSError/ValueError: PyAV's errors subclass them
        raise ClassifyError(f"{path}: not a decodable video ({err.strerror or err})") from err
    except (OSError, ValueError) as err:
        message = str(err)
        raise ClassifyError(message if str(path) in message else f"{path}: {message}") from err


def top(probabilities: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in order]


def line(
    video: str, start: float | None, end: float | None, best: list[tuple[str, float]], as_json: bool
) -> str:
    """One result: ``VIDEO [0.0-2.0 s]: label 0.912, label 0.051`` or one JSON object."""
    if as_json:
        record = {
            "video": video,
            **({"start_sec": round(start, 3), "end_sec": round(end, 3)} if start is not None else {}),
            "top": [{"label": label, "probability": round(p, 6)} for label, p in best],
        }
        return json.dumps(record)
    span = f" [{start:.2f}-{end:.2f} s]" if start is not None else ""
    return f"{video}{span}: " + ", ".join(f"{label} {p:.3f}" for label, p in best)


def run(
    videos: list[str],
    *,
    ckpt: str | None = None,
    model_uri: str | None = None,
    topk: int = 5,
    as_json: bool = False,
    window: float | None = None,
    stride: float | None = None,
    weights: str | None = None,
    device: str = "cpu",
    out=print,
    err=None,
) -> int:
    """Classify ``videos`` and ``out`` one line per video (or per window); returns the exit status.

    Everything that can be checked before decoding (the model, the files exist, the options) is, and
    stops the command with nothing printed; a video that fails to decode is reported on ``err``
    (naming the file and the reason), the others are still classified, and the status is 1.
    """
    import sys

    err = err or (lambda text: print(text, file=sys.stderr))
    if (ckpt is None) == (model_uri is None):
        raise ClassifyError("give --ckpt CKPT or --model models:/NAME/VERSION")
    if topk < 1 or (window is not None and window <= 0) or (stride is not None and stride <= 0):
        raise ClassifyError("--topk, --window and --stride must be positive")
    if stride is not None and window is None:
        raise ClassifyError("--stride needs --window")
    missing = [v for v in videos if not Path(v).exists()]
    if missing:
        raise ClassifyError("; ".join(f"{v}: no such file" for v in missing))
    with tempfile.TemporaryDirectory(prefix="vpipe-classify-") as tmp:
        path = fetch(model_uri, Path(tmp)) if model_uri else Path(ckpt)
        classifier = load(path, weights=weights, device=device, source=model_uri or ckpt)
    failed = 0
    for video in videos:
        try:
            for start, end, frames in windows(Path(video), classifier.fps, classifier.size, window, stride):
                out(
                    line(
                        video,
                        start,
                        end,
                        top(classifier.probabilities(frames), classifier.classes, topk),
                        as_json,
                    )
                )
        except ClassifyError as error:
            err(f"vpipe classify: {error}")
            failed += 1
    return 1 if failed else 0
