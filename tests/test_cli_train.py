"""The learning-rate schedule over runs of any length, and `vpipe validate|test|predict` on a checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from jsonargparse import ArgumentParser
from test_training import feature_store, frame_store

from conftest import quiet_trainer
from pipeline.datasets.clips import segment_indices
from pipeline.storage.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "configs" / "gru_features.yaml")


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return feature_store(tmp_path_factory.mktemp("feat") / "features")


class LearningRates(pl.Callback):
    """Records the optimiser's learning rate before each training step; stops after ``stop_after`` steps
    as ``max_time`` or early stopping would, at a step no schedule could know in advance."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after, self.lrs, self.groups = stop_after, [], []  # group 0's rate; every group's

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.groups.append([g["lr"] for g in trainer.optimizers[0].param_groups])
        if self.stop_after is not None and len(self.lrs) >= self.stop_after:
            trainer.should_stop = True


def schedule_trainer(lrs: LearningRates, **limits) -> pl.Trainer:
    """A CPU trainer that only trains (no validation, logger or checkpoints), recording into ``lrs``."""
    return quiet_trainer(**limits, callbacks=[lrs], limit_val_batches=0)


@pytest.mark.parametrize(
    "limits",
    [
        {"max_epochs": -1, "max_steps": 12},
        {"max_epochs": -1, "max_time": "00:00:10:00"},
        {"max_epochs": 10, "max_steps": 12},
    ],
    ids=["max_steps", "max_time", "epochs_and_steps"],
)
def test_warmup_reaches_the_peak_learning_rate_whatever_bounds_the_run(features, limits):
    """12 training clips in batches of 5: 3 steps per epoch, so a one-epoch warm-up ends at step 3."""
    from pipeline.datasets.clips import FeatureDataModule
    from pipeline.models.heads import GRUHead
    from pipeline.systems.classifier import Classifier

    data = FeatureDataModule(str(features), num_segments=4, batch_size=5)
    lrs = LearningRates(stop_after=None if "max_steps" in limits else 9)
    trainer = schedule_trainer(lrs, **limits)
    trainer.fit(
        Classifier(GRUHead, input_dim=data.input_dim, num_classes=data.num_classes, lr=0.01, warmup_epochs=1),
        data,
    )
    got = lrs.lrs
    assert got[:3] == pytest.approx([0.0025, 0.005, 0.0075])  # linear warm-up over the first epoch
    assert got[3] == pytest.approx(0.01)  # the peak, right after the warm-up
    if "max_steps" in limits:
        assert (
            len(got) == 12 and got[4:] == sorted(got[4:], reverse=True) and got[-1] < 0.001
        )  # cosine to ~0 at max_steps
    else:
        assert len(got) == 9 and got[3:] == pytest.approx([0.01] * 6)  # unbounded: constant after the warm-up


def test_backbone_rate_follows_the_same_schedule_scaled(tmp_path):
    """End to end, the backbone's groups run at backbone_lr / lr of the head's rate at every step of the
    warm-up and the decay (timm's lr_scale), not at a warm-up of their own."""
    from pipeline.datasets.clips import FrameDataModule
    from pipeline.models.heads import GRUHead
    from pipeline.systems.classifier import Classifier

    data = FrameDataModule(str(frame_store(tmp_path / "frames", test_videos=3)), num_segments=2, batch_size=4)
    model = Classifier(
        GRUHead,
        num_classes=data.num_classes,
        backbone="test_resnet",
        backbone_input_size=32,
        lr=0.01,
        backbone_lr=0.001,
        warmup_epochs=1,
    )
    lrs = LearningRates()
    schedule_trainer(lrs, max_steps=8).fit(model, data)
    head_groups = len(model.param_groups()) - 2  # the backbone's two groups (decay, no decay) come last
    assert len(lrs.groups) == 8 and lrs.lrs[1] > lrs.lrs[0] and lrs.lrs[-1] < lrs.lrs[2]
    for step in lrs.groups:
        assert step[:head_groups] == pytest.approx([step[0]] * head_groups)
        assert step[head_groups:] == pytest.approx([step[0] / 10] * 2)


def _args(features: Path, *extra: str) -> list[str]:
    return ["-c", CONFIG, "--data.init_args.features", str(features), "--trainer.logger", "false", *extra]


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluation_without_a_checkpoint_refuses_naming_it(command, features, tmp_path, monkeypatch):
    """No models/NAME/best.ckpt yet: no run on random weights, no metrics file overwritten."""
    from pipeline.cli import main

    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "gesture_gru.json").write_text('{"test/acc": 0.9}\n')
    with pytest.raises(SystemExit) as err:
        main([command, *_args(features)])
    message = str(err.value)
    assert message.startswith(
        f"vpipe {command}: no checkpoint at {tmp_path / 'models' / 'gesture_gru' / 'best.ckpt'}"
    )
    assert f"vpipe fit -c {CONFIG}" in message and "--ckpt_path" in message
    with pytest.raises(SystemExit, match=f"no checkpoint at {tmp_path / 'elsewhere.ckpt'}"):
        main([command, *_args(features, "--ckpt_path", str(tmp_path / "elsewhere.ckpt"))])
    assert (tmp_path / "metrics" / "gesture_gru.json").read_text() == '{"test/acc": 0.9}\n'
    assert not (tmp_path / "predictions").exists()


