"""Screenshots of the MLflow UI for the README, taken of the real UI (`vpipe ui`) in headless Chromium.

    python3 -m venv /tmp/shot && /tmp/shot/bin/pip install selenium     # once; Debian: apt-get install chromium chromium-driver
    /tmp/shot/bin/python docs/screenshot.py [PROJECT_ROOT] [--experiment gesture_gru]

Starts ``vpipe ui`` (the project's ``.venv``) on a free port over PROJECT_ROOT's store (default: this
repository), opens the UI in the "Model training" view with the assistant panel closed and the
runs table showing test metrics, the swept parameter and the DVC experiment tag, and writes
``docs/mlflow-ui.png`` (runs of one experiment), ``docs/mlflow-charts.png`` (their curves),
``docs/mlflow-run.png`` (the best run's page, with its datasets and logged model),
``docs/mlflow-models.png`` (the registered versions), ``docs/mlflow-system-metrics.png`` (the run's
system metrics) and ``docs/mlflow-logged-model.png`` (its pyfunc model). The server is stopped whatever happens. Not part of ``make test`` (needs Chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

HERE = Path(__file__).resolve().parents[1]
COLUMNS = ["metrics.`test/acc`", "metrics.`test/f1`", "metrics.`test/loss`", "params.`model/head/hidden_size`",
           "tags.`dvc_exp_name`", "tags.`registered_model`"]


def api(url: str, path: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default=str(HERE))
    parser.add_argument("--experiment", default="gesture_gru")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(HERE / ".venv/bin/python"), "-m", "pipeline", "ui", "--port", str(port)],
                              env={**os.environ, "VPIPE_ROOT": str(Path(args.root).resolve())}, start_new_session=True)
    browser = None
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("vpipe ui exited") from None
                time.sleep(0.5)
        experiment = api(url, f"experiments/get-by-name?experiment_name={args.experiment}")["experiment"]["experiment_id"]
        best = api(url, "runs/search", {"experiment_ids": [experiment], "order_by": ["metrics.`test/acc` DESC"],
                                        "max_results": 1})["runs"][0]["info"]

        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1000"):
            options.add_argument(flag)
        options.binary_location = args.chromium
        browser = webdriver.Chrome(service=Service(args.chromedriver), options=options)
        browser.get(f"{url}/health")  # same origin: set the UI's stored preferences before it loads
        state = {"searchFilter": "", "orderByKey": "metrics.`test/acc`", "orderByAsc": False, "startTime": "ALL",
                 "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs", "selectedColumns": COLUMNS}
        for key, value in {"mlflow.workflowType_v1": "machine_learning", "mlflow.assistant.panelOpen_v1": False,
                           "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
                           f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment}"]-ReactComponentState': state}.items():
            browser.execute_script("localStorage.setItem(arguments[0], arguments[1])", key, json.dumps(value))

        def shoot(name: str, path: str, expect: str, charts: str = "") -> None:
            browser.get(f"{url}/#/{path}")
            # The React app fetches and renders after load: wait for what the page must show, then for charts to draw.
            deadline = time.monotonic() + 90
            while expect not in browser.execute_script("return document.body.innerText") and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(4)
            if charts:  # keep the charts whose name matches, e.g. the per-epoch validation curves
                browser.find_element(By.XPATH, "//input[@placeholder='Search metric charts']").send_keys(charts)
                time.sleep(3)
            browser.save_screenshot(str(HERE / "docs" / name))
            print(f"docs/{name} <- {url}/#/{path}")

        shoot("mlflow-ui.png", f"experiments/{experiment}/runs", expect=best["run_name"])
        shoot("mlflow-charts.png", f"experiments/{experiment}/runs?compareRunsMode=CHART", expect="val/acc", charts="val/")
        shoot("mlflow-run.png", f"experiments/{experiment}/runs/{best['run_id']}", expect="dvc_stage")
        shoot("mlflow-models.png", f"models/{args.experiment}", expect="Version 1")
        shoot("mlflow-system-metrics.png", f"experiments/{experiment}/runs/{best['run_id']}/system-metrics",
              expect="cpu_utilization")
        run = api(url, f"runs/get?run_id={best['run_id']}")["run"]
        registered = {t["key"]: t["value"] for t in run["data"]["tags"]}["registered_model"]  # models:/NAME/VERSION
        version = api(url, f"model-versions/get?name={args.experiment}&version={registered.rsplit('/', 1)[1]}")["model_version"]
        model_id = version["source"].removeprefix("models:/")  # the run's logged pyfunc model
        shoot("mlflow-logged-model.png", f"experiments/{experiment}/models/{model_id}", expect=model_id[:8])
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
