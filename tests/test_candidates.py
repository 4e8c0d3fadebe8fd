from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from models.baselines import CoVisitation
from models.errors import ConfigError
from tasks.ranking.candidate_sources import BUILTIN_SOURCES, CandidateConfig, merge_sources
from tasks.ranking.candidates import build_candidates, candidate_recall, label_candidates
from tests.frames import hourly_events

T0 = dt.datetime(2025, 3, 1, 12, tzinfo=dt.UTC)


def _events(rows: list[tuple[str, str, str, float]]) -> pl.DataFrame:
    """(user, item, event type, hours after T0) rows as canonical events."""
    return hourly_events(T0, rows)


@pytest.fixture
def history() -> pl.DataFrame:
    return _events([
        ("u1", "a", "view", 1), ("u1", "b", "view", 2), ("u1", "a", "cart", 3),
        ("u1", "c", "view", 4),
        ("u2", "a", "view", 1), ("u2", "b", "view", 2), ("u2", "d", "view", 3),
        ("u3", "b", "view", 1), ("u3", "c", "view", 2),
    ])


@pytest.fixture
def covis(history) -> CoVisitation:
    return CoVisitation().fit(history)


def _ranks(cands: pl.DataFrame, user: str, column: str) -> dict[str, int]:
    rows = cands.filter(pl.col("user_id") == user).drop_nulls(column)
    return dict(zip(rows["item_id"], rows[column], strict=True))


def test_candidates_are_distinct_and_ordered_per_user(history, covis):
    cands = build_candidates(history, ["u3", "u1", "u2", "u4"], covis, CandidateConfig())
    assert cands.filter(pl.struct("user_id", "item_id").is_duplicated()).is_empty()
    assert cands["user_id"].to_list() == sorted(cands["user_id"].to_list())
    per_user = cands.group_by("user_id", maintain_order=True).agg("cand_rank")
    for ranks in per_user["cand_rank"]:
        assert ranks.to_list() == list(range(1, len(ranks) + 1))
    assert set(cands["user_id"]) == {"u1", "u2", "u3", "u4"}
    assert {f"rank_{s}" for s in BUILTIN_SOURCES} <= set(cands.columns)


def test_sources_rank_as_defined(history, covis):
    cands = build_candidates(history, ["u1", "u4"], covis, CandidateConfig())
    # last interaction: c (4h), a (3h), b (2h); only a was touched twice
    assert _ranks(cands, "u1", "rank_recent") == {"c": 1, "a": 2, "b": 3}
    assert _ranks(cands, "u1", "rank_repeat") == {"a": 1}
    # weighted popularity: a = 1 + 3 + 1, b = 3, c = 2, d = 1
    assert _ranks(cands, "u4", "rank_pop") == {"a": 1, "b": 2, "c": 3, "d": 4}
    # an unknown user has no history: popular items only
    assert cands.filter(pl.col("user_id") == "u4")["n_sources"].to_list() == [1, 1, 1, 1]
    # d follows b for u2, b is among u1's recent items: d is a co-visitation candidate of u1
    assert "d" in _ranks(cands, "u1", "rank_covis")
    row = cands.filter((pl.col("user_id") == "u1") & (pl.col("item_id") == "d")).row(0, named=True)
    assert row["covis_sum"] > 0
    assert row["covis_n"] >= 1


def test_exclude_seen_and_quota(history, covis):
    config = CandidateConfig(exclude_seen=True, n_candidates=2)
    cands = build_candidates(history, ["u1", "u2"], covis, config)
    seen = history.select("user_id", "item_id").unique()
    assert cands.join(seen, on=["user_id", "item_id"], how="semi").is_empty()
    assert cands.group_by("user_id").len()["len"].max() <= 2
    assert cands["rank_recent"].null_count() == cands.height


def test_merge_orders_by_relative_rank_then_sources_then_priority():
    def source(items: list[str]) -> pl.DataFrame:
        return pl.DataFrame({"user_id": "u1", "item_id": items, "score": 1.0,
                             "rank": list(range(1, len(items) + 1))})

    config = CandidateConfig(n_candidates=4, n_covis=4, n_popular=2)
    merged = merge_sources({"covis": source(["x", "y", "z", "v"]), "pop": source(["y", "w"])},
                           config, ["covis", "pop"])
    # relative ranks: x 1/4, y min(2/4, 1/2) with two sources, z 3/4, then v 4/4 and w 2/2 tie:
    # covis comes first in the priority order
    assert merged["item_id"].to_list() == ["x", "y", "z", "v"]
    y = merged.row(1, named=True)
    assert (y["rank_covis"], y["rank_pop"], y["n_sources"]) == (2, 1, 2)
    assert merged["rank_pop"].to_list() == [None, 1, None, None]


def test_external_source(history, covis):
    external = pl.DataFrame({"user_id": ["u1", "u1", "u9"], "item_id": ["e", "f", "e"],
                             "score": [0.2, 0.9, 1.0]})
    cands = build_candidates(history, ["u1"], covis, CandidateConfig(), external={"nn": external})
    assert _ranks(cands, "u1", "rank_nn") == {"f": 1, "e": 2}
    assert "score_nn" in cands.columns
    with pytest.raises(ConfigError, match="external candidate source name"):
        build_candidates(history, ["u1"], covis, CandidateConfig(), external={"pop": external})


def test_recall_and_labels(history, covis):
    cands = build_candidates(history, ["u1", "u3"], covis, CandidateConfig())
    targets = pl.DataFrame({"user_id": ["u1", "u1", "u3", "u3"],
                            "item_id": ["c", "zzz", "b", "a"]})
    recall = candidate_recall(cands, targets)
    found = targets.join(cands, on=["user_id", "item_id"], how="semi").height
    assert recall["all"] == pytest.approx(found / 4)
    assert recall["recent"] == pytest.approx(2 / 4)  # c for u1, b for u3
    labelled = label_candidates(cands, targets)
    assert labelled.height == cands.height
    assert labelled.filter(pl.col("label") == 1).height == found


def test_targets_on_items_without_events_get_the_new_item_grade():
    cands = pl.DataFrame({"user_id": ["u1", "u1", "u1", "u2"], "item_id": ["a", "n", "b", "n"],
                          "i_n_events": [4.0, 0.0, 2.0, 0.0]})
    targets = pl.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "n", "x"]})
    graded = label_candidates(cands, targets, new_grade=2)
    assert graded["label"].to_list() == [1, 2, 0, 0]  # u2's n is no target: still 0
    assert label_candidates(cands, targets)["label"].to_list() == [1, 1, 0, 0]
    assert label_candidates(cands.drop("i_n_events"), targets, 2)["label"].to_list() == [1, 1, 0, 0]
