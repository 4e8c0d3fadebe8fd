"""``engine: dask`` against ``engine: local``: same split, ranker frames, metrics; faults survived.

Every test runs the real ``train`` flow (Prefect test harness, a real MLflow store) on a real
``distributed.LocalCluster`` of 2 worker processes on 127.0.0.1, started and stopped here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from distributed import Client, LocalCluster
from polars.testing import assert_frame_equal
from prefect import flow, task

from flows.cli import run
from flows.config import load_config
from flows.train import train
from tasks.data.prepare import read_split
from tasks.ranking.external_sources import load_source
from tasks.ranking.reranker import SOURCE_DIR, RankingPipeline

pytestmark = pytest.mark.usefixtures("prefect_server")
SKIP = ("fit_seconds",)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local:
        yield local


RANKER = {"num_boost_round": 40, "extra_windows": 1}
TRANSFORMER = {"space": {"epochs": [2, 2], "hidden_size": [32], "max_len": [20]}}


def _config(tmp_path: Path, shop: Path, engine: str, **overrides):
    storage = f"sqlite:///{tmp_path / f'optuna-{engine}.db'}"
    overrides = {"ranker__n_trials": 1, "ranker__extra": RANKER, "ranker__storage": storage,
                 "transformer__n_trials": 1, "transformer__extra": TRANSFORMER,
                 "transformer__storage": storage,
                 "evaluation__test_user_share": 0.5,  # both engines score the same half
                 "content__enabled": False, **overrides}  # not with the dask engine yet
    return load_config(None, output_dir=str(tmp_path / engine), engine=engine,
                       data__path=str(shop), data__format="parquet", registry__enabled=False,
                       **overrides)


def _assert_same_scores(local: dict, dask: dict) -> None:
    """Every family's metrics equal between engines (the ranker fed by the transformer too)."""
    assert set(local) == set(dask)
    for model, stages in local.items():
        for stage, metrics in stages.items():
            for key, value in metrics.items():
                if key not in SKIP:
                    assert dask[model][stage][key] == pytest.approx(value, rel=1e-9, abs=1e-12), \
                        (model, stage, key)


@pytest.fixture(scope="module")
def local_result(tmp_path_factory, demo_shop_dir):
    tmp = tmp_path_factory.mktemp("local")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    try:
        return train(_config(tmp, demo_shop_dir, "local"))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_dask_engine_gives_the_local_split_and_metrics(tmp_path, mlflow_store, demo_shop_dir,
                                                       cluster, local_result):
    # the test users scored a few at a time, items in 3 buckets (not the 4 shards): same numbers
    config = _config(tmp_path, demo_shop_dir, "dask", dask__address=cluster.scheduler_address,
                     dask__shards=4, dask__buckets=3,
                     ranker__extra={**RANKER, "user_chunk": 7})
    result = train(config)
    _assert_same_scores(local_result["scores"], result["scores"])
    _assert_resumed_from_cache(config, result, mlflow_store)
    local_split = Path(local_result["workdir"]) / "split"
    dask_split = Path(result["workdir"]) / "split"
    info = json.loads((local_split / "info.json").read_text())
    assert json.loads((dask_split / "info.json").read_text())["summary"] == info["summary"]
    assert info["test_sample"] == {"share": 0.5, "seed": 42}
    test = result["scores"]["lgbm_ranker"]["test"]  # the sample's users, with standard errors
    assert 0 < test["users"] < int(info["summary"]["test_users"])
    assert test["se.ndcg@10"] > 0
    for table in ("train", "valid_targets", "test_history", "test_targets"):
        whole = pl.read_parquet(local_split / f"{table}.parquet")
        shards = pl.read_parquet(dask_split / table / "*.parquet")
        assert shards.sort(whole.columns).equals(whole.sort(whole.columns)), table
    assert len(list((Path(result["workdir"]) / "events").glob("shard-*.parquet"))) == 4
    # the ranker learnt from the same candidate groups and features (every group sampled), the
    # transformer's among them: its training source asked shard by shard as in one call
    local = _config(tmp_path, demo_shop_dir, "local")
    config = local.ranker.settings(local.seed)
    pipe = RankingPipeline(config, pl.read_parquet(demo_shop_dir / "items.parquet"))
    selection = local.evaluation.selection(local.seed)  # its validation targets train nothing
    ranker = Path(result["workdir"]) / "ranker"
    source = load_source(ranker / "sources" / "train")
    expected = pipe.training_frames(selection.tuning(read_split(local_split)), source)
    assert "rank_seq" in expected.train.columns
    assert load_source(ranker / "model" / SOURCE_DIR).name == "seq"  # kept with the model
    for name in ("train", "holdout"):
        got = pl.read_parquet(ranker / f"{name}.parquet")
        assert_frame_equal(got, getattr(expected, name), check_exact=False, rel_tol=1e-9,
                           abs_tol=1e-12)
    assert len(list((ranker / "lists").glob("shard-*.parquet"))) == 4


