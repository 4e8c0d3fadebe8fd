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

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self

import polars as pl

from models.base import (
    POP_RANK,
    Recommender,
    check_event_weights,
    check_events,
    event_weight_expr,
    popularity_table,
)
from models.columns import ITEM, SCORE, SESSION, TIMESTAMP, USER
from models.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "fav": 2.0, "cart": 3.0, "purchase": 4.0}
"""A view is the weakest signal of intent, a purchase the strongest; favourites sit below carts
because they are cheap to give and often never followed up."""

_SECONDS_PER_DAY = 86_400.0
_POS = "__pos"
ALL_TIME = "all_time"
PAIR_KEYS = ("src", "dst")
ADDITIVE_KEYS: dict[str, tuple[str, ...]] = {"counts": (ITEM,), "pairs": PAIR_KEYS}
"""Key columns of each additive partial table; every other column is a sum."""


@dataclass(frozen=True)
class SharedState:
    """What the users of one part need from the whole history (see the module docstring).

    Attributes:
        t_max: The latest timestamp of the whole history ("recent" is relative to it).
        tables: Summed partial tables (``counts``) and, for co-visitation, ``neighbours``.
    """

    t_max: dt.datetime
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)


def weighted_counts(events: pl.DataFrame, weights: Mapping[str, float], t_max: object,
                    window_days: float | None = None) -> pl.DataFrame:
    """``item_id, score, all_time``: weighted events per item, in a window and in all time.

    ``score`` counts the ``window_days`` before ``t_max`` (every event when None). Additive over
    parts of the history.
    """
    in_window = pl.lit(True)
    if window_days is not None:
        in_window = pl.col(TIMESTAMP) > pl.lit(t_max) - pl.duration(days=window_days)
    return events.with_columns(event_weight_expr(weights)).group_by(ITEM).agg(
        pl.col("weight").filter(in_window).sum().alias(SCORE),
        pl.col("weight").sum().alias(ALL_TIME),
    )


def sum_partials(parts: Sequence[Mapping[str, pl.DataFrame]]) -> dict[str, pl.DataFrame]:
    """Add up the partial tables of several parts, table by table (keys: :data:`ADDITIVE_KEYS`)."""
    summed: dict[str, pl.DataFrame] = {}
    for name in parts[0] if parts else ():
        keys = list(ADDITIVE_KEYS[name])
        frame = pl.concat([part[name] for part in parts])
        values = [c for c in frame.columns if c not in keys]
        summed[name] = frame.group_by(keys).agg(pl.col(values).sum())
    return summed


def _all_time_popularity(counts: pl.DataFrame) -> pl.DataFrame:
    return popularity_table(counts.select(ITEM, pl.col(ALL_TIME).alias(SCORE)))
_SHIFT = 1 << 32  # (user code, item code) packed into one UInt64 key


def _weights(given: Mapping[str, float] | None, name: str = "event_weights") -> dict[str, float]:
    weights = dict(DEFAULT_EVENT_WEIGHTS if given is None else given)
    check_event_weights(weights, name)
    return weights


def _positive(name: str, value: float | None, allow_none: bool = True) -> None:
    if (value is None and not allow_none) or (value is not None and not value > 0):
        raise ConfigError(f"{name} must be > 0{' or None' if allow_none else ''}; got {value}.")


def _age_decay(half_life_days: float | None, t_max: object) -> pl.Expr:
    """Weight ``0.5 ** (age / half_life)`` of each event, age measured back from ``t_max``."""
    if half_life_days is None:
        return pl.lit(1.0)
    age_days = (pl.lit(t_max) - pl.col(TIMESTAMP)).dt.total_microseconds() / (
        _SECONDS_PER_DAY * 1e6
    )
    return pl.lit(0.5).pow(age_days / half_life_days)


def _history(events: pl.DataFrame) -> pl.DataFrame:
    return events.select(USER, ITEM).unique().sort(USER, ITEM)


