"""`vpipe ui`: MLflow's server without the assistant (its API refuses a local client), and a port
already taken named in one line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import free_port
from pipeline.mlflow_app import WithoutAssistant


def request(url: str, payload: dict | None = None) -> tuple[int, str]:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def ui(tmp_path):
    """`vpipe ui` on a free port over a fresh project store; always stopped (its process group)."""
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "ui", "--port", str(port)],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**env, "VPIPE_ROOT": str(tmp_path)},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if request(f"{url}/health")[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"vpipe ui did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url, port
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)
        log.close()


def test_ui_refuses_the_assistant_to_a_local_client_and_a_second_ui_on_its_port(ui):
    url, port = ui
    assistant = f"{url}/ajax-api/3.0/mlflow/assistant"
    for path, payload in (
        ("/config", None),  # what the UI asks first: refused, so its panel finds no provider
        ("/providers", None),
        ("/message", {"message": "run ls"}),
        ("/config", {"providers": {"claude_code": {"selected": True}}}),
    ):
        status, body = request(f"{assistant}{path}", payload)
        assert status == 403 and "assistant is off" in body, (path, status, body)
    # The rest of the server answers as MLflow's does.
    status, body = request(f"{url}/api/2.0/mlflow/experiments/search", {"max_results": 5})
    assert status == 200 and "experiments" in json.loads(body)

    second = subprocess.run(
        [sys.executable, "-m", "pipeline", "ui", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode != 0 and second.stdout == ""
    assert second.stderr.strip().splitlines() == [
        f"vpipe ui: port {port} on 127.0.0.1 is taken (Address already in use): another vpipe ui? Choose one with --port"
    ]


def test_without_assistant_passes_everything_else():
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    sent = []

    async def send(message):
        sent.append(message)

    app = WithoutAssistant(inner)
    asyncio.run(app({"type": "http", "path": "/ajax-api/3.0/mlflow/assistant/message"}, None, send))
    asyncio.run(app({"type": "http", "path": "/api/2.0/mlflow/runs/search"}, None, send))
    assert sent[0]["status"] == 403 and sent[-1]["status"] == 200 and seen == ["/api/2.0/mlflow/runs/search"]
