"""`vpipe classify` on a model trained through the real chain (see conftest.trained_project)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, moving_square
from pipeline.cli import main
from pipeline.media.video import write_video


def _classify(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(["classify", *args])
    out, err = capsys.readouterr()
    code = done.value.code
    return (
        (code if isinstance(code, int) else 1 if code else 0),
        out,
        err if isinstance(code, int) or not code else code,
    )


def test_features_on_the_fly_equal_the_cached_ones(trained_project):
    """The recipe in the checkpoint rebuilds decoding and the backbone: same probabilities as the store's features."""
    from pipeline.datasets.clips import segment_indices
    from pipeline.inference.checkpoints import load
    from pipeline.media.video import decode
    from pipeline.storage.store import FeatureStore

    classifier = load(trained_project / "models" / "gesture_gru" / "best.ckpt")
    assert classifier.classes == ["left", "right"] and classifier.num_segments == 4
    assert classifier.fps == 10 and classifier.size == (32, 32)
    store = FeatureStore(trained_project / "features")
    for video_id in ("left5", "right6"):
        frames = decode(trained_project / "videos" / f"{video_id}.mp4", fps=10, size=(32, 32)).frames
        rows = np.asarray(store.rows(video_id), np.float32)
        assert len(rows) == len(frames)
        x = torch.from_numpy(rows[segment_indices(len(rows), 4, None)].reshape(1, 4, -1))
        with torch.inference_mode():
            expected = torch.softmax(classifier.model(x), -1)[0].numpy()
        np.testing.assert_allclose(classifier.probabilities(frames), expected, atol=1e-3)