def _ordered(events: pl.DataFrame) -> pl.DataFrame:
    """Events sorted by user (and session when present) then time, ties in input order."""
    keys = [USER, SESSION] if SESSION in events.columns else [USER]
    return events.with_row_index("__row").sort([*keys, TIMESTAMP, "__row"]).drop("__row")


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
        _positive("window_days", self.window_days)
        weights = _weights(self.event_weights)
        return {"counts": weighted_counts(events, weights, t_max, self.window_days)}

    def fit(self, events: pl.DataFrame, shared: SharedState | None = None) -> Self:
        """Count weighted events per item (or take the whole history's ``shared`` counts)."""
        check_events(events)
        if shared is None:
            shared = SharedState(events[TIMESTAMP].max(), self.partial(events, events[
                TIMESTAMP].max()))
        _positive("window_days", self.window_days)
        self.popularity_ = popularity_table(shared.tables["counts"], tiebreak=ALL_TIME)
        self.history_ = _history(events)
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
        return {"counts": weighted_counts(events, _weights(self.event_weights), t_max)}

    def fit(self, events: pl.DataFrame, shared: SharedState | None = None) -> Self:
        """Score every fitted (user, item) pair; returns ``self``."""
        check_events(events)
        _positive("half_life_days", self.half_life_days)
        weights = _weights(self.event_weights)
        if shared is None:
            t_max = events[TIMESTAMP].max()
            shared = SharedState(t_max, self.partial(events, t_max))
        decay = _age_decay(self.half_life_days, shared.t_max)
        self.user_scores_ = (
            events.with_columns(event_weight_expr(weights), decay.alias("decay"))
            .group_by(USER, ITEM)
            .agg((pl.col("weight") * pl.col("decay")).sum().alias(SCORE))
            .filter(pl.col(SCORE) > 0)
            .sort(USER, ITEM)
        )
        self.popularity_ = _all_time_popularity(shared.tables["counts"])
        self.history_ = _history(events)
        return self

    def _score(self, users: pl.DataFrame) -> pl.DataFrame | None:
        return self.user_scores_.join(users, on=USER, how="semi")


