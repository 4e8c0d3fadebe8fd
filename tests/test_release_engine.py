"""The release on ``engine: dask`` against the local engine's; a worker, then the flow, killed.

Every test runs the real ``train`` flow (Prefect test harness, a real MLflow store) twice on the
built-in shop's sample, with the release on, the dask engine on a real ``distributed.LocalCluster``
of 2 worker processes on 127.0.0.1 started and stopped here: the first run's model becomes the
champion (refitted on every event), the second's is judged against the champion's recipe
refitted on its split. The last test kills ``shoprank train`` itself (SIGKILL) once the engine
has refitted the winner, and ``shoprank promote`` completes the release on the same cluster.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from distributed import LocalCluster
from mlflow import MlflowClient

from flows.config import load_config
from flows.train import train
from models.errors import ConfigError
from tasks.release.packaging import load_serving
from tasks.release.promotion import RELEASE_DECISION_TAG, STATE_TAG
from tasks.release.registry import DECISION_ID_TAG, EVALUATED, PROMOTED, alias_version
from tests.test_release_faults import _shoprank
from tests.test_release_loop import model_events

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

RANKER = {"num_boost_round": 40, "extra_windows": 1}
TRANSFORMER = {"space": {"epochs": [2, 2], "hidden_size": [32], "max_len": [20]}}
DECISION_KEYS = ("ndcg_at_10", "coverage_at_10", "users", "cold5.recall_at_20", "cold5.users",
                 "live.ndcg_at_10", "live.users", "daily.ndcg_at_10")


@pytest.fixture
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local:
        yield local


def _config(tmp_path: Path, shop: Path, engine: str, **overrides):
    storage = f"sqlite:///{tmp_path / f'optuna-{engine}.db'}"
    return load_config(
        None, output_dir=str(tmp_path / engine), engine=engine, data__path=str(shop),
        data__format="parquet", data__name="demo", ranker__n_trials=1, ranker__extra=RANKER,
        ranker__storage=storage, transformer__n_trials=1, transformer__extra=TRANSFORMER,
        transformer__storage=storage, evaluation__test_user_share=0.5,
        content__enabled=False, registry__model_name=f"shop-{engine}",
        registry__latency_slack_ms=1000.0, **overrides)


def _lists(uri: str, model: str) -> dict[str, list[tuple[str, float]]]:
    _, serving = load_serving(model, uri)
    return {user: serving.lists.get(user) for user in serving.lists.users.to_list()}


def _decision(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    tags = client.get_model_version(name, version).tags
    return {key: tags.get(f"promotion.{side}.{key}") for side in ("challenger", "champion")
            for key in DECISION_KEYS} | {"decision": tags["promotion.decision"]}


def test_the_engine_releases_what_the_local_engine_releases(tmp_path, mlflow_store,
                                                            demo_shop_dir, cluster):
    client = MlflowClient(mlflow_store)
    results = {}
    for engine in ("local", "dask"):
        extra = {"dask__address": cluster.scheduler_address, "dask__shards": 3} \
            if engine == "dask" else {}
        config = _config(tmp_path, demo_shop_dir, engine, **extra)
        results[engine] = [train(config)["release"], train(config)["release"]]
    for first, second in zip(results["local"], results["dask"], strict=True):
        assert (first["family"], first["decision"], first["version"],
                first["released_version"]) == (second["family"], second["decision"],
                                               second["version"], second["released_version"])
    assert results["dask"][0]["decision"] == "promoted"  # no champion yet
    assert results["dask"][1]["decision"] == "rejected"  # the same recipe: no gain, a refresh
    # the second decision's numbers, both sides, are the local gate's
    assert _decision(client, "shop-dask", "3") == _decision(client, "shop-local", "3")
    dask_tags = client.get_model_version("shop-dask", "3").tags
    assert "on the engine" in dask_tags["promotion.reason"]
    # every served version's lists, user by user, item by item, score by score
    for version in ("1", "2", "3", "4"):
        local = _lists(mlflow_store, f"models:/shop-local/{version}")
        dask = _lists(mlflow_store, f"models:/shop-dask/{version}")
        if version in ("1", "3"):  # evaluated copies: the engine keeps the test users' lists
            local = {user: local[user] for user in dask}
        assert dask == local, version
    # served answers with a live session too (the same session weight chosen on validation)
    _, local = load_serving("models:/shop-local@champion", mlflow_store)
    _, dask = load_serving("models:/shop-dask@champion", mlflow_store)
    assert dask.session_weight == local.session_weight
    users = local.lists.users.to_list()[:200]
    sessions = [{"user_id": user, "k": 10, "recent_items": [local.lists.get(other)[0][0]]}
                for user, other in zip(users, users[1:] + users[:1], strict=True)]
    assert dask.predict(sessions).equals(local.predict(sessions))
    assert alias_version(client, "shop-dask", "champion") == "4"
    released = client.get_model_version("shop-dask", "4").tags
    assert (released["release.kind"], released["shoprank.engine"]) == ("refresh", "dask")
    _, serving = load_serving("models:/shop-dask@champion", mlflow_store)
    assert serving.lists_only
    assert not (serving.folder / "model").exists()
    user = serving.lists.users[0]
    deep = serving.predict([{"user_id": user, "k": 200, "exclude": ["x"] * 30}])
    assert deep.height == 200  # deeper than the lists: the list, then trending items
    # the attempt folders of the gate and the release are gone once registered
    assert not list((tmp_path / "dask").rglob("release/*/bundle"))
    # batch lists of the engine's champion: by parts on its run's cluster, the same file as the
    # one process writes (and as the local engine's champion gives)
    from flows.recommend import batch_recommend, recommend

    files = {side: tmp_path / f"recs-{side}.parquet" for side in ("cluster", "one", "local")}
    on_cluster = recommend(k=20, out=str(files["cluster"]), model_uri="models:/shop-dask@champion",
                           tracking_uri=mlflow_store)
    batch_recommend.fn("models:/shop-dask@champion", mlflow_store, None, 20, str(files["one"]))
    batch_recommend.fn("models:/shop-local@champion", mlflow_store, None, 20,
                       str(files["local"]))
    assert on_cluster["parts"] == 4  # two a worker
    assert on_cluster["users"] == serving.users.len()
    frames = {side: pl.read_parquet(path) for side, path in files.items()}
    assert frames["cluster"].equals(frames["one"])
    assert frames["cluster"].height == 20 * serving.users.len()
    mine, local = (frames[side].drop("model_version").sort("user_id", "rank")
                   for side in ("cluster", "local"))  # the bundles order their users apart
    assert mine.equals(local)
    assert not list(tmp_path.glob(".recs-cluster.parquet.parts-*"))
    # the training run's cluster replaced: a LocalCluster here, or a scheduler that is down
    here = recommend(k=20, out=str(tmp_path / "recs-here.parquet"), dask_address="local",
                     model_uri="models:/shop-dask@champion", tracking_uri=mlflow_store)
    assert pl.read_parquet(here["path"]).equals(frames["cluster"])
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        down = f"tcp://127.0.0.1:{free.getsockname()[1]}"
    with pytest.raises(ConfigError, match="--dask-address local"):
        recommend(k=20, out=str(tmp_path / "recs-down.parquet"), dask_address=down,
                  model_uri="models:/shop-dask@champion", tracking_uri=mlflow_store)
    assert not (tmp_path / "recs-down.parquet").exists()


def test_a_worker_killed_during_the_release_leaves_the_registry_consistent(
        tmp_path, mlflow_store, demo_shop_dir, cluster):
    config = _config(tmp_path, demo_shop_dir, "dask", dask__address=cluster.scheduler_address,
                     dask__shards=3, transformer__enabled=False)
    killed = []

    def kill_a_worker_when_the_release_refits() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if list((tmp_path / "dask").rglob("release/release-v*/split/test_history/*")):
                nanny = next(iter(cluster.workers.values()))
                pid = nanny.process.process.pid
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_a_worker_when_the_release_refits, daemon=True)
    watcher.start()
    result = train(config)["release"]
    watcher.join(timeout=5)
    assert killed, "no worker was killed during the release"
    client = MlflowClient(mlflow_store)
    name, version = result["model"], result["version"]
    tags = client.get_model_version(name, version).tags
    assert tags[STATE_TAG] == "complete"
    champion = alias_version(client, name, "champion")
    assert champion == tags["promotion.released_version"] == result["released_version"]
    released = [str(v.version) for v in client.search_model_versions(f"name='{name}'")
                if v.tags.get(RELEASE_DECISION_TAG) == tags[DECISION_ID_TAG]]
    assert released == [champion]  # one released copy, whatever the worker's tasks redid
    _, serving = load_serving(f"models:/{name}@champion", mlflow_store)
    assert len(serving.lists) > 0


def test_a_train_killed_in_the_engines_release_is_completed_by_promote(
        tmp_path, mlflow_store, demo_shop_dir, prefect_api):
    import yaml

    settings = {"data": {"path": str(demo_shop_dir), "format": "parquet", "name": "demo"},
                "engine": "dask", "ranker": {"enabled": False},
                "transformer": {"enabled": False}, "content": {"enabled": False},
                "registry": {"model_name": "shoprank", "families": ["buy_again"],
                             "latency_slack_ms": 1000.0},
                "output_dir": str(tmp_path / "outputs")}
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "TMPDIR": str(tmp_path),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "MLFLOW_TRACKING_URI": mlflow_store}
    log = tmp_path / "shoprank.log"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, env={"PREFECT_API_URL": prefect_api}) as cluster:
        settings["dask"] = {"address": cluster.scheduler_address, "shards": 3}
        config = tmp_path / "train.yaml"
        config.write_text(yaml.safe_dump(settings))
        code = _shoprank(["train", "--config", str(config)], env, tmp_path, log,
                         kill_at="engine-refitted")
        assert code == -signal.SIGKILL, log.read_text()[-4000:]
        client = MlflowClient(mlflow_store)
        (evaluated,) = client.search_model_versions("name='shoprank'")  # no released copy yet
        version = str(evaluated.version)
        assert client.get_model_version("shoprank", version).tags[STATE_TAG] == "pending"
        assert alias_version(client, "shoprank", "champion") is None
        assert _shoprank(["promote"], env, tmp_path, log) == 0, log.read_text()[-4000:]
    tags = client.get_model_version("shoprank", version).tags
    assert tags[STATE_TAG] == "complete"
    champion = alias_version(client, "shoprank", "champion")
    assert champion == tags["promotion.released_version"]
    released = [str(v.version) for v in client.search_model_versions("name='shoprank'")
                if v.tags.get(RELEASE_DECISION_TAG) == tags[DECISION_ID_TAG]]
    assert released == [champion]
    assert client.get_model_version("shoprank", champion).tags["shoprank.engine"] == "dask"
    assert len(model_events(version, PROMOTED, api=prefect_api)) == 1
    assert len(model_events(version, EVALUATED, settle_s=0, api=prefect_api)) == 1
    outputs = subprocess.run(["find", str(tmp_path / "outputs"), "-path", "*release/*",
                              "-name", "bundle"], capture_output=True, text=True, check=True)
    assert outputs.stdout.count("bundle") <= 1  # the killed attempt's folder, not the second
