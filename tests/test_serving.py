"""MLflow as its users expect it: datasets and system metrics on runs, registered versions that MLflow itself
loads (pyfunc) and serves (`mlflow models serve`), the UI's runs-table URLs, telemetry off."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import free_port
from pipeline import ui
from pipeline.cli import main
from pipeline.inference import classify
from pipeline.tracking import runs as tracking


@pytest.fixture
def project_store(trained_project, monkeypatch):
    """The session's trained project as this process's MLflow store."""
    monkeypatch.setenv("VPIPE_ROOT", str(trained_project))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained_project / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{trained_project / 'mlflow.db'}")
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def _classify(video: Path, ckpt: Path) -> list[dict]:
    lines: list[str] = []
    assert classify.run([str(video)], ckpt=str(ckpt), topk=5, as_json=True, out=lines.append) == 0
    return json.loads(lines[0])["top"]


def test_training_run_shows_its_datasets_and_system_metrics(project_store, trained_project):
    version = project_store.get_model_version("gesture_gru", "1")
    run = project_store.get_run(version.run_id)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {
        "features/features",
        "frames/frames",
    }  # the feature store and the frame store it came from
    features = json.loads((trained_project / "features" / "meta.json").read_text())
    assert inputs["features/features"].dataset.digest == features["content_hash"][:32]
    profile = json.loads(inputs["frames/frames"].dataset.profile)
    assert (
        profile["train_videos"] == 6
        and profile["test_videos"] == 4
        and profile["classes"] == ["left", "right"]
    )
    assert (
        json.loads(inputs["features/features"].dataset.source)["uri"]
        == (trained_project / "features").as_uri()
    )
    assert {t.key: t.value for t in inputs["features/features"].tags}["mlflow.data.context"] == "training"
    assert any(k.startswith("system/cpu_utilization_percentage") for k in run.data.metrics)
    assert any(k.startswith("system/system_memory_usage_megabytes") for k in run.data.metrics)


def test_registered_version_is_a_pyfunc_model_with_the_numbers_of_vpipe_classify(
    project_store, trained_project
):
    version = project_store.get_model_version("gesture_gru", "1")
    logged = project_store.get_logged_model(version.source.removeprefix("models:/"))
    assert [(v["name"], str(v["version"])) for v in json.loads(logged.tags["mlflow.modelVersions"])] == [
        ("gesture_gru", "1")
    ]  # linked both ways
    assert logged.source_run_id == version.run_id
    model = mlflow.pyfunc.load_model("models:/gesture_gru/1")
    assert {c.name for c in model.metadata.get_input_schema().inputs} == {"video", "video_b64", "filename"}
    video = trained_project / "videos" / "right5.mp4"
    frame = pd.DataFrame(
        [
            {"video": str(video)},
            {"video_b64": base64.b64encode(video.read_bytes()).decode(), "filename": "x.mp4"},
        ]
    )
    out = model.predict(frame, params={"top_k": 2})
    expected = _classify(video, trained_project / "models" / "gesture_gru" / "best.ckpt")
    assert list(out["label"]) == [expected[0]["label"]] * 2
    assert out["probability"].tolist() == pytest.approx([expected[0]["probability"]] * 2, abs=1e-6)
    assert json.loads(out["top_k"][1]) == expected[:2]
    with pytest.raises(Exception, match="needs `video`"):
        model.predict(pd.DataFrame([{"filename": "x.mp4"}]))
    # The input example (a short clip; registration logs it without running the model on it) is a request
    # the model answers.
    local = mlflow.artifacts.download_artifacts("models:/gesture_gru/1")
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert list(example.columns) == ["video_b64", "filename"]
    assert model.predict(example)["label"][0] in {"left", "right"}


def test_classify_reads_versions_registered_as_bare_checkpoints(project_store, trained_project, tmp_path):
    """Versions registered before the pyfunc flavor (a checkpoint under the run's ``model/``) still work."""
    run_id = project_store.get_model_version("gesture_gru", "1").run_id
    ckpt = trained_project / "models" / "gesture_gru" / "best.ckpt"
    project_store.log_artifact(run_id, str(ckpt), "bare")
    source = f"{project_store.get_run(run_id).info.artifact_uri}/bare"
    if not project_store.search_registered_models("name = 'gesture_gru_bare'"):
        project_store.create_registered_model("gesture_gru_bare")
    version = project_store.create_model_version("gesture_gru_bare", source, run_id=run_id)
    lines: list[str] = []
    video = trained_project / "videos" / "left5.mp4"
    assert (
        classify.run(
            [str(video)],
            model_uri=f"models:/gesture_gru_bare/{version.version}",
            as_json=True,
            out=lines.append,
        )
        == 0
    )
    assert json.loads(lines[0])["top"] == _classify(video, ckpt)


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_top_k_of_vpipe_classify(project_store, trained_project):
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{trained_project / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # The server runs `uvicorn` from the environment's bin folder.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/gesture_gru/latest",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow models serve did not start: {server.stdout.read().decode()[-3000:]}")
                time.sleep(1)
        video = trained_project / "videos" / "right6.mp4"
        body = json.dumps(
            {
                "dataframe_records": [
                    {"video_b64": base64.b64encode(video.read_bytes()).decode(), "filename": video.name}
                ]
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        row = answer["predictions"][0]
        expected = _classify(video, trained_project / "models" / "gesture_gru" / "best.ckpt")
        assert row["label"] == expected[0]["label"] and json.loads(row["top_k"]) == expected
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_ui_urls_open_the_runs_tables(project_store):
    found = dict(ui.urls("http://127.0.0.1:5000"))
    assert found["experiments"] == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    experiment = project_store.get_experiment_by_name("gesture_gru")
    assert (
        found["gesture_gru"]
        == f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    )
    assert "Default" not in found


def test_vpipe_turns_mlflow_telemetry_off_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    main(["report", "--metrics", str(tmp_path), "--out", "", "--no-timings"])
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # a user who opts in
    main(["report", "--metrics", str(tmp_path), "--out", "", "--no-timings"])
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_system_metrics_switch_and_short_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    client = tracking.registry_client()
    tracking.ensure_store(tracking.tracking_uri())
    experiment = client.create_experiment("jobs")
    for enabled in (True, False):
        run = client.create_run(experiment)
        with tracking.SystemMetrics(run.info.run_id, enabled, interval=30):
            time.sleep(0.2)  # far shorter than one interval: the sample taken at the start is still logged
        metrics = client.get_run(run.info.run_id).data.metrics
        assert any(k.startswith("system/") for k in metrics) == enabled
