"""Serving: the pure answering logic, the pyfunc, and the real HTTP server on localhost.

The process helpers here (free port, process groups, waiting for HTTP) are shared with the
deployment and browser tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import polars as pl
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flows.cli import run
from flows.recommend import MODEL_VERSION, batch_recommend
from flows.server import MAX_RECORDS
from models.baselines import BuyAgain, CoVisitation, Popularity
from models.errors import ConfigError
from models.serving import (
    EXCLUDE_SLACK,
    FAMILIES,
    RequestError,
    ServingModel,
    family_class,
    parse_requests,
    register_family,
)
from models.user_lists import UserItems, blend
from tasks.release.packaging import load_serving
from tests.test_registry import register_version

BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- process helpers (shared)
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_group(command: list[str], log: Path, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.Popen:
    """Start ``command`` in a new session (its own process group), output to ``log``."""
    handle = log.open("wb")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the whole process group of ``proc``: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            time.sleep(0.2)
        except subprocess.TimeoutExpired:
            continue
        try:  # children may outlive the leader for a moment
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200; fail with the log if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def post(url: str, body: bytes | dict) -> tuple[int, dict | str]:
    """POST JSON; returns the status and the decoded answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


# ---------------------------------------------------------------- the pure serving logic
def covisitation_bundle(events: pl.DataFrame, root: Path, **settings: object) -> ServingModel:
    """A co-visitation model fitted on ``events``, served from a bundle written under ``root``."""
    covis = CoVisitation().fit(events)
    covis.save(root / "covisitation")
    bundle = ServingModel.build(
        root / "bundle", family="covisitation", model_dir=root / "covisitation",
        trending=Popularity(window_days=7).fit(events).popularity_,
        neighbours=covis.neighbours_, users=events["user_id"], items=events["item_id"],
        exclude_seen=False, max_k=50, **settings)
    return ServingModel.load(bundle)


@pytest.fixture(scope="module")
def serving(tmp_path_factory, demo_shop_dir) -> ServingModel:
    events = pl.read_parquet(demo_shop_dir / "events.parquet")
    return covisitation_bundle(events, tmp_path_factory.mktemp("bundle"), config={"seed": 1})


def _items(frame: pl.DataFrame, user: str) -> list[str]:
    return frame.filter(pl.col("user_id") == user).sort("rank")["item_id"].to_list()


def test_known_user_gets_the_model_list(serving):
    user = serving.users[0]
    answer = serving.predict([{"user_id": user}])
    expected = serving.model.recommend([user], k=10)
    assert answer["rank"].to_list() == list(range(1, 11))
    assert _items(answer, user) == _items(expected, user)


def test_unknown_user_gets_trending_items_or_session_neighbours(serving):
    answer = serving.predict([{"user_id": "never-seen", "k": 5}])
    assert _items(answer, "never-seen") == serving.trending["item_id"].head(5).to_list()
    item = serving.neighbours["item_id"][0]
    session = serving.predict([{"user_id": "visitor", "recent_items": ["not-an-item", item]}])
    top = serving.neighbours.filter(pl.col("item_id") == item).sort(
        ["score", "neighbour"], descending=[True, False])["neighbour"].head(1).to_list()
    assert _items(session, "visitor")[:1] == top
    assert session.height == 10


def test_k_exclude_and_monotone_scores(serving):
    user = serving.users[1]
    first = _items(serving.predict([{"user_id": user, "k": 5}]), user)
    answer = serving.predict([{"user_id": user, "k": 5, "exclude": first[:3]},
                              {"user_id": "new", "k": 3, "exclude": serving.trending[
                                  "item_id"].head(2).to_list()}])
    assert not set(_items(answer, user)) & set(first[:3])
    assert len(_items(answer, user)) == 5
    assert _items(answer, "new") == serving.trending["item_id"][2:5].to_list()
    for _, group in answer.group_by("user_id"):
        scores = group.sort("rank")["score"].to_list()
        assert scores == sorted(scores, reverse=True)


def _live(serving: ServingModel, user: str, k: int, exclude: list[str]) -> list[str]:
    """What the model itself answers (before the trending fill)."""
    recs = serving.model.recommend([user], k=k + len(exclude), exclude_seen=False)
    return [i for i in _items(recs, user) if i not in exclude][:k]


