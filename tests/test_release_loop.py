"""The release loop when things go wrong: late promotions, retries, crashes, store addresses.

Each test reproduces one way an operator breaks the release (a manual promotion of an older run,
a forced re-decision, a crash between two registry writes, a champion of an older shoprank, two
spellings of the tracking server's address) on a real MLflow store, real pyfuncs and, where
events matter, the session's real Prefect server.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient

from flows.config import load_config
from tasks.release.gate import champion_side, gate_split, request_mix, request_records
from tasks.release.packaging import KIND_TAG, RECIPE_TAG
from tasks.release.promotion import (
    EXPECTED_TAG,
    STATE_TAG,
    complete,
    judge,
    plan,
    promote_version,
    write_pending,
)
from tasks.release.registry import (
    DECISION_TAG,
    PROMOTED,
    alias_version,
    lock_name,
    registry_id,
)
from tasks.splitting.split import Split
from tests.test_registry import FAST, _buy_again_settings, register_version
from tests.test_serving import BIN, free_port, start_group, stop_group, wait_http

NAME = "shoprank"


def version_files(uri: str, version: str, folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a registered version's artifacts, by relative path."""
    client = MlflowClient(uri)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(NAME, version),
        dst_path=str(folder), tracking_uri=uri))
    return {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(local.rglob("*")) if p.is_file()}


def model_events(version: str, event: str = PROMOTED, settle_s: float = 6.0,
                 api: str | None = None) -> list:
    """The events of one model version on the Prefect server (after they had time to land).

    ``api``: another server's API URL than the session's test server.
    """
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    time.sleep(settle_s)  # emitted events are sent in the background
    with temporary_settings({PREFECT_API_URL: api} if api else {}), \
            get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(
            event=EventNameFilter(name=[event]),
            resource=EventResourceFilter(id=[f"mlflow.model-version.{NAME}.{version}"])),
            limit=50)
    return page.events


def cut_shop(shop: Path, folder: Path, share: float) -> Path:
    """The shop's events before the ``share`` time quantile (its catalogue whole), as a folder."""
    folder.mkdir(parents=True)
    events = pl.read_parquet(shop / "events.parquet")
    cut = events["timestamp"].sort()[int(events.height * share)]
    events.filter(pl.col("timestamp") < cut).write_parquet(folder / "events.parquet")
    shutil.copy(shop / "items.parquet", folder / "items.parquet")
    return folder


def test_a_late_promotion_of_older_data_never_moves_the_champion_back(tmp_path, mlflow_store,
                                                                      demo_shop_dir):
    client = MlflowClient(mlflow_store)
    early = cut_shop(demo_shop_dir, tmp_path / "early-shop", 0.8)
    old = register_version(tmp_path / "early", early, mlflow_store, "buy_again", recipe=True)
    new = register_version(tmp_path / "full", demo_shop_dir, mlflow_store, "buy_again",
                           recipe=True)
    first = promote_version(NAME, new, mlflow_store, FAST)
    assert first.promoted
    champion = alias_version(client, NAME, "champion")
    served = client.get_model_version(NAME, champion).tags["shoprank.last_event"]
    count = len(client.search_model_versions(f"name='{NAME}'"))

    late = promote_version(NAME, old, mlflow_store, FAST)  # the older run, promoted late
    assert late.decision == "stale"
    assert "older data" in late.reason
    forced = promote_version(NAME, old, mlflow_store, FAST, force=True)
    assert forced.decision == "stale"  # --force never serves older data either
    assert alias_version(client, NAME, "champion") == champion
    assert client.get_model_version(NAME, champion).tags["shoprank.last_event"] == served
    assert len(client.search_model_versions(f"name='{NAME}'")) == count  # nothing refitted
    assert client.get_model_version(NAME, old).tags[DECISION_TAG] == "stale"


