"""Catalogue updates: new items reach served lists without retraining; unavailable ones never do.

The bundle-level logic (:mod:`models.catalogue`) on a real bundle with hand-made vectors, then
``shoprank catalogue update`` end to end on a real MLflow store with the real encoder and the
network off: a new item reaches a known user's list, a rerun registers nothing, and the model
registered before is untouched.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow import MlflowClient

from flows.cli import run
from models.catalogue import update_bundle
from models.errors import DataError
from models.serving import ServingModel
from tasks.release.catalogue import UPDATE_TAG
from tasks.release.packaging import load_serving
from tasks.release.registry import alias_version
from tests.test_registry import register_version
from tests.test_serving import history_bundle

DIM = 16


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _vectors(ids: list[str], matrix: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids,
                         "vector": pl.Series(_unit(matrix), dtype=pl.Array(pl.Float32, DIM))})


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shop(tmp_path_factory, demo_shop_dir):
    """A buy-again bundle of the demo shop, and vectors: one new item per chosen user."""
    events = pl.read_parquet(demo_shop_dir / "events.parquet")
    bundle = history_bundle(events, tmp_path_factory.mktemp("catalogue"))
    known = events["item_id"].unique().sort().to_list()
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(len(known), DIM))
    row = {item: i for i, item in enumerate(known)}
    users = events.group_by("user_id").len().sort("len", descending=True)["user_id"][:3].to_list()
    new = []
    for user in users:  # a new item whose text is the mean of the user's items
        mine = events.filter(pl.col("user_id") == user)["item_id"].unique().to_list()
        new.append(matrix[[row[i] for i in mine]].mean(axis=0))
    ids = [*known, "new-a", "new-b", "new-c"]
    return bundle, events, users, _vectors(ids, np.vstack([matrix, *new]))


def _list(serving: ServingModel, user: str, k: int = 10, recent=None) -> list[str]:
    record = {"user_id": user, "k": k, **({"recent_items": recent} if recent else {})}
    return serving.predict([record])["item_id"].to_list()


def test_new_items_reach_known_users_sessions_and_visitors(shop, tmp_path):
    bundle, events, users, vectors = shop
    before = _files(bundle)
    old = ServingModel.load(bundle)
    top = _list(old, users[0])[0]
    counts = update_bundle(bundle, tmp_path / "updated", vectors, pl.Series([top]))
    assert (counts["new_items"], counts["unavailable"]) == (3, 1)
    assert counts["users_reached"] >= 3
    served = ServingModel.load(tmp_path / "updated")
    for user, new in zip(users, ("new-a", "new-b", "new-c"), strict=True):
        assert new in _list(served, user), user  # the known-user path, from the lists
        assert new not in _list(old, user)
    assert top not in _list(served, users[0], k=50)  # unavailable: never returned
    visitor = _list(served, "a-visitor", k=5, recent=["new-a"])
    trending = _list(served, "a-visitor", k=5)
    assert visitor != trending  # a session on a new item gets its nearest known items
    assert _files(bundle) == before  # the bundle it started from is untouched


def test_a_second_update_starts_from_the_models_own_lists(shop, tmp_path):
    bundle, _, users, vectors = shop
    first = tmp_path / "first"
    update_bundle(bundle, first, vectors)
    again = update_bundle(first, tmp_path / "again", vectors)
    assert again["new_items"] == 3  # still new: the model does not know them
    once, twice = ServingModel.load(first), ServingModel.load(tmp_path / "again")
    for user in users:
        assert _list(once, user, k=50) == _list(twice, user, k=50)  # not blended twice


def test_an_update_without_new_items_changes_no_list(shop, tmp_path):
    bundle, events, users, vectors = shop
    known = vectors.filter(~pl.col("item_id").str.starts_with("new-"))
    counts = update_bundle(bundle, tmp_path / "same", known)
    assert counts["new_items"] == 0
    old, same = ServingModel.load(bundle), ServingModel.load(tmp_path / "same")
    assert _list(old, users[0], k=30) == _list(same, users[0], k=30)
    with pytest.raises(DataError, match="already exists"):
        update_bundle(bundle, tmp_path / "same", known)


@pytest.fixture
def no_network(monkeypatch):
    """Refuse every connection that leaves the machine (the test's servers are on 127.0.0.1)."""
    connect = socket.socket.connect

    def local_only(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") \
                and self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network is off in this test: connection to {address} refused")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _catalogue(demo_shop_dir: Path, user: str, events: pl.DataFrame, path: Path) -> str:
    """The demo catalogue plus one new item that reads like the user's items (their words).

    The user's favourite item is marked unavailable; its id is returned.
    """
    items = pl.read_parquet(demo_shop_dir / "items.parquet")
    mine = events.filter(pl.col("user_id") == user).group_by("item_id").len().sort(
        "len", "item_id", descending=[True, False])
    texts = items.join(mine, on="item_id").sort("len", "item_id", descending=[True, False])
    new = items.head(1).with_columns(
        pl.lit("launched-1").alias("item_id"),
        pl.lit(" ".join(texts["title"].to_list())).alias("title"),
        pl.lit(" ".join(texts["description"].to_list())).alias("description"))
    favourite = mine["item_id"][0]
    catalogue = pl.concat([items, new]).with_columns(
        pl.when(pl.col("item_id") == favourite).then(pl.lit("no")).otherwise(pl.lit("yes"))
        .alias("available"))
    catalogue.drop("attributes", strict=False).write_csv(path)
    return favourite


def test_catalogue_update_registers_the_champion_with_a_new_item(tmp_path, demo_shop_dir,
                                                                 no_network, capsys):
    (tmp_path / "mlruns").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    base = register_version(tmp_path, demo_shop_dir, uri, "buy_again", recipe=True)
    client = MlflowClient(uri)
    client.set_registered_model_alias("shoprank", "champion", base)
    before = _files(Path(client.download_artifacts(
        client.get_model_version("shoprank", base).run_id, "", str(tmp_path / "before"))))
    events = pl.read_parquet(demo_shop_dir / "events.parquet")
    user = events.group_by("user_id").len().sort("len", "user_id",
                                                 descending=[True, False])["user_id"][0]
    file = tmp_path / "catalogue.csv"
    favourite = _catalogue(demo_shop_dir, user, events, file)
    argv = ["catalogue", "update", "--items", str(file), "--tracking-uri", uri]
    config = tmp_path / "settings.yaml"
    config.write_text(f"output_dir: {tmp_path / 'outputs'}\n")
    argv += ["--config", str(config)]

    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "1 new items, 1 unavailable" in out
    champion = alias_version(client, "shoprank", "champion")
    assert champion != base
    tags = client.get_model_version("shoprank", champion).tags
    assert tags["catalogue.base_version"] == base
    assert tags["shoprank.recipe"] == client.get_model_version("shoprank", base).tags.get(
        "shoprank.recipe")  # the champion's recipe, so the gate refits it as before
    _, serving = load_serving("models:/shoprank@champion", uri)
    answer = serving.predict([{"user_id": user, "k": 10}])["item_id"].to_list()
    assert "launched-1" in answer
    assert favourite not in serving.predict([{"user_id": user, "k": 50}])["item_id"].to_list()

    versions = len(client.search_model_versions("name='shoprank'"))
    assert run(argv) == 0  # the same catalogue again: found, nothing registered
    assert "already registered" in capsys.readouterr().out
    assert len(client.search_model_versions("name='shoprank'")) == versions
    assert [str(v.version) for v in client.search_model_versions("name='shoprank'")
            if v.tags.get(UPDATE_TAG) == tags[UPDATE_TAG]] == [champion]
    after = _files(Path(client.download_artifacts(
        client.get_model_version("shoprank", base).run_id, "", str(tmp_path / "after"))))
    assert {k: v for k, v in after.items() if not k.startswith("catalogue/")} == before


def test_a_catalogue_without_ids_or_words_is_refused(tmp_path, mlflow_store, capsys):
    bad = tmp_path / "items.csv"
    bad.write_text("sku,title\n1,red shirt\n")
    assert run(["catalogue", "update", "--items", str(bad)]) == 2
    assert "item_id" in capsys.readouterr().err
    bad.write_text("item_id,price\n1,3.5\n")
    assert run(["catalogue", "update", "--items", str(bad)]) == 2
    assert "no words" in capsys.readouterr().err


KILLER = """
import os, signal
from tasks.release import catalogue

def then_die(name):
    original = getattr(catalogue, name)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(catalogue, name, wrapped)

then_die(os.environ["SHOPRANK_KILL_AFTER"])
from flows.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("step", ["package_and_register", "move_alias"])
def test_an_update_killed_at_a_step_ends_consistent(tmp_path, demo_shop_dir, step):
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    (tmp_path / "mlruns").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    base = register_version(tmp_path, demo_shop_dir, uri, "buy_again", recipe=True)
    client = MlflowClient(uri)
    client.set_registered_model_alias("shoprank", "champion", base)
    events = pl.read_parquet(demo_shop_dir / "events.parquet")
    file = tmp_path / "catalogue.csv"
    _catalogue(demo_shop_dir, events["user_id"][0], events, file)
    (tmp_path / "scratch").mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TMPDIR": str(tmp_path / "scratch"),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "SHOPRANK_KILL_AFTER": step}
    env.pop("PREFECT_API_URL", None)
    argv = ["catalogue", "update", "--items", str(file)]
    log = tmp_path / "update.log"
    with log.open("ab") as out:
        # its own process group: the temporary Prefect server the killed process started is
        # orphaned by the SIGKILL, and stopped with the group
        killed = subprocess.Popen([sys.executable, "-c", KILLER, *argv], cwd=tmp_path, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(killed.pid, signal.SIGKILL)
        assert killed.returncode == -9, log.read_text()[-3000:]
        after_kill = len(client.search_model_versions("name='shoprank'"))
        assert after_kill == 2, log.read_text()[-3000:]  # the kill came after registering
        again = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()",
                                *argv], cwd=tmp_path, env=env, stdout=out,
                               stderr=subprocess.STDOUT, timeout=600, check=False)
    assert again.returncode == 0, log.read_text()[-3000:]
    versions = client.search_model_versions("name='shoprank'")
    assert len(versions) == 2  # the rerun found the update, registered nothing
    update = next(v for v in versions if v.tags.get(UPDATE_TAG))
    assert alias_version(client, "shoprank", "champion") == str(update.version)
    _, serving = load_serving("models:/shoprank@champion", uri)
    assert "launched-1" in serving.items.to_list()
