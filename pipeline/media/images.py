"""Image sequences: a folder of frames (as Jester ships its clips) standing in for a video.

Which files count as frames, the order they are shown in (natural order: ``img2`` before ``img10``)
and the frame rate used when the manifest gives none. Path logic only: :mod:`pipeline.media.video` decodes
the images, :func:`pipeline.storage.store.fingerprint` identifies the folder.
"""

from __future__ import annotations

import re
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Jester's frame rate; image sequences take theirs from the manifest's `fps` column or --image-fps.
DEFAULT_IMAGE_FPS = 12.0


def natural_key(path: Path) -> list:
    """``img2.jpg`` before ``img10.jpg``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def image_sequence(folder: Path, fps: float) -> list[Path]:
    """The frames of the image sequence ``folder`` in natural order, shown at ``fps``.

    Raises:
        ValueError: the folder holds no image, or ``fps`` is not positive; the message names the folder.
    """
    images = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
    if not images:
        raise ValueError(f"{folder}: a folder without images ({', '.join(IMAGE_SUFFIXES)})")
    if fps <= 0:
        raise ValueError(f"{folder}: an image sequence needs a frame rate > 0, got {fps}")
    return images