def test_precomputed_and_live_model_lists_agree(serving):
    excluded = serving.trending["item_id"].head(20).to_list()
    records = [{"user_id": serving.users[0], "k": 4, "exclude": excluded[:1]},
               {"user_id": serving.users[1], "k": 50},  # max_k: still precomputed
               {"user_id": serving.users[2], "k": 50, "exclude": excluded}]  # deeper: the model
    answer = serving.predict(records)
    for record in records:
        user, exclude = record["user_id"], record.get("exclude", [])
        live = _live(serving, user, record["k"], exclude)
        assert _items(answer, user)[: len(live)] == live
        assert len(_items(answer, user)) == record["k"]


def test_lists_are_memory_mapped_and_the_model_loads_only_when_needed(serving, tmp_path):
    import numpy as np

    fresh = ServingModel.load(serving.folder)
    assert isinstance(fresh.lists.scores, np.memmap)
    assert fresh.list_depth == 50 + EXCLUDE_SLACK
    fresh.predict([{"user_id": u, "k": 50} for u in fresh.users.head(20)])
    assert fresh._model is None
    fresh.predict([{"user_id": fresh.users[0], "k": 50, "exclude": fresh.trending["item_id"]
                    .head(EXCLUDE_SLACK + 1).to_list()}])
    assert fresh._model is not None


def test_a_bundle_without_precomputed_lists_still_loads(serving, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(serving.folder, legacy)
    shutil.rmtree(legacy / "lists")
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["list_depth"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    old = ServingModel.load(legacy)
    records = [{"user_id": u, "k": 30} for u in serving.users.head(5)]
    assert old.predict(records).equals(serving.predict(records))


def test_the_user_index_and_the_session_model_are_memory_mapped(serving, tmp_path):
    import numpy as np

    fresh = ServingModel.load(serving.folder)
    assert isinstance(fresh.lists._rows.ids.base, np.memmap)  # views of memory-maps
    assert isinstance(fresh.lists._names.base, np.memmap)
    assert isinstance(fresh._session_neighbours._codes.base, np.memmap)
    assert fresh._neighbours is None  # the table is read only when asked for
    # a bundle written before the index, the names and the arrays existed builds them in memory
    older = tmp_path / "older"
    shutil.copytree(serving.folder, older)
    shutil.rmtree(older / "session")
    for name in ("index.npy", "index_rows.npy", "vocabulary.npy"):
        (older / "lists" / name).unlink()
    old = ServingModel.load(older)
    assert not isinstance(old.lists._rows.ids.base, np.memmap)
    assert old.lists._names is None
    items = fresh.neighbours["item_id"].unique(maintain_order=True).head(6).to_list()
    records = [{"user_id": u, "k": 20} for u in serving.users.head(5)] + [
        {"user_id": "visitor", "recent_items": items[:3], "k": 30},
        {"user_id": serving.users[7], "recent_items": items[3:], "k": 30},
        {"user_id": serving.users[8], "recent_items": [items[0], "ü-new", "y" * 300], "k": 30},
        {"user_id": "ü-nobody", "k": 5}, {"user_id": "x" * 300, "k": 5}]
    assert fresh.predict(records).equals(old.predict(records))
    assert fresh.predict(records).equals(serving.predict(records))
    # the history's item names the same way
    history = pl.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "ü", "y"]})
    built = UserItems.build(pl.Series(["a", "b"]), history)
    built.save(tmp_path / "history")
    opened = UserItems.open(tmp_path / "history")
    assert isinstance(opened._names.base, np.memmap)
    asked = ["ü", "x", "y", "z" * 300, "", "x"]
    assert opened.unseen(0, asked) == built.unseen(0, asked) == ["y", "z" * 300, ""]


