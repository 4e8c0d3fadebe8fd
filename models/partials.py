"""What the baselines share: event weights, time decay, and the additive tables of map-reduce.

A history split into parts by user fits the same models by map-reduce: each part gives its
additive tables (weighted counts per item, raw co-visitation pair sums: :func:`weighted_counts`,
``CoVisitation.partial``), :func:`sum_partials` adds them up, and :class:`SharedState` carries
the sums (and the whole history's latest time) to every part (see :mod:`models.baselines`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl

from models.base import (
    check_event_weights,
    event_weight_expr,
    popularity_table,
)
from models.columns import ITEM, SCORE, SESSION, TIMESTAMP, USER
from models.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "fav": 2.0, "cart": 3.0, "purchase": 4.0}
"""A view is the weakest signal of intent, a purchase the strongest; favourites sit below carts
because they are cheap to give and often never followed up."""

SECONDS_PER_DAY = 86_400.0
POSITION = "__pos"
ALL_TIME = "all_time"
PAIR_KEYS = ("src", "dst")
ADDITIVE_KEYS: dict[str, tuple[str, ...]] = {"counts": (ITEM,), "pairs": PAIR_KEYS}
"""Key columns of each additive partial table; every other column is a sum."""

@dataclass(frozen=True)
class SharedState:
    """What the users of one part need from the whole history (see the module docstring).

    Attributes:
        t_max: The latest timestamp of the whole history ("recent" is relative to it).
        tables: Summed partial tables (``counts``) and, for co-visitation, ``neighbours``;
            optionally ``popularity``: the model's popularity table already ordered from
            ``counts`` (as the model would order it), so that every part need not sort the
            whole catalogue again.
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


def all_time_popularity(counts: pl.DataFrame) -> pl.DataFrame:
    """The popularity table of the all-time weighted counts."""
    return popularity_table(counts.select(ITEM, pl.col(ALL_TIME).alias(SCORE)))


def window_popularity(counts: pl.DataFrame) -> pl.DataFrame:
    """The popularity table of the window's weighted counts (``score``), ties by all time."""
    return popularity_table(counts, tiebreak=ALL_TIME)


def shared_popularity(shared: SharedState, order: Callable[[pl.DataFrame], pl.DataFrame]
                      ) -> pl.DataFrame:
    """``shared``'s ready ``popularity`` table, else ``order`` applied to its ``counts``."""
    ready = shared.tables.get("popularity")
    return ready if ready is not None else order(shared.tables["counts"])


PAIR_SHIFT = 1 << 32  # (user code, item code) packed into one UInt64 key


def resolved_weights(given: Mapping[str, float] | None, name: str = "event_weights"
                     ) -> dict[str, float]:
    """The given event weights (checked), else :data:`DEFAULT_EVENT_WEIGHTS`."""
    weights = dict(DEFAULT_EVENT_WEIGHTS if given is None else given)
    check_event_weights(weights, name)
    return weights


def check_positive(name: str, value: float | None, allow_none: bool = True) -> None:
    """Raise :class:`ConfigError` unless ``value`` is above 0 (or None when allowed)."""
    if (value is None and not allow_none) or (value is not None and not value > 0):
        raise ConfigError(f"{name} must be > 0{' or None' if allow_none else ''}; got {value}.")


def age_decay(half_life_days: float | None, t_max: object) -> pl.Expr:
    """Weight ``0.5 ** (age / half_life)`` of each event, age measured back from ``t_max``."""
    if half_life_days is None:
        return pl.lit(1.0)
    age_days = (pl.lit(t_max) - pl.col(TIMESTAMP)).dt.total_microseconds() / (
        SECONDS_PER_DAY * 1e6
    )
    return pl.lit(0.5).pow(age_days / half_life_days)


def sorted_history(events: pl.DataFrame) -> pl.DataFrame:
    """The distinct ``(user_id, item_id)`` pairs of ``events``, sorted."""
    return events.select(USER, ITEM).unique().sort(USER, ITEM)


def ordered_events(events: pl.DataFrame) -> pl.DataFrame:
    """Events sorted by user (and session when present) then time, ties in input order."""
    keys = [USER, SESSION] if SESSION in events.columns else [USER]
    return events.with_row_index("__row").sort([*keys, TIMESTAMP, "__row"]).drop("__row")
