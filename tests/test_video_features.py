"""`vpipe features --manifest`: features straight from videos equal the two-step path's (extract, then
features of the frame store), with the same index, errors and store contract."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import moving_square
from pipeline.media.manifest import write_manifest
from pipeline.media.video import write_video
from pipeline.stages.extract import extract
from pipeline.stages.features import FeatureCacheError, compute
from pipeline.stages.video_features import compute_from_videos
from pipeline.storage.store import INDEX_FIELDS, FeatureStore

BACKBONE = dict(name="test_resnet", input_size=32, accelerator="cpu")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Five clips of 7 to 19 frames (two splits, two sizes) and one file that is not a video."""
    root = tmp_path_factory.mktemp("videos")
    rows = []
    for i, split in enumerate(["train", "val", "test", "train", "test"]):
        height, width = (48, 64) if i != 3 else (40, 40)
        write_video(root / f"v{i}.mp4", moving_square(7 + 3 * i, height, width, seed=i), 25)
        rows.append({"video_id": f"v{i}", "path": f"v{i}.mp4", "label": f"c{i % 2}", "split": split})
    (root / "bad.mp4").write_bytes(b"not a video")
    rows.insert(2, {"video_id": "bad", "path": "bad.mp4", "label": "c0", "split": "train"})
    write_manifest(root / "manifest.csv", rows)
    return root / "manifest.csv"


def two_step(manifest: Path, out: Path, decode: dict, **options) -> FeatureStore:
    """The reference: a raw frame store (vpipe extract), then its features (vpipe features --frames)."""
    extract(manifest, out / "frames", workers=2, codec="raw", **decode)
    compute(str(out / "frames"), str(out / "features"), **BACKBONE, **options)
    return FeatureStore(out / "features")


def assert_same_store(got: FeatureStore, expected: FeatureStore) -> float:
    """Same index.csv rows (where each video's rows lie aside: a feature store from frames mirrors the
    frame store's shards) and errors.csv, features equal to float16 rounding; returns the largest
    difference."""
    assert (got.root / "index.csv").read_text().splitlines()[0] == ",".join(INDEX_FIELDS)
    placed = ("shard", "offset")
    assert [{k: v for k, v in vars(r).items() if k not in placed} for r in got.index] == [
        {k: v for k, v in vars(r).items() if k not in placed} for r in expected.index
    ]
    assert (got.root / "errors.csv").read_text() == (expected.root / "errors.csv").read_text()
    assert got.feature_shape == expected.feature_shape
    worst = 0.0
    for row in expected.index:
        a, b = got.rows(row.video_id), expected.rows(row.video_id)
        assert a.dtype == np.float16 and a.shape == b.shape
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=2e-3)
        worst = max(worst, float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()))
    return worst


@pytest.mark.parametrize(
    "decode, options",
    [
        ({"size": "40"}, {"pool": "grid", "grid": 2, "batch_size": 5}),  # batches span videos
        ({"fps": 10, "max_frames": 6}, {"modality": "rgb_diff", "batch_size": 64}),  # sizes differ
    ],
)
def test_streamed_features_equal_the_two_step_path(videos, tmp_path, decode, options):
    expected = two_step(videos, tmp_path / "ref", decode, **options)
    meta = compute_from_videos(videos, tmp_path / "streamed", workers=2, **decode, **BACKBONE, **options)
    got = FeatureStore(tmp_path / "streamed")
    worst = assert_same_store(got, expected)
    if "size" in decode:  # frames of one size: one frame shard, one feature shard, the same index.csv
        assert (got.root / "index.csv").read_text() == (expected.root / "index.csv").read_text()
    print(f"max abs difference streamed vs two-step: {worst:g}")
    assert [e["video_id"] for e in got.errors] == ["bad"] and "bad.mp4" in got.errors[0]["error"]
    assert "\n" not in got.errors[0]["error"]
    assert [r.video_id for r in got.index] == ["v0", "v1", "v2", "v3", "v4"]
    # The cache-key fields of a feature store, and how the frames were decoded in place of a frame store.
    for key in ("backbone", "weights", "preprocessing", "pool", "modality", "precision"):
        assert meta[key] == expected.meta[key]
    # No frame store to hash: frames_hash is that of how the frames were decoded (the recorded
    # frames_meta, less the manifest's path), and so differs from the frame store's content hash.
    decoding = {k: v for k, v in meta["frames_meta"].items() if k != "manifest"}
    digest = hashlib.sha256(json.dumps(decoding, sort_keys=True).encode()).hexdigest()
    assert meta["frames_hash"] == digest != expected.meta["frames_hash"]
    assert meta["frames_meta"]["params"] == FeatureStore(tmp_path / "ref" / "frames").meta["params"]
    assert len(meta["cache_key"]) == 16 and meta["content_hash"] and meta["world_size"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.is_dir()]  # no leftovers


def test_crashed_decoder_costs_its_video_and_the_key_follows_the_inputs(
    videos, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "features"
    monkeypatch.setenv("VPIPE_FAULT", "decode-v2")  # the worker decoding v2 dies at its 6th frame
    compute_from_videos(videos, out, size="32", workers=2, **BACKBONE)
    store = FeatureStore(out)
    assert [r.video_id for r in store.index] == ["v0", "v1", "v3", "v4"]
    errors = {e["video_id"]: e["error"] for e in store.errors}
    assert errors.keys() == {"bad", "v2"} and "killed by SIGKILL" in errors["v2"]
    monkeypatch.delenv("VPIPE_FAULT")
    # Same inputs, same options: nothing to do. Other decoding options: another key, refused unless --overwrite.
    compute_from_videos(videos, out, size="32", workers=2, **BACKBONE)
    assert "is up to date" in capsys.readouterr().err
    with pytest.raises(FeatureCacheError, match="--overwrite"):
        compute_from_videos(videos, out, size="40", workers=2, **BACKBONE)
    with pytest.raises(FeatureCacheError, match="bad.mp4"):
        compute_from_videos(videos, out, size="40", on_error="fail", overwrite=True, **BACKBONE)
    assert FeatureStore(out).cache_key == store.cache_key  # the failed runs left the store alone


def _features(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "features", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.slow
def test_two_ddp_processes_equal_one(videos, tmp_path):
    """`--devices 2 --strategy ddp` on CPU (gloo): each rank decodes its own videos, rank 0 writes the
    store, which equals one process's."""
    env = {**os.environ, "VPIPE_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    common = ["--manifest", str(videos), "--size", "40", "--workers", "1", "--backbone", "test_resnet"]
    common += ["--input-size", "32", "--batch-size", "4", "--accelerator", "cpu", "--no-system-metrics"]
    one = _features(*common, "--out", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _features(*common, "--out", str(tmp_path / "two"), "--devices", "2", "--strategy", "ddp", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stderr
    a, b = FeatureStore(tmp_path / "one"), FeatureStore(tmp_path / "two")
    assert a.cache_key == b.cache_key and b.meta["world_size"] == 2
    assert_same_store(b, a)
    assert not [p for p in tmp_path.glob(".two.*") if p.is_dir()]  # no part or temporary folder left


def test_frames_and_manifest_exclude_each_other(videos, tmp_path):
    from pipeline.options import build_parser as _parser

    with pytest.raises(SystemExit):
        _parser().parse_args(["features", "--frames", "f", "--manifest", str(videos), "--out", "o"])
    args = _parser().parse_args(["features", "--manifest", str(videos), "--out", "o", "--fps", "5"])
    assert args.frames is None and args.fps == 5 and args.workers is None and args.timeout == 600
