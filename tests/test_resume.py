"""``train --resume``: a killed run continues from the stages it finished.

A ``shoprank train`` process on the session's Prefect test server is killed with SIGKILL once the
ranker has started; ``--resume`` reads load, validate, split, baselines and transformer from
Prefect's result storage (a PREFECT_HOME both processes share), runs the ranker, and finishes
the same MLflow run with the metrics of a clean run with the same seed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_API_URL

from flows.cli import run
from flows.config import config_digest, load_config
from tasks.resume import DIGEST_TAG, WORKDIR_TAG, source_stamp

pytestmark = pytest.mark.usefixtures("prefect_server")

TINY = {
    "transformer": {"n_trials": 2, "extra": {
        "space": {"hidden_size": [16], "n_blocks": [1], "n_heads": [1], "max_len": [10],
                  "n_negatives": [64], "epochs": [2, 3]},
        "model": {"device": "cpu", "num_threads": 1}}},
    "ranker": {"n_trials": 1, "extra": {"num_boost_round": 30, "extra_windows": 1}},
    "registry": {"enabled": False},
}
BASELINES_ONLY = {"ranker": {"enabled": False}, "transformer": {"enabled": False},
                  "registry": {"enabled": False}}
CACHED = ("load", "validate", "split", "baselines", "transformer")


def _train_argv(shop: Path, settings: dict[str, Any], tmp_path: Path) -> list[str]:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(settings))
    return ["train", "--data", str(shop), "--format", "parquet", "--config", str(config),
            "--output-dir", str(tmp_path / "outputs")]


def _top_runs(client: MlflowClient) -> list[Run]:
    """Training runs (not trials), oldest first."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time ASC"])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def _test_metrics(run: Run) -> dict[str, float]:
    return {key: value for key, value in run.data.metrics.items()
            if ".test." in key and not key.endswith("seconds")}


def _wait_for(found: Callable[[], Any], what: str, proc: subprocess.Popen | None = None,
              log: Path | None = None, limit_s: float = 300) -> Any:
    """Poll ``found`` until it returns something truthy (``limit_s`` only guards a hang)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"shoprank train exited ({proc.returncode}) before {what}:\n"
                        f"{log.read_text()[-4000:] if log else ''}")
        result = found()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"no {what} after {limit_s:.0f} s")


def _train_flow_runs() -> set:
    with get_client(sync_client=True) as client:
        return {r.id for r in client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])))}


def _task_states(flow_run_id) -> dict[str, Any]:
    """The state of each task run of a flow run, by task name (``lgbm-ranker-a1b`` -> ...)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state for r in runs}


def _new_flow_run(known: set) -> Any:
    return next(iter(_train_flow_runs() - known), None)


def _final_states(flow_run_id, names: set[str]) -> dict[str, Any] | None:
    """The task states of a flow run once ``names`` all reached a final state, else None.

    (The server records task runs from the events a flow run sends: a moment after it ends.)
    """
    states = _task_states(flow_run_id)
    if names <= set(states) and all(states[n] and states[n].is_final() for n in names):
        return states
    return None