@pytest.mark.slow  # a train flow or a server: `make test-release` runs it
@pytest.mark.usefixtures("prefect_server")
def test_train_resumes_after_a_failure_in_the_release(tmp_path, mlflow_store, demo_shop_dir,
                                                      monkeypatch):
    from flows.train import train
    from tasks.release import packaging

    config = load_config(None, **_buy_again_settings(tmp_path, demo_shop_dir))
    original = packaging.package_and_register

    def dies(*args, **kwargs):
        raise RuntimeError("the worker died while packaging")

    monkeypatch.setattr(packaging, "package_and_register", dies)
    with pytest.raises(RuntimeError, match="worker died"):
        train(config)
    monkeypatch.setattr(packaging, "package_and_register", original)
    resumed = train(config, resume=True)
    assert resumed["resumed"]
    assert resumed["release"]["decision"] == "promoted"
    client = MlflowClient(mlflow_store)
    again = train(config, resume=True)  # nothing unfinished: a fresh run, registered once
    assert not again["resumed"]
    runs = {v.run_id for v in client.search_model_versions(f"name='{NAME}'")
            if v.tags.get(KIND_TAG) == "evaluated"}
    assert runs == {resumed["run_id"], again["run_id"]}


def _champion_then_refresh(tmp_path: Path, shop: Path, uri: str) -> tuple[str, str, str, str]:
    """v(a) promoted and released as ra; the same recipe again, v(b): rejected, refreshed as rb."""
    a = register_version(tmp_path / "a", shop, uri, "buy_again", recipe=True)
    ra = promote_version(NAME, a, uri, FAST).released_version
    b = register_version(tmp_path / "b", shop, uri, "buy_again", recipe=True)
    second = promote_version(NAME, b, uri, FAST)
    assert second.decision == "rejected"  # a tie: the champion's recipe, refreshed
    return a, ra, b, second.released_version


def test_deciding_again_never_rewrites_a_registered_versions_files(tmp_path, mlflow_store,
                                                                   demo_shop_dir):
    client = MlflowClient(mlflow_store)
    a, ra, b, rb = _champion_then_refresh(tmp_path, demo_shop_dir, mlflow_store)
    before = {v: (version_files(mlflow_store, v, tmp_path / f"before-{v}"),
                  client.get_model_version(NAME, v).tags) for v in (ra, rb)}
    again = promote_version(NAME, a, mlflow_store, FAST, force=True)  # decide v(a) again
    assert again.promoted
    assert again.released_version not in (ra, rb)
    for v in (ra, rb):
        files, tags = before[v]
        assert version_files(mlflow_store, v, tmp_path / f"after-{v}") == files
        now = client.get_model_version(NAME, v).tags
        assert {k: now[k] for k in tags if k != "promotion.replaced_by"} == {
            k: tags[k] for k in tags if k != "promotion.replaced_by"}
    sources = [client.get_model_version(NAME, v).source for v in (ra, rb, again.released_version)]
    assert len(set(sources)) == 3  # every released copy under a path of its own
    # the earlier decision on v(a) stays readable: its record and its line in the description
    history = client.get_model_version(NAME, a).tags["promotion.history"].split(",")
    assert len(history) == 2
    run_id = client.get_model_version(NAME, a).run_id
    records = client.list_artifacts(run_id, f"promotions/v{a}")
    assert len(records) == 2
    assert client.get_model_version(NAME, a).description.count("PROMOTED") == 2


def test_force_promotes_a_rejected_challenger_whose_rival_was_refreshed(tmp_path, mlflow_store,
                                                                        demo_shop_dir):
    client = MlflowClient(mlflow_store)
    _, _, b, rb = _champion_then_refresh(tmp_path, demo_shop_dir, mlflow_store)
    assert alias_version(client, NAME, "champion") == rb
    rerun = promote_version(NAME, b, mlflow_store, FAST)
    assert (rerun.decision, rerun.reason) == ("unchanged", "already rejected earlier")
    forced = promote_version(NAME, b, mlflow_store, FAST, force=True)
    assert forced.decision == "promoted"
    assert forced.reason.startswith("forced (the gate said rejected)")
    champion = alias_version(client, NAME, "champion")
    assert champion == forced.released_version not in (b, rb)
    tags = client.get_model_version(NAME, champion).tags
    assert (tags[KIND_TAG], tags["release.evaluated_version"]) == ("challenger", b)


