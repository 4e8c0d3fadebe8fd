"""The whole-history tables of the ranker's candidates and features, from one part or many.

A user's candidates and features need the user's own events plus a few tables of the whole
history: its end, item popularity (in the popularity window and in all time), every item's
features (weighted popularity, event and user counts, windows, tail, funnel, price, category)
and the co-visitation neighbours. Each is a sum, a distinct-user count or a min / max over events,
so it comes out the same whether computed on the history at once or on parts by user (the
shards of ``engine: dask``, whose users are disjoint) and added up:

1. :func:`item_partials`: one row per item of a part, with additive columns (weighted and plain
   counts, distinct users, price sums) and the item's first and last timestamps;
2. :func:`sum_item_partials`: the parts' rows added up (first: min, last: max, the rest: sums);
3. :func:`finish_tables`: the summed rows as :class:`HistoryTables`.

The in-process engine goes through the same three steps with a single part, so both engines build
these tables with the same code.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from models.base import event_weight_expr
from models.columns import CATEGORY, EVENT_TYPE, EVENT_TYPES, ITEM, PRICE, SCORE, TIMESTAMP, USER
from tasks.ranking.candidate_sources import POS, WEIGHT

FIRST, LAST = "__first", "__last"
_WINDOW_N = "__window_n"
_PRICE_SUM, _PRICE_N = "__price_sum", "__price_n"
_US_PER_DAY = 86_400 * 1e6
FUNNEL_TYPES = tuple(t for t in EVENT_TYPES if t != "view")


@dataclass(frozen=True)
class TableSettings:
    """What the tables depend on: the candidates' and the features' settings.

    Attributes:
        candidate_weights: Event weights of the candidates' popularity.
        popular_days: Window of the popular source (None: all time).
        feature_weights: Event weights of the item features' weighted popularity.
        windows_days: Item count windows of the features.
        tail_events: Latest events per user counted in the tail popularity.
        real_time: Timestamps are real (False: they only order events).
    """

    candidate_weights: Mapping[str, float]
    popular_days: float | None
    feature_weights: Mapping[str, float]
    windows_days: Sequence[float]
    tail_events: int
    real_time: bool


@dataclass
class HistoryTables:
    """The whole history's tables the candidates and features of any of its users need.

    Attributes:
        end: The latest timestamp of the history.
        popular: ``item_id, score`` by the candidates' weights in the popularity window, best
            first (items with an event in the window only).
        popularity: ``item_id, score``: all-time popularity by the candidates' weights.
        prices: ``item_id, price`` (catalogue price, else the mean price in events), or None.
        categories: ``item_id, category_id`` of the items table, or None.
        item_table: One row per item with the ``i_*`` features.
    """

    end: dt.datetime
    popular: pl.DataFrame
    popularity: pl.DataFrame
    prices: pl.DataFrame | None
    categories: pl.DataFrame | None
    item_table: pl.DataFrame


def days(expr: pl.Expr) -> pl.Expr:
    """A duration expression in days."""
    return expr.dt.total_microseconds() / _US_PER_DAY


def window_name(days: float) -> str:
    """``1``, ``0_5``: a window length as it appears in feature names."""
    return f"{days:g}".replace(".", "_")


def item_partials(events: pl.DataFrame, end: object, settings: TableSettings) -> pl.DataFrame:
    """One row per item of ``events``: the additive columns behind :class:`HistoryTables`.

    ``events`` are prepared (:func:`tasks.ranking.candidates.prepare_history`: ``pos`` per user) and
    ``end`` is the latest timestamp of the whole history, not only of this part.
    """
    n_users = pl.col(USER).n_unique().cast(pl.Float64)
    in_window = pl.lit(True)
    if settings.popular_days is not None and settings.real_time:
        in_window = pl.col(TIMESTAMP) > pl.lit(end) - pl.duration(days=settings.popular_days)
    cand = event_weight_expr(settings.candidate_weights).alias("__cand")
    feat = event_weight_expr(settings.feature_weights).alias(WEIGHT)
    tail = (pl.len().over(USER) - pl.col(POS)) <= settings.tail_events
    aggs = [
        pl.col("__cand").filter(in_window).sum().alias("cand_window"),
        in_window.sum().cast(pl.Float64).alias(_WINDOW_N),
        pl.col("__cand").sum().alias("cand_all"),
        pl.col(WEIGHT).sum().alias("i_pop"),
        pl.len().cast(pl.Float64).alias("i_n_events"),
        n_users.alias("i_n_users"),
        pl.col("__tail").sum().cast(pl.Float64).alias("i_pop_tail"),
        *(pl.col(USER).filter(pl.col(EVENT_TYPE) == t).n_unique().cast(pl.Float64)
          .alias(f"__users_{t}") for t in FUNNEL_TYPES),
        pl.col(TIMESTAMP).min().alias(FIRST),
        pl.col(TIMESTAMP).max().alias(LAST),
    ]
    if settings.real_time:
        age = days(pl.lit(end) - pl.col(TIMESTAMP))
        aggs += [(age <= w).sum().cast(pl.Float64).alias(f"i_n_{window_name(w)}d")
                 for w in settings.windows_days]
        aggs.append(pl.col(USER).filter(age <= min(settings.windows_days, default=1.0))
                    .n_unique().cast(pl.Float64).alias("i_n_users_recent"))
    if PRICE in events.columns:
        price = pl.col(PRICE).cast(pl.Float64)
        aggs += [price.sum().alias(_PRICE_SUM), price.is_not_null().sum().cast(pl.Float64)
                 .alias(_PRICE_N)]
    return (events.with_columns(cand, feat, tail.alias("__tail"))
            .group_by(ITEM).agg(aggs))


def sum_item_partials(parts: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """The :func:`item_partials` of disjoint sets of users added up (one row per item)."""
    frame = pl.concat(list(parts), how="diagonal_relaxed")
    sums = [c for c in frame.columns if c not in (ITEM, FIRST, LAST)]
    return frame.group_by(ITEM).agg(pl.col(FIRST).min(), pl.col(LAST).max(),
                                     pl.col(sums).sum())


def _prices(partials: pl.DataFrame, items: pl.DataFrame | None) -> pl.DataFrame | None:
    """``item_id, price``: the catalogue price, else the mean price in events; None without any."""
    frames = []
    if items is not None and PRICE in items.columns:
        frames.append(items.select(ITEM, pl.col(PRICE).cast(pl.Float64)).drop_nulls())
    if _PRICE_SUM in partials.columns:
        frames.append(partials.filter(pl.col(_PRICE_N) > 0).select(
            ITEM, (pl.col(_PRICE_SUM) / pl.col(_PRICE_N)).alias(PRICE)))
    if not frames:
        return None
    return pl.concat(frames).unique(ITEM, keep="first", maintain_order=True)


def item_categories(items: pl.DataFrame | None) -> pl.DataFrame | None:
    """``item_id, category_id`` of the items table (first row per item), or None."""
    if items is None or CATEGORY not in items.columns:
        return None
    return items.select(ITEM, CATEGORY).drop_nulls().unique(ITEM, keep="first",
                                                           maintain_order=True)


def finish_tables(partials: pl.DataFrame, end: dt.datetime, settings: TableSettings,
                  items: pl.DataFrame | None) -> HistoryTables:
    """The :class:`HistoryTables` of summed :func:`item_partials` (see the module docstring)."""
    categories, prices = item_categories(items), _prices(partials, items)
    popular = (partials.filter(pl.col(_WINDOW_N) > 0)
               .select(ITEM, pl.col("cand_window").alias(SCORE))
               .sort([SCORE, ITEM], descending=[True, False]))
    popularity = partials.select(ITEM, pl.col("cand_all").alias(SCORE))
    n_users = pl.col("i_n_users")
    table = partials.with_columns(
        *((pl.col(f"__users_{t}") / n_users).alias(f"i_{t}_user_share") for t in FUNNEL_TYPES))
    features = ["i_pop", "i_n_events", "i_n_users", "i_pop_tail",
                *(f"i_{t}_user_share" for t in FUNNEL_TYPES)]
    if settings.real_time:
        windows = [f"i_n_{window_name(w)}d" for w in settings.windows_days]
        table = table.with_columns(days(pl.lit(end) - pl.col(FIRST)).alias("i_days_since_first"),
                                   days(pl.lit(end) - pl.col(LAST)).alias("i_days_since_last"))
        features += [*windows, "i_days_since_first", "i_days_since_last", "i_n_users_recent"]
    table = table.select(ITEM, *features)
    if settings.real_time and len(settings.windows_days) >= 2:
        short, long = min(settings.windows_days), max(settings.windows_days)
        table = table.with_columns(
            ((pl.col(f"i_n_{window_name(short)}d") / short + 0.1)
             / (pl.col(f"i_n_{window_name(long)}d") / long + 0.1)).alias("i_trend"))
    if prices is not None:
        table = table.join(prices.rename({PRICE: "i_price"}), on=ITEM, how="left")
    if categories is not None:
        cat_pop = pl.when(pl.col(CATEGORY).is_not_null()).then(pl.col("i_pop").sum().over(CATEGORY))
        table = table.join(categories, on=ITEM, how="left").with_columns(
            cat_pop.alias("i_cat_pop")
        ).with_columns(
            (pl.col("i_pop") / pl.col("i_cat_pop")).fill_nan(0.0).alias("i_cat_share"),
            pl.col("i_cat_pop").fill_null(0.0),
        ).drop(CATEGORY)
    return HistoryTables(end, popular, popularity, prices, categories, table)


def history_tables(events: pl.DataFrame, settings: TableSettings,
                   items: pl.DataFrame | None) -> HistoryTables:
    """The :class:`HistoryTables` of one whole (prepared) history, as one part."""
    end = events[TIMESTAMP].max()
    return finish_tables(item_partials(events, end, settings), end, settings, items)
