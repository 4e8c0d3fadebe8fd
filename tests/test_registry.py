"""Registration and metric-gated promotion: real MLflow store, real pyfuncs, real locks.

``register_version`` (also used by the serving, deployment and browser tests) registers a baseline
the way ``train`` does, without the Prefect flow: split the demo shop, fit the models on the test
history, package and register.
"""

from __future__ import annotations

import datetime as dt
import shutil
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flows.config import load_config
from models.errors import ConfigError, ShoprankError
from tasks import tracking
from tasks.data.prepare import read_split, write_split
from tasks.evaluation.evaluate import baseline_factories, score_model
from tasks.release.gate import EVALUATED_TAG
from tasks.release.packaging import (
    GATE_DATA_TAG,
    KIND_TAG,
    LAST_EVENT_TAG,
    SPLIT_DIR_TAG,
    T_TEST_TAG,
    ReleaseRun,
    check_shop,
    register_best,
    select_best,
)
from tasks.release.promotion import promote_version
from tasks.release.recipes import baseline_recipe, write_recipe
from tasks.release.registry import (
    DECISION_TAG,
    PromotionPolicy,
    alias_version,
    decide,
    lock_name,
    lock_path,
    registry_lock,
)
from tasks.splitting.split import cut_times, time_split

FAST = PromotionPolicy(latency_requests=20, latency_tolerance=5.0, latency_slack_ms=50.0)