@pytest.mark.slow  # about 100 s: run by `make test-release` (and CI) on its own line
def test_killed_train_resumes_from_its_finished_stages(tmp_path, mlflow_store, demo_shop_dir,
                                                       monkeypatch):
    argv = _train_argv(demo_shop_dir, TINY, tmp_path)
    work = tmp_path / "killed-and-resumed"  # the cwd: its mlruns/optuna.db holds the studies
    work.mkdir()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "MLFLOW_TRACKING_URI": mlflow_store}
    command = [sys.executable, "-c", "from flows.cli import main; main()", *argv]
    known = _train_flow_runs()
    log = tmp_path / "killed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        killed = _wait_for(lambda: _new_flow_run(known), "train flow run", proc, log)
        # the ranker starts only after the transformer's result has been written
        _wait_for(lambda: "lgbm-ranker" in _task_states(killed), "ranker task run", proc, log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    client = MlflowClient(mlflow_store)
    [interrupted] = _top_runs(client)
    assert interrupted.info.status == "RUNNING"  # as a killed process leaves it

    resumed_log = tmp_path / "resumed.log"
    with resumed_log.open("wb") as out:
        done = subprocess.run([*command, "--resume"], cwd=work, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600, check=False)
    assert done.returncode == 0, resumed_log.read_text()[-4000:]
    assert f"resuming MLflow run {interrupted.info.run_id}" in resumed_log.read_text()
    resumed = _new_flow_run(known | {killed})
    expected = {*CACHED, "lgbm-ranker", "report"}
    states = _wait_for(lambda: _final_states(resumed, expected),
                       "final task states of the resumed flow run")
    assert {name: states[name].name for name in CACHED} == dict.fromkeys(CACHED, "Cached")
    assert states["lgbm-ranker"].name == "Completed"  # the stage the killed run did not finish
    [run_after] = _top_runs(client)
    assert run_after.info.run_id == interrupted.info.run_id
    assert run_after.info.status == "FINISHED"

    clean = tmp_path / "clean"  # a fresh cwd: fresh Optuna studies
    clean.mkdir()
    monkeypatch.chdir(clean)
    assert run(argv) == 0
    finished = [r for r in _top_runs(client) if r.info.run_id != interrupted.info.run_id]
    assert [r.info.status for r in finished] == ["FINISHED"]
    metrics = _test_metrics(run_after)
    assert {"transformer.test.ndcg_at_10", "lgbm_ranker.test.ndcg_at_10"} <= set(metrics)
    assert metrics == _test_metrics(finished[0])


def test_resume_with_nothing_to_resume_starts_a_fresh_run(tmp_path, mlflow_store,
                                                          demo_shop_dir):
    argv = _train_argv(demo_shop_dir, BASELINES_ONLY, tmp_path)
    assert run([*argv, "--resume"]) == 0
    client = MlflowClient(mlflow_store)
    [first] = _top_runs(client)
    assert first.info.status == "FINISHED"
    config = load_config(argv[argv.index("--config") + 1], data__path=str(demo_shop_dir),
                         output_dir=str(tmp_path / "outputs"))
    assert first.data.tags[DIGEST_TAG] == config_digest(config)
    assert Path(first.data.tags[WORKDIR_TAG]).is_dir()
    # a finished run is not resumed either
    assert run([*argv, "--resume"]) == 0
    runs = _top_runs(client)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert runs[1].data.tags[WORKDIR_TAG] != first.data.tags[WORKDIR_TAG]


def test_resume_refuses_changed_data_and_a_missing_run_folder(tmp_path, mlflow_store,
                                                              demo_shop_dir, capsys):
    shop = tmp_path / "shop"
    shutil.copytree(demo_shop_dir, shop)
    argv = _train_argv(shop, BASELINES_ONLY, tmp_path)
    assert run(argv) == 0
    client = MlflowClient(mlflow_store)
    [failed] = _top_runs(client)
    client.set_terminated(failed.info.run_id, "FAILED")  # as a run that failed half-way
    events = pl.read_parquet(shop / "events.parquet")
    events.head(events.height - 100).write_parquet(shop / "events.parquet")
    capsys.readouterr()

    assert run([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"data changed since MLflow run {failed.info.run_id}" in err
    assert "without --resume" in err
    assert [r.info.status for r in _top_runs(client)] == ["FAILED"]  # left as it was

    shutil.rmtree(failed.data.tags[WORKDIR_TAG])
    assert run([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no longer exists" in err
    assert "without --resume" in err


def test_settings_digest_leaves_out_the_stores_and_the_cluster():
    base = load_config(None)
    assert config_digest(base) == config_digest(load_config(None, tracking_uri="sqlite://"))
    # a run on a restarted Dask cluster (a new address, other workers) can be resumed
    assert config_digest(base) == config_digest(load_config(
        None, dask__address="tcp://127.0.0.1:8786", dask__workers=3, dask__memory_limit="4GiB"))
    assert config_digest(base) != config_digest(load_config(None, dask__shards=8))
    assert config_digest(base) != config_digest(load_config(None, seed=7))
    assert config_digest(base) != config_digest(load_config(None, ranker__n_trials=9))


def test_source_stamp_changes_when_a_file_is_rewritten(tmp_path):
    (tmp_path / "events.csv").write_text("a\n1\n")
    before = source_stamp(tmp_path)
    assert source_stamp(tmp_path) == before
    (tmp_path / "events.csv").write_text("a\n1\n2\n")
    assert source_stamp(tmp_path) != before
    assert source_stamp(tmp_path / "events.csv") == source_stamp(tmp_path)
