"""The team setup for real: PostgreSQL, Prefect and MLflow servers on it, process workers.

``shoprank team up`` in a temporary folder (free ports), ``shoprank deploy --pool``, two workers
on the work queue ``train``; the ``train`` deployment triggered twice at once. Then the training
outputs are deleted and two workers on the queue ``release`` run the promotions that the
evaluation events triggered (and the batch lists that the promotion events trigger). Checked:
both training runs in the tracking server, one consistent champion (the promotions took turns
under the Prefect server's lock), the gate read its split through the tracking server, and the
database password appears in no MLflow param or tag and no Prefect log.

Slow (about five minutes on two cores): run with ``pytest -m slow tests/test_team.py``; it needs
Debian's ``postgresql`` package (``make team-deps``).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.team import Team
from tasks.release.packaging import GATE_DATA_TAG, KIND_TAG
from tasks.release.registry import DECISION_TAG, alias_version
from tests.test_serving import BIN, free_port, start_group, stop_group

pytestmark = pytest.mark.slow

TINY = {"data": {"demo_events": 20000}, "ranker": {"n_trials": 2},
        "transformer": {"enabled": False}, "registry": {"latency_requests": 20}}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def team():
    """The three servers in a folder the ``postgres`` user can enter (not under pytest's 700)."""
    folder = Path(tempfile.mkdtemp(prefix="shoprank-team-"))
    servers = Team(folder, pg_port=free_port(), prefect_port=free_port(),
                   mlflow_port=free_port())
    try:
        servers.up()
        yield servers
    finally:
        servers.down()
        shutil.rmtree(folder, ignore_errors=True)


def _runs(api: str, deployment: str) -> list:
    """The flow runs of ``deployment`` (``flow/name``), but those its schedule creates."""
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment).id
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found])))
    return [run for run in runs if not run.auto_scheduled]


def _wait(api: str, deployment: str, count: int, logs: list[Path], timeout_s: float = 900.0
          ) -> list:
    """Wait until ``count`` runs of ``deployment`` ended; fail with the workers' logs if not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = _runs(api, deployment)
        ended = [run for run in runs if run.state_type.value in TERMINAL]
        if len(ended) >= count and len(ended) == len(runs):
            return ended
        time.sleep(3)
    pytest.fail(f"{deployment}: {count} runs did not end within {timeout_s:.0f} s\n"
                f"{_tails(logs)}")


def _tails(logs: list[Path]) -> str:
    """The end of each worker's log (what a failed run printed)."""
    return "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)


def test_two_workers_train_at_once_and_the_release_needs_no_training_disk(team, tmp_path):
    env = {**team.env(), "PREFECT_HOME": str(tmp_path / "client-home")}
    api, uri = env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"]
    config, outputs = tmp_path / "tiny.yaml", tmp_path / "outputs"
    config.write_text(yaml.safe_dump(TINY))
    deployed = subprocess.run(
        [str(BIN / "shoprank"), "deploy", "--pool", team.pool, "--config", str(config),
         "--output-dir", str(outputs), "--out", str(tmp_path / "lists.parquet")],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False)
    assert deployed.returncode == 0, deployed.stderr[-3000:]

    workers, logs = [], []

    def start_worker(queue: str) -> None:
        log = tmp_path / f"worker-{queue}-{len(logs)}.log"
        logs.append(log)
        workers.append(start_group(
            [str(BIN / "prefect"), "worker", "start", "--pool", team.pool, "--work-queue",
             queue, "--limit", "1", "--name", f"{queue}-{uuid.uuid4().hex[:6]}"], log, env,
            cwd=tmp_path))

    try:
        for _ in range(2):
            start_worker("train")
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            train_id = client.read_deployment_by_name("train/train").id
            for _ in range(2):
                client.create_flow_run_from_deployment(train_id)
        trained = _wait(api, "train/train", 2, logs)
        assert {run.state_type.value for run in trained} == {"COMPLETED"}, _tails(logs)

        shutil.rmtree(outputs)  # the training machine's disk is gone before any promotion
        for _ in range(2):
            start_worker("release")
        promoted = _wait(api, "promote/promote", 2, logs)
        assert {run.state_type.value for run in promoted} == {"COMPLETED"}, _tails(logs)
        _wait(api, "recommend/recommend", 1, logs)
    finally:
        for worker in workers:
            stop_group(worker)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    assert {r.info.status for r in parents} == {"FINISHED"}
    assert len(runs) > 2  # the ranker's trials, nested

    # one consistent champion: the two decisions took turns, the second saw the first's result
    evaluated = [v for v in client.search_model_versions("name='shoprank'")
                 if v.tags.get(KIND_TAG) == "evaluated"]
    assert len(evaluated) == 2
    assert all(v.tags[GATE_DATA_TAG].startswith("runs:/") for v in evaluated)
    first, second = sorted((v.tags for v in evaluated),
                           key=lambda tags: dt.datetime.fromisoformat(
                               tags["promotion.decided_at"]))
    assert (first[DECISION_TAG], first["promotion.champion_version"]) == ("promoted", "none")
    assert second["promotion.champion_version"] == first["promotion.released_version"]
    assert second[DECISION_TAG] in ("promoted", "rejected")
    champion = alias_version(client, "shoprank", "champion")
    assert champion == second["promotion.released_version"]
    assert client.get_model_version("shoprank", champion).tags[KIND_TAG] in (
        "challenger", "refresh")
    lists = pl.read_parquet(tmp_path / "lists.parquet")
    assert lists.height > 0

    # no password in any MLflow param or tag, nor in any Prefect log
    password = team.password()
    texts = [str(run.data.params) + str(run.data.tags) for run in runs]
    texts += [str(v.tags) for v in client.search_model_versions("name='shoprank'")]
    texts += [str(client.get_registered_model("shoprank").tags)]
    assert not [text for text in texts if password in text]
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as prefect:
        messages = [log.message for log in prefect.read_logs(limit=200)]
        offset = 200
        while len(messages) == offset:
            messages += [log.message for log in prefect.read_logs(limit=200, offset=offset)]
            offset += 200
    assert len(messages) > 50
    assert not [message for message in messages if password in message]
