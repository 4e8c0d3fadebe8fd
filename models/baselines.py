"""Baseline recommenders every model is reported beside: popularity, co-visitation, buy-again.

All three learn from canonical events, rank the full catalogue of the fitted data and answer
unknown users with popularity. Event types weigh differently (:data:`DEFAULT_EVENT_WEIGHTS`, a
rough ordering of purchase intent); "recent" is always relative to the latest timestamp of the
fitted events, never to the wall clock, so a model fitted on a past window behaves the same
whenever it is run.

A history split into parts by user (the shards of ``engine: dask``) fits the same models by
map-reduce: each part gives its additive tables (``partial(events, t_max)``: weighted counts per
item, raw co-visitation pair sums), :func:`sum_partials` adds them up, the co-visitation pairs are
normalised and pruned per item (:meth:`CoVisitation.neighbours_from`, on any partition of the
source items), and ``fit(part, shared)`` then learns only each part's users from that part.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Self

import polars as pl

from models.base import (
    Recommender,
    check_events,
    event_weight_expr,
)
from models.columns import ITEM, SCORE, TIMESTAMP, USER
from models.covisitation import CoVisitation
from models.partials import (
    ADDITIVE_KEYS,
    ALL_TIME,
    DEFAULT_EVENT_WEIGHTS,
    PAIR_KEYS,
    SharedState,
    age_decay,
    all_time_popularity,
    check_positive,
    resolved_weights,
    shared_popularity,
    sorted_history,
    sum_partials,
    weighted_counts,
    window_popularity,
)

__all__ = [  # what the other layers import from here
    "ADDITIVE_KEYS", "ALL_TIME", "DEFAULT_EVENT_WEIGHTS", "PAIR_KEYS", "BuyAgain", "CoVisitation",
    "Popularity", "SharedState", "baseline_factories", "sum_partials", "weighted_counts",
]

logger = logging.getLogger(__name__)


class Popularity(Recommender):
    """The most interacted-with items, all-time or over a recent window.

    Args:
        window_days: Count only events in the last ``window_days`` before the latest fitted
            timestamp; None counts everything. Items without events in the window follow, in
            all-time order.
        event_weights: Weight per event type; types left out are ignored. Default
            :data:`DEFAULT_EVENT_WEIGHTS`.
    """

    _state_tables = ("popularity_", "history_")
    _fill_below = False

    def __init__(
        self, window_days: float | None = None, event_weights: dict[str, float] | None = None
    ) -> None:
        self.window_days = window_days
        self.event_weights = event_weights

    def partial(self, events: pl.DataFrame, t_max: object) -> dict[str, pl.DataFrame]:
        """The additive tables of one part of the history (``counts``)."""
        check_positive("window_days", self.window_days)
        weights = resolved_weights(self.event_weights)
        return {"counts": weighted_counts(events, weights, t_max, self.window_days)}

    def fit(self, events: pl.DataFrame, shared: SharedState | None = None) -> Self:
        """Count weighted events per item (or take the whole history's ``shared`` counts)."""
        check_events(events)
        if shared is None:
            shared = SharedState(events[TIMESTAMP].max(), self.partial(events, events[
                TIMESTAMP].max()))
        check_positive("window_days", self.window_days)
        self.popularity_ = shared_popularity(shared, window_popularity)
        self.history_ = sorted_history(events)
        return self

    def _score(self, users: pl.DataFrame) -> pl.DataFrame | None:
        return None


class BuyAgain(Recommender):
    """The user's own items, by weighted and recency-decayed counts of their events.

    Shoppers return to what they viewed and re-buy consumables; this ranks a user's past items by
    ``sum(event weight * 0.5 ** (age / half_life))`` and fills the list with popular items. With
    ``exclude_seen=True`` every personal item is removed, so it degenerates to popularity.

    Args:
        event_weights: Weight per event type (default :data:`DEFAULT_EVENT_WEIGHTS`, purchases
            highest, so repeat purchases dominate).
        half_life_days: Age at which an event counts half; None for no decay.
    """

    _state_tables = ("user_scores_", "popularity_", "history_")

    def __init__(
        self, event_weights: dict[str, float] | None = None, half_life_days: float | None = 30.0
    ) -> None:
        self.event_weights = event_weights
        self.half_life_days = half_life_days

    def partial(self, events: pl.DataFrame, t_max: object) -> dict[str, pl.DataFrame]:
        """The additive tables of one part of the history (``counts``)."""
        return {"counts": weighted_counts(events, resolved_weights(self.event_weights), t_max)}

    def fit(self, events: pl.DataFrame, shared: SharedState | None = None) -> Self:
        """Score every fitted (user, item) pair; returns ``self``."""
        check_events(events)
        check_positive("half_life_days", self.half_life_days)
        weights = resolved_weights(self.event_weights)
        if shared is None:
            t_max = events[TIMESTAMP].max()
            shared = SharedState(t_max, self.partial(events, t_max))
        decay = age_decay(self.half_life_days, shared.t_max)
        self.user_scores_ = (
            events.with_columns(event_weight_expr(weights), decay.alias("decay"))
            .group_by(USER, ITEM)
            .agg((pl.col("weight") * pl.col("decay")).sum().alias(SCORE))
            .filter(pl.col(SCORE) > 0)
            .sort(USER, ITEM)
        )
        self.popularity_ = shared_popularity(shared, all_time_popularity)
        self.history_ = sorted_history(events)
        return self

    def _score(self, users: pl.DataFrame) -> pl.DataFrame | None:
        return self.user_scores_.join(users, on=USER, how="semi")


def baseline_factories(recent_days: float) -> dict[str, Callable[[], Recommender]]:
    """The baselines every run reports, by name."""
    return {
        "popularity": lambda: Popularity(),
        "recent_popularity": lambda: Popularity(window_days=recent_days),
        "covisitation": lambda: CoVisitation(),
        "buy_again": lambda: BuyAgain(),
    }
