"""Jobs launched as teams launch them: `torchrun` with two processes (gloo on CPU) on a brand-new MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import feature_args, feature_store

from conftest import free_port, torchrun_command

ROOT = Path(__file__).resolve().parents[1]


def _fresh_root(tmp_path: Path) -> tuple[Path, dict]:
    """An empty project root, and the environment of a job there (its own SQLite store, created by the job)."""
    root = tmp_path / "project"
    root.mkdir()
    env = {**os.environ, "VPIPE_ROOT": str(root), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return root, env


def _succeeds(processes: list[subprocess.Popen]) -> None:
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]


def _launch(cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _torchrun(args: list[str], env: dict, cwd: Path) -> None:
    """``python -m pipeline ARGS`` under ``torchrun --nproc-per-node 2`` on 127.0.0.1."""
    _succeeds([_launch(torchrun_command(args), env, cwd)])


def _one_finished_run(root: Path, name: str):
    """The job's single MLflow run, FINISHED, from two processes."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    return client, run


def _single_process_test(args: list[str], name: str, root: Path, tmp_path: Path, env: dict) -> dict:
    """Test metrics of ``root``'s ``models/NAME/best.ckpt`` computed by one process (``vpipe test``, MLflow off)."""
    single_root = tmp_path / "single"
    single_root.mkdir()
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    _succeeds(
        [
            _launch(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "test",
                    *args,
                    "--trainer.logger",
                    "false",
                    "--ckpt_path",
                    str(root / "models" / name / "best.ckpt"),
                ],
                {**env, "VPIPE_ROOT": str(single_root)},
                single_root,
            )
        ]
    )
    return json.loads((single_root / "metrics" / f"{name}.json").read_text())


def _gru_features(features: Path) -> list[str]:
    return feature_args(ROOT / "tests/configs/gru_features.yaml", features)


DDP = ["-c", str(ROOT / "configs/trainer/ddp.yaml")]


@pytest.mark.slow
def test_torchrun_fit_on_a_fresh_store_creates_it_once(tmp_path):
    """Every rank used to create the new SQLite store's schema at once (duplicate-column errors); now rank
    zero alone opens the store, and the job leaves one FINISHED run with its test metrics."""
    root, env = _fresh_root(tmp_path)
    _torchrun(
        ["fit", *_gru_features(feature_store(tmp_path / "features")), *DDP, "--trainer.devices", "2"],
        env,
        root,
    )
    client, run = _one_finished_run(root, "gesture_gru")
    metrics = json.loads((root / "metrics" / "gesture_gru.json").read_text())
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert [str(v.version) for v in client.search_model_versions("name = 'gesture_gru'")] == ["1"]


def _captions(project: Path, folder: Path) -> Path:
    from pipeline.storage.captions import write_captions

    ids = [line.split(",")[0] for line in (project / "videos" / "manifest.csv").read_text().splitlines()[1:]]
    rows = [(v, f"a white square moves to the {'right' if v.startswith('right') else 'left'}") for v in ids]
    write_captions(folder, rows, {"right": ["right"], "left": ["left"]})
    return folder / "captions.csv"


