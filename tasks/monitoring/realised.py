"""The champion's realised quality per calendar day, on the requests a shop front end sends.

For each calendar day (UTC) of the new events and each user active that day, the request is the
user's id with ``recent_items`` = the item of the user's first event of the day (a live session,
as the shop sends it) and ``k`` = the largest cut-off; the targets are the distinct items of the
user's later events that day (the first item counts again when it is revisited). Users with no
later event that day are not evaluated. All of a day's requests go to ``predict`` in one call and
are scored by :func:`models.metrics.evaluate` (binary gains, seen items kept, as the time-split
protocol scores).

``session=False`` scores returning users instead: the same users and targets, no
``recent_items``, so the difference between the two is what the live session adds.

Events with the same timestamp keep their input order (the first of them is the session).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pandas as pd
import polars as pl

from models.columns import ITEM, RANK, TIMESTAMP, USER
from models.errors import DataError, require_columns
from models.metrics import ACCURACY_METRICS, evaluate

logger = logging.getLogger(__name__)

DAY = "day"
USERS = "users"
SESSION_ITEMS = "recent_items"

Predict = Callable[[pd.DataFrame], pd.DataFrame | pl.DataFrame]
"""The served model's ``predict``: request records (``user_id``, ``k``, optional
``recent_items``) in, ``user_id, item_id, score, rank`` out (the MLflow pyfunc's ``predict``)."""


def day_sessions(events: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The evaluated (day, user) pairs of ``events``: their session item and their targets.

    Args:
        events: ``user_id, item_id, timestamp`` (UTC), any order.

    Returns:
        ``(sessions, targets)``: ``day, user_id, item_id`` of each evaluated user's first event
        of the day, and ``day, user_id, item_id`` of the distinct items of its later events that
        day; both sorted by day and user.
    """
    require_columns(events.columns, (USER, ITEM, TIMESTAMP), "new events")
    ordered = (
        events.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String), TIMESTAMP)
        .sort([USER, TIMESTAMP], maintain_order=True)
        .with_columns(pl.col(TIMESTAMP).dt.date().alias(DAY))
        .with_columns(pl.int_range(pl.len()).over(DAY, USER).alias("_position"))
    )
    targets = (ordered.filter(pl.col("_position") > 0).select(DAY, USER, ITEM)
               .unique().sort(DAY, USER, ITEM))
    sessions = (ordered.filter(pl.col("_position") == 0).select(DAY, USER, ITEM)
                .join(targets.select(DAY, USER).unique(), on=[DAY, USER], how="semi")
                .sort(DAY, USER))
    return sessions, targets


def request_records(sessions: pl.DataFrame, k: int, session: bool = True) -> pd.DataFrame:
    """One request record per user of ``sessions`` (one day's), as the served pyfunc takes them.

    ``user_id`` and ``k``; with ``session``, ``recent_items`` = ``[the session item]``.
    """
    records = {USER: sessions[USER].to_list(), "k": [k] * sessions.height}
    if session:
        records[SESSION_ITEMS] = [[item] for item in sessions[ITEM].to_list()]
    return pd.DataFrame(records)


def realised_quality(
    predict: Predict,
    events: pl.DataFrame,
    ks: Sequence[int] = (10, 20),
    session: bool = True,
    n_items: int | None = None,
) -> pl.DataFrame:
    """The served model's metrics per calendar day of ``events`` (see the module docstring).

    Args:
        predict: The served model's ``predict`` (called once per day with all its requests).
        events: The new events, ``user_id, item_id, timestamp`` (all after the champion's
            last event).
        ks: Cut-offs; each request asks for ``max(ks)`` items.
        session: Send the user's first event of the day as ``recent_items``; False scores the
            same users as returning users (no session).
        n_items: Catalogue size, for ``coverage@K``; without it coverage is left out.

    Returns:
        One row per day with an evaluated user, sorted by day: ``day`` (date), ``users`` (how
        many were evaluated) and every metric of :func:`models.metrics.evaluate`
        (``ndcg@10``, ``recall@20``, ...).

    Raises:
        MissingColumnsError: ``events`` or the answers of ``predict`` lack a column.
        DataError: ``predict`` answered with no list for a requested user.
    """
    if not ks:
        raise DataError("ks is empty: give the cut-offs to score, like (10, 20).")
    sessions, targets = day_sessions(events)
    rows = []
    for (day,), today in sessions.group_by(DAY, maintain_order=True):
        answers = _answers(predict, request_records(today, max(ks), session))
        day_targets = targets.filter(pl.col(DAY) == day).select(USER, ITEM)
        metrics = evaluate(answers, day_targets, ks=list(ks), n_items=n_items)
        rows.append({DAY: day, USERS: int(metrics.pop(USERS)), **metrics})
        logger.debug("realised quality on %s: %d users", day, rows[-1][USERS])
    names = metric_names(ks, n_items is not None)
    schema = {DAY: pl.Date, USERS: pl.Int64, **dict.fromkeys(names, pl.Float64)}
    return pl.DataFrame(rows, schema=schema)


def metric_names(ks: Sequence[int], coverage: bool = False) -> list[str]:
    """The metric columns of :func:`realised_quality`, in the order ``evaluate`` gives them."""
    cut_offs = sorted(set(ks))
    names = [f"{metric}@{k}" for k in cut_offs for metric in ACCURACY_METRICS]
    return names + ([f"coverage@{k}" for k in cut_offs] if coverage else [])


def _answers(predict: Predict, records: pd.DataFrame) -> pl.DataFrame:
    """``predict``'s answers as ``user_id, item_id, rank``; every requested user must have one."""
    answer = predict(records)
    frame = pl.from_pandas(answer) if isinstance(answer, pd.DataFrame) else answer
    require_columns(frame.columns, (USER, ITEM, RANK), "the served model's answers")
    frame = frame.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String),
                         pl.col(RANK).cast(pl.Int64))
    missing = set(records[USER]) - set(frame[USER].unique().to_list())
    if missing:
        raise DataError(f"the served model answered no list for {len(missing)} of "
                        f"{len(records)} requested users (e.g. {sorted(missing)[0]!r}); it must "
                        "answer every user, unknown ones included.")
    return frame
