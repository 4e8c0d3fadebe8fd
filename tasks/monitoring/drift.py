"""Drift between the champion's training events and the events that arrived after them.

One :class:`~tasks.monitoring.settings.CheckResult` per check (:func:`drift_checks`):

* ``event_type_mix``: Jensen-Shannon distance between the event-type shares;
* ``unknown_users``, ``unknown_items``: shares of new events from users / on items the champion
  never saw (Great Expectations, :mod:`tasks.monitoring.expectations`);
* ``top_items_overlap``: share of the champion's top items of its last ``popularity_days`` that
  are still among the top items of the new events;
* ``category_mix`` (when the catalogue has ``category_id``): Jensen-Shannon distance between the
  category shares of the events;
* ``price`` (when events or items have ``price``): Wasserstein distance between the events'
  ``log(1 + price)``, divided by its standard deviation in the training events.

The distances are Evidently's ``jensenshannon`` and ``wasserstein`` drift methods (scipy, natural
log, shares over the union of values, no smoothing), written here on scipy because Evidently
0.7.23 does not import with pandas 3. :func:`daily_drift` gives the same values per calendar day.
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import polars as pl
from scipy import stats
from scipy.spatial import distance

from models.columns import CATEGORY, EVENT_TYPE, ITEM, PRICE, TIMESTAMP, USER
from models.errors import require_columns
from tasks.monitoring.expectations import (
    ITEM_KNOWN,
    USER_KNOWN,
    known_flags,
    unknown_share_checks,
)
from tasks.monitoring.realised import DAY
from tasks.monitoring.settings import CheckResult, MonitorSettings, skipped

logger = logging.getLogger(__name__)

_VALUE, _SHARE = "__value", "__share"


def js_distance(reference: pl.Series, current: pl.Series) -> float:
    """Jensen-Shannon distance (natural log, 0 to 0.83) between the value shares of two series.

    Nulls are left out. Two empty series are at distance 0.
    """
    before, after = _shares(reference), _shares(current)
    if before.is_empty() or after.is_empty():
        return 0.0 if before.is_empty() and after.is_empty() else float(np.sqrt(np.log(2)))
    joined = before.join(after, on=_VALUE, how="full", coalesce=True).fill_null(0.0)
    return float(distance.jensenshannon(joined[_SHARE].to_numpy(),
                                        joined[f"{_SHARE}_right"].to_numpy()))


def _shares(values: pl.Series) -> pl.DataFrame:
    """``__value, __share`` of the non-null values."""
    values = values.drop_nulls().cast(pl.String).alias(_VALUE)
    return values.value_counts(name=_SHARE, normalize=True)


def largest_changes(reference: pl.Series, current: pl.Series, n: int = 3) -> str:
    """The ``n`` values whose share moved most, e.g. ``view 88.1% -> 61.5%, purchase ...``."""
    joined = _shares(reference).join(_shares(current), on=_VALUE, how="full", coalesce=True)
    joined = joined.fill_null(0.0).with_columns(
        (pl.col(f"{_SHARE}_right") - pl.col(_SHARE)).abs().alias("__move"))
    rows = joined.sort(["__move", _VALUE], descending=[True, False]).head(n).iter_rows()
    return ", ".join(f"{value} {before:.1%} -> {after:.1%}" for value, before, after, _ in rows)


def price_distance(reference: pl.Series, current: pl.Series) -> float:
    """Wasserstein distance of ``log(1 + price)``, divided by its std in ``reference``.

    The std is floored at 0.001 (as Evidently does); negative prices count as 0.
    """
    before = np.log1p(reference.drop_nulls().cast(pl.Float64).clip(lower_bound=0).to_numpy())
    after = np.log1p(current.drop_nulls().cast(pl.Float64).clip(lower_bound=0).to_numpy())
    return float(stats.wasserstein_distance(before, after) / max(float(np.std(before)), 0.001))


def top_items(events: pl.DataFrame, n: int) -> pl.Series:
    """The ``n`` items with the most events (ties by item id)."""
    counts = events.group_by(ITEM).len("count")
    return counts.sort(["count", ITEM], descending=[True, False]).head(n)[ITEM]


def recent(events: pl.DataFrame, days: float) -> pl.DataFrame:
    """The events of the last ``days`` before the last one."""
    if events.is_empty():
        return events
    return events.filter(pl.col(TIMESTAMP) >= events[TIMESTAMP].max() - dt.timedelta(days=days))


def top_overlap(reference: pl.DataFrame, current: pl.DataFrame, n: int, days: float) -> float:
    """Share of the top-``n`` items of ``reference``'s last ``days`` in ``current``'s top ``n``."""
    before = top_items(recent(reference, days), n)
    after = top_items(current, n)
    return before.is_in(after.implode()).mean() if before.len() else 1.0


def event_categories(events: pl.DataFrame, items: pl.DataFrame | None) -> pl.Series | None:
    """The ``category_id`` of each event's item (null when missing); None without categories."""
    if CATEGORY in events.columns:
        return events[CATEGORY]
    if items is None or CATEGORY not in items.columns:
        return None
    return _lookup(events, items, CATEGORY)