@pytest.mark.usefixtures("prefect_server")
def test_a_crash_after_the_alias_moved_is_completed_by_the_next_promotion(
        tmp_path, mlflow_store, demo_shop_dir, monkeypatch):
    client = MlflowClient(mlflow_store)
    first = register_version(tmp_path / "a", demo_shop_dir, mlflow_store, "popularity")
    assert promote_version(NAME, first, mlflow_store, FAST).promoted
    better = register_version(tmp_path / "b", demo_shop_dir, mlflow_store, "buy_again")

    def crash(*args, **kwargs):
        raise RuntimeError("killed between moving the alias and recording the decision")

    monkeypatch.setattr(MlflowClient, "update_model_version", crash)  # the description line
    with pytest.raises(RuntimeError, match="killed"):
        promote_version(NAME, better, mlflow_store, FAST)
    monkeypatch.undo()
    assert alias_version(client, NAME, "champion") == better  # it moved before the crash
    done = promote_version(NAME, None, mlflow_store, FAST)  # a rerun (the current challenger)
    assert (done.decision, done.released_version) == ("promoted", better)
    tags = client.get_model_version(NAME, better).tags
    assert tags[STATE_TAG] == "complete"
    assert "PROMOTED against champion" in client.get_model_version(NAME, better).description
    assert client.get_model_version(NAME, first).tags["promotion.replaced_by"] == better
    decided = [e for e in model_events(better)  # this store's decision (the server is shared)
               if e.payload.get("decision_id") == tags["promotion.decision_id"]]
    assert len(decided) == 1  # sent by the rerun, once
    again = promote_version(NAME, better, mlflow_store, FAST)
    assert again.decision == "unchanged"


def test_a_champion_whose_recipe_cannot_be_refitted_is_incomparable(tmp_path, mlflow_store,
                                                                    demo_shop_dir):
    client = MlflowClient(mlflow_store)
    old = register_version(tmp_path / "a", demo_shop_dir, mlflow_store, "buy_again", recipe=True)
    champion = promote_version(NAME, old, mlflow_store, FAST).released_version
    # as an upgrade leaves it: the champion's recipe names a family this version does not know
    run_id = client.get_model_version(NAME, champion).run_id
    client.log_dict(run_id, {"family": "buy_again_v0", "recent_days": 7.0}, "old/recipe.json")
    client.set_model_version_tag(NAME, champion, RECIPE_TAG, f"runs:/{run_id}/old/recipe.json")
    new = register_version(tmp_path / "b", demo_shop_dir, mlflow_store, "buy_again", recipe=True)
    decision = promote_version(NAME, new, mlflow_store, FAST)
    assert decision.decision == "incomparable"
    assert "cannot be refitted" in decision.reason
    assert "buy_again_v0" in decision.reason
    assert alias_version(client, NAME, "champion") == champion
    forced = promote_version(NAME, new, mlflow_store, FAST, force=True)
    assert forced.decision == "promoted"
    assert alias_version(client, NAME, "champion") == forced.released_version


def test_the_alias_moves_only_from_the_champion_the_decision_was_made_against(
        tmp_path, mlflow_store, demo_shop_dir):
    client = MlflowClient(mlflow_store)
    first = register_version(tmp_path / "a", demo_shop_dir, mlflow_store, "popularity")
    assert promote_version(NAME, first, mlflow_store, FAST).promoted
    other = register_version(tmp_path / "c", demo_shop_dir, mlflow_store, "recent_popularity")
    better = register_version(tmp_path / "b", demo_shop_dir, mlflow_store, "buy_again")
    decision = judge(client, NAME, better, first, None, FAST, tmp_path / "gate", force=False)
    write_pending(client, decision, *plan(client, NAME, better, first, decision))
    assert client.get_model_version(NAME, better).tags[EXPECTED_TAG] == first
    client.set_registered_model_alias(NAME, "champion", other)  # another host moved it meanwhile
    done = complete(client, NAME, better, mlflow_store, None, tmp_path / "release")
    assert done.decision == "stale"
    assert "moved from v" in done.reason
    assert alias_version(client, NAME, "champion") == other


