"""MLflow for real: the UI server over a store written by a real training run, lineage and registry,
and the faults (a tracking server that does not answer, a run that crashes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from pytorch_lightning.callbacks import Callback

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def get(url: str, **query) -> dict | str:
    with urllib.request.urlopen(
        f"{url}?{urllib.parse.urlencode(query)}" if query else url, timeout=30
    ) as response:
        body = response.read().decode()
    return json.loads(body) if response.headers.get_content_type() == "application/json" else body


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def ui_server(trained_project, tmp_path):
    """`vpipe ui` on a free port over the trained project's store; always stopped (its whole process group)."""
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "ui", "--port", str(port)],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VPIPE_ROOT": str(trained_project)},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if get(f"{url}/health").strip() == "OK":
                    break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"mlflow server did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def test_ui_server_over_a_real_store(ui_server, trained_project):
    api = f"{ui_server}/api/2.0/mlflow"
    experiment = get(f"{api}/experiments/get-by-name", experiment_name="gesture_gru")["experiment"]
    assert experiment["artifact_location"] == (trained_project / "mlartifacts" / "gesture_gru").as_uri()
    [run] = post(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    info, data = run["info"], run["data"]
    assert info["status"] == "FINISHED" and info["run_name"] == "gesture_gru-fit"

    history = get(f"{api}/metrics/get-history", run_id=info["run_id"], metric_key="val/acc")["metrics"]
    # Two epochs, as the epochs table records them; 2 val clips of each class: accuracy in quarters.
    epochs = (trained_project / "plots" / "gesture_gru" / "epochs.csv").read_text().splitlines()
    column = epochs[0].split(",").index("val/acc")
    logged = [m["value"] for m in sorted(history, key=lambda m: m["step"])]
    assert logged == pytest.approx([float(line.split(",")[column]) for line in epochs[1:]], abs=1e-6)
    assert len(logged) == 2 and all(4 * v == pytest.approx(round(4 * v), abs=1e-6) for v in logged)
    assert {m["key"] for m in data["metrics"]} >= {"train/loss", "val/acc", "val/loss", "test/acc", "test/f1"}
    params = {p["key"]: p["value"] for p in data["params"]}
    assert (
        params["model/head/hidden_size"] == "16" and params["model/head"] == "pipeline.models.heads.GRUHead"
    )
    assert params["name"] == "gesture_gru" and params["data/features"] == str(trained_project / "features")
    tags = {t["key"]: t["value"] for t in data["tags"]}
    features = json.loads((trained_project / "features" / "meta.json").read_text())
    assert tags["data.features.cache_key"] == features["cache_key"] == tags["feature_cache_key"]
    assert tags["data.features.content_hash"] == features["content_hash"]
    assert tags["data.frames.content_hash"] == features["frames_hash"]
    assert re.search(r"(^|, )fps=10(\.0)?(, |$)", tags["data.frames.params"])
    assert re.search(r"(^|, )codec=jpeg(, |$)", tags["data.frames.params"])
    assert tags["config.md5"] and tags["registered_model"] == "models:/gesture_gru/1"

    listed = {f["path"] for f in get(f"{api}/artifacts/list", run_id=info["run_id"])["files"]}
    assert {"config.yaml", "test"} <= listed
    config = get(f"{ui_server}/get-artifact", path="config.yaml", run_uuid=info["run_id"])
    assert "name: gesture_gru" in config  # served from the store's artifact folder

    version = get(f"{api}/model-versions/get", name="gesture_gru", version="1")["model_version"]
    version_tags = {t["key"]: t["value"] for t in version["tags"]}
    metrics = json.loads((trained_project / "metrics" / "gesture_gru.json").read_text())
    assert version["run_id"] == info["run_id"] and float(version_tags["test/acc"]) == pytest.approx(
        metrics["test/acc"]
    )
    # The version is the run's logged (pyfunc) model, which the run page lists under "Logged models".
    assert version["source"].startswith("models:/m-")

    index = get(f"{ui_server}/")
    assert "<title>MLflow</title>" in index and 'id="root"' in index


class Explode(Callback):
    """Raises ``error`` at the fifth training step (in the second epoch: 3 steps per epoch)."""

    def __init__(self, error: str = "RuntimeError"):
        self.error = {"RuntimeError": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt}[error]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 4:
            raise self.error("boom at step 4")


@pytest.fixture
def fit_args(tmp_path, monkeypatch) -> list[str]:
    from test_training import feature_store

    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    features = feature_store(tmp_path / "features")
    return [
        "fit",
        "-c",
        str(ROOT / "tests" / "configs" / "gru_features.yaml"),
        "--data.init_args.features",
        str(features),
        "--trainer.max_epochs",
        "3",
    ]


@pytest.mark.parametrize("error", ["RuntimeError", "KeyboardInterrupt"])
def test_crashed_run_is_marked_failed(fit_args, tmp_path, error):
    import mlflow

    from pipeline.cli import main

    callback = json.dumps({"class_path": "test_tracking.Explode", "init_args": {"error": error}})
    with pytest.raises((RuntimeError, SystemExit)):  # Lightning turns Ctrl-C into exit status 1
        main([*fit_args, "--trainer.callbacks+", callback])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("gesture_gru").experiment_id])
    assert run.info.status == "FAILED"
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 1  # it died in the second epoch
    assert not client.search_registered_models()  # nothing registered from a failed run


