"""The weight a live session gets against a family's own list, chosen on the validation window.

The served pyfunc blends a known user's list with the co-visitation neighbours of its *new*
session items (:mod:`models.serving`). How much the session should count depends on the family
(a strong personal ranker needs it less than a popularity list), so it is chosen on data: the
validation window's first event of each selection user is its session, the rest of its window
the targets, and the family's validation lists (saved beside its model) are blended at every
weight as serving would (:func:`models.session_blend.choose_session_weight`). The choice, and
the figure of every weight, is recorded on the version; a family that reads sessions itself
(the transformer) keeps the configured weight, which it does not use.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import polars as pl

from models.columns import ITEM, TIMESTAMP, USER
from models.covisitation import CoVisitation
from models.session_blend import VALID_LISTS, choose_session_weight
from tasks.splitting.split import Split

logger = logging.getLogger(__name__)


def window_sessions(window: pl.DataFrame, targets: pl.DataFrame
                    ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Live sessions of a window's events: ``(sessions, targets)``.

    A user's first event in ``window`` is its session (``user_id, item_id``); its targets are
    its ``targets`` among the items of its later events in the window. Users with no later
    target are left out of both.
    """
    window = (window.sort([USER, TIMESTAMP, ITEM])
              .with_columns(pl.int_range(pl.len()).over(USER).alias("__n")))
    later = window.filter(pl.col("__n") > 0).select(USER, ITEM).unique()
    targets = targets.join(later, on=[USER, ITEM], how="semi")
    sessions = (window.filter(pl.col("__n") == 0).select(USER, ITEM)
                .join(targets.select(USER).unique(), on=USER, how="semi").sort(USER))
    return sessions, targets


def between(events: pl.DataFrame, start: Any, end: Any = None) -> pl.DataFrame:
    """The events from ``start`` (an ISO 8601 time or datetime) up to ``end`` (excluded)."""
    def moment(value: Any) -> pl.Expr:
        return pl.lit(dt.datetime.fromisoformat(str(value))).cast(events[TIMESTAMP].dtype)

    kept = events.filter(pl.col(TIMESTAMP) >= moment(start))
    return kept if end is None else kept.filter(pl.col(TIMESTAMP) < moment(end))


def validation_sessions(split: Split, events: pl.DataFrame, users: pl.Series
                        ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`window_sessions` of the validation window ``[t_valid, t_test)`` for ``users``."""
    window = between(events, split.info["t_valid"], split.info["t_test"])
    return window_sessions(window.filter(pl.col(USER).is_in(users.implode())),
                           split.valid_targets)


def chosen_weight(split: Split, events_path: Path, model_dir: Path, metric: str,
                  session_items: int) -> dict[str, Any] | None:
    """The session weight of the family saved in ``model_dir`` and its table; None if unknown.

    None when the family left no validation lists (a run without a selection holdout for the
    ranker, a resumed transformer study) or the window has no session with a later target.
    """
    lists_path = model_dir / VALID_LISTS
    if split.protocol != "time" or not lists_path.is_file() or not events_path.is_file():
        return None
    lists = pl.read_parquet(lists_path)
    events = pl.read_parquet(events_path, columns=[USER, ITEM, TIMESTAMP])
    sessions, targets = validation_sessions(split, events, lists[USER].unique())
    if targets.is_empty():
        return None
    neighbours = CoVisitation().fit(split.train).neighbours_
    choice = choose_session_weight(lists, neighbours, split.train.select(USER, ITEM), sessions,
                                   targets, metric=metric, session_items=session_items)
    logger.info("session weight %.1f chosen on %d validation sessions (%d blended)",
                choice.weight, sessions.height, choice.blended)
    return {"weight": choice.weight, "metric": choice.metric, "blended": choice.blended,
            "sessions": sessions.height, "table": choice.table.to_dicts()}
