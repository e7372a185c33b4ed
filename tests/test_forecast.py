"""Next-step forecasters: shapes, truncated BPTT, metrics against copy-last, configs, pictures,
``vpipe forecast``, and evaluation under DDP counting every window once.

Fixtures are real: Moving-MNIST-style digits rendered to H.264 by ``data_scripts.synth`` and
extracted by ``vpipe extract`` (32×32, a handful of sequences), and a feature store whose
features drift at a constant velocity per video (learnable, unlike copy-last).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import quiet_trainer, write_store
from pipeline.models import cores

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
FRAME_CONFIGS = ["nextframe_convlstm", "nextframe_convgru"]
# Small and fast: 4 frames in, 3 out, one thin layer; everything else from the config under test.
TINY_FRAMES = [
    "--data.init_args.context",
    "4",
    "--data.init_args.horizon",
    "3",
    "--data.init_args.batch_size",
    "4",
    "--model.init_args.hidden_channels",
    "[8]",
    "--trainer.accelerator",
    "cpu",
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """13 digit sequences (7 train, 3 val, 3 test) as MP4 files and as a 32×32 frame store."""
    from data_scripts.synth import generate
    from pipeline.stages.extract import extract

    folder = tmp_path_factory.mktemp("digits")
    raw = generate("digits", folder / "raw", count=13, seed=0, workers=1)
    extract(raw / "manifest.csv", folder / "frames", size="32", workers=1)
    return {"raw": raw, "frames": folder / "frames"}


def tiny_frame_args(name: str, digits: dict) -> list[str]:
    """``vpipe fit`` arguments of the frame forecaster NAME on the digits: configs/debug.yaml, TINY_FRAMES."""
    return [
        "-c",
        str(ROOT / "configs" / f"{name}.yaml"),
        "-c",
        DEBUG,
        "--data.init_args.frames",
        str(digits["frames"]),
        *TINY_FRAMES,
    ]


def drifting_features(folder: Path, test_videos: int = 5) -> Path:
    """Grid features ``(4, 2, 2)`` moving at a constant velocity per video, plus a little noise."""

    def clip(rng, i):
        length = int(rng.integers(12, 16))
        start, velocity = rng.normal(0, 1, (4, 2, 2)), rng.normal(0, 0.3, (4, 2, 2))
        feats = (
            start + velocity * np.arange(length)[:, None, None, None] + rng.normal(0, 0.01, (length, 4, 2, 2))
        )
        return feats.astype(np.float16), "x"

    return write_store(
        folder,
        "features",
        {"train": 24, "val": 4, "test": test_videos},
        clip,
        {"cache_key": "test", "feature_shape": [4, 2, 2]},
    )


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return drifting_features(tmp_path_factory.mktemp("feat") / "features")


def fit(args: list[str], root: Path, monkeypatch) -> dict:
    from pipeline.train import cli_main

    monkeypatch.setenv("VPIPE_ROOT", str(root))
    cli = cli_main(["fit", *args])
    return json.loads((root / "metrics" / f"{cli.experiment}.json").read_text())


# Shapes and the untrained baseline


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_conv_forecaster_shapes(cell):
    core = cores.ConvRecurrentCore(1, cell, hidden_channels=[8, 6], kernel_sizes=[3, 5], patch_size=4)
    frame, state = torch.rand(2, 1, 16, 24), None
    for t in range(3):
        frame, state = core.step(frame, state, forecasting=t == 2)
        assert frame.shape == (2, 1, 16, 24) and 0 <= frame.min() and frame.max() <= 1
    assert len(state) == 2
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        core.step(torch.rand(2, 1, 18, 24), None, False)
    with pytest.raises(ValueError, match="kernel sizes"):
        cores.ConvRecurrentCore(1, cell, hidden_channels=[8, 6], kernel_sizes=[3])


def test_untrained_feature_core_is_copy_last():
    core = cores.FeatureRecurrentCore(6, "lstm", hidden_size=5)
    x = torch.randn(3, 4, 6)
    pred, state = core(x)
    torch.testing.assert_close(pred, x)
    assert isinstance(state[0], tuple) and state[1].shape == (3, 6)  # LSTM (h, c) and the last input


def test_residual_conv_core_starts_as_copy_last_and_reads_covariates():
    core = cores.ConvRecurrentCore(
        3, "gru", hidden_channels=[8], kernel_sizes=3, patch_size=2, output="residual", covariates=2
    )
    frame = torch.rand(2, 3, 8, 8)
    values, grids = torch.rand(2, 2), torch.rand(2, 2, 8, 8)
    for cond in (values, grids):
        pred, _ = core.step(frame, None, True, cond)
        torch.testing.assert_close(pred, frame)  # untrained: the frame read, i.e. copy-last
    torch.nn.init.normal_(core.out.weight)
    a, _ = core.step(frame, None, True, values)
    b, _ = core.step(frame, None, True, values + 1)
    assert not torch.allclose(a, b)  # the covariates reach the prediction
    with pytest.raises(ValueError, match="output must be"):
        cores.ConvRecurrentCore(1, output="linear")


def test_mirror_augmentation_only_mirrors(digits):
    from pipeline.datasets.sequences import Sequences
    from pipeline.storage.store import FrameStore

    store = FrameStore(digits["frames"])
    rows = store.split("train")[:1]
    video = store.rows(rows[0].video_id)
    plain = Sequences(store, rows, window=int(rows[0].length), train=False, grayscale=False)
    mirrored = Sequences(
        store, rows, window=int(rows[0].length), train=True, grayscale=False, augment="mirror", seed=3
    )
    original = plain.__getitems__([0])["x"]
    seen = set()
    for _ in range(12):
        x = mirrored.__getitems__([0])["x"]
        same, flipped = torch.equal(x, original), torch.equal(x, original.flip(-1))
        assert same or flipped
        seen.add(same)
    assert seen == {True, False} and video.shape[0] == original.shape[1]
    with pytest.raises(ValueError, match="augment must be"):
        Sequences(store, rows, window=4, train=True, augment="rotate")


# Truncated backpropagation through time


def _models(tbptt):
    """A feature and a frame forecaster reading 5 context steps, then their own predictions."""
    from pipeline.systems.conv_forecaster import FrameForecaster
    from pipeline.systems.forecaster import FeatureForecaster

    torch.manual_seed(0)
    feature = FeatureForecaster(
        input_dim=8, context=5, horizon=4, hidden_size=8, tbptt_steps=tbptt, teacher_forcing=0.0
    )
    torch.nn.init.normal_(feature.core.out.weight, std=0.1)  # not zero: predictions depend on the state
    feature.core.calibrate(torch.tensor(1.0))
    torch.manual_seed(0)
    frame = FrameForecaster(
        context=5,
        horizon=4,
        hidden_channels=[4],
        kernel_sizes=3,
        patch_size=2,
        tbptt_steps=tbptt,
        teacher_forcing=0.0,
    )
    return [(feature, torch.randn(2, 10, 8)), (frame, torch.rand(2, 10, 1, 8, 8))]


@pytest.mark.parametrize("which", [0, 1], ids=["features", "frames"])
def test_no_gradient_crosses_a_chunk_boundary(which):
    """Chunks of 3 steps; from step 5 on predictions are fed back, so only detaching cuts every path."""
    model, x = _models(3)[which]
    x.requires_grad_(True)
    losses = list(model.chunk_losses(x, teacher_forcing=0.0))
    assert len(losses) == 3  # 9 steps in chunks of 3
    (grad,) = torch.autograd.grad(losses[1], x)  # chunk 2: steps 3..5 read inputs 3, 4 and a prediction
    per_step = grad.flatten(2).abs().sum(-1).sum(0)
    assert per_step[:3].eq(0).all(), per_step
    assert per_step[3:5].gt(0).all(), per_step

    # Without the cut, the same loss depends on the first chunk's inputs: the check above can fail.
    state = pred = None
    late = []
    for t in range(6):
        pred, state = model.core.step(x[:, t] if t < 5 else pred, state, t >= 4)
        if t >= 3:
            late.append(model.loss(pred, x[:, t + 1]))
    (grad,) = torch.autograd.grad(torch.stack(late).mean(), x)
    assert grad.flatten(2).abs().sum(-1).sum(0)[:3].gt(0).all()


def test_full_chunk_equals_full_bptt_reference():
    """k ≥ the sequence: the one chunk's gradients equal an independent full-sequence forward."""
    from pipeline.systems.forecaster import FeatureForecaster

    torch.manual_seed(0)
    model = FeatureForecaster(input_dim=8, context=3, horizon=6, hidden_size=8, tbptt_steps=50)
    torch.nn.init.normal_(model.core.out.weight, std=0.1)  # not zero, so every weight gets a gradient
    x = torch.randn(2, 10, 8)
    (loss,) = model.chunk_losses(x)
    chunked = torch.autograd.grad(loss, list(model.parameters()))
    pred, _ = model.core(x[:, :-1])  # all 9 steps in one call of the recurrent network
    reference = torch.autograd.grad(torch.nn.functional.mse_loss(pred, x[:, 1:]), list(model.parameters()))
    for a, b in zip(chunked, reference, strict=True):
        torch.testing.assert_close(a, b)


