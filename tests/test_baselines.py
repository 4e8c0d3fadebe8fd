from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from models.base import IdIndex, NotFittedError, Recommender
from models.baselines import BuyAgain, CoVisitation, Popularity
from models.columns import ITEM, SCORE, USER
from models.errors import ConfigError, DataError, MissingColumnsError
from models.metrics import COUNT, evaluate
from models.partials import ALL_TIME, DEFAULT_EVENT_WEIGHTS, SharedState, weighted_counts
from tasks.evaluation.evaluate import baseline_factories
from tasks.evaluation.evaluate_shards import RECENT, _shared, write_popularity
from tasks.splitting.split import leave_one_out

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)


def _events(rows: list[tuple], session: bool = False) -> pl.DataFrame:
    """Rows of (user, item, event_type, hours after T0[, session])."""
    names = ["user_id", "item_id", "event_type", "hours"] + (["session_id"] if session else [])
    frame = pl.DataFrame(rows, schema=names, orient="row")
    return frame.with_columns(
        (pl.lit(T0) + pl.duration(hours=pl.col("hours"))).dt.cast_time_unit("us").alias("timestamp")
    ).drop("hours")


def _items(recs: pl.DataFrame, user: str) -> list[str]:
    return recs.filter(pl.col("user_id") == user)["item_id"].to_list()


# a: 3 views (3.0), b: 1 purchase (4.0), c: 1 cart (3.0), d: 1 view 10 days later (1.0)
POP_EVENTS = _events(
    [
        ("u1", "a", "view", 0),
        ("u2", "a", "view", 1),
        ("u3", "a", "view", 2),
        ("u1", "b", "purchase", 3),
        ("u2", "c", "cart", 4),
        ("u3", "d", "view", 240),
    ]
)


def test_popularity_orders_by_weighted_counts_with_id_tiebreak() -> None:
    recs = Popularity().fit(POP_EVENTS).recommend(["new"], k=4)
    assert _items(recs, "new") == ["b", "a", "c", "d"]  # a and c tie at 3.0: id order
    assert recs["score"].to_list() == [4.0, 3.0, 3.0, 1.0]
    assert recs["rank"].to_list() == [1, 2, 3, 4]


def test_popularity_window_counts_only_recent_events() -> None:
    model = Popularity(window_days=1).fit(POP_EVENTS)
    # only d lies within a day of the latest event; the rest follow in all-time order
    assert _items(model.recommend(["new"], k=4), "new") == ["d", "b", "a", "c"]


def test_popularity_event_weights_and_exclude_seen() -> None:
    model = Popularity(event_weights={"view": 1.0}).fit(POP_EVENTS)
    assert _items(model.recommend(["u1"], k=2), "u1") == ["a", "d"]
    # u1 saw a and b: the list is filled with the next best unseen items
    assert _items(model.recommend(["u1"], k=2, exclude_seen=True), "u1") == ["d", "c"]


def test_k_larger_than_catalogue_returns_every_allowed_item() -> None:
    recs = Popularity().fit(POP_EVENTS).recommend(["u1", "new"], k=50, exclude_seen=True)
    assert len(_items(recs, "new")) == 4
    assert sorted(_items(recs, "u1")) == ["c", "d"]
    assert recs.filter(pl.col("user_id") == "u1")["rank"].to_list() == [1, 2]


def test_output_schema_and_order() -> None:
    recs = CoVisitation().fit(POP_EVENTS).recommend(pl.Series(["u3", "u1", "u3"]), k=3)
    assert recs.columns == ["user_id", "item_id", "score", "rank"]
    assert recs.dtypes == [pl.String, pl.String, pl.Float64, pl.Int64]
    assert recs["user_id"].to_list() == ["u1"] * 3 + ["u3"] * 3
    assert recs.equals(recs.sort("user_id", "rank"))
    for _, group in recs.group_by("user_id"):
        assert group["score"].is_sorted(descending=True)


