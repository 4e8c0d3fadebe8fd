"""``shoprank serve``: the registered model over HTTP, on localhost.

It resolves the model in the same MLflow store that training writes to (a clear message when the
model or alias does not exist), fetches its artifacts once through MLflow (a local store is read in
place), then replaces itself with the server, so stopping ``shoprank serve`` stops the server:

* by default uvicorn running :mod:`flows.server` with ``--workers N`` (one per CPU core), which
  answers with the pyfunc's serving core and MLflow's JSON wire format, without the pandas
  conversions of MLflow's scoring server;
* with ``--mlflow-server``, ``mlflow models serve -m MODEL --env-manager local --workers N``.

Both answer ``POST /invocations`` with
``{"dataframe_records": [{"user_id": "u1", "k": 10, "recent_items": [...], "exclude": [...]}]}``
by ``{"predictions": [{"user_id", "item_id", "score", "rank"}, ...]}``; ``GET /ping`` is the
health check.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from flows.server import MODEL_ENV
from models.errors import ConfigError
from tasks import tracking
from tasks.release.registry import resolve_model

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


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket, kept open across ``exec``, with ``TCP_NODELAY`` set.

    Worker processes accept on it and their connections inherit ``TCP_NODELAY``: without it a
    response's head and body, written separately, wait for the client's delayed ACK (about 40 ms
    a request with more than one worker).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}. Choose another "
                          "--port (or stop what is using it).") from err
    sock.set_inheritable(True)
    return sock


def app_command(sock: socket.socket, workers: int) -> list[str]:
    """The uvicorn command line of :mod:`flows.server` on ``sock``, run with this interpreter."""
    return [sys.executable, "-m", "uvicorn", "--factory", "flows.server:create_app",
            "--fd", str(sock.fileno()), "--workers", str(workers), "--no-access-log"]


def local_model(model_uri: str, tracking_uri: str) -> str:
    """A local folder holding the model: the store's own folder when it is local."""
    client = MlflowClient(tracking_uri)
    if model_uri.startswith("models:/"):
        name, version = resolve_model(model_uri, client)
        model_uri = client.get_model_version_download_uri(name, version)
    return mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=tracking_uri)


def serve(model_uri: str = "models:/shoprank@champion", host: str = "127.0.0.1",
          port: int = 5001, tracking_uri: str | None = None, workers: int | None = None,
          timeout: int = 60, mlflow_server: bool = False) -> None:
    """Check that ``model_uri`` resolves, then run the server in this process.

    ``tracking_uri`` defaults to MLFLOW_TRACKING_URI, else ``./mlruns``; ``workers`` to one
    per CPU core; ``mlflow_server`` runs MLflow's own scoring server instead.
    """
    uri = tracking_uri or tracking.tracking_uri()
    workers = workers or default_workers()
    if model_uri.startswith("models:/"):
        name, version = resolve_model(model_uri, MlflowClient(uri))
        logger.info("serving %s version %s from %s on http://%s:%d/invocations with %d "
                    "worker(s)", name, version, uri, host, port, workers)
    env = serve_environment(uri)
    if mlflow_server:
        command = serve_command(model_uri, host, port, workers, timeout)
    else:
        env[MODEL_ENV] = local_model(model_uri, uri)
        sock = listening_socket(host, port)  # kept open (referenced) until the exec
        command = app_command(sock, workers)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)