def test_tbptt_in_training_steps_per_chunk(digits):
    """One batch of 19 steps: k = 19 updates the weights exactly like full BPTT (one optimiser step);
    k = 5 takes 4 optimiser steps and ends elsewhere."""
    import pytorch_lightning as pl

    from pipeline.datasets.sequences import SequenceDataModule
    from pipeline.systems.conv_forecaster import FrameForecaster

    weights, steps = {}, {}
    for tbptt in (None, 19, 5):
        pl.seed_everything(0)
        data = SequenceDataModule(frames=str(digits["frames"]), context=10, horizon=10, batch_size=4)
        model = FrameForecaster(
            input_dim=1,
            context=10,
            horizon=10,
            hidden_channels=[8],
            kernel_sizes=3,
            tbptt_steps=tbptt,
            warmup_epochs=0,
        )
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
        trainer.fit(model, data)
        weights[tbptt], steps[tbptt] = model.state_dict(), trainer.global_step
    assert steps == {None: 1, 19: 1, 5: 4}
    for key, value in weights[None].items():
        torch.testing.assert_close(weights[19][key], value)
    assert any(not torch.allclose(weights[5][k], v) for k, v in weights[None].items())


# Metrics


def test_frame_metrics_units():
    from pipeline.systems.conv_forecaster import FrameForecaster

    model = FrameForecaster(hidden_channels=[4], patch_size=2)
    truth = torch.zeros(2, 3, 1, 8, 8)
    pred = truth.clone()
    pred[..., :4, :] = 0.5  # half the pixels off by 0.5
    values = dict(zip(model.METRICS, model.sample_metrics(pred, truth).unbind(-1), strict=True))
    torch.testing.assert_close(values["mse"], torch.full((2, 3), 0.125))
    torch.testing.assert_close(
        values["mse_frame"], torch.full((2, 3), 0.125 * 64)
    )  # summed over the 8×8 frame
    torch.testing.assert_close(values["mae_frame"], torch.full((2, 3), 0.25 * 64))
    torch.testing.assert_close(values["psnr"], torch.full((2, 3), 10 * np.log10(1 / 0.125)).float())
    same = dict(zip(model.METRICS, model.sample_metrics(truth + 0.3, truth + 0.3).unbind(-1), strict=True))
    assert same["ssim"].allclose(torch.ones(2, 3), atol=1e-3) and same["psnr"].eq(100).all()