def test_test_validate_and_predict_default_to_the_best_checkpoint(features, tmp_path, monkeypatch):
    from pipeline.train import cli_main

    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    cli_main(["fit", *_args(features, "--trainer.max_epochs", "3")])
    metrics = tmp_path / "metrics" / "gesture_gru.json"
    fitted = json.loads(metrics.read_text())  # the fit's test of best.ckpt
    metrics.unlink()

    cli_main(["test", *_args(features)])
    assert (
        json.loads(metrics.read_text()) == fitted
    )  # the same weights: best.ckpt, not a fresh initialisation
    assert cli_main(["validate", *_args(features)]).trainer.ckpt_path == str(
        tmp_path / "models/gesture_gru/best.ckpt"
    )
    last = cli_main(["test", *_args(features, "--ckpt_path", "last")])
    assert last.trainer.ckpt_path == str(tmp_path / "models/gesture_gru/last.ckpt")

    cli_main(["predict", *_args(features)])
    with open(tmp_path / "predictions" / "gesture_gru-test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["video_id", "label", "predicted", "score"]
    assert [r["video_id"] for r in rows] == sorted(f"test{i}" for i in range(7))  # every test video, once
    assert all(
        r["label"] == f"c{int(r['video_id'][4:]) % 3}" and r["predicted"] in ("c0", "c1", "c2") for r in rows
    )
    # Each row's class and score: the argmax and top softmax probability of best.ckpt on the clip's
    # evaluation steps (the centres of 4 segments), computed here from the store.
    checkpoint = torch.load(tmp_path / "models/gesture_gru/best.ckpt", map_location="cpu", weights_only=True)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=pl.LightningModule)
    model = parser.instantiate_classes(parser.parse_object({"model": checkpoint["vpipe"]["model"]})).model
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    store = FeatureStore(features)
    for r in rows:
        clip = np.asarray(store.rows(r["video_id"]), np.float32)
        x = torch.from_numpy(clip[segment_indices(len(clip), 4, None)]).flatten(1)[None]
        with torch.inference_mode():
            probabilities = model(x).softmax(-1)[0]
        assert r["predicted"] == f"c{int(probabilities.argmax())}", r
        assert float(r["score"]) == pytest.approx(float(probabilities.max()), abs=2e-6), r
    accuracy = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(fitted["test/acc"], abs=1e-6)  # the same predictions as the test

    cli_main(["predict", *_args(features, "--predict_split", "all")])
    lines = (tmp_path / "predictions" / "gesture_gru-all.csv").read_text().splitlines()
    assert len(lines) == 1 + 12 + 6 + 7 and not list(
        (tmp_path / "predictions").glob(".*")
    )  # no temporary file left


def test_predict_refuses_a_forecaster(features, tmp_path, monkeypatch):
    import torch

    from pipeline.train import CommandError, cli_main

    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    torch.save({}, tmp_path / "forecaster.ckpt")
    with pytest.raises(CommandError, match="FeatureForecaster has no predict step.*vpipe forecast"):
        cli_main(
            [
                "predict",
                "-c",
                str(ROOT / "configs" / "nextfeature_gru.yaml"),
                "--data.init_args.features",
                str(features),
                "--data.init_args.context",
                "3",
                "--data.init_args.horizon",
                "2",
                "--trainer.logger",
                "false",
                "--ckpt_path",
                str(tmp_path / "forecaster.ckpt"),
            ]
        )


@pytest.mark.slow
def test_ddp_predict_writes_every_video_once(tmp_path):
    """7 test videos over 2 ranks (4 + 3, no padding): one CSV, joined on rank zero, each video once."""
    import os
    import subprocess
    import sys

    features = feature_store(tmp_path / "features")
    env = {**os.environ, "VPIPE_ROOT": str(tmp_path)}
    common = [sys.executable, "-m", "pipeline"]
    for args in (
        ["fit", *_args(features, "--trainer.max_epochs", "1")],
        [
            "predict",
            *_args(features),
            "-c",
            str(ROOT / "configs" / "trainer" / "ddp.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--data.init_args.batch_size",
            "2",
        ],
    ):
        done = subprocess.run(
            [*common, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-4000:]
    lines = (tmp_path / "predictions" / "gesture_gru-test.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == sorted(f"test{i}" for i in range(7))
