"""Whole-history tables from user shards equal those of the whole history; trial shares add up."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from models.columns import ITEM, USER
from tasks.data.demo_data import generate_shop
from tasks.data.shards import shard_of
from tasks.ranking.candidate_sources import CandidateConfig
from tasks.ranking.candidates import prepare_history
from tasks.ranking.features import FeatureConfig, table_settings
from tasks.ranking.history_tables import (
    finish_tables,
    history_tables,
    item_partials,
    sum_item_partials,
)
from tasks.ranking.rank_shards import trial_shares


@pytest.mark.parametrize("ordered_only", [False, True])
def test_tables_summed_over_shards_equal_the_whole_history(ordered_only):
    events, items = generate_shop(8_000, seed=3)
    events = events.with_columns(  # prices in events too: the mean of their sums
        pl.when(pl.int_range(pl.len()) % 3 == 0).then(pl.lit(2.5)).otherwise(None)
        .alias("price"))
    settings = table_settings(CandidateConfig(), FeatureConfig(), ordered_only)
    weights = CandidateConfig().event_weights
    whole = history_tables(prepare_history(events, weights), settings, items)
    end = events["timestamp"].max()
    shards = events.with_columns(shard_of(events[USER], 3).alias("shard")).partition_by(
        "shard", include_key=False)
    parts = [item_partials(prepare_history(part, weights), end, settings) for part in shards]
    summed = finish_tables(sum_item_partials(parts), end, settings, items)
    assert summed.end == whole.end
    for name in ("popular", "popularity", "prices", "categories", "item_table"):
        got, expected = getattr(summed, name), getattr(whole, name)
        if name != "popular":  # the popular source is ordered; the others are keyed by item
            got, expected = got.sort(ITEM), expected.sort(ITEM)
        assert_frame_equal(got, expected, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize(("missing", "workers", "expected"), [
    (0, 2, []), (1, 2, [1]), (5, 2, [3, 2]), (4, 8, [1, 1, 1, 1]), (7, 1, [7]), (-2, 2, [])])
def test_missing_trials_are_shared_by_the_workers(missing, workers, expected):
    assert trial_shares(missing, workers) == expected