def test_loss_ssim_equals_torchmetrics():
    from torchmetrics.functional.image import structural_similarity_index_measure

    from pipeline.systems.conv_forecaster import gaussian_ssim

    torch.manual_seed(0)
    pred, target = torch.rand(3, 1, 24, 20), (torch.rand(3, 1, 24, 20) > 0.7).float()
    for a, b in ((pred, target), (target, target), (0.5 * target, target)):
        torch.testing.assert_close(
            gaussian_ssim(a, b), structural_similarity_index_measure(a, b, data_range=1.0)
        )


def test_feature_forecaster_beats_copy_last(features, tmp_path, monkeypatch):
    """Constant-velocity features: a trained GRU extrapolates, copy-last cannot."""
    metrics = fit(
        [
            "-c",
            str(ROOT / "configs/nextfeature_gru.yaml"),
            "--data.init_args.features",
            str(features),
            "--data.init_args.batch_size",
            "8",
            "--trainer.max_epochs",
            "15",
            "--trainer.logger",
            "false",
            "--model.init_args.hidden_size",
            "32",
            "--model.init_args.lr",
            "0.01",
            "--trainer.accelerator",
            "cpu",
        ],
        tmp_path,
        monkeypatch,
    )
    horizons = 4
    for name in ("mse", "cos"):
        assert {f"test/h{k:02d}/{name}" for k in range(1, horizons + 1)} <= metrics.keys()
        assert {f"test/copy_last/h{k:02d}/{name}" for k in range(1, horizons + 1)} <= metrics.keys()
    assert metrics["test/h01/mse"] < 0.5 * metrics["test/copy_last/h01/mse"]
    assert metrics["test/h01/cos"] > metrics["test/copy_last/h01/cos"]
    rows = (tmp_path / "plots" / "nextfeature_gru" / "horizons.csv").read_text().splitlines()
    assert rows[0] == "horizon,mse,cos,copy_last_mse,copy_last_cos" and len(rows) == 1 + horizons