def test_unreachable_tracking_server_stops_before_training(fit_args, tmp_path, monkeypatch):
    from pipeline.cli import main

    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(SystemExit) as err:
        main(fit_args)
    assert f"MLflow tracking server {uri} does not answer" in str(err.value) and "MLFLOW_TRACKING_URI" in str(
        err.value
    )
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlflow.db").exists()
    assert time.monotonic() - started < 120  # not MLflow's minutes of retries


def test_lineage_tags_read_dvc_lock_only_inside_a_stage(tmp_path, monkeypatch):
    import yaml
    from test_training import feature_store

    from pipeline.tracking.inputs import lineage_tags

    monkeypatch.chdir(tmp_path)
    feature_store(tmp_path / "data/features/gestures")
    meta = json.loads((tmp_path / "data/features/gestures/meta.json").read_text())
    (tmp_path / "data/frames/gestures").mkdir(parents=True)
    (tmp_path / "data/frames/gestures/meta.json").write_text(
        json.dumps({"content_hash": "f" * 64, "params": {"fps": 10.0}})
    )
    meta.update(
        frames="data/frames/gestures", frames_hash="e" * 64
    )  # the frames the features were computed from
    (tmp_path / "data/features/gestures/meta.json").write_text(json.dumps(meta))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/x.yaml").write_text("name: x\n")
    lock = {
        "schema": "2.0",
        "stages": {
            "extract@gestures": {"outs": [{"path": "data/frames/gestures", "hash": "md5", "md5": "aaa.dir"}]},
            "features@gestures": {
                "outs": [{"path": "data/features/gestures", "hash": "md5", "md5": "bbb.dir"}]
            },
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))

    monkeypatch.delenv("DVC_STAGE", raising=False)
    outside = lineage_tags("data/features/gestures", None, ["configs/x.yaml"])
    assert outside["data.features.cache_key"] == "test" and outside["data.frames"] == "data/frames/gestures"
    assert outside["data.frames.content_hash"] == "e" * 64 and outside["data.frames.params"] == "fps=10.0"
    assert (
        outside["config"] == "configs/x.yaml" and outside["config.md5"] == "5cb9b2eb121adc70727209d5fda6fe4e"
    )
    assert not any(k.startswith("dvc.lock") for k in outside)  # a lock of some earlier repro proves nothing

    monkeypatch.setenv("DVC_STAGE", "train@x")
    inside = lineage_tags(str(tmp_path / "data/features/gestures"), None, ["configs/x.yaml"])
    assert inside["dvc.lock.features"] == "bbb.dir (features@gestures)"
    assert inside["dvc.lock.frames"] == "aaa.dir (extract@gestures)"


def test_git_dirty_ignores_what_dvc_repro_rewrites(tmp_path, monkeypatch):
    from pipeline.tracking.runs import run_tags

    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

    for name in ("metrics/x.json", "configs/x.yaml", "params.yaml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("a: 1\n")
    lock = "schema: '2.0'\nstages:\n  train@x:\n    outs:\n    - path: metrics/x.json\n      hash: md5\n      md5: {}\n"
    (tmp_path / "dvc.lock").write_text(lock.format("a" * 32))
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    monkeypatch.setenv("VPIPE_ROOT", str(tmp_path))
    assert run_tags()["git_dirty"] == "False"
    (tmp_path / "dvc.lock").write_text(
        lock.format("b" * 32)
    )  # what a repro of this commit writes as its stages finish
    (tmp_path / "metrics/x.json").write_text("a: 2\n")
    assert run_tags()["git_dirty"] == "False"
    (tmp_path / "params.yaml").write_text("a: 2\n")  # `dvc exp run -S` in the workspace, or a hand edit
    assert run_tags()["git_dirty"] == "True"


@pytest.mark.slow
def test_sigterm_ends_the_run_failed_with_a_nonzero_status(tmp_path):
    import mlflow
    from test_training import feature_args, feature_store

    features = feature_store(tmp_path / "features")
    last = tmp_path / "models" / "gesture_gru" / "last.ckpt"
    fit = feature_args(ROOT / "tests" / "configs" / "gru_features.yaml", features)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "fit", *fit, "--trainer.max_epochs", "500"],
        cwd=tmp_path,
        env={**os.environ, "VPIPE_ROOT": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # as a scheduler (or `kill`) stops a job
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, stderr[-2000:]  # DVC and schedulers must see the stage failed
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("gesture_gru").experiment_id])
    assert run.info.status == "FAILED"
    assert not (tmp_path / "metrics" / "gesture_gru.json").exists()
