"""The backbone stage (`vpipe fit -c configs/backbone_NAME.yaml`): a CNN trained on the train split,
exported with its card; features computed from it; the RGB-difference modality; run durations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import frame_store

from pipeline.datasets.clips import rgb_difference
from pipeline.models import backbone
from pipeline.stages.features import FeatureCacheError, compute
from pipeline.storage.store import FeatureStore, FrameStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """``backbone_gestures`` trained for one short epoch on a tiny 32×32 frame store."""
    from pipeline.train import cli_main

    root = tmp_path_factory.mktemp("backbone")
    frames = frame_store(root / "frames")
    previous = __import__("os").environ.get("VPIPE_ROOT")
    __import__("os").environ["VPIPE_ROOT"] = str(root)
    try:
        cli_main(
            [
                "fit",
                "-c",
                str(ROOT / "configs/backbone_gestures.yaml"),
                "-c",
                str(ROOT / "configs/debug.yaml"),
                "--data.init_args.frames",
                str(frames),
                "--data.init_args.batch_size",
                "4",
                "--model.init_args.backbone_input_size",
                "32",
            ]
        )
    finally:
        if previous is None:
            __import__("os").environ.pop("VPIPE_ROOT")
        else:
            __import__("os").environ["VPIPE_ROOT"] = previous
    return root


def _stage_features(stage: Path, out: Path) -> dict:
    """Grid features (2×2) of the stage's frames from its exported weights, into OUT; their meta.json."""
    weights = stage / "models" / "backbone_gestures" / "backbone.safetensors"
    return compute(
        str(stage / "frames"),
        str(out),
        weights=str(weights),
        pool="grid",
        grid=2,
        num_workers=0,
        accelerator="cpu",
    )


def test_stage_exports_weights_and_card_without_testing(stage):
    out = stage / "models" / "backbone_gestures"
    card = json.loads((out / "backbone.json").read_text())
    assert card["backbone"] == "test_resnet" and card["input_size"] == 32 and card["modality"] == "rgb"
    assert card["frames_content_hash"] == FrameStore(stage / "frames").meta["content_hash"] and card[
        "classes"
    ] == ["c0", "c1", "c2"]
    assert card["weights_sha256"] == backbone.file_sha256(out / "backbone.safetensors")
    metrics = json.loads((stage / "metrics" / "backbone_gestures.json").read_text())
    assert set(metrics) >= {"val/acc", "val/loss"} and not any(k.startswith("test/") for k in metrics)
    assert card["val"] == metrics
    # The test split is never read: no test pass, so no per-clip test predictions either.
    assert not (stage / "plots" / "backbone_gestures" / "predictions.csv").exists()


def test_exported_weights_load_strictly_and_reproduce_the_cached_features(stage, tmp_path):
    weights = stage / "models" / "backbone_gestures" / "backbone.safetensors"
    frames = stage / "frames"
    meta = _stage_features(stage, tmp_path / "f")  # backbone name and input size from the card
    assert meta["backbone"] == "test_resnet" and meta["preprocessing"]["input_size"] == [32, 32]
    assert meta["modality"] == "rgb" and meta["weights"]["weights_sha256"] == backbone.file_sha256(weights)
    # The same CNN, taken from the best checkpoint the stage validated, encodes the frames the same way.
    state = torch.load(
        stage / "models" / "backbone_gestures" / "best.ckpt", map_location="cpu", weights_only=True
    )["state_dict"]
    model, _ = backbone.create("test_resnet")
    model.load_state_dict(
        {k.removeprefix("encoder.model."): v for k, v in state.items() if k.startswith("encoder.model.")}
    )
    encoder = backbone.FrameEncoder(model.eval(), backbone.preprocessing(model, 32), "grid", 2)
    store, feats = FrameStore(frames), FeatureStore(tmp_path / "f")
    with torch.inference_mode():
        direct = encoder(torch.from_numpy(np.array(store.rows("val1")))).numpy()
    np.testing.assert_allclose(feats.rows("val1").astype(np.float32), direct, rtol=2e-3, atol=2e-3)


