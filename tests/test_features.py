from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from models.baselines import CoVisitation
from models.errors import ValidationFailedError
from tasks.data.demo_data import generate_shop
from tasks.ranking.candidate_sources import CandidateConfig
from tasks.ranking.candidates import build_candidates
from tasks.ranking.features import build_features, check_features, feature_columns
from tasks.ranking.reranker import RankerConfig, RankingPipeline, training_windows
from tasks.splitting.split import cut_times, time_split
from tests.frames import hourly_events

T0 = dt.datetime(2025, 3, 3, 8, tzinfo=dt.UTC)  # a Monday


def _events(rows: list[tuple[str, str, str, float]]) -> pl.DataFrame:
    """(user, item, event type, hours after T0) rows as canonical events."""
    return hourly_events(T0, rows)


@pytest.fixture
def history() -> pl.DataFrame:
    return _events([
        ("u1", "a", "view", 0), ("u1", "b", "view", 1), ("u1", "a", "cart", 2),
        ("u1", "c", "view", 3),
        ("u2", "a", "view", 0), ("u2", "b", "view", 1), ("u2", "d", "purchase", 26),
    ])


@pytest.fixture
def items() -> pl.DataFrame:
    return pl.DataFrame({"item_id": ["a", "b", "c", "d"], "category_id": ["x", "x", "y", "y"],
                         "price": [10.0, 20.0, 30.0, None]})


def _features(history, items, users=("u1", "u2"), ordered_only=False):
    covis = CoVisitation().fit(history)
    cands = build_candidates(history, list(users), covis, CandidateConfig(), items, None,
                             ordered_only)
    return build_features(cands, history, items, covis, ordered_only)


def _row(frame: pl.DataFrame, user: str, item: str) -> dict:
    return frame.filter((pl.col("user_id") == user) & (pl.col("item_id") == item)).row(
        0, named=True)


def test_hand_computed_values(history, items):
    feats = _features(history, items)
    a = _row(feats, "u1", "a")
    assert (a["u_n_events"], a["u_n_view"], a["u_n_cart"], a["u_n_items"]) == (4, 3, 1, 3)
    assert (a["ui_n_events"], a["ui_n_view"], a["ui_n_cart"]) == (2, 1, 1)
    assert a["ui_steps_since_last"] == 1  # u1's last event (c) came after the cart on a
    assert a["ui_hours_since_last"] == pytest.approx(24.0)  # history end is u2's purchase at 26h
    assert a["ui_cat_n_events"] == 3
    assert a["ui_cat_share"] == pytest.approx(3 / 4)
    assert a["i_n_users"] == 2
    assert a["i_cart_user_share"] == pytest.approx(0.5)
    assert a["i_n_1d"] == 1
    assert a["i_n_3d"] == 3
    assert a["ctx_last_hour"] == 11
    assert a["ctx_last_weekday"] == 1
    assert a["u_mean_price"] == pytest.approx((10 + 20 + 10 + 30) / 4)
    d = _row(feats, "u1", "d")
    assert d["ui_n_events"] == 0
    assert d["ui_steps_since_last"] is None
    assert d["i_price"] is None
    assert d["i_purchase_user_share"] == 1.0


