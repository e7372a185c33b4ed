"""MLflow's server apps without the assistant: what ``vpipe ui`` (``mlflow server --app-name vpipe``) and
the team server (``--app-name vpipe-basic-auth``) run.

MLflow 3.17's UI has an "Assistant" panel whose API (``/ajax-api/3.0/mlflow/assistant/...``) drives a
coding-agent CLI or an LLM gateway and can run a ``Bash`` tool on the server's host. MLflow has no
setting that turns it off: ``MLFLOW_ENABLE_REMOTE_ASSISTANT`` (false by default) only keeps clients
from other hosts out, and every local client is served, which on a shared machine is every user of it.
These apps answer every assistant request with 403 before MLflow sees it, so the panel finds no
provider and stays closed. They are registered as ``mlflow.app`` entry points in pyproject.toml.
"""

from __future__ import annotations

import json

from pipeline import compat

ASSISTANT = "/ajax-api/3.0/mlflow/assistant"
REFUSAL = (
    "The MLflow assistant is off on this server (vpipe: it could run commands on the server's host, "
    "and the project runs offline)."
)


class WithoutAssistant:
    """An ASGI app: ``app`` with every request under the assistant's API refused (403)."""

    def __init__(self, app):
        self.app = app
        self.prefix = compat.mlflow_static_prefix().rstrip("/") + ASSISTANT

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and (
            path.startswith(self.prefix) or path.startswith(ASSISTANT)
        ):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = json.dumps({"error_code": "PERMISSION_DENIED", "message": REFUSAL}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _local():
    return WithoutAssistant(compat.mlflow_asgi_app())


def basic_auth_app():
    """MLflow's basic-auth app (``mlflow server --app-name basic-auth``) without the assistant."""
    from flask import Flask
    from mlflow.server.auth import create_app

    app = create_app()
    # Under gunicorn or waitress MLflow serves the Flask app, which has no assistant routes.
    return app if isinstance(app, Flask) else WithoutAssistant(app)


# Imported by uvicorn in the server's worker processes only (mlflow server --app-name vpipe).
def __getattr__(name: str):
    if name == "app":
        return _local()
    raise AttributeError(name)