def test_a_known_users_session_changes_the_list(serving):
    user = serving.users[3]
    plain = _items(serving.predict([{"user_id": user, "k": 10}]), user)
    item = serving.neighbours["item_id"][-1]
    top = serving.neighbours.filter(pl.col("item_id") == item).sort(
        ["score", "neighbour"], descending=[True, False])["neighbour"][0]
    live = serving.predict([{"user_id": user, "k": 10, "recent_items": ["not-an-item", item]}])
    assert top in _items(live, user)
    assert _items(live, user) != plain
    scores = live["score"].to_list()
    assert scores == sorted(scores, reverse=True)
    weight, serving.session_weight = serving.session_weight, 0.0
    try:
        ignored = serving.predict([{"user_id": user, "k": 10, "recent_items": [item]}])
    finally:
        serving.session_weight = weight
    assert _items(ignored, user) == plain


# ---------------------------------------------------------------- sessions that only add
@pytest.fixture(scope="module")
def shop_events(demo_shop_dir) -> pl.DataFrame:
    return pl.read_parquet(demo_shop_dir / "events.parquet")


def history_bundle(events: pl.DataFrame, root: Path) -> Path:
    """A blending family (buy-again) fitted on ``events``, its bundle knowing each history."""
    BuyAgain().fit(events).save(root / "buy_again")
    return ServingModel.build(
        root / "bundle", family="buy_again", model_dir=root / "buy_again",
        trending=Popularity(window_days=7).fit(events).popularity_,
        neighbours=CoVisitation().fit(events).neighbours_, users=events["user_id"],
        items=events["item_id"], history=events.select("user_id", "item_id"),
        exclude_seen=False, max_k=50)


@pytest.fixture(scope="module")
def blended(tmp_path_factory, shop_events) -> ServingModel:
    """A blending family (buy-again) whose bundle knows each user's history."""
    return ServingModel.load(history_bundle(shop_events, tmp_path_factory.mktemp("history")))


def _history(events: pl.DataFrame, user: str) -> list[str]:
    """A user's distinct items, newest last (what a shop front end replays)."""
    mine = events.filter(pl.col("user_id") == user).sort("timestamp")
    return mine["item_id"].reverse().unique(maintain_order=True).reverse().to_list()


def _new_item(serving: ServingModel, events: pl.DataFrame, user: str) -> str:
    """An item with session neighbours that ``user`` never interacted with."""
    seen = set(_history(events, user))
    return next(i for i in serving.neighbours["item_id"].unique(maintain_order=True)
                if i not in seen)


def test_a_session_of_known_items_leaves_a_known_users_list_as_it_is(blended, shop_events):
    users = blended.users.head(8).to_list()
    plain = blended.predict([{"user_id": u, "k": 10} for u in users])
    replayed = blended.predict([{"user_id": u, "k": 10, "recent_items": _history(
        shop_events, u)[-5:]} for u in users])
    assert replayed.equals(plain)  # items, order and scores


def test_only_new_session_items_change_a_known_users_list(blended, shop_events):
    user = blended.users[3]
    known, new = _history(shop_events, user)[-4:], _new_item(blended, shop_events, user)
    plain = _items(blended.predict([{"user_id": user}]), user)
    mixed = blended.predict([{"user_id": user, "recent_items": [*known[:2], new, *known[2:]]}])
    alone = blended.predict([{"user_id": user, "recent_items": [new]}])
    assert _items(mixed, user) != plain
    assert blended._session_list([new])[0][0] in _items(mixed, user)
    assert mixed.equals(alone)  # the known items count for nothing


def test_an_unknown_users_whole_session_counts(blended, shop_events):
    recent = _history(shop_events, blended.users[0])[-3:]  # someone else's known items
    answer = blended.predict([{"user_id": "a-new-visitor", "k": 5, "recent_items": recent}])
    session = [i for i, _ in blended._session_list(recent)]
    assert session
    assert _items(answer, "a-new-visitor") == session[:5]


def test_a_bundle_without_the_history_still_blends_the_whole_session(blended, shop_events,
                                                                      tmp_path):
    older = tmp_path / "older"
    shutil.copytree(blended.folder, older)
    shutil.rmtree(older / "history")
    old = ServingModel.load(older)
    user = blended.users[5]
    recent = _history(shop_events, user)[-3:]
    plain = [{"user_id": user, "k": 10}]
    assert old.predict(plain).equals(blended.predict(plain))
    live = _items(old.predict([{"user_id": user, "k": 10, "recent_items": recent}]), user)
    expected = blend(old.lists.get(user), old._session_list(recent)[: old.list_depth],
                     old.session_weight)
    assert live == [i for i, _ in expected][:10]


