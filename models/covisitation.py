"""Co-visitation: items seen together in a session (or close in a sequence) recommend each other.

Pairs of a user's items within a session (or within ``window`` steps when there are no sessions)
are counted with event-type weights and a time decay, normalised per source item and pruned to
each item's top neighbours; a user's score of an item sums the links from its recent items,
weighted by recency. Fits by map-reduce over parts of the history like the other baselines
(:meth:`CoVisitation.partial`, :meth:`CoVisitation.neighbours_from`).
"""

from __future__ import annotations

import logging
from typing import Self

import polars as pl

from models.base import (
    POP_RANK,
    Recommender,
    check_events,
    event_weight_expr,
)
from models.columns import ITEM, SCORE, SESSION, TIMESTAMP, USER
from models.errors import ConfigError
from models.partials import (
    PAIR_SHIFT,
    POSITION,
    SharedState,
    age_decay,
    all_time_popularity,
    check_positive,
    ordered_events,
    resolved_weights,
    shared_popularity,
    sorted_history,
    weighted_counts,
)

logger = logging.getLogger(__name__)

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
        return ordered_events(events).with_columns(
            event_weight_expr(resolved_weights(self.event_weights)),
            age_decay(self.half_life_days, t_max).alias("decay"),
        )

    def partial(self, events: pl.DataFrame, t_max: object) -> dict[str, pl.DataFrame]:
        """The additive tables of one part of the history: ``counts`` and raw ``pairs``."""
        self._check_params()
        weights = resolved_weights(self.event_weights)
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
            self.popularity_ = all_time_popularity(part["counts"])
            self.neighbours_ = self.neighbours_from(part["pairs"], self.popularity_)
            logger.info("co-visitation: %d items with neighbours, %d pairs kept",
                        self.neighbours_[ITEM].n_unique(), self.neighbours_.height)
        else:
            t_max = shared.t_max
            self.popularity_ = shared_popularity(shared, all_time_popularity)
            self.neighbours_ = shared.tables["neighbours"]
        self.recent_ = self._recent(self._ordered_weighted(events, t_max))
        self.history_ = sorted_history(events)
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
        check_positive("CoVisitation.time_window_hours", self.time_window_hours)
        check_positive("CoVisitation.half_life_days", self.half_life_days)

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
            ordered.with_row_index(POSITION)
            .group_by(USER, ITEM)
            .agg(pl.col(TIMESTAMP).max(), pl.col(POSITION).max(), pl.col("weight").max())
            .filter(pl.col("weight") > 0)
            .sort([USER, TIMESTAMP, POSITION], descending=[False, True, True])
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
        # only the neighbours of these users' recent items vote: the rest are dropped before the
        # joins (a shard's table holds the neighbours of every item in its history)
        voting = self.neighbours_.join(recent.select(ITEM).unique(), on=ITEM, how="semi")
        neighbours = voting.join(codes, on=ITEM).join(
            codes.rename({ITEM: "neighbour", "code": "n_code"}), on="neighbour"
        )
        summed = (
            recent.join(neighbours.select("code", "n_code", SCORE), on="code")
            .select(
                (pl.col("user_code") * PAIR_SHIFT + pl.col("n_code")).alias("key"),
                (pl.col("weight") * pl.col(SCORE)).alias(SCORE),
            )
            .sort("key")
            .group_by("key", maintain_order=True)
            .agg(pl.col(SCORE).sum())
            .with_columns((pl.col("key") // PAIR_SHIFT).alias("user_code"))
        )
        return (
            summed.join(user_codes.select("user_code", "depth"), on="user_code")
            .filter(pl.col(SCORE).rank("min", descending=True).over("user_code") <= pl.col("depth"))
            .with_columns((pl.col("key") % PAIR_SHIFT).alias("code"))
            .join(user_codes.select("user_code", USER), on="user_code")
            .join(codes, on="code")
            .select(USER, ITEM, SCORE)
        )