# Configs, pictures, MLflow


@pytest.mark.parametrize("name", FRAME_CONFIGS)
def test_frame_configs_run(name, digits, tmp_path, monkeypatch):
    metrics = fit(tiny_frame_args(name, digits), tmp_path, monkeypatch)
    for metric in ("mse", "mse_frame", "mae", "mae_frame", "ssim", "psnr"):
        for prefix in ("test/", "test/copy_last/"):
            assert {f"{prefix}{metric}", f"{prefix}h01/{metric}", f"{prefix}h03/{metric}"} <= metrics.keys()
    assert metrics["test/mse_frame"] == pytest.approx(metrics["test/mse"] * 32 * 32, rel=1e-4)
    plots = tmp_path / "plots" / name
    assert (plots / "rollout.png").read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    with Image.open(plots / "rollout.gif") as gif:
        assert gif.n_frames == 4 + 3
    checkpoint = torch.load(tmp_path / "models" / name / "best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["video_format"] == {
        "fps": 0.0,
        "rate": 10.0,
        "width": 32,
        "height": 32,
        "grayscale": True,
        "codec": "jpeg",  # the frame store's: vpipe forecast puts its context frames through JPEG too
        "quality": 90,
    }


def test_nextfeature_config_runs_on_grid_features(features, tmp_path, monkeypatch):
    metrics = fit(
        [
            "-c",
            str(ROOT / "configs/nextfeature_gru.yaml"),
            "-c",
            DEBUG,
            "--data.init_args.features",
            str(features),
            "--data.init_args.pool",
            "flatten",
            "--trainer.accelerator",
            "cpu",
        ],
        tmp_path,
        monkeypatch,
    )
    assert {"test/mse", "test/cos", "test/copy_last/mse", "test/h04/cos"} <= metrics.keys()