def test_text_json_and_registered_model(trained_project, tmp_path, capsys, monkeypatch):
    video = str(trained_project / "videos" / "left5.mp4")
    ckpt = str(trained_project / "models" / "gesture_gru" / "best.ckpt")
    code, text, _ = _classify([video, "--ckpt", ckpt, "--topk", "2"], capsys)
    assert code == 0
    [line] = text.splitlines()
    assert line.startswith(f"{video}: ") and {"left", "right"} <= set(line.split())
    code, out, _ = _classify([video, video, "--ckpt", ckpt, "--json", "--topk", "1"], capsys)
    records = [json.loads(row) for row in out.splitlines()]
    assert len(records) == 2 and records[0] == records[1] and records[0]["video"] == video
    [best] = records[0]["top"]
    # Text: both classes, likeliest first, probabilities summing to 1; the JSON's best is the text's first.
    ranked = [entry.split() for entry in line.split(": ")[1].split(", ")]
    assert [label for label, _ in ranked] in (["left", "right"], ["right", "left"])
    assert float(ranked[0][1]) >= float(ranked[1][1])
    assert float(ranked[0][1]) + float(ranked[1][1]) == pytest.approx(1, abs=0.0015)
    assert [best["label"], f"{best['probability']:.3f}"] == ranked[0]

    # The same model through the MLflow registry: `latest` in a fresh process elsewhere (no state left by
    # training), a version number and a missing version in this one.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "classify",
            video,
            "--model",
            "models:/gesture_gru/latest",
            "--topk",
            "2",
        ],
        cwd=tmp_path,
        env={**os.environ, "VPIPE_ROOT": str(trained_project)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout == text, done.stderr[-2000:]
    monkeypatch.setenv("VPIPE_ROOT", str(trained_project))
    code, out, _ = _classify([video, "--model", "models:/gesture_gru/1", "--topk", "2"], capsys)
    assert code == 0 and out == text
    code, out, err = _classify([video, "--model", "models:/gesture_gru/7"], capsys)
    assert code == 1 and out == "" and "models:/gesture_gru/7" in err


def test_streaming_windows(trained_project, tmp_path, capsys):
    long = tmp_path / "long.mp4"
    write_video(
        long, np.concatenate([moving_square(20, 48, 64, seed=1), moving_square(20, 48, 64, seed=2)[::-1]]), 25
    )
    ckpt = str(trained_project / "models" / "gesture_gru" / "best.ckpt")
    # 40 frames at 25 fps = 1.6 s → 16 frames at 10 fps; windows of 0.6 s (6 frames) every 0.2 s (2 frames): 6 windows.
    code, out, _ = _classify(
        [str(long), "--ckpt", ckpt, "--window", "0.6", "--stride", "0.2", "--json"], capsys
    )
    assert code == 0
    spans = [(r["start_sec"], r["end_sec"]) for r in map(json.loads, out.splitlines())]
    assert spans == [(round(0.2 * i, 3), round(0.2 * i + 0.6, 3)) for i in range(6)]
    code, out, _ = _classify([str(long), "--ckpt", ckpt, "--window", "0.6", "--stride", "0.2"], capsys)
    assert out.splitlines()[1].startswith(f"{long} [0.20-0.80 s]: ")
    # A video shorter than one window is classified whole, as one window.
    code, out, _ = _classify([str(long), "--ckpt", ckpt, "--window", "60", "--json"], capsys)
    assert [(r["start_sec"], r["end_sec"]) for r in map(json.loads, out.splitlines())] == [(0.0, 1.6)]


def test_bad_inputs_fail_clearly_and_print_no_result(trained_project, tmp_path, capsys):
    ckpt = trained_project / "models" / "gesture_gru" / "best.ckpt"
    video = str(trained_project / "videos" / "left5.mp4")

    code, out, err = _classify([str(tmp_path / "nope.mp4"), "--ckpt", str(ckpt)], capsys)
    assert code == 1 and out == "" and "nope.mp4: no such file" in err

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    code, out, err = _classify([str(corrupt), "--ckpt", str(ckpt)], capsys)
    assert code == 1 and out == "" and "corrupt.mp4: not a decodable video" in err

    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    code, out, err = _classify([video, "--ckpt", str(not_a_checkpoint)], capsys)
    assert code == 1 and out == "" and "notes.ckpt: not a readable PyTorch checkpoint" in err

    # A checkpoint of another task (e.g. a forecaster): its recipe names the task and has no classes.
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["vpipe"] = {
        **checkpoint["vpipe"],
        "task": "pipeline.systems.forecaster.FeatureForecaster",
        "classes": [],
    }
    torch.save(checkpoint, tmp_path / "forecaster.ckpt")
    code, out, err = _classify([video, "--ckpt", str(tmp_path / "forecaster.ckpt")], capsys)
    assert (
        code == 1
        and out == ""
        and "forecaster.ckpt: a checkpoint of pipeline.systems.forecaster.FeatureForecaster, not of a Classifier"
        in err
    )

    # One bad video among good ones: the good ones are classified, the bad one named, status 1.
    code, out, err = _classify([video, str(corrupt), video, "--ckpt", str(ckpt)], capsys)
    assert code == 1 and len(out.splitlines()) == 2 and "corrupt.mp4" in err


def test_end_to_end_model_is_given_the_frames(trained_project, tmp_path, monkeypatch):
    """A Classifier with its own backbone, trained on a frame store: classify feeds it the decoded frames,
    which equal the store's (same decoder, same parameters)."""
    from pipeline.datasets.clips import segment_indices
    from pipeline.inference.checkpoints import load
    from pipeline.media.codecs import as_stored
    from pipeline.media.video import decode
    from pipeline.storage.store import FrameStore
    from pipeline.train import cli_main

    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    cli_main(
        [
            "fit",
            "-c",
            str(ROOT / "tests" / "configs" / "lrcn_frames.yaml"),
            "--data.init_args.frames",
            str(trained_project / "frames"),
        ]
    )
    classifier = load(tmp_path / "models" / "lrcn" / "best.ckpt")
    assert classifier.encoder is None and classifier.size == (32, 32)  # the model encodes frames itself
    frames = decode(trained_project / "videos" / "right6.mp4", fps=10, size=(32, 32)).frames
    store = FrameStore(trained_project / "frames")
    stored = np.asarray(store.rows("right6"))
    # a JPEG store holds the frames through JPEG and back: the model reads them so at inference too
    np.testing.assert_array_equal(as_stored(frames, store.meta["params"]), stored)
    clip = torch.from_numpy(stored[segment_indices(len(stored), 4, None)])[None]
    with torch.inference_mode():
        expected = torch.softmax(classifier.model(clip), -1)[0].numpy()
    np.testing.assert_allclose(classifier.probabilities(frames), expected, atol=1e-5)