def _assert_resumed_from_cache(config, result: dict, store: str) -> None:
    """A run marked failed at its very end resumes: every per-shard task comes from the cache.

    (``validate-shard`` runs again: "no event in the future" is checked against the time now.)
    """
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort

    MlflowClient(store).set_terminated(result["run_id"], "FAILED")
    again = train(config, resume=True)
    assert (again["resumed"], again["run_id"], again["workdir"]) == (
        True, result["run_id"], result["workdir"])
    _assert_same_scores(result["scores"], again["scores"])
    with get_client(sync_client=True) as client:
        subflow = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["train-shards"])),
            sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [subflow.id]}))
    states = {(re.sub(r"-(\d+|[0-9a-f]{3})$", "", t.name), t.state_name) for t in tasks}
    names = {name for name, _ in states}  # a shard's task runs are named by stage and shard
    assert {"baseline-score-valid", "baseline-score-test", "ranker-frames-w0", "ranker-score-test",
            "transformer-score-test", "transformer-study"} <= names
    assert {name for name, state in states if state != "Cached"} == {"validate-shard"}


def test_a_killed_worker_is_survived(tmp_path, mlflow_store, demo_shop_dir, local_result):
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as own, Client(own) as client:
        pids = list(client.run(os.getpid).values())
        config = _config(tmp_path, demo_shop_dir, "dask", dask__address=own.scheduler_address,
                         dask__shards=6)
        killed = threading.Event()

        def kill_when_the_baselines_start() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if any(tmp_path.glob("dask/*/*/baselines/valid/counts/*.parquet")):
                    os.kill(pids[0], signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_when_the_baselines_start, daemon=True)
        watcher.start()
        result = train(config)
        watcher.join(timeout=5)
        assert killed.is_set()
        assert pids[0] not in client.run(os.getpid).values()
    _assert_same_scores(local_result["scores"], result["scores"])


def test_a_corrupt_shard_is_one_clear_error(tmp_path, mlflow_store, demo_shop_dir, capsys,
                                            cluster):
    shop = tmp_path / "sharded-shop"
    (shop / "events").mkdir(parents=True)
    events = pl.read_parquet(demo_shop_dir / "events.parquet")
    half = events.height // 2
    events.head(half).write_parquet(shop / "events" / "shard-00000.parquet")
    good = shop / "events" / "shard-00001.parquet"
    events.tail(events.height - half).write_parquet(good)
    (shop / "events" / "shard-00001.parquet").write_bytes(good.read_bytes()[:200])
    (shop / "items.parquet").write_bytes((demo_shop_dir / "items.parquet").read_bytes())
    code = run(["train", "--data", str(shop), "--format", "parquet", "--engine", "dask",
                "--dask-address", cluster.scheduler_address, "--no-ranker",
                "--no-transformer", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "shard-00001.parquet" in err
    assert "Traceback" not in err


@task
def _worker_api(_: int) -> tuple[str | None, int]:
    """The Prefect API a worker process was given, and its process id."""
    return os.environ.get("PREFECT_API_URL"), os.getpid()


@flow
def _on_workers() -> list[tuple[str | None, int]]:
    return [future.result() for future in _worker_api.map([0, 1, 2])]


def test_a_local_clusters_workers_report_to_the_flows_api():
    """The LocalCluster the engine starts: its workers use this process's Prefect API.

    Without it each worker process would start a temporary Prefect server of its own, and on
    separate databases the flow's task runs would be scattered.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.config import DaskConfig
    from flows.train import dask_runner, prefect_api_url

    @flow
    def parent() -> tuple[str | None, list, str]:
        state = _on_workers.with_options(task_runner=dask_runner(DaskConfig(workers=1)))(
            return_state=True)
        return prefect_api_url(), state.result(), str(state.state_details.flow_run_id)

    api, found, child = parent()
    assert api
    assert {url for url, _ in found} == {api}  # every task ran in a worker given the flow's API
    assert all(pid != os.getpid() for _, pid in found)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[child])))
    assert sorted(r.state.type.value for r in runs) == ["COMPLETED"] * 3


def test_shards_are_sized_to_the_clusters_workers_and_memory(cluster):
    """A running cluster is asked for its workers and their memory; the shards follow them."""
    from flows.cluster import shard_sizing
    from flows.config import DaskConfig
    from tasks.data.load_shards import SHARD_BYTES_PER_EVENT, ShardSizing

    with Client(cluster.scheduler_address) as client:
        limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
    sizing = shard_sizing(DaskConfig(address=cluster.scheduler_address))
    assert sizing == ShardSizing(2, min(limits))
    assert sizing.events_per_shard() == min(limits) // 2 // SHARD_BYTES_PER_EVENT
    # half a worker's memory at 2 KB an event, a multiple of the workers, 2 at least
    small = ShardSizing(workers=3, worker_memory=4 * SHARD_BYTES_PER_EVENT * 1_000_000)
    assert [small.shards(n) for n in (1, 3_000_000, 6_000_000, 6_000_001, 14_000_000)] == [
        3, 3, 3, 6, 9]
    assert ShardSizing().shards(2_500_000) == 3  # no cluster known: a million events each
    assert ShardSizing(2, 0).shards(10) == 2  # no memory limit
    assert DaskConfig().buckets == 8
