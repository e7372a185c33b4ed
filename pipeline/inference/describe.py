"""``vpipe caption``: one caption per video or still image (a one-frame video), decoded and featurised as
the captioner's stores were (see :mod:`pipeline.inference.checkpoints`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.inference.checkpoints import ClassifyError, LoadedModel
from pipeline.inference.runner import run_each, windows


def run(
    paths: list[str],
    *,
    ckpt: str | None = None,
    model_uri: str | None = None,
    beam: int | None = None,
    as_json: bool = False,
    weights: str | None = None,
    device: str = "cpu",
    out=print,
    err=None,
) -> int:
    """Caption ``paths`` and ``out`` one line per file; returns the exit status
    (:func:`pipeline.inference.runner.run_each`: checks first, then a failed file does not stop the others)."""
    if beam is not None and beam < 1:
        raise ClassifyError(f"--beam must be at least 1, got {beam}")

    def answer(captioner: LoadedModel, path: str) -> None:
        ((_, _, frames),) = windows(Path(path), captioner.fps, captioner.size, None, None)
        with torch.inference_mode():
            caption = captioner.model.generate(captioner.inputs(frames), beam_size=beam)[0]
        out(json.dumps({"video": path, "caption": caption}) if as_json else f"{path}: {caption}")

    return run_each(
        paths,
        answer,
        ckpt=ckpt,
        model_uri=model_uri,
        weights=weights,
        device=device,
        task="Captioner",
        command="vpipe caption",
        err=err,
    )