class CoVisitation(Recommender):
    """Item-to-item co-visitation scored from each user's most recent items.

    Two kinds of evidence link item ``i`` to item ``j`` inside one user's sequence (one session
    when the events carry ``session_id``), counting only pairs at most ``time_window_hours``
    apart:

    * transitions: ``j`` follows ``i`` within ``max_gap`` positions, weighted ``1 / gap``;
    * co-occurrence: ``i`` and ``j`` lie within ``window`` positions of each other, both ways.

    Each pair weighs the event weight of ``j``'s event times ``0.5 ** (age / half_life_days)``,
    the age being that of the later event.
    Both sums are divided by ``pop(i) ** source_alpha * pop(j) ** alpha`` (weighted event counts),
    combined as ``transitions + cooc_weight * co-occurrence`` and the best ``n_neighbours`` kept
    per item. A user's score for ``j`` is ``sum_i w_i * S(i, j)`` over its last ``n_recent``
    distinct items, ``w_i = recency_decay ** r * event weight`` (``r = 0`` for the newest item).
    Lists are filled with popular items.

    The defaults were tuned on the validation targets of Amazon Beauty (leave-one-out, coordinate
    search in ``benchmarks/beauty_baselines.py``): validation NDCG@10 0.0684, test 0.0612.
    ``n_neighbours=200`` scored 0.0002 higher on validation for twice the state; 100 is kept.
    ``time_window_hours`` and ``half_life_days`` cannot be tuned on data without timestamps: one
    day keeps pairs inside a shopping visit, and no pair decay is the neutral choice.

    Args:
        max_gap: Transition reach in positions.
        window: Co-occurrence reach in positions.
        cooc_weight: Weight of co-occurrence against transitions.
        alpha: Exponent of the neighbour's popularity in the normalisation (higher favours rarer
            items).
        source_alpha: Exponent of the source item's popularity in the normalisation.
        n_neighbours: Neighbours kept per item.
        n_recent: Distinct recent items of a user that vote.
        recency_decay: Factor applied per step back in the user's recent items.
        time_window_hours: Largest time between the two events of a pair; None for no limit.
        half_life_days: Age at which a pair counts half; None for no decay.
        event_weights: Weight per event type (default :data:`DEFAULT_EVENT_WEIGHTS`).
    """

    _state_tables = ("neighbours_", "recent_", "popularity_", "history_")

    def __init__(
        self,
        max_gap: int = 8,
        window: int = 10,
        cooc_weight: float = 0.25,
        alpha: float = 0.1,
        source_alpha: float = 0.25,
        n_neighbours: int = 100,
        n_recent: int = 10,
        recency_decay: float = 0.5,
        time_window_hours: float | None = 24.0,
        half_life_days: float | None = None,
        event_weights: dict[str, float] | None = None,
    ) -> None:
        self.max_gap = max_gap
        self.window = window
        self.cooc_weight = cooc_weight
        self.alpha = alpha
        self.source_alpha = source_alpha
        self.n_neighbours = n_neighbours
        self.n_recent = n_recent
        self.recency_decay = recency_decay
        self.time_window_hours = time_window_hours
        self.half_life_days = half_life_days
        self.event_weights = event_weights

    def _ordered_weighted(self, events: pl.DataFrame, t_max: object) -> pl.DataFrame:
        return _ordered(events).with_columns(
            event_weight_expr(_weights(self.event_weights)),
            _age_decay(self.half_life_days, t_max).alias("decay"),
        )

    def partial(self, events: pl.DataFrame, t_max: object) -> dict[str, pl.DataFrame]:
        """The additive tables of one part of the history: ``counts`` and raw ``pairs``."""
        self._check_params()
        weights = _weights(self.event_weights)
        return {"counts": weighted_counts(events, weights, t_max),
                "pairs": self._pair_sums(self._ordered_weighted(events, t_max))}

    def fit(self, events: pl.DataFrame, shared: SharedState | None = None) -> Self:
        """Build the neighbour table and each user's recent items; returns ``self``.

        With ``shared``, the neighbours and popularity are the whole history's (its
        ``neighbours`` and ``counts`` tables) and only the users of ``events`` are learnt.
        """
        check_events(events)
        self._check_params()
        if shared is None:
            t_max = events[TIMESTAMP].max()
            part = self.partial(events, t_max)
            self.popularity_ = _all_time_popularity(part["counts"])
            self.neighbours_ = self.neighbours_from(part["pairs"], self.popularity_)
        else:
            t_max = shared.t_max
            self.popularity_ = _all_time_popularity(shared.tables["counts"])
            self.neighbours_ = shared.tables["neighbours"]
        self.recent_ = self._recent(self._ordered_weighted(events, t_max))
        self.history_ = _history(events)
        logger.info(
            "co-visitation: %d items with neighbours, %d pairs kept",
            self.neighbours_[ITEM].n_unique(),
            self.neighbours_.height,
        )
        return self

    def _check_params(self) -> None:
        for name in ("max_gap", "window", "n_neighbours", "n_recent"):
            value, least = getattr(self, name), 0 if name == "window" else 1
            if not isinstance(value, int) or value < least:
                raise ConfigError(
                    f"CoVisitation.{name} must be an integer >= {least}; got {value}."
                )
        if self.cooc_weight < 0 or not 0 < self.recency_decay <= 1:
            raise ConfigError(
                "CoVisitation.cooc_weight must be >= 0 and recency_decay in (0, 1]; got "
                f"{self.cooc_weight} and {self.recency_decay}."
            )
        _positive("CoVisitation.time_window_hours", self.time_window_hours)
        _positive("CoVisitation.half_life_days", self.half_life_days)

    def _pairs_at(self, ordered: pl.DataFrame, gap: int) -> pl.DataFrame:
        """``src, dst, w_fwd, w_back`` for events ``gap`` positions apart in one sequence."""
        same = pl.col(USER).shift(-gap) == pl.col(USER)
        if SESSION in ordered.columns:
            same = same & (pl.col(SESSION).shift(-gap) == pl.col(SESSION)).fill_null(True)
        if self.time_window_hours is not None:
            limit = pl.duration(seconds=self.time_window_hours * 3600)
            same = same & ((pl.col(TIMESTAMP).shift(-gap) - pl.col(TIMESTAMP)) <= limit)
        return ordered.select(
            pl.col(ITEM).alias("src"),
            pl.col(ITEM).shift(-gap).alias("dst"),
            # forward pair weighs the later event, backward pair the earlier; both the later decay
            (pl.col("weight").shift(-gap) * pl.col("decay").shift(-gap)).alias("w_fwd"),
            (pl.col("weight") * pl.col("decay").shift(-gap)).alias("w_back"),
            same.alias("keep"),
        ).filter(pl.col("keep") & (pl.col("src") != pl.col("dst")))

    def _pair_sums(self, ordered: pl.DataFrame) -> pl.DataFrame:
        """``src, dst, w``: summed pair weights before normalisation (additive over users)."""
        parts = []
        for gap in range(1, max(self.max_gap, self.window) + 1):
            pairs = self._pairs_at(ordered, gap)
            trans = 1.0 / gap if gap <= self.max_gap else 0.0
            cooc = self.cooc_weight if gap <= self.window else 0.0
            fwd = pairs.select("src", "dst", (pl.col("w_fwd") * (trans + cooc)).alias("w"))
            back = pairs.select(
                pl.col("dst").alias("src"),
                pl.col("src").alias("dst"),
                (pl.col("w_back") * cooc).alias("w"),
            )
            parts.append(
                pl.concat([fwd, back])
                .filter(pl.col("w") > 0)
                .group_by("src", "dst")
                .agg(pl.col("w").sum())
            )
        return pl.concat(parts).group_by("src", "dst").agg(pl.col("w").sum())

    def neighbours_from(self, pairs: pl.DataFrame, popularity: pl.DataFrame) -> pl.DataFrame:
        """``item_id, neighbour, score``: the best ``n_neighbours`` per source item.

        ``pairs`` are summed :meth:`partial` pairs of the whole history (or of any subset of the
        source items: the result is the same rows for those sources); ``popularity`` is the
        whole history's ``item_id, score`` popularity.
        """
        pop = popularity.select(ITEM, pl.col(SCORE).clip(lower_bound=1e-12).alias("pop"))
        return (
            pairs
            .join(pop.rename({ITEM: "src", "pop": "pop_src"}), on="src")
            .join(pop.rename({ITEM: "dst", "pop": "pop_dst"}), on="dst")
            .with_columns(
                (
                    pl.col("w")
                    / pl.col("pop_src").pow(self.source_alpha)
                    / pl.col("pop_dst").pow(self.alpha)
                ).alias(SCORE)
            )
            .sort(["src", SCORE, "dst"], descending=[False, True, False])
            .filter(pl.int_range(pl.len()).over("src") < self.n_neighbours)
            .select(pl.col("src").alias(ITEM), pl.col("dst").alias("neighbour"), SCORE)
        )

    def _recent(self, ordered: pl.DataFrame) -> pl.DataFrame:
        """``user_id, item_id, weight``: each user's last ``n_recent`` distinct items."""
        return (
            ordered.with_row_index(_POS)
            .group_by(USER, ITEM)
            .agg(pl.col(TIMESTAMP).max(), pl.col(_POS).max(), pl.col("weight").max())
            .filter(pl.col("weight") > 0)
            .sort([USER, TIMESTAMP, _POS], descending=[False, True, True])
            .with_columns(pl.int_range(pl.len()).over(USER).alias("r"))
            .filter(pl.col("r") < self.n_recent)
            .select(
                USER,
                ITEM,
                (pl.col("weight") * pl.lit(self.recency_decay).pow(pl.col("r"))).alias("weight"),
            )
        )

    def _score(self, users: pl.DataFrame) -> pl.DataFrame | None:
        # Integer codes keep the join and the (user, item) aggregation fast: an item's code is
        # its popularity rank, a user's its row in ``users``.
        codes = self.popularity_.select(ITEM, pl.col(POP_RANK).cast(pl.UInt64).alias("code"))
        user_codes = users.with_row_index("user_code").with_columns(
            pl.col("user_code").cast(pl.UInt64)
        )
        recent = self.recent_.join(user_codes, on=USER).join(codes, on=ITEM)
        neighbours = self.neighbours_.join(codes, on=ITEM).join(
            codes.rename({ITEM: "neighbour", "code": "n_code"}), on="neighbour"
        )
        summed = (
            recent.join(neighbours.select("code", "n_code", SCORE), on="code")
            .select(
                (pl.col("user_code") * _SHIFT + pl.col("n_code")).alias("key"),
                (pl.col("weight") * pl.col(SCORE)).alias(SCORE),
            )
            .sort("key")
            .group_by("key", maintain_order=True)
            .agg(pl.col(SCORE).sum())
            .with_columns((pl.col("key") // _SHIFT).alias("user_code"))
        )
        return (
            summed.join(user_codes.select("user_code", "depth"), on="user_code")
            .filter(pl.col(SCORE).rank("min", descending=True).over("user_code") <= pl.col("depth"))
            .with_columns((pl.col("key") % _SHIFT).alias("code"))
            .join(user_codes.select("user_code", USER), on="user_code")
            .join(codes, on="code")
            .select(USER, ITEM, SCORE)
        )


def baseline_factories(recent_days: float) -> dict[str, Callable[[], Recommender]]:
    """The baselines every run reports, by name."""
    return {
        "popularity": lambda: Popularity(),
        "recent_popularity": lambda: Popularity(window_days=recent_days),
        "covisitation": lambda: CoVisitation(),
        "buy_again": lambda: BuyAgain(),
    }
