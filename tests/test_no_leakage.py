"""Whatever is computed for a window uses only earlier events: change the future, nothing moves."""

from __future__ import annotations

import polars as pl
import pytest

from models.baselines import BuyAgain, CoVisitation, Popularity
from models.columns import EVENT_TYPE, ITEM, TIMESTAMP, USER
from tasks.data.demo_data import generate_shop
from tasks.splitting.split import cut_times, time_split


@pytest.fixture(scope="module")
def logs():
    events, _ = generate_shop(n_events=8_000, seed=3)
    t_valid, t_test = cut_times(events)
    # the same log with every event from the validation window on scrambled
    future = pl.col(TIMESTAMP) >= t_valid
    scrambled = events.with_columns(
        pl.when(future).then(pl.col(ITEM).shuffle(seed=1)).otherwise(pl.col(ITEM)).alias(ITEM),
        pl.when(future).then(pl.lit("purchase")).otherwise(pl.col(EVENT_TYPE)).alias(EVENT_TYPE),
    )
    return events, scrambled, t_valid, t_test


@pytest.mark.parametrize("factory", [Popularity, lambda: Popularity(window_days=7), CoVisitation,
                                     BuyAgain])
def test_models_fitted_for_validation_ignore_later_events(logs, factory):
    events, scrambled, t_valid, t_test = logs
    split_a = time_split(events, t_valid, t_test)
    split_b = time_split(scrambled, t_valid, t_test)
    assert split_a.train.equals(split_b.train)
    users = split_a.train[USER].unique().sort().head(200)
    recs_a = factory().fit(split_a.train).recommend(users, k=10)
    recs_b = factory().fit(split_b.train).recommend(users, k=10)
    assert recs_a.equals(recs_b)


def test_test_history_ends_before_the_test_window(logs):
    events, _, t_valid, t_test = logs
    split = time_split(events, t_valid, t_test)
    assert split.test_history[TIMESTAMP].max() < t_test
    assert split.train[TIMESTAMP].max() < t_valid