def test_blend_weights_ranks():
    model = [("a", 9.0), ("b", 8.0), ("c", 7.0)]
    session = [("c", 1.0), ("d", 0.5)]
    assert [i for i, _ in blend(model, session, 0.0)][:3] == ["a", "b", "c"]
    assert [i for i, _ in blend(model, session, 1.0)][:2] == ["c", "d"]
    fused = blend(model, session, 0.5)
    assert fused[0][0] == "c"  # in both lists
    assert [s for _, s in fused] == sorted((s for _, s in fused), reverse=True)


def test_batch_lists_cover_every_user(serving):
    frame = serving.recommend_users(serving.users, k=7)
    assert frame["user_id"].n_unique() == serving.users.len()
    assert frame.height == 7 * serving.users.len()


@pytest.mark.parametrize(("records", "field"), [
    ([{"k": 3}], "user_id"),
    ([{"user_id": None}], "user_id"),
    ([{"user_id": "u", "k": -1}], "k"),
    ([{"user_id": "u", "k": "abc"}], "k"),
    ([{"user_id": "u", "k": 2.5}], "k"),
    ([{"user_id": "u", "k": True}], "k"),
    ([{"user_id": "u", "k": 51}], "k"),
    ([{"user_id": "u", "recent_items": "i1"}], "recent_items"),
    ([{"user_id": "u", "exclude": {"a": 1}}], "exclude"),
    ([{"user_id": "u", "exclude": [None]}], "exclude item"),
    ([{"user_id": "u"}, {"user_id": "u"}], "user_id"),
    ([], "user_id"),
    (["just a string"], "user_id"),
])
def test_malformed_records_name_the_field(serving, records, field):
    with pytest.raises(RequestError) as caught:
        serving.predict(records)
    assert caught.value.field == field
    assert field.split()[0] in str(caught.value)


def test_missing_optional_fields_take_defaults():
    parsed = parse_requests([{"user_id": 7, "k": float("nan"), "recent_items": None,
                              "exclude": float("nan")}, {"user_id": "b", "k": 3.0}])
    assert parsed[0].user_id == "7"
    assert (parsed[0].k, parsed[0].recent_items, parsed[0].exclude) == (10, (), ())
    assert parsed[1].k == 3


def test_families_plug_in_by_name():
    with pytest.raises(ConfigError, match="register_family"):
        family_class("no-such-family")
    register_family("my-popularity", Popularity)
    try:
        assert family_class("my-popularity") is Popularity
        assert family_class("covisitation") is CoVisitation
    finally:
        FAMILIES.pop("my-popularity")


# ---------------------------------------------------------------- the pyfunc and the server
@pytest.fixture(scope="module")
def champion_store(tmp_path_factory, demo_shop_dir) -> str:
    root = tmp_path_factory.mktemp("serving-store")
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    version = register_version(root, demo_shop_dir, uri, "buy_again")
    MlflowClient(uri).set_registered_model_alias("shoprank", "champion", version)
    return uri


def test_pyfunc_answers_and_rejects_with_400(champion_store):
    pyfunc, serving = load_serving("models:/shoprank@champion", champion_store)
    user = serving.users[0]
    answer = pyfunc.predict(pd.DataFrame([{"user_id": user, "k": 4}]))
    assert list(answer.columns) == ["user_id", "item_id", "score", "rank"]
    assert answer["rank"].tolist() == [1, 2, 3, 4]
    with pytest.raises(MlflowException, match="k must be an integer") as caught:
        pyfunc.predict(pd.DataFrame([{"user_id": user, "k": 0}]))
    assert caught.value.get_http_status_code() == 400


