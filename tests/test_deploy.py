"""Deployments on a real Prefect server: schedules, triggers, and the event chain running for real.

A ``prefect server start`` on a free localhost port (temporary PREFECT_HOME) and a
``shoprank deploy`` subprocess that creates and serves the deployments. The test then announces
version 2 with ``shoprank.model.evaluated``: the ``promote`` deployment promotes it, its
``shoprank.model.promoted`` event starts ``recommend``, which writes the champion's lists.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.release.registry import DECAYED, DECISION_TAG, EVALUATED, alias_version
from tests.test_registry import register_version
from tests.test_serving import BIN, free_port, post, start_group, stop_group, wait_http

NAMES = {"train/train", "promote/promote", "recommend/recommend", "monitor/monitor"}


def start_prefect_server(folder: Path, wait: bool = True) -> tuple[object, str, Path]:
    """``prefect server start`` on a free port with its own PREFECT_HOME.

    Returns the process, the API URL and the log; ``wait=False`` returns before it is healthy.
    """
    port = free_port()
    log = folder / "prefect-server.log"
    env = {"PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED":
           "false", "PREFECT_API_URL": "", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    proc = start_group([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                        "--port", str(port)], log, env)
    if wait:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, log)
    return proc, f"http://127.0.0.1:{port}/api", log


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    proc, api, _ = start_prefect_server(tmp_path_factory.mktemp("prefect"))
    try:
        yield api
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_shop_dir) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("deploy-store")
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    first = register_version(root, demo_shop_dir, uri, "popularity")
    MlflowClient(uri).set_registered_model_alias("shoprank", "champion", first)
    register_version(root, demo_shop_dir, uri, "buy_again")
    return uri, root


@pytest.fixture(scope="module")
def deployed(prefect_api, store):
    uri, root = store
    log = root / "deploy.log"
    env = {"PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": uri,
           "PREFECT_HOME": str(root / "client-home"), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    proc = start_group([str(BIN / "shoprank"), "deploy", "--cron", "30 2 * * *", "--timezone",
                        "Europe/Berlin", "--out", str(root / "recs.parquet"), "--output-dir",
                        str(root / "outputs")], log, env, cwd=root)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            _wait_for_deployments(proc, log)
            yield proc, log
    finally:
        stop_group(proc)


def _wait_for_deployments(proc, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"shoprank deploy exited:\n{log.read_text()[-4000:]}")
            found = {f"{client.read_flow(d.flow_id).name}/{d.name}"
                     for d in client.read_deployments()}
            if found >= NAMES and len(client.read_automations()) >= 3:
                return
            time.sleep(1)
    pytest.fail(f"deployments did not appear:\n{log.read_text()[-4000:]}")


def test_deploy_creates_schedule_and_triggers(deployed):
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(
                any_=["train", "promote", "recommend", "monitor"])))
        by_name = {d.name: d for d in deployments}
        schedule = by_name["train"].schedules[0].schedule
        assert (schedule.cron, schedule.timezone) == ("30 2 * * *", "Europe/Berlin")
        watch = by_name["monitor"].schedules[0].schedule
        assert (watch.cron, watch.timezone) == ("15 * * * *", "Europe/Berlin")
        assert by_name["train"].parameters["config"]["registry"]["promote"] is False
        automations = {a.name: a for a in client.read_automations()}
    triggers = {name: json.loads(a.trigger.model_dump_json()) for name, a in automations.items()}
    expects = {tuple(t["expect"])[0]: t for t in triggers.values()}
    assert set(expects) == {"shoprank.model.evaluated", "shoprank.model.promoted",
                            "shoprank.model.decayed"}
    for trigger in expects.values():
        assert trigger["match"]["prefect.resource.id"] == "mlflow.model-version.shoprank.*"


def _flow_runs(client, flow_name: str) -> list:
    return [r for r in client.read_flow_runs() if client.read_flow(r.flow_id).name == flow_name]


def _wait_for_run(flow_name: str, log: Path, timeout: float = 150.0):
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = _flow_runs(client, flow_name)
            done = [r for r in runs if r.state and r.state.is_final()]
            if done:
                return done[0]
            time.sleep(1)
    pytest.fail(f"no finished {flow_name} run within {timeout:.0f} s:\n"
                f"{log.read_text()[-6000:]}")


def test_evaluation_event_promotes_and_then_recommends(deployed, prefect_api, store):
    uri, root = store
    _, log = deployed
    event = {"id": str(uuid.uuid4()), "occurred": dt.datetime.now(dt.UTC).isoformat(),
             "event": EVALUATED, "payload": {"version": "2"},
             "resource": {"prefect.resource.id": "mlflow.model-version.shoprank.2",
                          "shoprank.model.name": "shoprank", "shoprank.model.version": "2"}}
    status, answer = post(f"{prefect_api}/events", json.dumps([event]).encode())
    assert status == 204, answer

    promoted = _wait_for_run("promote", log)
    assert promoted.state.is_completed(), promoted.state
    assert promoted.parameters["version"] == "2"
    client = MlflowClient(uri)
    tags = client.get_model_version("shoprank", "2").tags
    assert tags[DECISION_TAG] == "promoted", tags
    assert alias_version(client, "shoprank", "champion") == "2"

    recommended = _wait_for_run("recommend", log)
    assert recommended.state.is_completed(), recommended.state
    recs = pl.read_parquet(root / "recs.parquet")
    assert set(recs["model_version"]) == {"2"}
    assert recs["user_id"].n_unique() * 10 == recs.height
    meta = pq.read_schema(root / "recs.parquet").metadata
    assert meta[b"shoprank.model_version"] == b"2"


def test_a_decayed_champion_is_retrained(deployed, prefect_api):
    """``shoprank.model.decayed`` (sent by ``monitor``) runs the ``train`` deployment."""
    _, log = deployed
    with get_client(sync_client=True) as client:
        before = {r.id for r in _flow_runs(client, "train")}
    event = {"id": str(uuid.uuid4()), "occurred": dt.datetime.now(dt.UTC).isoformat(),
             "event": DECAYED, "payload": {"version": "2", "decayed": True},
             "resource": {"prefect.resource.id": "mlflow.model-version.shoprank.2",
                          "shoprank.model.name": "shoprank", "shoprank.model.version": "2"}}
    status, answer = post(f"{prefect_api}/events", json.dumps([event]).encode())
    assert status == 204, answer
    deadline = time.monotonic() + 90
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            new = [r for r in _flow_runs(client, "train") if r.id not in before]
            if new:
                deployment = client.read_deployment(new[0].deployment_id)
                assert deployment.name == "train"
                return
            time.sleep(1)
    pytest.fail(f"no train run after the decayed event:\n{log.read_text()[-4000:]}")