# Sequences: three users go a -> b, one goes a -> c; e follows d twice.
COVIS_EVENTS = _events(
    [
        ("s1", "a", "view", 0), ("s1", "b", "view", 1),
        ("s2", "a", "view", 0), ("s2", "b", "view", 1),
        ("s3", "a", "view", 0), ("s3", "b", "view", 1),
        ("s4", "a", "view", 0), ("s4", "c", "view", 1),
        ("s5", "d", "view", 0), ("s5", "e", "view", 1),
        ("s6", "d", "view", 0), ("s6", "e", "view", 1),
        ("x", "d", "view", 0), ("x", "a", "view", 1),
    ]
)  # fmt: skip


def test_covisitation_ranks_frequent_next_items_first() -> None:
    model = CoVisitation(alpha=0.0, source_alpha=0.0, window=0).fit(COVIS_EVENTS)
    recs = model.recommend(["s4"], k=3, exclude_seen=True)
    assert _items(recs, "s4")[0] == "b"  # a -> b three times, a -> c once
    assert (recs["score"] > 0).head(1).all()


def test_covisitation_weights_recent_items_more() -> None:
    # transitions only (gap 1, view weight 1, no popularity normalisation):
    # a -> b 3 times, d -> e 4 times; x saw d, then a (a is the newest, r = 0; d has r = 1)
    rows = [(f"s{u}", "a", "view", 0) for u in range(3)] + [
        (f"s{u}", "b", "view", 1) for u in range(3)
    ]
    rows += [(f"t{u}", "d", "view", 0) for u in range(4)] + [
        (f"t{u}", "e", "view", 1) for u in range(4)
    ]
    events = _events([*rows, ("x", "d", "view", 0), ("x", "a", "view", 1)])
    params = {"alpha": 0.0, "source_alpha": 0.0, "window": 0, "max_gap": 1}

    def scores(decay: float) -> dict[str, float]:
        recs = CoVisitation(recency_decay=decay, **params).fit(events).recommend(["x"], k=2)
        return dict(recs.select("item_id", "score").iter_rows())

    # no decay: b = 3 * 1, e = 4 * 1 -> e first
    assert scores(1.0) == pytest.approx({"e": 4.0, "b": 3.0})
    # decay 0.5: b = 3 * 1, e = 4 * 0.5 = 2 -> the newest item's neighbour wins
    assert scores(0.5) == pytest.approx({"b": 3.0, "e": 2.0})


def test_covisitation_ignores_pairs_far_apart_in_time_or_across_sessions() -> None:
    far = _events([("u", "a", "view", 0), ("u", "b", "view", 48), ("v", "a", "view", 0)])
    model = CoVisitation(time_window_hours=24).fit(far)
    assert model.neighbours_.is_empty()
    assert not CoVisitation(time_window_hours=72).fit(far).neighbours_.is_empty()
    split = _events(
        [("u", "a", "view", 0, "s1"), ("u", "b", "view", 1, "s2"), ("v", "c", "view", 0, "s3")],
        session=True,
    )
    assert CoVisitation().fit(split).neighbours_.is_empty()


def test_covisitation_falls_back_to_popularity() -> None:
    model = CoVisitation().fit(COVIS_EVENTS)
    recs = model.recommend(["stranger", "s4"], k=5, exclude_seen=True)
    popular = Popularity().fit(COVIS_EVENTS).recommend(["stranger"], k=5)
    assert _items(recs, "stranger") == _items(popular, "stranger")
    assert (recs.filter(pl.col("user_id") == "stranger")["score"] <= 0).all()
    assert len(_items(recs, "s4")) == 3  # 5 items, 2 seen: personal items then popular fill
    assert "a" not in _items(recs, "s4")


