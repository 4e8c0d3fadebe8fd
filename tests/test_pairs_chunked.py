"""Candidates and features built per chunk of users equal the one-call result."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import tasks.ranking.candidates as candidates_module
from models.baselines import CoVisitation
from models.errors import ConfigError
from tasks.data.adapters import load_raw
from tasks.data.demo_data import generate_shop
from tasks.ranking.candidate_sources import CandidateConfig
from tasks.ranking.candidates import (
    CandidateBuilder,
    PreparedHistory,
    build_candidates,
    label_candidates,
    user_frame,
)
from tasks.ranking.features import FeatureBuilder, FeatureConfig, build_features, candidate_features
from tasks.splitting.split import Split, cut_times, time_split


@pytest.fixture(scope="module")
def shop() -> tuple[Split, pl.DataFrame]:
    events, items = generate_shop(6_000, seed=7)
    return time_split(events, *cut_times(events)), items


def _one_call(split: Split, users: list[str], items: pl.DataFrame | None,
              cand_config: CandidateConfig, feat_config: FeatureConfig, ordered_only: bool,
              external: dict[str, pl.DataFrame] | None, labels: bool) -> pl.DataFrame:
    covis = CoVisitation().fit(split.train)
    cands = build_candidates(split.train, users, covis, cand_config, items, external, ordered_only)
    frame = build_features(cands, split.train, items, covis, ordered_only, feat_config)
    return label_candidates(frame, split.valid_targets) if labels else frame


def _chunked(split: Split, users: list[str], items: pl.DataFrame | None,
             cand_config: CandidateConfig, feat_config: FeatureConfig, ordered_only: bool,
             external: dict[str, pl.DataFrame] | None, labels: bool,
             user_chunk: int = 7) -> pl.DataFrame:
    covis = CoVisitation().fit(split.train)
    return candidate_features(split.train, users, covis, cand_config, feat_config, items,
                              external, ordered_only, split.valid_targets if labels else None,
                              user_chunk)


def assert_same(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Same rows, order and columns; floats equal up to summation order (polars group sums)."""
    assert_frame_equal(got, expected, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)


def _users(split: Split) -> list[str]:
    # the validation users, shuffled, plus one the history does not know
    users = split.valid_targets["user_id"].unique().shuffle(seed=1).to_list()
    return [*users, "nobody"]


@pytest.mark.parametrize("case", ["default", "exclude_seen_other_weights_external"])
def test_chunks_equal_one_call_on_the_demo_shop(shop, case):
    split, items = shop
    users = _users(split)
    cand_config, feat_config, external = CandidateConfig(), FeatureConfig(), None
    if case != "default":
        cand_config = CandidateConfig(exclude_seen=True, n_candidates=40,
                                      event_weights={"view": 1.0, "purchase": 5.0})
        feat_config = FeatureConfig(recent_items=3)
        scores = split.train.group_by("user_id", "item_id").len()
        external = {"nn": scores.select("user_id", "item_id",
                                        pl.col("len").cast(pl.Float64).alias("score"))}
        price_band = pl.lit("p") + (pl.col("price") // 20).cast(pl.Int64).cast(pl.String)
        items = items.with_columns(pl.concat_list(pl.col("brand"), pl.col("category_id"),
                                                  price_band).alias("attributes"))
    labels = case == "default"
    expected = _one_call(split, users, items, cand_config, feat_config, False, external, labels)
    got = _chunked(split, users, items, cand_config, feat_config, False, external, labels)
    assert len(users) > 5 * 7  # several chunks ran
    assert got.height > 1_000
    assert ("label" in got.columns) == labels
    assert got.schema == expected.schema
    assert_same(got, expected)
    if case != "default":
        assert got["ui_attr_share"].max() > 0  # the attribute features ran per chunk too


def test_chunks_equal_one_call_ordered_only_without_items(shop):
    split, _ = shop
    users = _users(split)[:60]
    config = CandidateConfig(exclude_seen=True)
    expected = _one_call(split, users, None, config, FeatureConfig(), True, None, True)
    got = _chunked(split, users, None, config, FeatureConfig(), True, None, True, user_chunk=11)
    assert_same(got, expected)
    assert "ui_hours_since_last" not in got.columns


def test_chunks_equal_one_call_on_real_taobao_events(shared_data: Path):
    raw = load_raw(shared_data / "taobao_userbehavior_sample", "taobao")
    split = time_split(raw.events, *cut_times(raw.events))
    users = _users(split)[:150]
    expected = _one_call(split, users, raw.items, CandidateConfig(), FeatureConfig(), False,
                         None, True)
    got = _chunked(split, users, raw.items, CandidateConfig(), FeatureConfig(), False, None,
                   True, user_chunk=13)
    assert got.height > 1_000
    assert_same(got, expected)


def test_history_is_prepared_once_when_the_weights_agree(shop, monkeypatch):
    split, items = shop
    calls = []
    original = candidates_module.prepare_history

    def counting(history, weights):
        calls.append(dict(weights))
        return original(history, weights)

    monkeypatch.setattr(candidates_module, "prepare_history", counting)
    users = _users(split)[:30]
    covis = CoVisitation().fit(split.train)
    candidate_features(split.train, users, covis, items=items, user_chunk=7)
    assert len(calls) == 1
    calls.clear()
    other = CandidateConfig(event_weights={"view": 1.0})
    candidate_features(split.train, users, covis, other, items=items, user_chunk=7)
    assert len(calls) == 2


def test_prepared_history_slices_users_like_a_semi_join(shop):
    split, _ = shop
    prepared = PreparedHistory(split.train, CandidateConfig().event_weights)
    users = user_frame(["nobody", *_users(split)[3:20]])
    expected = prepared.events.join(users, on="user_id", how="semi")
    assert prepared.of_users(users).equals(expected)
    assert prepared.of_users(user_frame(["nobody"])).is_empty()


def test_builders_reject_a_history_prepared_with_other_weights(shop):
    split, items = shop
    covis = CoVisitation().fit(split.train)
    prepared = PreparedHistory(split.train, {"view": 1.0})
    with pytest.raises(ConfigError, match="event_weights"):
        CandidateBuilder(prepared, covis, CandidateConfig(), items)
    with pytest.raises(ConfigError, match="event_weights"):
        FeatureBuilder(prepared, items, covis)
    with pytest.raises(ConfigError, match="user_chunk"):
        candidate_features(split.train, ["u"], covis, user_chunk=0)
