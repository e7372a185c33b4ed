"""A stage's wall time split into phases: the line a `vpipe` process appends to $VPIPE_TIMINGS, and
bench/repro.py's rows, whose columns add up to the stage's seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tracking import timings

ROOT = Path(__file__).resolve().parents[1]


def test_phases_are_exclusive_and_add_up_to_the_wall_time(tmp_path):
    clock = timings.Recorder(str(tmp_path / "t.jsonl"), started=time.time() - 0.05)
    clock.switch("work")
    time.sleep(0.02)
    previous = clock.switch("mlflow")  # what timings.phase does, nested inside work
    time.sleep(0.03)
    clock.switch(previous)
    time.sleep(0.01)
    clock.switch("other")
    record = clock.record()
    phases = record["phases"]
    assert set(phases) == set(timings.PHASES)
    assert phases["imports"] >= 0.05 and phases["mlflow"] >= 0.03 and 0.03 <= phases["work"] < 0.05
    assert sum(phases.values()) == pytest.approx(record["wall_s"], abs=0.005)


def test_nothing_is_recorded_without_the_variable(monkeypatch):
    monkeypatch.delenv(timings.ENV, raising=False)
    monkeypatch.setattr(timings, "_recorder", None)
    assert timings.start() is None
    with timings.phase("work"):  # a no-op
        pass


@pytest.mark.slow
def test_a_fit_appends_its_phases(tmp_path):
    """`vpipe fit` under a DVC stage: one line, named after the stage, every phase present and spent."""
    from test_training import feature_args, feature_store

    features = feature_store(tmp_path / "features")
    fit = feature_args(ROOT / "tests" / "configs" / "gru_features.yaml", features)
    out = tmp_path / "timings.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"VPIPE_ROOT": str(tmp_path), "VPIPE_TIMINGS": str(out), "DVC_STAGE": "train@gesture_gru"}
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "pipeline", "fit", *fit, "--trainer.max_epochs", "1"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    elapsed = time.time() - started
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["stage"] == "train@gesture_gru" and record["rank"] == 0
    phases = record["phases"]
    assert sum(phases.values()) == pytest.approx(record["wall_s"], abs=0.01)
    assert 0 < record["wall_s"] <= elapsed
    assert all(phases[p] > 0 for p in ("imports", "config", "mlflow", "work", "logging")), phases
    assert phases["imports"] > phases["mlflow"]  # torch and Lightning, loaded before anything else
    assert (tmp_path / "metrics" / "gesture_gru.json").is_file()  # the fit itself is what it was


def _repro():
    spec = importlib.util.spec_from_file_location("bench_repro", ROOT / "bench" / "repro.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_repro_rows_add_up_to_the_stage_seconds(tmp_path):
    repro = _repro()
    phases = {"imports": 3.0, "config": 0.2, "mlflow": 0.1, "work": 1.5, "logging": 0.5, "other": 0.2}
    lines = [
        {"stage": "train@a", "rank": 0, "phases": phases},
        {"stage": "train@a", "rank": 1, "phases": phases},  # a DDP rank beside rank zero: not added
        {"stage": "features@a", "rank": 0, "phases": {**phases, "work": 9.0}},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"torn')
    records = repro.read_timings(path)
    assert len(records) == 3
    split = repro.split_stage("train@a", 6.0, records)
    assert split == {"imports": 3.0, "config": 0.2, "mlflow": 0.1, "work": 1.5, "logging": 0.5, "other": 0.7}
    assert repro.split_stage("synth@a", 2.5, records) == {**dict.fromkeys(repro.PHASES, 0.0), "other": 2.5}
    rows = [{"stage": "train@a", "seconds": 6.0, "phases": split, "limit_s": 60, "within": True}]
    text = repro.table(rows, 6.0)
    assert "| train@a | 6.0 | 3.0 | 0.2 | 0.1 | 1.5 | 0.5 | 0.7 | 60 | True |" in text