def test_buy_again_ranks_own_items_by_weight_and_recency() -> None:
    events = _events(
        [
            ("u", "old", "purchase", 0),  # 4 * 0.5 ** (60 / 30) = 1.0
            ("u", "new", "view", 24 * 60),  # 1 * 0.5 ** 0 = 1.0, and a second view
            ("u", "new", "view", 24 * 60),
            ("v", "hit", "view", 24 * 60),
        ]
    )
    recs = BuyAgain(half_life_days=30).fit(events).recommend(["u"], k=3)
    assert _items(recs, "u") == ["new", "old", "hit"]
    assert recs["score"].head(2).to_list() == pytest.approx([2.0, 1.0])
    no_decay = BuyAgain(half_life_days=None).fit(events).recommend(["u"], k=2)
    assert _items(no_decay, "u") == ["old", "new"]


def test_buy_again_with_exclude_seen_is_popularity() -> None:
    model = BuyAgain().fit(POP_EVENTS)
    assert _items(model.recommend(["u1"], k=2, exclude_seen=True), "u1") == ["c", "d"]
    assert _items(model.recommend(["new"], k=2), "new") == ["b", "a"]


@pytest.mark.parametrize(
    "model",
    [Popularity(window_days=3), BuyAgain(half_life_days=7), CoVisitation(n_recent=2)],
    ids=["popularity", "buy_again", "covisitation"],
)
def test_save_load_reproduces_recommendations(model: Recommender, tmp_path: Path) -> None:
    model.fit(COVIS_EVENTS)
    users = ["s1", "x", "unknown"]
    model.save(tmp_path / "m")
    loaded = type(model).load(tmp_path / "m")
    assert loaded.get_params() == model.get_params()
    for exclude in (False, True):
        assert_frame_equal(
            loaded.recommend(users, k=4, exclude_seen=exclude),
            model.recommend(users, k=4, exclude_seen=exclude),
        )
    assert not list((tmp_path / "m").glob("*.pkl"))


def test_errors_a_user_can_cause(tmp_path: Path) -> None:
    with pytest.raises(NotFittedError, match="fit"):
        Popularity().recommend(["u"])
    Popularity().fit(POP_EVENTS).save(tmp_path / "pop")
    with pytest.raises(DataError, match="Popularity"):
        CoVisitation.load(tmp_path / "pop")
    with pytest.raises(DataError, match="params.json"):
        Popularity.load(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="event_weights"):
        Popularity(event_weights={"click": 1.0}).fit(POP_EVENTS)
    with pytest.raises(DataError, match="click"):
        Popularity().fit(POP_EVENTS.with_columns(pl.lit("click").alias("event_type")))
    with pytest.raises(MissingColumnsError, match="timestamp"):
        BuyAgain().fit(POP_EVENTS.drop("timestamp"))
    with pytest.raises(ConfigError, match="k must"):
        Popularity().fit(POP_EVENTS).recommend(["u1"], k=0)


def test_id_index_round_trip(tmp_path: Path) -> None:
    index = IdIndex(["b", "a", "b", "c"])
    assert len(index) == 3
    assert index.to_index(["c", "zz", "b"]).tolist() == [2, -1, 0]
    assert index.to_ids(np.array([1, 0])).to_list() == ["a", "b"]
    index.save(tmp_path / "ids.parquet")
    assert IdIndex.load(tmp_path / "ids.parquet").ids.to_list() == ["b", "a", "c"]


def test_covisitation_beats_popularity_on_real_sequences(shared_data: Path) -> None:
    path = shared_data / "amazon_s3rec" / "Beauty.txt.gz"
    with gzip.open(path, "rt") as handle:
        lines = [line.split() for _, line in zip(range(8000), handle, strict=False)]
    rows = [(u, item, "purchase", pos) for u, *seq in lines for pos, item in enumerate(seq)]
    split = leave_one_out(_events(rows))
    results = {}
    for model in (Popularity(), CoVisitation()):
        recs = model.fit(split.train).recommend(
            split.valid_targets["user_id"], k=10, exclude_seen=True
        )
        results[type(model).__name__] = evaluate(recs, split.valid_targets, ks=(10,))
    # 8,000 users: about 0.026 against 0.008 (all 22,363 users: 0.068 against 0.008)
    assert results["CoVisitation"]["ndcg@10"] > 2.5 * results["Popularity"]["ndcg@10"]


