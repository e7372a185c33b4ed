"""`dvc repro` end to end in a temporary copy of the repository, with tiny params."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
BACKBONES = [f"backbone_{name}" for name in PARAMS["features"]["datasets"]]


def _model_class(name: str) -> str:
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"]["class_path"]


# The experiments of params.yaml, by kind: classifiers (test/acc) and forecasters.
TRAINED = [name for name in PARAMS["experiments"] if _model_class(name).endswith(".Classifier")]
FORECASTERS = [name for name in PARAMS["experiments"] if name not in TRAINED]


def copy_repository(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        if name.startswith(("dvc.lock", "data/", "models/", "metrics/", "plots/")):  # outputs of a local run
            continue
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def shrink(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for item in params["synthetic"].values():
        item["count"] = 3
    params["traffic"].update(
        days=16, val_days=1, test_days=1
    )  # two weeks of history before the evaluated days
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for name in TRAINED + BACKBONES + FORECASTERS:
        path = repo / "configs" / f"{name}.yaml"
        config = yaml.safe_load(path.read_text())
        config["trainer"]["max_epochs"] = 2
        path.write_text(yaml.safe_dump(config))


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_dvc_repro_runs_every_stage(tmp_path):
    repo = tmp_path / "repo"
    copy_repository(repo)
    shrink(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VPIPE_ROOT", "DVC_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    run(["git", "init", "-q"], repo, env)
    run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "init", "--allow-empty"],
        repo,
        env,
    )
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], repo, env)

    log = run(["dvc", "repro"], repo, env)
    for stage in (
        "synth@gestures",
        "extract@digits",
        "backbone@actions",
        "features@actions",
        "train@gesture_gru",
        "synth_traffic",
        "grids",
        "train@traffic_convlstm",
        "train@still_convlstm",
        "report",
    ):
        assert f"Running stage '{stage}'" in log
    traffic = json.loads((repo / "metrics" / "traffic_convlstm.json").read_text())
    assert {"test/rmse", "test/copy_last/rmse", "test/historical_average/rmse"} <= traffic.keys()
    still = json.loads((repo / "metrics" / "still_convlstm.json").read_text())
    assert {"test/h01/mse", "test/copy_last/h08/mse"} <= still.keys()

    for dataset in ("gestures", "actions", "digits"):
        assert (repo / "data/raw" / dataset / "manifest.csv").is_file()
        store = repo / "data/frames" / dataset
        for name in (
            "frames-00000.mjpeg",
            "frames-00000.offsets.npy",
            "index.csv",
            "errors.csv",
            "meta.json",
        ):
            assert (store / name).is_file(), store / name
        assert json.loads((store / "meta.json").read_text())["codec"] == "jpeg"  # params.yaml's codec
    for dataset in ("gestures", "actions"):
        for name in ("features-00000.npy", "index.csv", "errors.csv", "meta.json"):
            assert (repo / "data/features" / dataset / name).is_file()
        # The features come from the backbone stage's weights, in the modality it was trained on.
        card = json.loads((repo / "models" / f"backbone_{dataset}" / "backbone.json").read_text())
        meta = json.loads((repo / "data/features" / dataset / "meta.json").read_text())
        assert (
            meta["weights"]["weights_sha256"] == card["weights_sha256"]
            and meta["modality"] == card["modality"]
        )
        assert card["frames_content_hash"] == meta["frames_hash"]
        assert not any(
            k.startswith("test/")
            for k in json.loads((repo / "metrics" / f"backbone_{dataset}.json").read_text())
        )
    for name in TRAINED:
        assert (repo / "models" / name / "best.ckpt").is_file() and (
            repo / "models" / name / "last.ckpt"
        ).is_file()
        metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
        # test/acc is the share of the test clips (3 videos a class here: one test clip each) that the
        # written predictions get right; the loss a finite cross-entropy (not a run that diverged).
        dataset = Path(PARAMS["experiments"][name]).name
        with open(repo / "data/raw" / dataset / "manifest.csv", newline="") as fh:
            tested = sorted(r["label"] for r in csv.DictReader(fh) if r["split"] == "test")
        with open(repo / "plots" / name / "predictions.csv", newline="") as fh:
            predictions = list(csv.DictReader(fh))
        assert sorted(r["actual"] for r in predictions) == tested, name
        correct = sum(r["actual"] == r["predicted"] for r in predictions)
        assert metrics["test/acc"] == pytest.approx(correct / len(predictions), abs=1e-6), name
        assert 0 < metrics["test/loss"] < float("inf")
        epochs = (repo / "plots" / name / "epochs.csv").read_text().splitlines()
        assert epochs[0].startswith("epoch,") and len(epochs) == 3  # header + 2 epochs
    summary = (repo / "reports" / "summary.md").read_text()
    assert "| gesture_gru |" in summary and "Run durations (MLflow)" in summary
    plots = run(["dvc", "plots", "show", "--json"], repo, env)
    assert "plots/gesture_gru/predictions.csv" in plots and "val_accuracy" in plots

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for name in TRAINED:
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1, name
        run_ = runs[0]
        assert run_.info.status == "FINISHED"
        assert "test/acc" in run_.data.metrics and "val/acc" in run_.data.metrics
        assert run_.data.tags["dvc_stage"] == f"train@{name}" and len(run_.data.tags["git_commit"]) == 40
        # Lineage: the input store's hash as dvc.lock recorded it when its stage finished, before train ran.
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        recorded = {
            f"{out['md5']} ({stage})" for stage, entry in lock.items() for out in entry.get("outs", [])
        }
        assert run_.data.tags.get("dvc.lock.features", run_.data.tags.get("dvc.lock.frames")) in recorded, (
            name
        )
        assert experiment.artifact_location.startswith((repo / "mlartifacts").as_uri())
        assert "config.yaml" in [a.path for a in client.list_artifacts(run_.info.run_id)]
        assert "test/confusion.png" in [a.path for a in client.list_artifacts(run_.info.run_id, "test")]
    for name in BACKBONES:  # one run each, in its own experiment, with the exported weights and card
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "val/acc" in runs[0].data.metrics
        artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "backbone")}
        assert artifacts == {"backbone/backbone.safetensors", "backbone/backbone.json"}
    assert not (repo / "mlruns").exists()

    again = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again and "up to date" in again
