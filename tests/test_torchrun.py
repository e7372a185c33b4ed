"""Jobs launched as teams launch them: `torchrun` with two processes (gloo on CPU) on a brand-new MLflow store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import feature_store

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_fit_on_a_fresh_store_creates_it_once(tmp_path):
    """Every rank used to create the new SQLite store's schema at once (duplicate-column errors); now rank
    zero alone opens the store, and the job leaves one FINISHED run with its test metrics."""
    features = feature_store(tmp_path / "features")
    root = tmp_path / "project"
    root.mkdir()
    env = {**os.environ, "VPIPE_ROOT": str(root), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "-m", "pipeline", "fit", "-c", str(ROOT / "tests/configs/gru_features.yaml"),
         "-c", str(ROOT / "configs/trainer/ddp.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--data.init_args.features", str(features), "--data.init_args.batch_size", "2"],
        env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("gesture_gru").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    metrics = json.loads((root / "metrics" / "gesture_gru.json").read_text())
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert [str(v.version) for v in client.search_model_versions("name = 'gesture_gru'")] == ["1"]
