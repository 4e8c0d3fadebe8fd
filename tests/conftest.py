"""Shared fixtures: real data folders, an isolated Prefect server and MLflow store."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# Nothing a test does may touch the user's Prefect home.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="shoprank-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)


SYS_PATH = list(sys.path)


@pytest.fixture(autouse=True)
def _restore_sys_path():
    """Put sys.path back as it was when the session began, after every test.

    Loading a pyfunc prepends its code folder to sys.path (in tests and in module fixtures);
    later tests, and the Dask worker processes they spawn (which inherit sys.path), must import
    the project, not that copy.
    """
    yield
    sys.path[:] = SYS_PATH


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public dataset samples that sits beside the project."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_server():
    """A real, temporary Prefect API for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A real MLflow SQLite store in a temporary folder, set as the tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def demo_shop_dir(tmp_path_factory) -> Path:
    """A small built-in demo shop written once for the session."""
    from tasks.data.demo_data import write_demo_shop

    folder = tmp_path_factory.mktemp("demo-shop")
    write_demo_shop(folder, n_events=20_000, seed=1)
    return folder


@pytest.fixture
def prefect_api(tmp_path, monkeypatch):
    """A real Prefect server (``prefect server start``) whose repossessor checks leases every 5 s.

    Its API URL; the registry lock of a process killed while holding it is freed a lease later.
    """
    from tests.test_deploy import start_prefect_server
    from tests.test_serving import stop_group

    monkeypatch.setenv("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "5")
    (tmp_path / "server").mkdir()
    proc, api, _ = start_prefect_server(tmp_path / "server")
    try:
        yield api
    finally:
        stop_group(proc)