def _task(kind: str, tmp_path: Path, trained_project: Path) -> tuple[str, list[str]]:
    """(experiment name, `vpipe fit` arguments) of a small job of each kind of task."""
    from test_forecast import TINY_FRAMES, drifting_features
    from test_training import frame_store

    few = [
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.check_val_every_n_epoch",
        "1",
    ]
    if kind == "end-to-end classifier":
        return "lrcn", [
            "-c",
            str(ROOT / "tests/configs/lrcn_frames.yaml"),
            "--data.init_args.frames",
            str(frame_store(tmp_path / "frames", test_videos=7)),
            "--trainer.logger",
            "true",
            *few,
        ]
    if kind == "frame forecaster, truncated BPTT":
        from data_scripts.synth import generate
        from pipeline.stages.extract import extract

        raw = generate("digits", tmp_path / "raw", count=13, seed=0, workers=1)
        extract(raw / "manifest.csv", tmp_path / "frames", size="32", workers=1)
        # Chunks of 2 steps over 4 + 3: the first chunks never reach the forecasting stack.
        return "nextframe_convgru", [
            "-c",
            str(ROOT / "configs/nextframe_convgru.yaml"),
            "--data.init_args.frames",
            str(tmp_path / "frames"),
            *TINY_FRAMES,
            "--model.init_args.tbptt_steps",
            "2",
            "--data.init_args.batch_size",
            "2",
            *few,
        ]
    if kind == "feature forecaster":
        return "nextfeature_gru", [
            "-c",
            str(ROOT / "configs/nextfeature_gru.yaml"),
            "--data.init_args.features",
            str(drifting_features(tmp_path / "features")),
            "--trainer.accelerator",
            "cpu",
            *few,
        ]
    return "caption_gru", [
        "-c",
        str(ROOT / "configs/caption_gru.yaml"),
        "--data.init_args.features",
        str(trained_project / "features"),
        "--data.init_args.captions",
        str(_captions(trained_project, tmp_path)),
        "--data.init_args.batch_size",
        "2",
        "--model.init_args.hidden_size",
        "16",
        "--trainer.accelerator",
        "cpu",
        *few,
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["end-to-end classifier", "frame forecaster, truncated BPTT", "feature forecaster", "captioner"]
)
def test_torchrun_fit_of_every_task(kind, tmp_path, trained_project):
    """Two processes (gloo) on an empty root: the job finishes, leaves one FINISHED run, and the test
    metrics it logged are those one process computes from the same checkpoint."""
    name, args = _task(kind, tmp_path, trained_project)
    root, env = _fresh_root(tmp_path)
    _torchrun(["fit", *args, *DDP, "--trainer.accelerator", "cpu", "--trainer.devices", "2"], env, root)
    _, run = _one_finished_run(root, name)
    ddp = json.loads((root / "metrics" / f"{name}.json").read_text())
    single = _single_process_test(args, name, root, tmp_path, env)
    assert ddp.keys() == single.keys()
    for key in single:
        assert ddp[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
        assert run.data.metrics[key] == pytest.approx(ddp[key], rel=1e-6, abs=1e-7), key


def _two_nodes(args: list[str], env: dict, cwd: Path) -> None:
    """Run ``python -m pipeline ARGS`` as two one-process "nodes" on 127.0.0.1 (two torchrun launchers)."""
    port = free_port()
    _succeeds([_launch(torchrun_command(args, 1, port, node=(rank, 2)), env, cwd) for rank in (0, 1)])


@pytest.mark.slow
def test_two_nodes_extract_features_and_fit_like_one_process(tmp_path, trained_project):
    """`vpipe features` and `vpipe fit` over two torchrun "nodes" (one process each, a shared folder):
    the feature store equals a one-process run's row for row, and the fit's logged test metrics are
    those one process computes from its checkpoint."""
    import numpy as np

    from pipeline.storage.store import FeatureStore

    root, env = _fresh_root(tmp_path)
    features = [
        "features",
        "--frames",
        str(trained_project / "frames"),
        "--backbone",
        "test_resnet",
        "--pool",
        "grid",
        "--grid",
        "2",
        "--input-size",
        "32",
        "--batch-size",
        "16",
        "--accelerator",
        "cpu",
        "--no-system-metrics",
    ]
    _two_nodes([*features, "--out", str(tmp_path / "two"), "--num-nodes", "2", "--devices", "1"], env, root)
    _succeeds(
        [_launch([sys.executable, "-m", "pipeline", *features, "--out", str(tmp_path / "one")], env, root)]
    )
    one, two = FeatureStore(tmp_path / "one"), FeatureStore(tmp_path / "two")
    assert [r.video_id for r in two.index] == [r.video_id for r in one.index]
    for row in one.index:
        np.testing.assert_allclose(
            two.rows(row.video_id).astype(np.float32), one.rows(row.video_id).astype(np.float32), atol=2e-3
        )

    fit = _gru_features(tmp_path / "two")
    _two_nodes(["fit", *fit, *DDP, "--trainer.num_nodes", "2", "--trainer.devices", "1"], env, root)
    _one_finished_run(root, "gesture_gru")
    logged = json.loads((root / "metrics" / "gesture_gru.json").read_text())
    single = _single_process_test(fit, "gesture_gru", root, tmp_path, env)
    for key in single:
        assert logged[key] == pytest.approx(single[key], abs=1e-5), key


@pytest.mark.slow
def test_slurm_style_launch_on_a_fresh_store(tmp_path, trained_project):
    """Two tasks started as `srun --ntasks-per-node 2` starts them (the SLURM_* variables Lightning
    reads; no SLURM here): one FINISHED run on a brand-new store, the same test metrics as one process.
    Had Lightning not joined them, each task would have launched a 2-process job of its own: two runs."""
    root, env = _fresh_root(tmp_path)
    fit = _gru_features(trained_project / "features")
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "vpipe",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    _succeeds(
        [
            _launch(
                [sys.executable, "-m", "pipeline", "fit", *fit, *DDP, "--trainer.devices", "2"],
                {**env, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                root,
            )
            for i in range(2)
        ]
    )
    _one_finished_run(root, "gesture_gru")
    logged = json.loads((root / "metrics" / "gesture_gru.json").read_text())
    single = _single_process_test(fit, "gesture_gru", root, tmp_path, env)
    for key in single:
        assert logged[key] == pytest.approx(single[key], abs=1e-5), key
