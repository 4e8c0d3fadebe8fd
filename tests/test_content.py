"""Item vectors from the catalogue's text, their cache, and the content model that uses them."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow import MlflowClient

from flows.cli import run
from models.ann import nearest, searcher
from models.columns import ATTRIBUTES, BRAND, CATEGORY, EVENT_TYPE, ITEM, TIMESTAMP, TITLE, USER
from models.content import ContentNeighbours
from models.errors import ConfigError, DataError
from models.item_text import (
    VECTOR,
    WordLlamaEncoder,
    check_vectors,
    encode_items,
    encoder_from_spec,
    item_texts,
    normalised,
)
from tasks.data.item_vectors import cached_vectors

CATALOGUE = pl.DataFrame({
    ITEM: ["sweater", "jumper", "hose", "shirt", "new-jumper"],
    TITLE: ["red wool sweater", "crimson woolen jumper", "garden hose 20 m",
            "blue cotton shirt", "warm wool jumper"],
    CATEGORY: ["fashion/knitwear", "fashion/knitwear", "garden/tools", "fashion/shirts",
               "fashion/knitwear"],
    BRAND: ["Tika", "Ruka", "Hoza", "Tika", "Ruka"],
})


@pytest.fixture(scope="module")
def encoder() -> WordLlamaEncoder:
    return WordLlamaEncoder()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails (the encoder must need none)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_encoder_loads_and_encodes_with_the_network_off(no_network: None) -> None:
    encoder = WordLlamaEncoder()
    vectors = encoder.encode(CATALOGUE[TITLE].to_list())
    assert vectors.shape == (5, encoder.dim)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.name.startswith("wordllama-")


def test_vectors_are_deterministic_and_similar_texts_are_near(encoder: WordLlamaEncoder) -> None:
    first = encode_items(CATALOGUE, encoder)
    again = encode_items(CATALOGUE, WordLlamaEncoder())
    assert first.equals(again)
    v = dict(zip(first[ITEM], first[VECTOR].to_numpy(), strict=True))
    assert v["sweater"] @ v["jumper"] > v["sweater"] @ v["hose"]
    assert v["new-jumper"] @ v["jumper"] > v["new-jumper"] @ v["shirt"]


def test_item_text_reads_every_column_the_catalogue_has() -> None:
    items = CATALOGUE.head(1).with_columns(pl.Series(ATTRIBUTES, [["wool", "red"]]))
    assert item_texts(items)["text"][0] == "red wool sweater. fashion knitwear. Tika. wool red"
    bare = pl.DataFrame({ITEM: ["a"], TITLE: [None]}, schema={ITEM: pl.String, TITLE: pl.String})
    assert item_texts(bare)["text"].to_list() == [""]


def test_bad_vectors_and_bad_encoders_are_refused() -> None:
    texts = 2
    with pytest.raises(DataError, match="non-finite"):
        check_vectors(np.array([[1.0, 0.0], [np.nan, 0.0]]), texts, "x")
    with pytest.raises(DataError, match="unit norm"):
        check_vectors(np.array([[1.0, 0.0], [2.0, 0.0]]), texts, "x")
    check_vectors(np.array([[1.0, 0.0], [0.0, 0.0]]), texts, "x")  # zero: nothing read
    with pytest.raises(ConfigError, match="'wordllama' or"):
        encoder_from_spec("bert")
    with pytest.raises(ConfigError, match="no such folder"):
        encoder_from_spec("sentence-transformers:/nonexistent/model")


def test_vectors_are_cached_by_catalogue_content(tmp_path: Path) -> None:
    items, cache = tmp_path / "items.parquet", tmp_path / "cache"
    CATALOGUE.write_parquet(items)
    path, name, hit = cached_vectors(pl.read_parquet(items), "wordllama", cache)
    assert not hit
    assert path.is_file()
    assert name in path.name
    assert cached_vectors(pl.read_parquet(items), "wordllama", cache) == (path, name, True)
    CATALOGUE.with_columns(pl.col(TITLE).str.to_uppercase()).write_parquet(items)
    changed, _, hit = cached_vectors(pl.read_parquet(items), "wordllama", cache)
    assert not hit
    assert changed != path
    assert not list((tmp_path / "cache").glob("*.tmp"))


def _events(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return pl.DataFrame({USER: [r[0] for r in rows], ITEM: [r[1] for r in rows],
                         EVENT_TYPE: ["view"] * len(rows),
                         TIMESTAMP: [start + dt.timedelta(hours=r[2]) for r in rows]})


def test_content_model_recommends_an_item_nobody_has_seen(encoder: WordLlamaEncoder,
                                                          tmp_path: Path) -> None:
    vectors = encode_items(CATALOGUE, encoder)
    events = _events([("u1", "hose", 0), ("u1", "sweater", 1), ("u2", "shirt", 0),
                      ("u2", "hose", 1), ("u3", "hose", 2)])
    model = ContentNeighbours(n_recent=1).with_vectors(vectors).fit(events)
    lists = model.recommend(["u1", "nobody"], k=3, exclude_seen=True)
    mine = lists.filter(pl.col(USER) == "u1")[ITEM].to_list()
    assert mine[:2] == ["jumper", "new-jumper"] or mine[:2] == ["new-jumper", "jumper"]
    assert "sweater" not in mine
    assert "hose" not in mine
    assert lists.filter(pl.col(USER) == "nobody")[ITEM][0] == "hose"  # popularity fallback

    model.save(tmp_path / "content")
    loaded = ContentNeighbours.load(tmp_path / "content")
    assert loaded.recommend(["u1", "nobody"], k=3, exclude_seen=True).equals(lists)


def test_content_model_needs_its_vectors() -> None:
    with pytest.raises(ConfigError, match="with_vectors"):
        ContentNeighbours().fit(_events([("u1", "hose", 0)]))


@pytest.mark.usefixtures("prefect_server")
def test_no_content_flag_leaves_the_vectors_and_the_content_model_out(tmp_path, mlflow_store,
                                                                      demo_shop_dir):
    argv = ["train", "--data", str(demo_shop_dir), "--format", "parquet", "--no-ranker",
            "--no-transformer", "--output-dir", str(tmp_path / "out"), "--no-content"]
    assert run(argv) == 0
    client = MlflowClient(mlflow_store)
    (train_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [k for k in train_run.data.metrics if k.startswith("content.")]
    assert "content.encoder_name" not in train_run.data.params
    assert not (tmp_path / "out" / "item-vectors").exists()


def _clustered(n: int, seed: int, dims: int = 64, latent: int = 16) -> np.ndarray:
    """Unit vectors around 200 centres of a random subspace, like text vectors of a catalogue."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, latent))
    basis = np.linalg.qr(rng.normal(size=(dims, latent)))[0]
    rows = centres[rng.integers(200, size=n)] + 0.5 * rng.normal(size=(n, latent))
    rows = rows @ basis.T + 0.05 * rng.normal(size=(n, dims))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_exact_search_returns_the_best_rows_best_first() -> None:
    vectors = _clustered(301, seed=1, dims=16, latent=4)
    queries, base = vectors[:1], vectors[1:]
    index, score = nearest(queries, base, 7)
    products = (queries @ base.T)[0]
    assert index[0].tolist() == np.argsort(-products)[:7].tolist()
    assert np.allclose(score[0], products[index[0]])
    assert nearest(queries, base[:3], 7)[0].shape == (1, 3)  # fewer rows than wanted