def event_prices(events: pl.DataFrame, items: pl.DataFrame | None) -> pl.Series | None:
    """The price of each event, else of its item in the catalogue; None without prices."""
    if PRICE in events.columns and events[PRICE].null_count() < events.height:
        return events[PRICE]
    if items is None or PRICE not in items.columns:
        return None
    return _lookup(events, items, PRICE)


def _lookup(events: pl.DataFrame, items: pl.DataFrame, column: str) -> pl.Series:
    table = items.select(pl.col(ITEM).cast(pl.String), column).unique(ITEM, keep="first")
    keys = events.select(pl.col(ITEM).cast(pl.String))
    return keys.join(table, on=ITEM, how="left", maintain_order="left")[column]


def drift_checks(
    reference: pl.DataFrame,
    new: pl.DataFrame,
    items: pl.DataFrame | None = None,
    settings: MonitorSettings | None = None,
) -> list[CheckResult]:
    """Every drift check of the new events against the champion's training events.

    Args:
        reference: The champion's training events (``user_id, item_id, event_type,
            timestamp``; optional ``price``).
        new: The events since, same columns.
        items: The catalogue (optional ``category_id``, ``price``), for the category and price
            checks; without it they run only on columns of the events themselves.
        settings: Thresholds; default ``MonitorSettings()``.

    Returns:
        The checks in the order of the module docstring; a check that cannot run (no
        categories, no prices, no new events) has no value and says why.
    """
    settings = settings or MonitorSettings()
    for table, name in ((reference, "champion's events"), (new, "new events")):
        require_columns(table.columns, (USER, ITEM, EVENT_TYPE, TIMESTAMP), name)
    s = settings
    checks = [_event_type_check(reference, new, s), *unknown_share_checks(reference, new, s),
              _overlap_check(reference, new, s), _category_check(reference, new, items, s),
              _price_check(reference, new, items, s)]
    for check in checks:
        logger.info("%s", check.line())
    return checks


def _event_type_check(reference: pl.DataFrame, new: pl.DataFrame, s: MonitorSettings
                      ) -> CheckResult:
    name, limit = "event_type_mix", s.max_event_type_distance
    if new.is_empty():
        return skipped(name, limit, "no new events")
    value = js_distance(reference[EVENT_TYPE], new[EVENT_TYPE])
    detail = f"Jensen-Shannon distance; {largest_changes(reference[EVENT_TYPE], new[EVENT_TYPE])}"
    return CheckResult(name, value, limit, value > limit, detail, "max", "scipy")


