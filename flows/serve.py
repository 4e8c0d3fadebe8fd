"""``shoprank serve``: the registered model behind MLflow's scoring server, on localhost.

A thin wrapper over ``mlflow models serve -m models:/shoprank@champion --env-manager local
--workers N`` (N: one per CPU core unless given): it resolves the model in the same MLflow store
that training writes to, fails with a clear message when the model or alias does not exist, then
replaces itself with the MLflow server (so stopping ``shoprank serve`` stops the server).
``POST /invocations`` answers
``{"dataframe_records": [{"user_id": "u1", "k": 10, "recent_items": [...], "exclude": [...]}]}``
with ``{"predictions": [{"user_id", "item_id", "score", "rank"}, ...]}``; ``GET /ping`` is the
health check.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mlflow import MlflowClient

from tasks import tracking
from tasks.registry import resolve_model

logger = logging.getLogger(__name__)


def serve_command(model_uri: str, host: str, port: int, workers: int = 1, timeout: int = 60
                  ) -> list[str]:
    """The ``mlflow models serve`` command line, run with this interpreter."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", host, "--port", str(port),
            "--workers", str(workers), "--timeout", str(timeout)]


def serve_environment(tracking_uri: str) -> dict[str, str]:
    """The server's environment: the tracking URI, this interpreter's scripts on PATH."""
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
            "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")]),
            "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")}


def default_workers() -> int:
    """One server worker per CPU core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def serve(model_uri: str = "models:/shoprank@champion", host: str = "127.0.0.1",
          port: int = 5001, tracking_uri: str | None = None, workers: int | None = None,
          timeout: int = 60) -> None:
    """Check that ``model_uri`` resolves, then run the MLflow scoring server in this process.

    ``tracking_uri`` defaults to MLFLOW_TRACKING_URI, else ``./mlruns``; ``workers`` to one
    per CPU core.
    """
    uri = tracking_uri or tracking.tracking_uri()
    workers = workers or default_workers()
    if model_uri.startswith("models:/"):
        name, version = resolve_model(model_uri, MlflowClient(uri))
        logger.info("serving %s version %s from %s on http://%s:%d/invocations with %d "
                    "worker(s)", name, version, uri, host, port, workers)
    command = serve_command(model_uri, host, port, workers, timeout)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, serve_environment(uri))
