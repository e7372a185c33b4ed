"""A team's tracking server as the README sets it up: PostgreSQL as the backend store, artifacts served
by the server, MLflow's basic-auth app in front (`--app-name vpipe-basic-auth`: without the assistant). A real PostgreSQL (the Debian package, on loopback, in
a temporary data directory) and a real `mlflow server` are started and stopped here."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from test_training import feature_args

from conftest import free_port, torchrun_command

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "trainer-secret-4821"  # noqa: S105 - a throw-away credential of this test's server


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin may link pg_ctl alone
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _succeeds(cmd: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run CMD to the end (its output captured as text); it must exit 0."""
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server on 127.0.0.1 in a temporary data directory; yields its URI."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    # Outside pytest's own temporary folders, which only their owner may enter.
    base = Path(tempfile.mkdtemp(prefix="vpipe-pg-"))
    os.chmod(base, 0o755)
    data, port = base / "data", free_port()
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "vpipe", "--auth", "trust"]),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        _as_postgres(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-l",
                str(data / "log"),
                "-o",
                f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            _as_postgres(
                [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "vpipe", "mlflow"]
            ),
            check=True,
            capture_output=True,
        )
        yield f"postgresql://vpipe@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def server(postgres, tmp_path):
    """`mlflow server` with the basic-auth app over that database; yields (url, admin credentials)."""
    port = free_port()
    auth = tmp_path / "auth.ini"
    auth.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        "admin_username = admin\nadmin_password = admin-secret-7733\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(auth),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            postgres,
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--app-name",
            "vpipe-basic-auth",  # MLflow's basic-auth app without the assistant (pipeline/mlflow_app.py)
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url, ("admin", "admin-secret-7733")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_team_server_on_postgres_with_logins(server, tmp_path, trained_project, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    url, (admin, admin_password) = server
    # No credentials: refused, and nothing is written.
    assert (
        requests.get(
            f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=10
        ).status_code
        == 401
    )
    assert (
        requests.post(
            f"{url}/api/2.0/mlflow/experiments/create", json={"name": "intruder"}, timeout=10
        ).status_code
        == 401
    )

    # The assistant's API refuses even the admin on the server's own host (MLflow would serve it there).
    refused = requests.get(
        f"{url}/ajax-api/3.0/mlflow/assistant/config", auth=(admin, admin_password), timeout=10
    )
    assert refused.status_code == 403 and "assistant is off" in refused.text

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
    users = AuthServiceClient(url)
    users.create_user("trainer", PASSWORD)
    users.create_user("viewer", "viewer-secret-1290")
    admin_client = mlflow.MlflowClient(url)
    assert admin_client.get_experiment_by_name("intruder") is None

    # Training with 2 processes through the server, as the trainer.
    root = tmp_path / "project"
    root.mkdir()
    env = {
        **os.environ,
        "VPIPE_ROOT": str(root),
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": "trainer",
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    fit = feature_args(ROOT / "tests/configs/gru_features.yaml", trained_project / "features")
    ddp = ["-c", str(ROOT / "configs/trainer/ddp.yaml"), "--trainer.devices", "2"]
    done = _succeeds(torchrun_command(["fit", *fit, *ddp]), env, root, timeout=600)
    assert PASSWORD not in done.stdout + done.stderr

    [run] = admin_client.search_runs([admin_client.get_experiment_by_name("gesture_gru").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.params and "test/acc" in run.data.metrics
    assert admin_client.list_artifacts(run.info.run_id)  # uploaded through the server
    [version] = admin_client.search_model_versions("name = 'gesture_gru'")
    logged = {**run.data.params, **run.data.tags}
    assert not any(PASSWORD in str(v) for v in logged.values())  # credentials never in params or tags
    assert not list(root.glob("mlflow.db*")) and not (root / "mlruns").exists()  # nothing tracked locally

    # `vpipe classify --model models:/NAME/latest` loads the version from the server.
    video = trained_project / "videos" / "right5.mp4"
    done = _succeeds(
        [
            sys.executable,
            "-m",
            "pipeline",
            "classify",
            str(video),
            "--model",
            "models:/gesture_gru/latest",
            "--json",
        ],
        env,
        root,
        timeout=300,
    )
    assert '"label"' in done.stdout and str(video) in done.stdout

    # A read-only user reads, but cannot create runs.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "viewer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "viewer-secret-1290")
    viewer = mlflow.MlflowClient(url)
    assert viewer.get_run(run.info.run_id).info.status == "FINISHED"
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied|403"):
        viewer.create_run(run.info.experiment_id)
    assert len(admin_client.search_runs([run.info.experiment_id])) == 1
    assert version.version == "1"
