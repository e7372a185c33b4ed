import json

import numpy as np
import pytest
import torch

from pipeline.models import backbone
from pipeline.stages.extract import extract
from pipeline.stages.features import FeatureCacheError, compute
from pipeline.storage.store import FeatureStore, FrameStore, StoreError


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    from conftest import moving_square
    from pipeline.media.manifest import write_manifest
    from pipeline.media.video import write_video

    root = tmp_path_factory.mktemp("feat")
    rows = []
    for i, split in enumerate(["train", "val", "test"]):
        write_video(root / f"v{i}.mp4", moving_square(8 + i, seed=i), 25)
        rows.append({"video_id": f"v{i}", "path": f"v{i}.mp4", "label": "a", "split": split})
    write_manifest(root / "manifest.csv", rows)
    extract(root / "manifest.csv", root / "frames", size="40", workers=1)
    return root / "frames"


@pytest.mark.parametrize("pool", ["avg", "grid"])
def test_feature_store_mirrors_frames(frames, tmp_path, pool):
    compute(
        str(frames),
        str(tmp_path / "f"),
        name="test_resnet",
        pool=pool,
        grid=2,
        input_size=32,
        batch_size=4,
        num_workers=0,
        accelerator="cpu",
    )
    feats, store = FeatureStore(tmp_path / "f"), FrameStore(frames)
    model, _ = backbone.create("test_resnet")
    width = model.num_features
    assert feats.feature_shape == ((width,) if pool == "avg" else (width, 2, 2))
    assert [r.video_id for r in feats.index] == [r.video_id for r in store.index]
    for row in store.index:
        got = feats.rows(row.video_id)
        assert got.dtype == np.float16 and got.shape == (row.length, *feats.feature_shape)
    # Equal to a direct forward pass of the same model on the same frames, to float16 rounding.
    encoder = backbone.FrameEncoder(model, backbone.preprocessing(model, 32), pool, 2)
    with torch.inference_mode():
        direct = encoder(torch.from_numpy(np.array(store.rows("v1")))).numpy()
    np.testing.assert_allclose(feats.rows("v1").astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    assert feats.meta["frames_hash"] == store.meta["content_hash"] and len(feats.cache_key) == 16


def test_weights_file_round_trip(frames, tmp_path):
    model, _ = backbone.create("test_resnet", seed=123)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    compute(
        str(frames),
        str(tmp_path / "a"),
        name="test_resnet",
        seed=123,
        input_size=32,
        num_workers=0,
        accelerator="cpu",
    )
    compute(
        str(frames),
        str(tmp_path / "b"),
        name="test_resnet",
        weights=str(tmp_path / "w.pth"),
        input_size=32,
        num_workers=0,
        accelerator="cpu",
    )
    a, b = FeatureStore(tmp_path / "a"), FeatureStore(tmp_path / "b")
    np.testing.assert_array_equal(a.shard(0), b.shard(0))
    assert a.cache_key != b.cache_key and b.meta["weights"]["weights_file"] == "w.pth"


def test_preprocessing_follows_the_model():
    model, identity = backbone.create("test_resnet", seed=3)
    prep = backbone.preprocessing(model)
    cfg = model.pretrained_cfg
    assert (
        prep.input_size == tuple(cfg["input_size"][1:])
        and prep.mean == tuple(cfg["mean"])
        and identity == {"random_init_seed": 3}
    )


def test_unknown_backbone_lists_close_names():
    with pytest.raises(backbone.BackboneError, match="closest timm names: .*resnet18"):
        backbone.create("resnet19")


def test_different_key_is_refused_unless_overwrite(frames, tmp_path, capsys):
    out = tmp_path / "f"
    compute(str(frames), str(out), name="test_resnet", input_size=32, accelerator="cpu")
    first = FeatureStore(out).cache_key
    compute(
        str(frames), str(out), name="test_resnet", input_size=32, accelerator="cpu"
    )  # same key: nothing to do
    assert "is up to date" in capsys.readouterr().err
    with pytest.raises(FeatureCacheError, match=f"holds features with cache key {first}.*--overwrite"):
        compute(str(frames), str(out), name="test_resnet", input_size=32, seed=1, accelerator="cpu")
    assert FeatureStore(out).cache_key == first  # untouched
    compute(
        str(frames), str(out), name="test_resnet", input_size=32, seed=1, accelerator="cpu", overwrite=True
    )
    assert FeatureStore(out).cache_key != first and FeatureStore(out).meta["weights"] == {
        "random_init_seed": 1
    }


def test_damaged_frame_store_is_named(frames, tmp_path):
    import shutil

    broken = tmp_path / "frames"
    shutil.copytree(frames, broken)
    # A JPEG shard cut short: its first 3 frames, with offsets to match.
    offsets = np.load(broken / "frames-00000.offsets.npy")[:4]
    data = (broken / "frames-00000.mjpeg").read_bytes()[: offsets[-1]]
    (broken / "frames-00000.mjpeg").write_bytes(data)
    np.save(broken / "frames-00000.offsets.npy", offsets)
    with pytest.raises(StoreError, match="frames-00000.mjpeg: holds 3 frames, index.csv needs"):
        compute(str(broken), str(tmp_path / "f"), name="test_resnet", accelerator="cpu")
    # Offsets that do not fit their data.
    np.save(broken / "frames-00000.offsets.npy", offsets + 5)
    with pytest.raises(StoreError, match=r"frames-00000.mjpeg: cannot be read \(.*offsets.npy ends at"):
        compute(str(broken), str(tmp_path / "f"), name="test_resnet", accelerator="cpu")
    # A codec this version does not know.
    meta = json.loads((broken / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps({**meta, "codec": "webp"}))
    with pytest.raises(StoreError, match=r"meta.json: unknown frame codec 'webp' \(known: raw, jpeg\)"):
        compute(str(broken), str(tmp_path / "f"), name="test_resnet", accelerator="cpu")
    (broken / "meta.json").unlink()
    with pytest.raises(StoreError, match="meta.json: missing"):
        compute(str(broken), str(tmp_path / "f"), name="test_resnet", accelerator="cpu")


@pytest.mark.slow
def test_two_ddp_processes_equal_one(frames, tmp_path):
    """`--devices 2 --strategy ddp` on CPU (gloo): every frame once, same features as one process."""
    import subprocess
    import sys

    args = [
        "--frames",
        str(frames),
        "--backbone",
        "test_resnet",
        "--input-size",
        "32",
        "--batch-size",
        "3",
        "--pool",
        "grid",
        "--grid",
        "2",
        "--accelerator",
        "cpu",
    ]
    env = {
        **__import__("os").environ,
        "VPIPE_ROOT": str(tmp_path),
    }  # each job's MLflow run goes to tmp_path/mlflow.db
    env.pop("MLFLOW_TRACKING_URI", None)
    one = subprocess.run(
        [sys.executable, "-m", "pipeline", "features", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "features",
            *args,
            "--out",
            str(tmp_path / "two"),
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--no-system-metrics",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stderr
    a, b = FeatureStore(tmp_path / "one"), FeatureStore(tmp_path / "two")
    assert a.cache_key == b.cache_key and b.meta["world_size"] == 2
    for shard in {r.shard for r in a.index}:
        np.testing.assert_allclose(
            a.shard(shard).astype(np.float32), b.shard(shard).astype(np.float32), rtol=1e-2, atol=1e-3
        )
    assert not list(tmp_path.glob(".two.*-*"))  # no temporary folder left (a writer's lock file may stay)
    # One MLflow run per job (rank zero only): the frame store in, the feature store out, system metrics unless off.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {
        r.info.run_name: r
        for r in client.search_runs([client.get_experiment_by_name("features").experiment_id])
    }
    assert sorted(runs) == ["features-one", "features-two"] and all(
        r.info.status == "FINISHED" for r in runs.values()
    )
    contexts = {(i.dataset.name, i.tags[0].value) for i in runs["features-two"].inputs.dataset_inputs}
    assert contexts == {(f"frames/{frames.name}", "features"), ("features/two", "output")}
    assert (
        runs["features-two"].data.params["devices"] == "2"
        and runs["features-two"].data.tags["data.features.cache_key"] == b.cache_key
    )
    assert any(k.startswith("system/") for k in runs["features-one"].data.metrics)
    assert not any(k.startswith("system/") for k in runs["features-two"].data.metrics)


def test_safetensors_weights_and_pretrained_offline(frames, tmp_path):
    from safetensors.torch import save_file

    model, _ = backbone.create("test_resnet", seed=5)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded, identity = backbone.create("test_resnet", weights=str(tmp_path / "w.safetensors"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert identity["weights_file"] == "w.safetensors" and len(identity["weights_sha256"]) == 64
    with pytest.raises(backbone.BackboneError, match="no_such.pth: weights file not found"):
        backbone.create("test_resnet", weights=str(tmp_path / "no_such.pth"))
    # The model hub is unreachable here (HF_HUB_OFFLINE=1): a clear message, not a stack of hub errors.
    with pytest.raises(
        backbone.BackboneError, match="pretrained weights could not be fetched.*--weights FILE"
    ):
        backbone.create("resnet18", pretrained=True)
