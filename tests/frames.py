"""Small canonical event frames written by hand for unit tests."""

from __future__ import annotations

import datetime as dt

import polars as pl


def hourly_events(start: dt.datetime, rows: list[tuple[str, str, str, float]]) -> pl.DataFrame:
    """``(user, item, event type, hours after start)`` rows as canonical events (UTC, us)."""
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "timestamp": [start + dt.timedelta(hours=r[3]) for r in rows],
        },
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")},
    )