def test_pictures_logged_to_mlflow_at_test_and_every_n_epochs(digits, tmp_path, monkeypatch):
    import mlflow

    fit(
        [
            "-c",
            str(ROOT / "configs/nextframe_convlstm.yaml"),
            "--data.init_args.frames",
            str(digits["frames"]),
            *TINY_FRAMES,
            "--trainer.max_epochs",
            "2",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--model.init_args.picture_every_n_epochs",
            "2",
            "--model.init_args.pictures",
            "2",
        ],
        tmp_path,
        monkeypatch,
    )
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("nextframe_convlstm").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "test")} >= {
        "test/rollout.png",
        "test/rollout.gif",
        "test/horizons.csv",
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id, "epochs")} == {
        "epochs/epoch_001"
    }  # epoch 2 of 2
    assert "test/copy_last/ssim" in run.data.metrics and "val/loss" in run.data.metrics


# vpipe forecast


@pytest.fixture(scope="module")
def frame_checkpoint(digits, tmp_path_factory) -> Path:
    from pipeline.train import cli_main

    root = tmp_path_factory.mktemp("trained")
    os.environ["VPIPE_ROOT"] = str(root)
    try:
        cli_main(["fit", *tiny_frame_args("nextframe_convgru", digits)])
    finally:
        del os.environ["VPIPE_ROOT"]
    return root / "models" / "nextframe_convgru" / "best.ckpt"


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_forecast_writes_context_then_prediction(suffix, digits, frame_checkpoint, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.media.video import decode

    out = tmp_path / f"rollout{suffix}"
    video = digits["raw"] / "videos" / "seq_00000.mp4"
    main(
        [
            "forecast",
            str(video),
            "--ckpt",
            str(frame_checkpoint),
            "--context",
            "6",
            "--steps",
            "5",
            "--out",
            str(out),
        ]
    )
    assert "6 context + 5 predicted frames" in capsys.readouterr().out
    frames = decode(out).frames
    assert frames.shape == (11, 32, 32, 3)
    source = decode(video, size=(32, 32)).frames[:6].astype(float) @ [0.299, 0.587, 0.114]
    assert (
        np.abs(frames[:6, ..., 0].astype(float) - source).mean() < 8
    )  # the context, as the model saw it (codec loss aside)


def test_forecast_errors_name_the_file(digits, frame_checkpoint, features, tmp_path):
    from pipeline.cli import main

    video = digits["raw"] / "videos" / "seq_00000.mp4"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(video.read_bytes()[:600])
    feature_ckpt = tmp_path / "feature.ckpt"
    from pipeline.systems.forecaster import FeatureForecaster

    torch.save(
        {"state_dict": {}, "hyper_parameters": dict(FeatureForecaster(input_dim=4).hparams)}, feature_ckpt
    )
    cases = [
        ([str(tmp_path / "missing.mp4"), "--ckpt", str(frame_checkpoint)], "missing.mp4: no such file"),
        ([str(broken), "--ckpt", str(frame_checkpoint)], "broken.mp4"),
        ([str(video), "--ckpt", str(feature_ckpt)], "feature.ckpt: not a frame forecaster"),
        ([str(video), "--ckpt", str(tmp_path / "none.ckpt")], "none.ckpt: no such checkpoint"),
        ([str(video), "--ckpt", str(broken)], "broken.mp4: not a readable checkpoint"),
        ([str(video), "--ckpt", str(frame_checkpoint), "--context", "25"], "seq_00000.mp4: has 20 frames"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as err:
            main(["forecast", *args, "--out", str(tmp_path / "out.mp4")])
        assert str(err.value).startswith("vpipe forecast: ") and message in str(err.value), err.value
    assert not (tmp_path / "out.mp4").exists()


def test_forecast_from_one_still_image(digits, frame_checkpoint, tmp_path, monkeypatch, capsys):
    """``vpipe forecast IMAGE.png``: the still config trained here (RGB, context 1, its own size) rolls a
    PNG out; a still is one frame of context; a model trained on more context says so."""
    from PIL import Image

    from pipeline.cli import main
    from pipeline.media.video import decode

    fit(
        [
            "-c",
            str(ROOT / "configs/still_convlstm.yaml"),
            "-c",
            DEBUG,
            "--data.init_args.frames",
            str(digits["frames"]),
            "--data.init_args.size",
            "16",
            "--data.init_args.horizon",
            "3",
            "--model.init_args.hidden_channels",
            "[8]",
            "--trainer.accelerator",
            "cpu",
        ],
        tmp_path,
        monkeypatch,
    )
    ckpt = tmp_path / "models" / "still_convlstm" / "best.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["video_format"]["width"] == 16
    still = decode(digits["raw"] / "videos" / "seq_00000.mp4").frames[0]  # 64×64 RGB
    png = tmp_path / "still.png"
    Image.fromarray(still).save(png)
    out = tmp_path / "from_still.gif"
    main(["forecast", str(png), "--ckpt", str(ckpt), "--steps", "4", "--out", str(out)])
    assert "1 context + 4 predicted frames" in capsys.readouterr().out
    with Image.open(out) as gif:
        assert gif.n_frames == 5 and gif.size == (16, 16)
        first = np.asarray(gif.convert("RGB"), dtype=float)
    shrunk = np.asarray(Image.fromarray(still).resize((16, 16), Image.BOX), dtype=float)
    assert np.abs(first - shrunk).mean() < 12  # the still itself, at the model's size (GIF palette aside)
    with pytest.raises(SystemExit, match="still.png: a still image is one frame of context, not 3"):
        main(["forecast", str(png), "--ckpt", str(ckpt), "--context", "3", "--out", str(tmp_path / "x.gif")])
    main(
        [
            "forecast",
            str(png),
            "--ckpt",
            str(frame_checkpoint),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "y.gif"),
        ]
    )
    assert "trained on 4 context frames" in capsys.readouterr().err


# DDP


@pytest.mark.slow
def test_ddp_forecaster_metrics_equal_single_process(digits, frame_checkpoint, tmp_path, monkeypatch):
    """3 test windows over 2 ranks: every one counted once, one MLflow run."""
    from pipeline.train import cli_main

    common = [
        "-c",
        str(ROOT / "configs/nextframe_convgru.yaml"),
        "--data.init_args.frames",
        str(digits["frames"]),
        *TINY_FRAMES,
        "--data.init_args.batch_size",
        "2",
        "--ckpt_path",
        str(frame_checkpoint),
    ]
    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    cli_main(["test", *common, "--trainer.logger", "false"])
    metrics = tmp_path / "metrics" / "nextframe_convgru.json"
    single = json.loads(metrics.read_text())
    metrics.unlink()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "test", *common, "-c", str(ROOT / "configs/trainer/ddp.yaml")],
        cwd=tmp_path,
        env={**os.environ, "VPIPE_ROOT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ddp = json.loads(metrics.read_text())
    assert ddp.keys() == single.keys()
    for key in single:
        assert ddp[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("nextframe_convgru").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"


def test_a_fit_that_never_validates_tests_its_last_weights(digits, tmp_path, monkeypatch):
    """max_epochs below check_val_every_n_epoch: no best checkpoint, so the last one is tested (not a crash)."""
    with pytest.warns(UserWarning, match="no validation ran"):
        metrics = fit(
            [*tiny_frame_args("nextframe_convgru", digits), "--trainer.check_val_every_n_epoch", "2"],
            tmp_path,
            monkeypatch,
        )
    assert "test/mse" in metrics
    assert (tmp_path / "models" / "nextframe_convgru" / "last.ckpt").is_file()
    assert not (tmp_path / "models" / "nextframe_convgru" / "best.ckpt").exists()
