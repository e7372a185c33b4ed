"""What ``vpipe classify`` and ``vpipe caption`` share: a model loaded once from a checkpoint or a
registered version, then each file answered in turn.

Everything that can be checked before decoding (the model, that the files exist) is, and stops the
command with nothing printed; a file that fails to decode is reported on ``err`` (naming the file and
the reason), the others are still answered, and the exit status is 1.
"""

from __future__ import annotations

import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pipeline.inference.checkpoints import ClassifyError, LoadedModel, fetch, load


def windows(
    path: Path, fps: float, size: tuple[int, int] | None, window: float | None, stride: float | None
) -> Iterator[tuple[float | None, float | None, np.ndarray]]:
    """``(start_sec, end_sec, frames)`` of every window of ``path`` (times None: the whole video).

    A video shorter than one window is one window. Raises ClassifyError naming the file.
    """
    from pipeline.media.video import Decoder, FFmpegError

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


def run_each(
    paths: list[str],
    answer: Callable[[LoadedModel, str], None],
    *,
    ckpt: str | None,
    model_uri: str | None,
    weights: str | None,
    device: str,
    task: str,
    command: str,
    err=None,
) -> int:
    """Load the ``task`` model of ``ckpt`` or ``model_uri`` and call ``answer(model, path)`` for each path;
    returns the exit status (1 when a file failed, after answering the others).

    Raises:
        ClassifyError: neither or both of ``ckpt`` and ``model_uri``, a missing file, or a model that
            cannot be loaded (nothing is answered then).
    """
    err = err or (lambda text: print(text, file=sys.stderr))
    if (ckpt is None) == (model_uri is None):
        raise ClassifyError("give --ckpt CKPT or --model models:/NAME/VERSION")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ClassifyError("; ".join(f"{p}: no such file" for p in missing))
    with tempfile.TemporaryDirectory(prefix="vpipe-model-") as tmp:
        path = fetch(model_uri, Path(tmp)) if model_uri else Path(ckpt)
        loaded = load(
            path, weights=weights, device=device, source=model_uri or ckpt, task=task, command=command
        )
    failed = 0
    for video in paths:
        try:
            answer(loaded, video)
        except ClassifyError as error:
            err(f"{command}: {error}")
            failed += 1
    return 1 if failed else 0
