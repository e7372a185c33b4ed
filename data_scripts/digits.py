"""Moving digits for next-frame prediction, in the style of Moving MNIST.

Two handwritten digits bounce inside a 64×64 frame for 20 frames. The digit images are the real
handwriting samples bundled in scikit-learn (``sklearn.datasets.load_digits``: 1,797 scans of 8×8
pixels, upscaled to 28×28); train, val and test sequences draw from disjoint thirds of that set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

CLASSES = ["digits"]
SIZE, DIGIT, FRAMES, FPS = 64, 28, 20, 10
POOL_FRACTIONS = {"train": (0.0, 0.7), "val": (0.7, 0.85), "test": (0.85, 1.0)}


@cache
def digit_images() -> np.ndarray:
    """All bundled digits as ``(N, 28, 28)`` uint8."""
    from sklearn.datasets import load_digits

    small = load_digits().images  # (1797, 8, 8) with values 0..16
    return np.stack(
        [
            np.asarray(
                Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((DIGIT, DIGIT), Image.BILINEAR)
            )
            for img in small
        ]
    )


@dataclass(frozen=True)
class Params:
    digits: tuple[int, int]  # indices into digit_images()
    positions: tuple[tuple[float, float], tuple[float, float]]
    velocities: tuple[tuple[float, float], tuple[float, float]]


def sample_params(rng: np.random.Generator, split: str = "train") -> Params:
    n = len(digit_images())
    lo, hi = (int(f * n) for f in POOL_FRACTIONS[split])
    limit = SIZE - DIGIT
    velocities = []
    for _ in range(2):
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(2.0, 4.0)
        velocities.append((float(speed * np.cos(angle)), float(speed * np.sin(angle))))
    return Params(
        digits=tuple(int(d) for d in rng.integers(lo, hi, 2)),
        positions=tuple((float(rng.uniform(0, limit)), float(rng.uniform(0, limit))) for _ in range(2)),
        velocities=tuple(velocities),
    )


def render(name: str, p: Params) -> np.ndarray:
    """Frames ``(20, 64, 64, 3)`` uint8: white digits on black, bouncing off the borders."""
    images = digit_images()
    limit = SIZE - DIGIT
    frames = np.zeros((FRAMES, SIZE, SIZE), np.uint8)
    for digit, (x, y), (vx, vy) in zip(p.digits, p.positions, p.velocities, strict=True):
        for t in range(FRAMES):
            ix, iy = int(round(x)), int(round(y))
            np.maximum(
                frames[t, iy : iy + DIGIT, ix : ix + DIGIT],
                images[digit],
                out=frames[t, iy : iy + DIGIT, ix : ix + DIGIT],
            )
            x, y = x + vx, y + vy
            if not 0 <= x <= limit:
                vx, x = -vx, min(max(x, 0), limit)
            if not 0 <= y <= limit:
                vy, y = -vy, min(max(y, 0), limit)
    return np.repeat(frames[..., None], 3, axis=-1)