def _overlap_check(reference: pl.DataFrame, new: pl.DataFrame, s: MonitorSettings
                   ) -> CheckResult:
    name, limit = "top_items_overlap", s.min_top_overlap
    if new.is_empty():
        return skipped(name, limit, "no new events", "min")
    value = top_overlap(reference, new, s.top_items, s.popularity_days)
    n = top_items(recent(reference, s.popularity_days), s.top_items).len()
    detail = (f"{round(value * n)} of the champion's top {n} items of its last "
              f"{s.popularity_days:g} days are among the top {s.top_items} of the new events")
    return CheckResult(name, value, limit, value < limit, detail, "min", "polars")


def _category_check(reference: pl.DataFrame, new: pl.DataFrame, items: pl.DataFrame | None,
                    s: MonitorSettings) -> CheckResult:
    name, limit = "category_mix", s.max_category_distance
    before, after = event_categories(reference, items), event_categories(new, items)
    if before is None or after is None:
        return skipped(name, limit, "no category_id in the events or the catalogue")
    if after.drop_nulls().is_empty():
        return skipped(name, limit, "no new event is on an item with a category")
    value = js_distance(before, after)
    detail = (f"Jensen-Shannon distance over {after.drop_nulls().len():,} new events with a "
              f"category; {largest_changes(before, after)}")
    return CheckResult(name, value, limit, value > limit, detail, "max", "scipy")


def _price_check(reference: pl.DataFrame, new: pl.DataFrame, items: pl.DataFrame | None,
                 s: MonitorSettings) -> CheckResult:
    name, limit = "price", s.max_price_distance
    before, after = event_prices(reference, items), event_prices(new, items)
    if before is None or after is None:
        return skipped(name, limit, "no price in the events or the catalogue")
    if before.drop_nulls().is_empty() or after.drop_nulls().is_empty():
        return skipped(name, limit, "no priced events before or after")
    value = price_distance(before, after)
    detail = (f"Wasserstein distance of log(1 + price) / std before; median price "
              f"{before.median():.2f} -> {after.median():.2f}")
    return CheckResult(name, value, limit, value > limit, detail, "max", "scipy")


def daily_drift(
    reference: pl.DataFrame,
    new: pl.DataFrame,
    items: pl.DataFrame | None = None,
    settings: MonitorSettings | None = None,
) -> pl.DataFrame:
    """The drift values of :func:`drift_checks` for each calendar day (UTC) of ``new``.

    The unknown shares are computed directly (no GX run per day). Cheap: a pass over the
    reference's value counts per day.

    Returns:
        ``day, events, event_type_mix, unknown_users, unknown_items, top_items_overlap``, plus
        ``category_mix`` and ``price`` when they can be computed; sorted by day.
    """
    s = settings or MonitorSettings()
    for table, name in ((reference, "champion's events"), (new, "new events")):
        require_columns(table.columns, (USER, ITEM, EVENT_TYPE, TIMESTAMP), name)
    flagged = known_flags(reference, new).with_columns(pl.col(TIMESTAMP).dt.date().alias(DAY))
    categories = event_categories(reference, items)
    prices = event_prices(reference, items)
    rows = []
    for (day,), part in flagged.group_by(DAY, maintain_order=True):
        row = {DAY: day, "events": part.height,
               "event_type_mix": js_distance(reference[EVENT_TYPE], part[EVENT_TYPE]),
               "unknown_users": 1 - part[USER_KNOWN].mean(),
               "unknown_items": 1 - part[ITEM_KNOWN].mean(),
               "top_items_overlap": top_overlap(reference, part, s.top_items, s.popularity_days)}
        after = event_categories(part, items)
        if categories is not None and after is not None:
            row["category_mix"] = js_distance(categories, after)
        after = event_prices(part, items)
        if prices is not None and after is not None and after.drop_nulls().len():
            row["price"] = price_distance(prices, after)
        rows.append(row)
    return pl.DataFrame(rows).sort(DAY) if rows else pl.DataFrame(schema={DAY: pl.Date})