@pytest.mark.slow  # a train flow or a server: `make test-release` runs it
def test_the_lock_is_the_same_whatever_address_names_the_tracking_server(tmp_path):
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = start_group([str(BIN / "mlflow"), "server", "--backend-store-uri", store,
                        "--default-artifact-root", str(tmp_path / "artifacts"), "--host",
                        "127.0.0.1", "--port", str(port), "--workers", "1"], log,
                       {"MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        from tasks.release.packaging import ensure_registered_model

        ensure_registered_model(MlflowClient(f"http://127.0.0.1:{port}"), NAME, "demo")
        spellings = [f"http://127.0.0.1:{port}", f"http://localhost:{port}",
                     f"http://127.0.0.1:{port}/"]
        names = {lock_name(registry_id(MlflowClient(uri), NAME)) for uri in spellings}
        assert len(names) == 1
        assert len(next(iter(names))) > len("shoprank-registry-") + 8
    finally:
        stop_group(proc)


def test_the_latency_guardrail_times_both_sides_alike_over_the_served_request_mix(
        tmp_path, mlflow_store, demo_shop_dir):
    client = MlflowClient(mlflow_store)
    old = register_version(tmp_path / "a", demo_shop_dir, mlflow_store, "buy_again", recipe=True)
    champion = promote_version(NAME, old, mlflow_store, FAST).released_version
    new = register_version(tmp_path / "b", demo_shop_dir, mlflow_store, "popularity")
    folder = gate_split(client, NAME, new, None, tmp_path)
    pyfunc, how = champion_side(client, NAME, new, champion, folder, tmp_path / "champion")
    assert isinstance(pyfunc, mlflow.pyfunc.PyFuncModel), how  # as the challenger is loaded
    from tasks.data.prepare import read_split

    split: Split = read_split(folder)
    records = request_records(split, 5, False, 20)
    mix = request_mix(records, [10, 20], 400)
    assert {r["k"] for r in mix} == {10, 20}
    with_session = [r for r in mix if r.get("recent_items")]
    assert 0.3 < len(with_session) / len(mix) < 0.7
    known = set(records["user_id"])
    assert 0 < sum(r["user_id"] not in known for r in mix) < len(with_session)
    assert mix == request_mix(records, [10, 20], 400)  # the same requests for both sides
    decision = promote_version(NAME, new, mlflow_store, FAST)
    assert {"latency_p99_ms", "latency_p50_ms"} <= set(decision.champion)
    # both request sets scored on both sides: returning users and live sessions
    assert {"ndcg@10", "live.ndcg@10"} <= set(decision.champion) & set(decision.challenger)
    tags = client.get_model_version(NAME, new).tags
    assert float(tags["promotion.challenger.live.ndcg_at_10"]) == pytest.approx(
        decision.challenger["live.ndcg@10"], rel=1e-5)


@pytest.mark.slow  # a train flow or a server: `make test-release` runs it
@pytest.mark.usefixtures("prefect_server")
def test_promote_outside_train_uses_the_training_runs_settings(tmp_path, mlflow_store,
                                                               demo_shop_dir):
    from flows.promote import promote
    from flows.train import train

    common = _buy_again_settings(tmp_path, demo_shop_dir, registry__promote=False,
                                 registry__margin=0.5, registry__latency_slack_ms=80.0)
    first = train(load_config(None, **common))["release"]["version"]
    assert promote(version=first)["decision"] == "promoted"
    second = train(load_config(None, split__test_share=0.3, **common))["release"]["version"]
    result = promote(version=second)  # no registry given: the run's margin of 50%
    assert result["decision"] == "rejected"
    assert "margin 50.0%" in result["reason"]
    tags = MlflowClient(mlflow_store).get_model_version(NAME, second).tags
    assert tags["promotion.margin"] == "0.5"
    assert tags[DECISION_TAG] == "rejected"