def prepare_run(root: Path, shop_dir: Path, families: tuple[str, ...]
                ) -> tuple[Path, dict[str, dict[str, dict[str, float]]]]:
    """Split the shop under ``root``, score and save ``families`` and the fallback models."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "split" / "info.json").is_file():
        shutil.copy(shop_dir / "events.parquet", root / "events.parquet")
        shutil.copy(shop_dir / "items.parquet", root / "items.parquet")
        events = pl.read_parquet(root / "events.parquet")
        write_split(time_split(events, *cut_times(events)), root / "split")
    split = read_split(root / "split")
    factories = baseline_factories(7.0)
    n_items = pl.read_parquet(root / "events.parquet")["item_id"].n_unique()
    scores = {}
    for name in {*families, "recent_popularity", "covisitation"}:
        scores[name], model = score_model(factories[name], split, [10, 20], n_items, False)
        model.save(root / "models" / name)
    return root / "split", scores


def register_version(root: Path, shop_dir: Path, uri: str, family: str,
                     model_name: str = "shoprank", recipe: bool = False) -> str:
    """Register ``family`` fitted on the shop as train's release step does; returns the version.

    ``recipe``: save the baseline's recipe beside it (as ``train`` does), so the gate can refit it.
    """
    run_root = root / family
    split_dir, scores = prepare_run(run_root, shop_dir, (family,))
    if recipe:
        write_recipe(run_root / "models" / family, baseline_recipe(family, 7.0, False))
    client = MlflowClient(uri)  # no mlflow.set_tracking_uri: nothing leaks into other tests
    found = client.get_experiment_by_name("demo")
    experiment = found.experiment_id if found else client.create_experiment(
        "demo", artifact_location=f"{tracking.artifact_root(uri)}/demo")
    run_id = client.create_run(experiment).info.run_id
    config = load_config(None, registry__model_name=model_name,
                         registry__families=[family]).model_dump(mode="json")
    _, packaged = register_best(scores, ReleaseRun(
        run_id, uri, split_dir, run_root / "models", "demo", "f" * 64, "time", False, config))
    client.set_terminated(run_id, "FINISHED")
    return packaged.version


def test_a_version_is_logged_from_code_and_a_pickled_one_still_loads(tmp_path, mlflow_store,
                                                                      demo_shop_dir):
    import mlflow
    import yaml

    from tasks.release.packaging import ShoprankPyfunc, load_serving

    version = register_version(tmp_path, demo_shop_dir, mlflow_store, "popularity")
    client = MlflowClient(mlflow_store)
    local = Path(mlflow.artifacts.download_artifacts(
        client.get_model_version_download_uri("shoprank", version), dst_path=str(tmp_path / "v"),
        tracking_uri=mlflow_store))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / "served_model.py").is_file()
    assert not list(local.rglob("python_model.pkl"))  # no pickled instance
    # a version saved the earlier way (a pickled ShoprankPyfunc) loads and answers alike
    bundle = local / "artifacts" / next(p.name for p in (local / "artifacts").iterdir())
    mlflow.pyfunc.save_model(str(tmp_path / "pickled"), python_model=ShoprankPyfunc(),
                             artifacts={"bundle": str(bundle)})
    request = pl.DataFrame({"user_id": ["u000001"], "k": [5]}).to_pandas()
    pickled = mlflow.pyfunc.load_model(str(tmp_path / "pickled")).predict(request)
    served = load_serving(f"models:/shoprank/{version}", mlflow_store)[0].predict(request)
    assert pickled.equals(served)


def test_decide_applies_margin_and_guardrails():
    champion = {"ndcg@10": 0.20, "coverage@10": 0.50, "latency_p99_ms": 10.0}
    policy = PromotionPolicy(margin=0.05, coverage_tolerance=0.1, latency_tolerance=0.5,
                             latency_slack_ms=0.0)
    assert decide(champion, None, policy)[0]
    assert decide({**champion, "ndcg@10": 0.22}, champion, policy)[0]
    promote, reason = decide({**champion, "ndcg@10": 0.205}, champion, policy)
    assert not promote
    assert "margin" in reason
    promote, reason = decide({**champion, "ndcg@10": 0.3, "coverage@10": 0.40}, champion, policy)
    assert not promote
    assert "coverage@10" in reason
    promote, reason = decide({**champion, "ndcg@10": 0.3, "latency_p99_ms": 16.0}, champion,
                             policy)
    assert not promote
    assert "latency" in reason
    assert decide({**champion, "ndcg@10": 0.3, "latency_p99_ms": 14.9}, champion, policy)[0]
    # live sessions: a guardrail that may not regress beyond the margin (0.30 * 0.95 = 0.285)
    live = {**champion, "live.ndcg@10": 0.30}
    promote, reason = decide({**live, "ndcg@10": 0.3, "live.ndcg@10": 0.28}, live, policy)
    assert not promote
    assert "live sessions regresses" in reason
    assert decide({**live, "ndcg@10": 0.3, "live.ndcg@10": 0.29}, live, policy)[0]
    # cold targets (new items): at most 20% below the champion, when both have 50 such users
    cold = {**champion, "cold5.recall@20": 0.10, "cold5.users": 80.0}
    promote, reason = decide({**cold, "ndcg@10": 0.3, "cold5.recall@20": 0.07}, cold, policy)
    assert not promote
    assert "cold targets regresses: cold5.recall@20 0.0700 < 0.0800" in reason
    assert decide({**cold, "ndcg@10": 0.3, "cold5.recall@20": 0.085}, cold, policy)[0]
    few = {**cold, "cold5.users": 12.0}  # too few users: noise, not checked
    assert decide({**few, "ndcg@10": 0.3, "cold5.recall@20": 0.0}, few, policy)[0]


def test_select_best_uses_validation_and_skips_unservable():
    scores = {"popularity": {"valid": {"ndcg@10": 0.1}}, "buy_again": {"valid": {"ndcg@10": 0.3}},
              "mystery": {"valid": {"ndcg@10": 0.9}}}
    assert select_best(scores, "ndcg@10") == "buy_again"
    assert select_best(scores, "ndcg@10", ["popularity"]) == "popularity"
    with pytest.raises(ConfigError, match="primary_metric"):
        select_best(scores, "mrr@5")
    with pytest.raises(ConfigError, match="no servable model"):
        select_best({"mystery": scores["mystery"]}, "ndcg@10")


LOCK_ID = "0123456789abcdef0123"


def _assert_exclusive(uri: str) -> None:
    """Two threads holding the lock run one after the other; a third times out clearly."""
    inside: list[tuple[str, float, float]] = []

    def hold(name: str) -> None:
        with registry_lock(uri, "shoprank", lock_id=LOCK_ID):
            start = time.monotonic()
            time.sleep(0.3)
            inside.append((name, start, time.monotonic()))

    threads = [threading.Thread(target=hold, args=(n,)) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (_, s1, e1), (_, s2, _) = sorted(inside, key=lambda x: x[1])
    assert s2 >= e1  # the second holder entered only after the first left
    with (registry_lock(uri, "shoprank", lock_id=LOCK_ID),
          pytest.raises(ShoprankError, match="could not lock"),
          registry_lock(uri, "shoprank", timeout_s=0.5, lock_id=LOCK_ID)):
        pass


def test_lock_is_exclusive_and_lives_beside_the_store(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # no server: a file on this host
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert lock_path(uri, "shoprank", LOCK_ID).parent == tmp_path
    assert lock_path("http://127.0.0.1:5000", "shoprank", LOCK_ID).name.startswith(
        "shoprank-registry-")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # even beside the harness
        _assert_exclusive(uri)
    assert lock_path(uri, "shoprank", LOCK_ID).is_file()


@pytest.mark.usefixtures("prefect_server")
def test_with_a_prefect_server_the_lock_is_its_global_concurrency_limit(tmp_path):
    from prefect.client.orchestration import get_client

    uri = "postgresql://shoprank:s3cret@127.0.0.1:5432/mlflow"
    name = lock_name(LOCK_ID)
    assert "s3cret" not in name
    _assert_exclusive(uri)
    assert not lock_path(uri, "shoprank", LOCK_ID).exists()  # no file anywhere
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.limit, limit.active_slots) == (1, 0)  # released after use


def test_no_password_of_a_storage_url_reaches_params_or_the_config_artifact(tmp_path,
                                                                           mlflow_store):
    config = load_config(None, ranker__storage="postgresql://optuna:s3cret@127.0.0.1/optuna")
    client = MlflowClient(mlflow_store)
    experiment = tracking.ensure_experiment("demo", mlflow_store)
    run_id = client.create_run(experiment).info.run_id
    tracking.log_run_context(run_id, config.model_dump(mode="json"), "demo", tmp_path, "f" * 64,
                             {"events": 1})
    params = client.get_run(run_id).data.params
    assert params["ranker.storage"] == "postgresql://optuna:***@127.0.0.1/optuna"
    logged = Path(client.download_artifacts(run_id, "config.json", str(tmp_path)))
    assert "s3cret" not in logged.read_text()
    assert "s3cret" not in str(params)


def test_two_runs_starting_together_share_the_experiment_and_the_dataset(tmp_path,
                                                                          mlflow_store,
                                                                          monkeypatch):
    """Two trainings of one shop start at once: each finds no experiment and no dataset yet.

    The other run's writes are forced between this one's read and write (a real store): the
    refused creation reads the other's experiment, the refused dataset link is retried.
    """
    other = MlflowClient(mlflow_store)
    read = MlflowClient.get_experiment_by_name
    raced = []

    def read_then_race(self, name):
        if not raced:  # the first read: nothing yet, then the other run creates it
            raced.append(other.create_experiment(name))
            return None
        return read(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", read_then_race)
    assert tracking.ensure_experiment("demo", mlflow_store) == raced[0]
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", read)

    run_id = other.create_run(raced[0]).info.run_id
    log_inputs, refused = MlflowClient.log_inputs, []

    def refuse_once(self, run, datasets=None, **kwargs):
        if not refused:  # the other run wrote the same dataset row first (a 500 on a server)
            refused.append(run)
            raise MlflowException("duplicate key value violates unique constraint "
                                  '"dataset_pk"')
        return log_inputs(self, run, datasets=datasets, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_inputs", refuse_once)
    tracking.log_dataset(run_id, "demo", str(tmp_path), "f" * 64, "training", other)
    assert refused == [run_id]
    assert [d.dataset.name for d in other.get_run(run_id).inputs.dataset_inputs] == ["demo"]


def test_first_model_becomes_champion_and_better_one_replaces_it(tmp_path, mlflow_store,
                                                                demo_shop_dir):
    client = MlflowClient(mlflow_store)
    v1 = register_version(tmp_path, demo_shop_dir, mlflow_store, "popularity")
    assert alias_version(client, "shoprank", "challenger") == v1
    first = promote_version("shoprank", None, mlflow_store, FAST)
    assert (first.version, first.decision) == (v1, "promoted")
    assert alias_version(client, "shoprank", "champion") == v1

    v2 = register_version(tmp_path, demo_shop_dir, mlflow_store, "buy_again")
    second = promote_version("shoprank", v2, mlflow_store, FAST)
    assert second.decision == "promoted", second.reason
    assert second.challenger["ndcg@10"] > second.champion["ndcg@10"]
    assert alias_version(client, "shoprank", "champion") == v2
    tags = client.get_model_version("shoprank", v2).tags
    assert tags[DECISION_TAG] == "promoted"
    assert tags["promotion.champion_version"] == v1
    assert float(tags["promotion.challenger.ndcg_at_10"]) > float(
        tags["promotion.champion.ndcg_at_10"])
    assert "PROMOTED against champion 1" in client.get_model_version("shoprank", v2).description
    assert client.get_model_version("shoprank", v1).tags["promotion.replaced_by"] == v2

    v3 = register_version(tmp_path, demo_shop_dir, mlflow_store, "popularity")
    third = promote_version("shoprank", v3, mlflow_store, FAST)
    assert third.decision == "rejected"
    assert alias_version(client, "shoprank", "champion") == v2
    assert alias_version(client, "shoprank", "challenger") == v3
    assert client.get_model_version("shoprank", v3).tags[DECISION_TAG] == "rejected"
    again = promote_version("shoprank", v3, mlflow_store, FAST)
    assert again.decision == "unchanged"


def test_concurrent_promotions_leave_consistent_aliases(tmp_path, mlflow_store, demo_shop_dir):
    worse = register_version(tmp_path, demo_shop_dir, mlflow_store, "popularity")
    better = register_version(tmp_path, demo_shop_dir, mlflow_store, "buy_again")
    barrier = threading.Barrier(2)
    decisions, errors = {}, []

    def run(version: str) -> None:
        barrier.wait()
        try:
            decisions[version] = promote_version("shoprank", version, mlflow_store, FAST)
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(v,)) for v in (worse, better)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    client = MlflowClient(mlflow_store)
    assert alias_version(client, "shoprank", "champion") == better
    tags = {v: client.get_model_version("shoprank", v).tags for v in (worse, better)}
    assert tags[better][DECISION_TAG] == "promoted"
    # whichever ran first: the worse one was either first (promoted, then replaced) or rejected
    if tags[worse][DECISION_TAG] == "promoted":
        assert tags[worse]["promotion.replaced_by"] == better
        assert tags[better]["promotion.champion_version"] == worse
    else:
        assert tags[worse][DECISION_TAG] == "rejected"
        assert tags[worse]["promotion.champion_version"] == better


def test_promote_without_any_model_is_a_clear_error(tmp_path, mlflow_store):
    with pytest.raises(ConfigError, match="no version with alias 'challenger'"):
        promote_version("shoprank", None, mlflow_store, FAST)
    with pytest.raises(ConfigError, match="no version 9"):
        promote_version("shoprank", "9", mlflow_store, FAST)


def test_a_champion_without_recipe_that_saw_the_test_window_is_incomparable(
        tmp_path, mlflow_store, demo_shop_dir):
    client = MlflowClient(mlflow_store)
    v1 = register_version(tmp_path, demo_shop_dir, mlflow_store, "popularity")
    assert promote_version("shoprank", v1, mlflow_store, FAST).promoted
    v2 = register_version(tmp_path, demo_shop_dir, mlflow_store, "buy_again", recipe=True)
    t_test = client.get_model_version("shoprank", v2).tags[T_TEST_TAG]
    client.set_model_version_tag("shoprank", v1, LAST_EVENT_TAG, t_test)  # saw the test window
    decision = promote_version("shoprank", v2, mlflow_store, FAST)
    assert decision.decision == "incomparable"
    assert "no recipe" in decision.reason
    assert "--force" in decision.reason
    assert alias_version(client, "shoprank", "champion") == v1  # nothing moved
    forced = promote_version("shoprank", v2, mlflow_store, FAST, force=True)
    assert forced.decision == "promoted"
    assert forced.reason.startswith("forced")
    # v2's recipe refitted on every event: it has seen no less than the champion
    assert alias_version(client, "shoprank", "champion") == forced.released_version != v2


def _buy_again_settings(tmp_path: Path, shop: Path, **extra: object) -> dict[str, object]:
    """``train`` settings of the demo shop releasing buy-again (fast, with a recipe)."""
    return {"output_dir": str(tmp_path / "outputs"), "data__format": "parquet",
            "data__path": str(shop), "data__name": "demo", "registry__latency_requests": 20,
            "registry__families": ["buy_again"], "ranker__enabled": False,
            "transformer__enabled": False, **extra}


@pytest.mark.usefixtures("prefect_server")
def test_the_gate_refits_the_champions_recipe_on_the_challengers_split_and_serves_fresh(
        tmp_path, mlflow_store, demo_shop_dir):
    from flows.train import train
    from tasks.release.packaging import load_serving

    common = _buy_again_settings(tmp_path, demo_shop_dir)
    first = train(load_config(None, **common))["release"]
    assert (first["version"], first["decision"], first["released_version"]) == (
        "1", "promoted", "2")
    client = MlflowClient(mlflow_store)
    assert alias_version(client, "shoprank", "challenger") == "1"
    assert alias_version(client, "shoprank", "champion") == "2"
    evaluated, served = (client.get_model_version("shoprank", v).tags for v in ("1", "2"))
    # the served copy saw the test window; the evaluated copy (whose metrics it carries) did not
    moment = {name: dt.datetime.fromisoformat(tags[name]) for name, tags in (
        (T_TEST_TAG, evaluated), ("evaluated", {"evaluated": evaluated[LAST_EVENT_TAG]}),
        ("served", {"served": served[LAST_EVENT_TAG]}))}
    assert moment["evaluated"] < moment[T_TEST_TAG] <= moment["served"]
    assert (served[KIND_TAG], served[EVALUATED_TAG]) == ("challenger", "1")
    assert served["test.ndcg_at_10"] == evaluated["test.ndcg_at_10"]
    events = pl.read_parquet(demo_shop_dir / "events.parquet")
    newcomers = set(events["user_id"]) - set(
        events.filter(pl.col("timestamp") < moment[T_TEST_TAG])["user_id"])
    assert newcomers
    known = {v: set(load_serving(f"models:/shoprank/{v}", mlflow_store)[1].users)
             for v in ("1", "2")}
    assert newcomers <= known["2"]
    assert not newcomers & known["1"]

    # the same recipe on a longer test window: the champion is refitted on this split, so it
    # cannot have seen it (served as is, it had seen 2/3 of it); a tie keeps the champion's
    # recipe, released again on today's events
    second = train(load_config(None, split__test_share=0.3, **common))["release"]
    decision = client.get_model_version("shoprank", second["version"]).tags
    assert second["decision"] == "rejected"
    assert float(decision["promotion.challenger.ndcg_at_10"]) == pytest.approx(
        float(decision["promotion.champion.ndcg_at_10"]))
    assert "recipe (buy_again) refitted on this split" in decision["promotion.reason"]
    refresh = second["released_version"]
    assert alias_version(client, "shoprank", "champion") == refresh == second["champion"]
    assert client.get_model_version("shoprank", refresh).tags[KIND_TAG] == "refresh"
    assert client.get_model_version("shoprank", "2").tags["promotion.replaced_by"] == refresh


@pytest.mark.usefixtures("prefect_server")
def test_the_gate_reads_the_split_from_the_tracking_store_not_the_training_disk(
        tmp_path, mlflow_store, demo_shop_dir):
    from flows.train import train

    common = _buy_again_settings(tmp_path, demo_shop_dir, registry__promote=False)
    first = train(load_config(None, **common))
    second = train(load_config(None, split__test_share=0.3, **common))
    shutil.rmtree(tmp_path / "outputs")  # the training machine's outputs are gone
    client = MlflowClient(mlflow_store)
    tags = client.get_model_version("shoprank", first["release"]["version"]).tags
    assert tags[GATE_DATA_TAG] == f"runs:/{first['run_id']}/gate"
    assert SPLIT_DIR_TAG not in tags
    inputs = client.get_run(first["run_id"]).inputs.dataset_inputs
    assert {tag.value for i in inputs for tag in i.tags} == {"training", "evaluation"}
    one = promote_version("shoprank", first["release"]["version"], mlflow_store, FAST)
    assert (one.decision, one.released_version) == ("promoted", "3")
    two = promote_version("shoprank", second["release"]["version"], mlflow_store, FAST)
    assert two.decision == "rejected"  # the same recipe ties: the champion's is refreshed
    assert "refitted on this split" in two.reason
    assert alias_version(client, "shoprank", "champion") == two.released_version == "4"


def test_one_registered_model_holds_one_shops_champion(tmp_path, mlflow_store, demo_shop_dir):
    from flows.train import train

    register_version(tmp_path, demo_shop_dir, mlflow_store, "popularity")  # shop "demo"
    with pytest.raises(ConfigError, match="holds the champion of the shop 'demo'"):
        train(load_config(None, data__path=str(demo_shop_dir), data__format="parquet",
                          data__name="other", ranker__enabled=False,
                          transformer__enabled=False, output_dir=str(tmp_path / "out")))
    client = MlflowClient(mlflow_store)
    check_shop(client, "shoprank", "demo")
    check_shop(client, "shoprank-other", "other")  # not registered yet: free