def test_the_hnsw_graph_finds_the_exact_top_10_for_nearly_every_query() -> None:
    vectors = _clustered(20_500, seed=2)
    queries, base = vectors[:500], vectors[500:]
    exact, _ = nearest(queries, base, 10)
    search = searcher(base, exact_below=0)
    found, score = search(queries, 10)
    same = np.mean([set(f) == set(e) for f, e in zip(found, exact, strict=True)])
    assert same >= 0.99
    assert (np.diff(score, axis=1) <= 0).all()
    assert np.allclose(score, np.take_along_axis(queries @ base.T, found, axis=1), atol=1e-5)
    assert np.array_equal(searcher(base, exact_below=0)(queries, 10)[0], found)  # same graph


def test_content_model_through_the_hnsw_graph_recommends_as_the_exact_one() -> None:
    rng = np.random.default_rng(3)
    items = [f"i{j}" for j in range(3000)]
    vectors = pl.DataFrame({ITEM: items, VECTOR: pl.Series(_clustered(3000, seed=3, dims=32),
                                                           dtype=pl.Array(pl.Float32, 32))})
    events = _events([(f"u{rng.integers(300)}", items[rng.integers(3000)], int(hour))
                      for hour in range(3000)])
    users = events[USER].unique()
    exact = ContentNeighbours().with_vectors(vectors).fit(events)
    graph = ContentNeighbours(exact_below=0).with_vectors(vectors).fit(events)
    want = exact.recommend(users, k=10, exclude_seen=True)
    got = graph.recommend(users, k=10, exclude_seen=True)
    lists = [frame.group_by(USER).agg(pl.col(ITEM).sort()).sort(USER) for frame in (want, got)]
    assert (lists[0][ITEM] == lists[1][ITEM]).mean() >= 0.99
    assert graph.get_params()["exact_below"] == 0


def test_content_scores_do_not_depend_on_the_order_of_rows() -> None:
    rng = np.random.default_rng(1)
    items = [f"i{j}" for j in range(300)]
    vectors = pl.DataFrame({ITEM: items, "vector": pl.Series(
        normalised(rng.normal(size=(300, 32)).astype(np.float32)),
        dtype=pl.Array(pl.Float32, 32))})
    events = _events([(f"u{j % 40}", items[int(rng.integers(300))], j) for j in range(2_000)])
    shuffled = events.sample(fraction=1.0, shuffle=True, seed=2)
    first, second = (ContentNeighbours(n_recent=20).with_vectors(vectors).fit(e)
                     .recommend([f"u{j}" for j in range(40)], k=20, exclude_seen=True)
                     for e in (events, shuffled))
    assert first.height == 40 * 20
    assert first.equals(second)


def test_content_source_proposes_the_nearest_items_nobody_has_touched() -> None:
    from tasks.ranking.external_sources import ContentSource

    # 2-D unit vectors: "a" and the untouched "n1" point one way, "b" and "n2" the other
    vectors = pl.DataFrame({ITEM: ["a", "b", "n1", "n2"], "vector": pl.Series(
        [[1.0, 0.0], [0.0, 1.0], [0.9, 0.436], [0.1, 0.995]], dtype=pl.Array(pl.Float32, 2))})
    history = _events([("u1", "a", 0), ("u2", "b", 0), ("u3", "b", 1)])
    proposed = ContentSource(vectors, n=4, exclude_seen=True, encoder="hand", n_new=1)(
        history, ["u1", "u2"])
    new = proposed["content_new"].sort(USER)
    assert new[ITEM].to_list() == ["n1", "n2"]  # each user's nearest untouched item
    assert set(proposed["content"][ITEM]) <= {"a", "b", "n1", "n2"}
    assert "content_new" not in ContentSource(vectors, 4, True, "hand")(history, ["u1"])