def test_batch_recommend_for_a_users_file(champion_store, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("u000036\nsomeone-new\n\nu000036\n")
    out = tmp_path / "recs.parquet"
    result = batch_recommend.fn("models:/shoprank@champion", champion_store, str(users), 5,
                                str(out))
    frame = pl.read_parquet(out)
    assert (result["users"], result["rows"], frame.height) == (2, 10, 10)
    assert set(frame[MODEL_VERSION]) == {result["version"]}
    with pytest.raises(ConfigError, match="no version with alias 'nope'"):
        batch_recommend.fn("models:/shoprank@nope", champion_store, None, 5, str(out))


def test_serve_without_a_model_is_one_clear_message(tmp_path, capsys, monkeypatch, mlflow_store):
    def no_exec(*args: object) -> None:
        raise AssertionError(f"the server would have started: {args}")

    monkeypatch.setattr(os, "execvpe", no_exec)  # never replace the test process
    code = run(["serve", "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "alias 'champion'" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def server(tmp_path_factory, champion_store):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    proc = start_group([str(BIN / "shoprank"), "serve", "--host", "127.0.0.1", "--port",
                        str(port), "--tracking-uri", champion_store], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def test_server_answers_good_requests(server, champion_store):
    _, serving = load_serving("models:/shoprank@champion", champion_store)
    known, item = serving.users[0], serving.neighbours["item_id"][0]
    records = [{"user_id": known}, {"user_id": "stranger", "k": 3},
               {"user_id": "visitor", "k": 5, "recent_items": [item]},
               {"user_id": serving.users[1], "k": 4, "exclude": [serving.trending["item_id"][0]]}]
    status, body = post(f"{server}/invocations", {"dataframe_records": records})
    assert status == 200, body
    got = pl.DataFrame(body["predictions"])
    expected = serving.predict(records)
    assert got.select("user_id", "item_id", "rank").equals(
        expected.select("user_id", "item_id", "rank"))
    assert len(_items(got, known)) == 10
    assert _items(got, "stranger") == serving.trending["item_id"].head(3).to_list()
    assert serving.trending["item_id"][0] not in _items(got, serving.users[1])


@pytest.mark.parametrize(("body", "needle"), [
    ({"dataframe_records": [{"k": 3}]}, "user_id"),
    ({"dataframe_records": [{"user_id": "u", "k": -1}]}, "k must be an integer"),
    ({"dataframe_records": [{"user_id": "u", "k": "abc"}]}, "k must be an integer"),
    ({"dataframe_records": [{"user_id": "u", "k": 10**9}]}, "k must be an integer"),
    ({"dataframe_records": [{"user_id": "u", "recent_items": "i1"}]}, "recent_items"),
    (b"this is not json", "JSON"),
    ({"records": [{"user_id": "u"}]}, "dataframe_records"),
])
def test_server_rejects_bad_requests_with_4xx(server, body, needle):
    status, answer = post(f"{server}/invocations", body)
    assert 400 <= status < 500, answer
    assert needle in json.dumps(answer)
    status, _ = post(f"{server}/invocations", {"dataframe_records": [{"user_id": "still-up"}]})
    assert status == 200


def test_other_envelopes_and_the_record_limit(server, champion_store):
    _, serving = load_serving("models:/shoprank@champion", champion_store)
    user = serving.users[0]
    by_records = post(f"{server}/invocations", {"dataframe_records": [{"user_id": user, "k": 3}]})
    by_split = post(f"{server}/invocations",
                    {"dataframe_split": {"columns": ["user_id", "k"], "data": [[user, 3]]}})
    by_inputs = post(f"{server}/invocations", {"inputs": [{"user_id": user, "k": 3}]})
    assert by_records == by_split == by_inputs
    assert by_records[0] == 200
    many = [{"user_id": f"u{i}"} for i in range(MAX_RECORDS + 1)]
    status, answer = post(f"{server}/invocations", {"dataframe_records": many})
    assert status == 400
    assert "shoprank recommend" in answer["message"]


def test_mlflow_scoring_server_gives_the_same_answers(tmp_path, champion_store, server):
    port = free_port()
    log = tmp_path / "mlflow-serve.log"
    proc = start_group([str(BIN / "shoprank"), "serve", "--mlflow-server", "--workers", "1",
                        "--port", str(port), "--tracking-uri", champion_store], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log)
        _, serving = load_serving("models:/shoprank@champion", champion_store)
        records = [{"user_id": serving.users[0], "k": 4},
                   {"user_id": "visitor", "recent_items": [serving.neighbours["item_id"][0]]}]
        ours = post(f"{server}/invocations", {"dataframe_records": records})
        theirs = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": records})
        assert ours[0] == theirs[0] == 200
        assert pl.DataFrame(ours[1]["predictions"]).select("user_id", "item_id", "rank").equals(
            pl.DataFrame(theirs[1]["predictions"]).select("user_id", "item_id", "rank"))
        bad = post(f"http://127.0.0.1:{port}/invocations",
                   {"dataframe_records": [{"user_id": "u", "k": 0}]})
        assert bad[0] == 400
        assert "k must be an integer" in bad[1]["message"]
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def tiny_transformer(tmp_path_factory, shop_events) -> Path:
    """A one-epoch transformer fitted on the demo shop, saved; returns its folder."""
    from models.transformer import SequentialTransformer, TransformerConfig

    folder = tmp_path_factory.mktemp("tiny-transformer") / "transformer"
    SequentialTransformer(TransformerConfig(
        hidden_size=16, n_blocks=1, n_heads=1, max_len=10, epochs=1, batch_size=256,
        n_negatives=8, device="cpu", num_threads=1, seed=1)).fit(shop_events).save(folder)
    return folder


def _transformer_bundle(folder: Path, model_dir: Path, events: pl.DataFrame,
                        history: pl.DataFrame | None = None) -> ServingModel:
    bundle = ServingModel.build(
        folder, family="transformer", model_dir=model_dir,
        trending=Popularity(window_days=7).fit(events).popularity_,
        neighbours=CoVisitation().fit(events).neighbours_, users=events["user_id"],
        items=events["item_id"], history=history, exclude_seen=False, max_k=20)
    return ServingModel.load(bundle)


def test_a_session_reading_model_answers_live_sessions_itself(tmp_path, tiny_transformer,
                                                              shop_events):
    from models.transformer import SequentialTransformer

    model = SequentialTransformer.load(tiny_transformer)
    serving = _transformer_bundle(tmp_path / "bundle", tiny_transformer, shop_events)
    assert serving.session_model
    assert serving._model is not None  # loaded before traffic
    user, recent = serving.users[0], serving.neighbours["item_id"].head(2).to_list()
    answer = serving.predict([{"user_id": user, "k": 5, "recent_items": recent},
                              {"user_id": "someone-new", "k": 5, "recent_items": recent}])
    own = model.recommend_session([user], [recent], k=5, exclude_seen=False)
    assert _items(answer, user) == own["item_id"].tolist()
    assert _items(answer, "someone-new") == [i for i, _ in serving._session_list(recent)][:5]


def test_a_session_reading_model_reads_only_the_new_session_items(tmp_path, tiny_transformer,
                                                                  shop_events):
    from models.transformer import SequentialTransformer

    model = SequentialTransformer.load(tiny_transformer)
    serving = _transformer_bundle(tmp_path / "bundle", tiny_transformer, shop_events,
                                  shop_events.select("user_id", "item_id"))
    user = serving.users[2]
    known, new = _history(shop_events, user)[-3:], _new_item(serving, shop_events, user)
    plain = serving.predict([{"user_id": user, "k": 5}])
    assert serving.predict([{"user_id": user, "k": 5, "recent_items": known}]).equals(plain)
    mixed = serving.predict([{"user_id": user, "k": 5, "recent_items": [known[0], new]}])
    own = model.recommend_session([user], [[new]], k=5, exclude_seen=False)
    assert _items(mixed, user) == own["item_id"].tolist()
    assert _items(mixed, user) != _items(plain, user)


def test_history_items_tell_new_items_from_known_ones(tmp_path):
    from models.user_lists import UserItems

    history = pl.DataFrame({"user_id": ["a", "a", "b", "a", "x"],
                            "item_id": ["i2", "i1", "i3", "i2", "i9"]})
    UserItems.build(pl.Series(["b", "a", "c"]), history).save(tmp_path / "history")
    known = UserItems.open(tmp_path / "history")
    assert len(known) == 3  # rows follow the users given; x is not one of them
    assert known.unseen(1, ["i3", "i1", "new", "i2", "new"]) == ["i3", "new", "new"]
    assert known.unseen(0, ["i1", "i3", "i9"]) == ["i1", "i9"]
    assert known.unseen(2, ["i1"]) == ["i1"]  # a user without history
    assert known.unseen(1, []) == []