def test_features_refuse_what_contradicts_the_card(stage, tmp_path):
    weights = str(stage / "models" / "backbone_gestures" / "backbone.safetensors")
    with pytest.raises(FeatureCacheError, match="--input-size 32"):
        compute(
            str(stage / "frames"),
            str(tmp_path / "f"),
            weights=weights,
            input_size=48,
            num_workers=0,
            accelerator="cpu",
        )
    with pytest.raises(FeatureCacheError, match="--backbone test_resnet"):
        compute(
            str(stage / "frames"),
            str(tmp_path / "f"),
            name="resnet18",
            weights=weights,
            num_workers=0,
            accelerator="cpu",
        )
    with pytest.raises(
        backbone.BackboneError, match="weights do not fit"
    ):  # no card: strict loading still refuses
        bare = tmp_path / "bare.safetensors"
        bare.write_bytes((stage / "models" / "backbone_gestures" / "backbone.safetensors").read_bytes())
        compute(
            str(stage / "frames"),
            str(tmp_path / "g"),
            name="resnet18",
            weights=str(bare),
            num_workers=0,
            accelerator="cpu",
        )


def test_rgb_difference_features(tmp_path):
    frames = frame_store(tmp_path / "frames", size=32)
    meta = compute(
        str(frames),
        str(tmp_path / "f"),
        name="test_resnet",
        modality="rgb_diff",
        input_size=32,
        batch_size=5,
        num_workers=0,
        accelerator="cpu",
    )  # slices that end inside videos and across them
    rgb = compute(
        str(frames), str(tmp_path / "g"), name="test_resnet", input_size=32, num_workers=0, accelerator="cpu"
    )
    assert meta["modality"] == "rgb_diff" and meta["cache_key"] != rgb["cache_key"]
    model, _ = backbone.create("test_resnet")
    encoder = backbone.FrameEncoder(model, backbone.preprocessing(model, 32), "avg")
    store, feats = FrameStore(frames), FeatureStore(tmp_path / "f")
    for video_id in ("train0", "train1", "test6"):
        video = np.array(store.rows(video_id))
        following = np.minimum(
            np.arange(1, len(video) + 1), len(video) - 1
        )  # the last frame pairs with itself
        with torch.inference_mode():
            direct = encoder(torch.from_numpy(rgb_difference(video, video[following]))).numpy()
        np.testing.assert_allclose(feats.rows(video_id).astype(np.float32), direct, rtol=2e-3, atol=2e-3)


def test_report_lists_run_durations(trained_project, monkeypatch):
    from pipeline.report import report

    monkeypatch.setenv("VPIPE_ROOT", str(trained_project))
    text = report(str(trained_project / "metrics"), out=None)
    durations = text.split("Run durations (MLflow):")[1]
    row = next(line for line in durations.splitlines() if line.startswith("| gesture_gru |"))
    import mlflow

    # The newest gesture_gru run's name, status and seconds from its start to its end, as MLflow has them.
    client = mlflow.MlflowClient(f"sqlite:///{trained_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gesture_gru").experiment_id
    [run] = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)
    seconds = (run.info.end_time - run.info.start_time) / 1000
    assert row == f"| gesture_gru | {run.info.run_name} | FINISHED | {seconds:.1f} |" and seconds > 0.1
    assert "Run durations" not in report(str(trained_project / "metrics"), out=None, timings=False)


def test_classify_finds_the_stage_weights_where_features_read_them(stage, tmp_path):
    from pipeline.inference.checkpoints import ClassifyError, rebuild_backbone

    meta = _stage_features(stage, tmp_path / "f")
    encoder = rebuild_backbone(
        meta, None, "model.ckpt"
    )  # no --weights: the path recorded in meta.json, hash checked
    store, feats = FrameStore(stage / "frames"), FeatureStore(tmp_path / "f")
    with torch.inference_mode():
        direct = encoder(torch.from_numpy(np.array(store.rows("test0")))).numpy()
    np.testing.assert_allclose(
        feats.rows("test0").astype(np.float32), direct.reshape(len(direct), 96, 2, 2), rtol=2e-3, atol=2e-3
    )
    other, _ = backbone.create("test_resnet", seed=5)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ClassifyError, match="not the weights the features were computed with"):
        rebuild_backbone(meta, str(tmp_path / "other.pth"), "model.ckpt")
