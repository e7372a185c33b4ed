"""Training configs, smoke-tested, and evaluation under DDP counting every sample once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import quiet_trainer, write_store
from pipeline.storage.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[1]
# The classification configs (the forecasters' are smoke-tested in test_forecast.py).
# Backbone-stage configs (export_backbone: no test) are tested in test_backbone_stage.py.
CONFIGS = sorted(
    p
    for p in (ROOT / "configs").glob("*.yaml")
    if "pipeline.systems.classifier.Classifier" in p.read_text()
    and "export_backbone: true" not in p.read_text()
)


def feature_store(folder: Path, test_videos: int = 7) -> Path:
    """Random grid features of 3 classes whose mean encodes the class: learnable, tiny."""

    def clip(rng, i):
        feats = rng.normal(0, 1, (int(rng.integers(5, 12)), 4, 2, 2)) + i % 3
        return feats.astype(np.float16), f"c{i % 3}"

    return write_store(
        folder,
        "features",
        {"train": 12, "val": 6, "test": test_videos},
        clip,
        {"cache_key": "test", "feature_shape": [4, 2, 2]},
    )


def frame_store(folder: Path, test_videos: int = 7, size: int = 32) -> Path:
    """Random uint8 frames of 3 classes whose brightness encodes the class: learnable, tiny."""

    def clip(rng, i):
        frames = rng.integers(0, 100, (int(rng.integers(5, 12)), size, size, 3)) + 60 * (i % 3)
        return frames.astype(np.uint8), f"c{i % 3}"

    return write_store(
        folder, "frames", {"train": 12, "val": 6, "test": test_videos}, clip, {"content_hash": "test"}, size
    )


def feature_args(config: Path, features: Path) -> list[str]:
    """``vpipe fit``/``test`` arguments: CONFIG over the feature store FEATURES, batches of 2, on the CPU."""
    return [
        "-c",
        str(config),
        "--data.init_args.features",
        str(features),
        "--data.init_args.batch_size",
        "2",
        "--trainer.accelerator",
        "cpu",
    ]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return feature_store(tmp_path_factory.mktemp("feat") / "features")


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    return frame_store(tmp_path_factory.mktemp("frames") / "frames")


def store_argument(config: Path, features: Path, frames: Path) -> list[str]:
    """The command-line override that points a config at the test store its data module reads."""
    import yaml

    data = yaml.safe_load(config.read_text())["data"]
    key = next(k for k in ("features", "frames") if k in data["init_args"])
    return [f"--data.init_args.{key}", str(features if key == "features" else frames)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_runs(config, features, frames, tmp_path, monkeypatch):
    from pipeline.train import cli_main

    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    cli_main(
        [
            "fit",
            "-c",
            str(config),
            "-c",
            str(ROOT / "configs/debug.yaml"),
            *store_argument(config, features, frames),
            "--data.init_args.batch_size",
            "4",
        ]
    )
    name = config.stem
    assert (tmp_path / "models" / name / "best.ckpt").is_file()
    metrics = json.loads((tmp_path / "metrics" / f"{name}.json").read_text())
    assert set(metrics) >= {"test/acc", "test/f1", "test/loss"}
    plots = tmp_path / "plots" / name
    rows = (plots / "predictions.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1 + 7  # one row per test clip
    per_class = (plots / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,precision,recall,f1,support" and len(per_class) == 1 + 3
    assert sum(int(line.split(",")[-1]) for line in per_class[1:]) == 7
    assert (plots / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def _vpipe(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "VPIPE_ROOT": str(cwd)},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_ddp_test_metrics_equal_single_process(tmp_path):
    """7 test clips over 2 ranks: a padding sampler would count one twice; ours counts each once."""
    features = feature_store(tmp_path / "features", test_videos=7)
    args = feature_args(ROOT / "configs" / "gesture_gru.yaml", features)
    _vpipe(["fit", *args, "--trainer.logger", "false", "--trainer.max_epochs", "3"], tmp_path)
    ckpt = tmp_path / "models" / "gesture_gru" / "best.ckpt"
    single = json.loads((tmp_path / "metrics" / "gesture_gru.json").read_text())
    (tmp_path / "metrics" / "gesture_gru.json").unlink()
    # With MLflow on (the project's SQLite store under tmp_path): exactly one run for the 2-process job.
    _vpipe(["test", *args, "-c", str(ROOT / "configs/trainer/ddp.yaml"), "--ckpt_path", str(ckpt)], tmp_path)
    ddp = json.loads((tmp_path / "metrics" / "gesture_gru.json").read_text())
    assert ddp.keys() == single.keys()
    for key in single:
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("gesture_gru").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.metrics["test/acc"] == pytest.approx(single["test/acc"], abs=1e-5)


@pytest.mark.slow
def test_killed_fit_resumes_the_same_mlflow_run(tmp_path):
    import os
    import signal
    import time

    import mlflow
    import torch

    features = feature_store(tmp_path / "features")
    args = ["fit", *feature_args(ROOT / "configs" / "gesture_gru.yaml", features)]
    last = tmp_path / "models" / "gesture_gru" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, "--trainer.max_epochs", "200"],
        cwd=tmp_path,
        env={**os.environ, "VPIPE_ROOT": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not last.is_file() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gesture_gru").experiment_id
    [killed] = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"  # SIGKILL leaves no chance to close it
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)  # loads with weights_only
    assert checkpoint["mlflow_run_id"] == killed.info.run_id
    done_epochs = checkpoint["epoch"] + 1

    _vpipe([*args, "--ckpt_path", "last", "--trainer.max_epochs", str(done_epochs + 2)], tmp_path)
    [run] = client.search_runs([experiment])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
    assert len(steps) >= done_epochs + 2 and steps == sorted(steps)
    epochs = (tmp_path / "plots" / "gesture_gru" / "epochs.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in epochs] == list(range(done_epochs + 2))
    assert "test/acc" in json.loads((tmp_path / "metrics" / "gesture_gru.json").read_text())


def test_clip_sampling_and_augmentation(features):
    import torch

    from pipeline.datasets.clips import FeatureDataModule, segment_indices

    assert segment_indices(16, 4, None).tolist() == [2, 6, 10, 14]  # centres: deterministic evaluation
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = segment_indices(16, 4, rng)
        assert all(4 * k <= i < 4 * (k + 1) for k, i in enumerate(idx))  # one frame from each segment
    assert segment_indices(3, 5, None).tolist() == sorted(
        segment_indices(3, 5, None).tolist()
    )  # short clips repeat, in order

    plain = FeatureDataModule(str(features), num_segments=4, batch_size=4)
    augmented = FeatureDataModule(
        str(features), num_segments=4, batch_size=4, feature_noise=0.5, feature_dropout=0.5
    )
    batch = next(iter(plain.train_dataloader()))
    assert batch["x"].shape == (4, 4, 16) and set(batch) == {"x", "y"} and batch["y"].dtype == torch.int64
    x = next(iter(augmented.train_dataloader()))["x"]
    assert (x == 0).float().mean() > 0.3  # about half the values dropped
    evaluation = [next(iter(m.test_dataloader()))["x"] for m in (plain, augmented)]
    torch.testing.assert_close(evaluation[0], evaluation[1])  # evaluation is never augmented


def test_worker_processes_read_the_same_clips(features):
    """Clips are the store's rows at the segment centres, in float32, whether read in this process or
    in DataLoader workers (which get the store without its memory maps and map the shards themselves)."""
    import pickle

    import torch

    from pipeline.datasets.clips import FeatureDataModule, segment_indices

    data = FeatureDataModule(str(features), num_segments=4, batch_size=5)
    inline = list(data.test_dataloader())
    assert data.store._shards and not pickle.loads(pickle.dumps(data.store))._shards
    x = torch.cat([b["x"] for b in inline])
    assert x.dtype == torch.float32 and x.shape == (7, 4, 16)
    for clip, row in zip(x, data.store.split("test"), strict=True):
        expected = np.asarray(data.store.rows(row.video_id))[segment_indices(row.length, 4, None)].reshape(
            4, -1
        )
        torch.testing.assert_close(clip, torch.from_numpy(expected.astype(np.float32)))

    data.num_workers = 2
    in_workers = list(data.test_dataloader())
    torch.testing.assert_close(torch.cat([b["x"] for b in in_workers]), x)
    assert torch.equal(torch.cat([b["y"] for b in in_workers]), torch.cat([b["y"] for b in inline]))
    train = list(data.train_dataloader())
    assert sum(len(b["y"]) for b in train) == 12 and all(b["x"].dtype == torch.float32 for b in train)


def test_training_epoch_values_cover_every_step(features, tmp_path):
    """train/loss is the clip-weighted mean of the epoch's step losses (batches of 5, 5 and 2 clips),
    logged once per epoch, and the per-epoch CSV gets it with the other train/ and val/ values."""
    import pytorch_lightning as pl
    import torch

    from pipeline.datasets.clips import FeatureDataModule
    from pipeline.models.heads import GRUHead
    from pipeline.systems.classifier import Classifier
    from pipeline.tracking.callbacks import EpochCSV

    class StepLosses(pl.Callback):
        def __init__(self):
            self.epochs: list[list[tuple[float, int]]] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.epochs.append([])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.epochs[-1].append((float(outputs["loss"]), len(batch["y"])))

    data = FeatureDataModule(str(features), num_segments=4, batch_size=5)
    steps, csv_path = StepLosses(), tmp_path / "epochs.csv"
    trainer = quiet_trainer(max_epochs=2, callbacks=[steps, EpochCSV(csv_path)])
    trainer.fit(Classifier(GRUHead, input_dim=data.input_dim, num_classes=data.num_classes), data)
    assert [n for _, n in steps.epochs[0]] == [5, 5, 2]
    last = steps.epochs[-1]
    expected = sum(loss * n for loss, n in last) / sum(n for _, n in last)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(expected, rel=1e-5)
    rows = csv_path.read_text().splitlines()
    header = rows[0].split(",")
    assert {"train/loss", "train/acc", "train/f1", "val/loss", "val/acc"} <= set(header) and len(rows) == 3
    first = dict(zip(header, rows[1].split(","), strict=True))
    epoch0 = sum(loss * n for loss, n in steps.epochs[0]) / 12
    assert (
        float(first["train/loss"]) == pytest.approx(epoch0, abs=1e-5) and 0 <= float(first["train/acc"]) <= 1
    )
    assert not torch.isclose(
        torch.tensor(epoch0), torch.tensor(expected)
    )  # each epoch its own value (reset between)


def test_test_metrics_keep_top1_and_top5_apart():
    """A first batch with every top-1 guess right makes top-1 and top-5 states equal; F1 must still be
    the macro F1 of the top-1 guesses (neither top-5's value nor the micro accuracy)."""
    import torch
    from sklearn.metrics import f1_score

    from pipeline.models.heads import GRUHead
    from pipeline.systems.classifier import Classifier

    model = Classifier(GRUHead, input_dim=4, num_classes=10)
    metrics = model.metrics["test_metrics"]
    y = torch.arange(10)
    right = torch.nn.functional.one_hot(y, 10).float()
    wrong = torch.nn.functional.one_hot(torch.zeros_like(y), 10).float() + 0.5 * torch.nn.functional.one_hot(
        y, 10
    )
    metrics.update(right, y)
    metrics.update(wrong, y)
    values = {k: float(v) for k, v in metrics.compute().items()}
    expected = f1_score(torch.cat([y, y]), torch.cat([right, wrong]).argmax(-1), average="macro")
    assert values["test/acc"] == pytest.approx(11 / 20) and values["test/acc_top5"] == pytest.approx(1.0)
    assert values["test/f1"] == pytest.approx(expected) and expected == pytest.approx(
        (2 / 11 * 2 / (2 / 11 + 1) + 9 * 2 / 3) / 10
    )


def test_end_to_end_classifier_trains_its_backbone(frames, features):
    import torch

    from pipeline.datasets.clips import FeatureDataModule, FrameDataModule
    from pipeline.models.heads import GRUHead
    from pipeline.systems.classifier import Classifier

    data = FrameDataModule(str(frames), num_segments=4, batch_size=3)
    batch = next(iter(data.train_dataloader()))
    assert batch["x"].dtype == torch.uint8 and batch["x"].shape == (
        3,
        4,
        32,
        32,
        3,
    )  # frames stay uint8 until the model
    assert (
        data.num_classes == 3 and data.input_dim is None and data.cache_key == data.store_meta["content_hash"]
    )

    model = Classifier(
        GRUHead,
        input_dim=data.input_dim,
        num_classes=data.num_classes,
        backbone="test_resnet",
        backbone_input_size=32,
    )
    assert model.hparams.backbone == "test_resnet" and model.encoder.output_dim > 0
    logits = model(batch["x"])
    assert logits.shape == (3, 3)
    torch.nn.functional.cross_entropy(logits, batch["y"]).backward()
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert (
        grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    )  # trained jointly

    with pytest.raises(ValueError, match="uint8 frames"):
        model(torch.zeros(3, 4, 16))
    cached = Classifier(GRUHead, input_dim=FeatureDataModule(str(features)).input_dim, num_classes=3)
    with pytest.raises(ValueError, match="backbone"):
        cached(batch["x"])
    with pytest.raises(ValueError, match="backbone: NAME"):
        Classifier(GRUHead, input_dim=data.input_dim, num_classes=3)


def test_frame_data_module_needs_one_frame_size(tmp_path):
    with StoreWriter(tmp_path / "frames", "frames") as writer:
        for i, size in enumerate((16, 24)):
            writer.add(
                np.zeros((4, size, size, 3), np.uint8),
                video_id=f"v{i}",
                label="a",
                split="train",
                src_fps=10.0,
                fps=10.0,
                width=size,
                height=size,
                duration_sec=0.4,
            )
        writer.finish({"kind": "frames"})
    from pipeline.datasets.clips import FrameDataModule

    with pytest.raises(ValueError, match="--size"):
        FrameDataModule(str(tmp_path / "frames"))


def test_rgb_difference_modality_matches_between_training_and_classify(frames):
    import torch

    from pipeline.datasets.clips import FrameDataModule, clip_frames, rgb_difference
    from pipeline.storage.store import FrameStore

    a = np.array([[0, 100, 255]], np.uint8)
    assert rgb_difference(a, a).tolist() == [[128, 128, 128]]  # nothing moved: grey
    assert rgb_difference(a, a[:, ::-1]).tolist() == [
        [255, 128, 0]
    ]  # (255 - 0) // 2 + 128, 0, (0 - 255) // 2 + 128

    data = FrameDataModule(str(frames), num_segments=4, batch_size=50, modality="rgb_diff")
    batch = next(iter(data.test_dataloader()))
    store = FrameStore(frames)
    for clip, row in zip(
        batch["x"], store.split("test"), strict=True
    ):  # evaluation: segment centres, every time
        video = np.asarray(store.rows(row.video_id))
        expected = clip_frames(video, 4, "rgb_diff")
        np.testing.assert_array_equal(clip.numpy(), expected)
        steps = np.array([len(video) * (2 * k + 1) // 8 for k in range(4)])
        np.testing.assert_array_equal(
            expected, rgb_difference(video[steps], video[np.minimum(steps + 1, len(video) - 1)])
        )
    rgb = next(iter(FrameDataModule(str(frames), num_segments=4, batch_size=50).test_dataloader()))["x"]
    assert not torch.equal(rgb, batch["x"])
    with pytest.raises(ValueError, match="modality"):
        FrameDataModule(str(frames), modality="flow")
