"""What the synthetic clip generators (:mod:`data_scripts.gestures`, :mod:`data_scripts.actions`) share:
the camera's noise on each rendered frame, and how a clip's reference captions are drawn and worded.

Both datasets' files depend on this module byte for byte: a change here changes them both (DVC's
``synth`` stages list it)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image


def noisy_frame(image: Image.Image, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` as ``(H, W, 3)`` uint8 with Gaussian sensor noise of std ``noise`` grey levels (none at 0)."""
    frame = np.asarray(image, np.float32)
    if noise:
        frame += rng.normal(0.0, noise, frame.shape).astype(np.float32)
    return np.clip(frame, 0, 255).astype(np.uint8)


def distinct(draw: Callable[[], str], count: int) -> list[str]:
    """``count`` different captions from ``draw()`` (fewer if 20 tries per caption find no more)."""
    out: list[str] = []
    for _ in range(20 * count):
        caption = draw()
        if caption not in out:
            out.append(caption)
        if len(out) == count:
            break
    return out


def article(phrase: str, definite: bool) -> str:
    """``phrase`` after "the", or after "a"/"an" as its first sound needs."""
    return f"{'the' if definite else 'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"