def test_text_similarity_features_by_hand(history, items):
    # unit vectors in 2-D: a, b and the new item n point one way, c and d the other
    vectors = pl.DataFrame({
        "item_id": ["a", "b", "c", "d", "n"],
        "vector": pl.Series([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
                            dtype=pl.Array(pl.Float32, 2))})
    covis = CoVisitation().fit(history)
    cands = pl.DataFrame({"user_id": ["u1", "u1", "u2", "u2"], "item_id": ["n", "z", "n", "a"],
                          "cand_rank": [1, 2, 1, 2]})
    feats = build_features(cands, history, items, covis, vectors=vectors)
    n = _row(feats, "u1", "n")
    assert n["ui_text_last"] == pytest.approx(0.0)  # u1's last item is c
    assert n["ui_text_recent"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)  # a, b, c
    assert n["ui_text_bought"] == 0.0  # u1 bought nothing
    assert _row(feats, "u2", "n")["ui_text_bought"] == pytest.approx(0.0)  # d
    assert _row(feats, "u2", "a")["ui_text_recent"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    z = _row(feats, "u1", "z")  # no vector: no evidence
    assert (z["ui_text_last"], z["ui_text_recent"]) == (0.0, 0.0)
    assert "ui_text_last" not in _features(history, items).columns


def test_ordered_only_has_no_time_features(history, items):
    feats = _features(history, items, ordered_only=True)
    timed = {"ui_hours_since_last", "u_days_since_last", "ctx_last_hour", "i_n_1d", "i_trend"}
    assert not timed & set(feats.columns)
    assert "ui_steps_since_last" in feats.columns


def test_events_after_the_history_end_change_no_feature():
    events, items = generate_shop(3_000, seed=5)
    t_valid, t_test = cut_times(events)
    later = events.filter(pl.col("timestamp") >= t_valid)
    # the same past, a different future: drop half the later events and shift the rest
    changed = pl.concat([
        events.filter(pl.col("timestamp") < t_valid),
        later.filter(pl.int_range(pl.len()) % 2 == 0).with_columns(
            pl.col("timestamp") + pl.duration(hours=1), pl.lit("purchase").alias("event_type")),
    ])
    splits = [time_split(e, t_valid, t_test) for e in (events, changed)]
    users = sorted(set(splits[0].train["user_id"]))
    pipe = RankingPipeline(RankerConfig(extra_windows=2), items)
    first, second = (pipe.pairs(s.train, users) for s in splits)
    assert first.height > 100
    # grouped float sums are not bit-stable between runs (threads): equal to 1e-9
    assert_frame_equal(first, second, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)
    # the earlier training windows are cut from the train part alone
    earlier = [training_windows(s, 2)[1:] for s in splits]
    assert len(earlier[0]) == 2
    for (hist_a, targets_a), (hist_b, targets_b) in zip(*earlier, strict=True):
        assert hist_a.equals(hist_b)
        assert targets_a.sort("user_id", "item_id").equals(
            targets_b.sort("user_id", "item_id"))
        assert hist_a["timestamp"].max() < t_valid


def test_feature_columns_and_suite(history, items):
    feats = _features(history, items)
    columns = feature_columns(feats)
    assert "user_id" not in columns
    assert "cand_rank" in columns
    assert "covis_sum" in columns
    report = check_features(feats)
    assert report.success
    broken = feats.with_columns(pl.lit(0).alias("cand_rank"),
                                pl.lit(1.5).alias("i_cart_user_share"))
    with pytest.raises(ValidationFailedError) as failed:
        check_features(broken)
    message = str(failed.value)
    assert "cand_rank" in message
    assert "i_cart_user_share" in message
    assert "fix:" in message


def test_text_features_do_not_depend_on_the_order_of_rows():
    # float32 sums over a user's items in a fixed order: the same bits however rows arrive,
    # so a resumed run trains the ranker a clean run trains
    events, items = generate_shop(3_000, seed=7)
    rng = np.random.default_rng(0)
    ids = items["item_id"].unique().sort()
    vectors = pl.DataFrame({"item_id": ids, "vector": pl.Series(
        rng.normal(size=(ids.len(), 32)).astype(np.float32), dtype=pl.Array(pl.Float32, 32))})
    users = events["user_id"].unique().sort().to_list()
    covis = CoVisitation().fit(events)
    cands = build_candidates(events, users, covis, CandidateConfig(), items, None, False)
    shuffled = events.sample(fraction=1.0, shuffle=True, seed=3)
    first, second = (build_features(cands, e, items, covis, vectors=vectors)
                     .select("user_id", "item_id", "ui_text_last", "ui_text_recent",
                             "ui_text_bought").sort("user_id", "item_id")
                     for e in (events, shuffled))
    assert first.height > 1_000
    assert_frame_equal(first, second, check_exact=True)
