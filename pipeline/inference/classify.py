"""``vpipe classify``: a trained classifier on new videos, with the preprocessing it was trained on.

The checkpoint (or registered version) is loaded by :func:`pipeline.inference.checkpoints.load`, with the frame
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
from pathlib import Path

import numpy as np

from pipeline.inference.checkpoints import ClassifyError, LoadedModel
from pipeline.inference.runner import run_each, windows


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
    """Classify ``videos`` and ``out`` one line per video (or per window); returns the exit status
    (:func:`pipeline.inference.runner.run_each`: checks first, then a failed video does not stop the others)."""
    if topk < 1 or (window is not None and window <= 0) or (stride is not None and stride <= 0):
        raise ClassifyError("--topk, --window and --stride must be positive")
    if stride is not None and window is None:
        raise ClassifyError("--stride needs --window")

    def answer(classifier: LoadedModel, video: str) -> None:
        for start, end, frames in windows(Path(video), classifier.fps, classifier.size, window, stride):
            best = top(classifier.probabilities(frames), classifier.classes, topk)
            out(line(video, start, end, best, as_json))

    return run_each(
        videos,
        answer,
        ckpt=ckpt,
        model_uri=model_uri,
        weights=weights,
        device=device,
        task="Classifier",
        command="vpipe classify",
        err=err,
    )