@pytest.mark.parametrize("model_class", [Popularity, BuyAgain, CoVisitation])
def test_exclude_seen_equals_full_ranking_minus_seen(model_class: type[Recommender]) -> None:
    model = model_class().fit(COVIS_EVENTS)
    users = ["s1", "s4", "x", "nobody"]
    full = model.recommend(users, k=100)
    short = model.recommend(users, k=2, exclude_seen=True)
    seen = COVIS_EVENTS.select("user_id", "item_id").unique()
    expected = (
        full.join(seen, on=["user_id", "item_id"], how="anti")
        .filter(pl.int_range(pl.len()).over("user_id") < 2)
        .select("user_id", "item_id")
    )
    assert short.select("user_id", "item_id").equals(expected)


def test_a_part_fitted_with_the_stage_orderings_recommends_as_with_the_counts(
    tmp_path: Path,
) -> None:
    """The sharded score task's ready orderings (written once per stage) change no list."""
    rng = np.random.default_rng(3)  # many ties: 40 users, 30 items, a few events each
    rows = [(f"u{u}", f"i{rng.integers(30)}", str(rng.choice(["view", "cart", "purchase"])),
             int(rng.integers(0, 24 * 20))) for u in range(40) for _ in range(5)]
    events = _events(rows)
    t_max = events["timestamp"].max()
    counts = weighted_counts(events, DEFAULT_EVENT_WEIGHTS, t_max, 7.0).rename(
        {SCORE: RECENT}).join(events.group_by(ITEM).len(COUNT), on=ITEM)
    ordered = {k: pl.read_parquet(v) for k, v in write_popularity(counts, tmp_path).items()}
    pairs = CoVisitation().partial(events, t_max)["pairs"]
    neighbours = CoVisitation().neighbours_from(
        pairs, counts.select(ITEM, pl.col(ALL_TIME).alias(SCORE)))
    part = events.filter(pl.col(USER).is_in([f"u{u}" for u in range(0, 40, 3)]))
    users = part[USER].unique()
    for name, factory in baseline_factories(7.0).items():
        score = RECENT if name == "recent_popularity" else ALL_TIME
        from_counts = SharedState(t_max, {
            "counts": counts.select(ITEM, pl.col(score).alias(SCORE), ALL_TIME),
            "neighbours": neighbours})
        expected = factory().fit(part, from_counts).recommend(users, k=8, exclude_seen=True)
        got = factory().fit(part, _shared(name, t_max, ordered, neighbours)).recommend(
            users, k=8, exclude_seen=True)
        assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)


def test_the_baselines_save_their_validation_lists(tmp_path: Path, demo_shop_dir: Path) -> None:
    """Beside each saved baseline: the top max(ks) of every scored validation user."""
    from prefect.logging import disable_run_logger

    from models.session_blend import VALID_LISTS
    from tasks.data.prepare import read_split, write_split
    from tasks.evaluation.evaluate import evaluate_baselines
    from tasks.splitting.split import Selection, cut_times, time_split

    events = pl.read_parquet(demo_shop_dir / "events.parquet")
    write_split(time_split(events, *cut_times(events)), tmp_path / "split")
    selection = Selection(share=0.5, seed=3)
    with disable_run_logger():
        scores = evaluate_baselines.fn(tmp_path / "split", [5, 10], events[ITEM].n_unique(),
                                       False, 7.0, tmp_path / "models", None, selection)
    targets = selection.targets(read_split(tmp_path / "split"))
    for name, stages in scores.items():
        lists = pl.read_parquet(tmp_path / "models" / name / VALID_LISTS)
        assert lists.columns == ["user_id", "item_id", "score", "rank"]
        assert set(lists[USER]) == set(targets[USER])
        assert lists.group_by(USER).len()["len"].max() == 10
        assert evaluate(lists, targets, ks=[5, 10])["ndcg@10"] == stages["valid"]["ndcg@10"]
