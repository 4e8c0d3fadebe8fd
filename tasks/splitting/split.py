"""Train / validation / test splits exactly as the evaluation protocol defines them.

Two protocols:

* ``time``: two cut times ``t_valid < t_test``. Validation models see events before ``t_valid`` and
  predict the distinct items each user touches in ``[t_valid, t_test)``; test models see every event
  before ``t_test`` and predict the items of ``[t_test, end)``. Users are evaluated when they have
  at least one event in the history and at least one target.
* ``leave_one_out``: per user, in order, the last item is the test target, the second-last the
  validation target, everything before is training data. The test history is everything but the
  last item.

Nothing computed from ``train`` or ``test_history`` can see the window it is evaluated on: the
histories end strictly before their targets begin.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

from models.columns import EVENT_TYPE, EVENT_TYPES, ITEM, TIMESTAMP, USER
from models.errors import ConfigError, DataError

Protocol = Literal["time", "leave_one_out"]
_POS = "__pos"


@dataclass
class Split:
    """The four tables every model is fitted and evaluated on, plus how they were cut."""

    protocol: Protocol
    train: pl.DataFrame
    valid_targets: pl.DataFrame
    test_history: pl.DataFrame
    test_targets: pl.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Counts of rows and users per table, for logs and MLflow."""
        return {
            "protocol": self.protocol,
            "train_events": self.train.height,
            "valid_users": self.valid_targets[USER].n_unique(),
            "valid_targets": self.valid_targets.height,
            "test_history_events": self.test_history.height,
            "test_users": self.test_targets[USER].n_unique(),
            "test_targets": self.test_targets.height,
            **{k: str(v) for k, v in self.info.items()},
        }


def _targets(
    window: pl.DataFrame, history: pl.DataFrame, target_event_types: tuple[str, ...] | None
) -> pl.DataFrame:
    """Distinct (user, item) pairs of ``window`` for users that have a history."""
    if target_event_types:
        window = window.filter(pl.col(EVENT_TYPE).is_in(list(target_event_types)))
    known = history.select(USER).unique()
    return window.select(USER, ITEM).unique().join(known, on=USER, how="semi").sort(USER, ITEM)


def require_events(rows: int) -> None:
    """Raise :class:`DataError` when there are no events to split."""
    if not rows:
        raise DataError("cannot split an empty event table: the data has no events.")


def check_cut_settings(
    valid_share: float, test_share: float, valid_days: float | None, test_days: float | None
) -> bool:
    """Check the settings of :func:`cut_times`; tell whether the windows are given in days.

    Raises:
        ConfigError: Days given but not both positive, or shares out of range.
    """
    if test_days is not None or valid_days is not None:
        if not test_days or not valid_days or test_days <= 0 or valid_days <= 0:
            raise ConfigError("split.valid_days and split.test_days must both be set and > 0.")
        return True
    if not (0 < test_share < 1 and 0 < valid_share < 1 and valid_share + test_share < 1):
        raise ConfigError(
            "split.valid_share and split.test_share must be in (0, 1) and sum below 1; "
            f"got {valid_share} and {test_share}."
        )
    return False


def check_cuts(t_valid: dt.datetime, t_test: dt.datetime) -> None:
    """Raise :class:`DataError` unless ``t_valid`` comes before ``t_test``."""
    if not t_valid < t_test:
        raise DataError(
            "the validation and test cut times coincide: the events span too little time to "
            "split. Give split.valid_days/test_days or more data."
        )


def check_target_types(target_event_types: tuple[str, ...] | None) -> None:
    """Raise :class:`ConfigError` unless every target event type is a canonical one."""
    if target_event_types and not set(target_event_types) <= set(EVENT_TYPES):
        raise ConfigError(
            f"split.target_event_types must be among {', '.join(EVENT_TYPES)}; "
            f"got {', '.join(target_event_types)}."
        )


def cut_times(
    events: pl.DataFrame,
    valid_share: float = 0.1,
    test_share: float = 0.1,
    valid_days: float | None = None,
    test_days: float | None = None,
) -> tuple[dt.datetime, dt.datetime]:
    """Choose ``(t_valid, t_test)``.

    With ``test_days``/``valid_days`` the windows are that many days at the end of the log;
    otherwise the cuts are the event-time quantiles that leave ``test_share`` of the events for
    test and ``valid_share`` for validation (robust to a few stray early timestamps).
    """
    require_events(events.height)
    ts = events[TIMESTAMP]
    if check_cut_settings(valid_share, test_share, valid_days, test_days):
        end = ts.max()
        t_test = end - dt.timedelta(days=test_days)
        t_valid = t_test - dt.timedelta(days=valid_days)
    else:
        t_test = ts.quantile(1 - test_share, interpolation="lower")
        t_valid = ts.quantile(1 - test_share - valid_share, interpolation="lower")
    check_cuts(t_valid, t_test)
    return t_valid, t_test


def time_split(
    events: pl.DataFrame,
    t_valid: dt.datetime,
    t_test: dt.datetime,
    target_event_types: tuple[str, ...] | None = None,
    check: bool = True,
) -> Split:
    """Split by the two cut times (see the module docstring).

    With ``check`` False (for one part of a larger table, checked as a whole) a split without
    validation or test targets is returned instead of raising :class:`DataError`.
    """
    check_target_types(target_event_types)
    train = events.filter(pl.col(TIMESTAMP) < t_valid)
    valid = events.filter((pl.col(TIMESTAMP) >= t_valid) & (pl.col(TIMESTAMP) < t_test))
    test_history = events.filter(pl.col(TIMESTAMP) < t_test)
    test = events.filter(pl.col(TIMESTAMP) >= t_test)
    split = Split(
        protocol="time",
        train=train,
        valid_targets=_targets(valid, train, target_event_types),
        test_history=test_history,
        test_targets=_targets(test, test_history, target_event_types),
        info={
            "t_valid": t_valid,
            "t_test": t_test,
            "target_event_types": ",".join(target_event_types or EVENT_TYPES),
            "test_history": "train+valid",
        },
    )
    if check:
        require_targets(split.valid_targets.height, split.test_targets.height)
    return split


def leave_one_out(events: pl.DataFrame, check: bool = True) -> Split:
    """Per user, last item for test, second-last for validation (events ordered by timestamp).

    Users with fewer than three events stay in the training data and are not evaluated. With
    ``check`` False (for one part of a larger table) no events or no targets raise nothing.
    """
    if check:
        require_events(events.height)
    ordered = events.with_row_index("__row").sort([USER, TIMESTAMP, "__row"]).drop("__row")
    ordered = ordered.with_columns(
        (pl.len().over(USER) - pl.int_range(pl.len()).over(USER) - 1).alias(_POS)
    )  # _POS = 0 for a user's last event, 1 for the second-last, ...
    n_per_user = pl.len().over(USER)
    evaluated = n_per_user >= 3
    train = ordered.filter(~evaluated | (pl.col(_POS) >= 2)).drop(_POS)
    test_history = ordered.filter(~evaluated | (pl.col(_POS) >= 1)).drop(_POS)
    valid_targets = ordered.filter(evaluated & (pl.col(_POS) == 1)).select(USER, ITEM)
    test_targets = ordered.filter(evaluated & (pl.col(_POS) == 0)).select(USER, ITEM)
    split = Split(
        protocol="leave_one_out",
        train=train,
        valid_targets=valid_targets.sort(USER),
        test_history=test_history,
        test_targets=test_targets.sort(USER),
        info={"test_history": "train+valid item"},
    )
    if check:
        require_targets(split.valid_targets.height, split.test_targets.height)
    return split


def require_targets(valid_targets: int, test_targets: int) -> None:
    """Raise :class:`DataError` when the validation or the test window has no targets."""
    for name, count in (("validation", valid_targets), ("test", test_targets)):
        if not count:
            raise DataError(
                f"the {name} window has no targets for users with a history: the data is too "
                "small or too short for this split. Use more data or change the split windows."
            )


SELECTION_SCALE = 1_000_000


@dataclass(frozen=True)
class Selection:
    """The selection holdout: the validation users every family is selected on.

    A user is drawn when the hash of its id keyed by purpose ``selection`` and ``seed``
    (:func:`tasks.data.shards.shard_of`) modulo 10^6 is below ``share`` x 10^6: the same draw
    in every process and shard, independent of the shard and of the other draws. Their
    validation targets are used by no family's early stopping, trials or boosting
    (:meth:`tuning`); every family, baselines included, reports its ``valid`` metrics on them
    (:meth:`targets`). ``share`` 0 turns it off: every validation user is tuned and selected on.
    """

    share: float = 0.0
    seed: int = 0

    def drawn(self, users: pl.Series) -> pl.Series:
        """Whether each user is in the selection holdout."""
        from tasks.data.shards import shard_of

        if self.share <= 0:
            return pl.Series(USER, [True] * users.len(), dtype=pl.Boolean)
        key = shard_of(users, SELECTION_SCALE, purpose="selection", seed=self.seed)
        return key < self.share * SELECTION_SCALE

    def targets(self, split: Split) -> pl.DataFrame:
        """The validation targets of the drawn users (all of them with ``share`` 0)."""
        return split.valid_targets.filter(self.drawn(split.valid_targets[USER]))

    def tuning(self, split: Split) -> Split:
        """``split`` without the drawn users' validation targets (itself with ``share`` 0)."""
        if self.share <= 0:
            return split
        kept = split.valid_targets.filter(~self.drawn(split.valid_targets[USER]))
        return Split(split.protocol, split.train, kept, split.test_history, split.test_targets,
                     split.info)

    def check(self, users: int) -> None:
        """Raise :class:`DataError` when no validation user was drawn (``users`` drawn)."""
        if users == 0:
            raise DataError(
                f"no validation user was drawn into the selection holdout "
                f"(evaluation.selection_share {self.share}): the validation window has too few "
                "users. Raise evaluation.selection_share, or set it to 0 to select on every "
                "validation user.")


@dataclass(frozen=True)
class EvalSample:
    """The test users scored: all of them, or a seeded sample of a large shop's.

    A user is kept when the hash of its id keyed by purpose ``test`` and ``seed``
    (:func:`tasks.data.shards.shard_of`) modulo 10^6 is below ``share`` x 10^6: the same users
    in every process and shard, for every family, both engines and both sides of the gate, and
    independent of the other draws. The split keeps every test target on disk and records the
    sample in its ``info.json``; readers apply it (:func:`tasks.data.prepare.read_split`). The
    metrics are then those of the sample, with their standard errors
    (:mod:`models.metrics`). ``share`` 1 scores every test user.
    """

    share: float = 1.0
    seed: int = 0

    def apply(self, split: Split) -> Split:
        """``split`` with the test targets of the sampled users only (itself at ``share`` 1)."""
        from tasks.data.shards import shard_of

        if self.share >= 1:
            return split
        key = shard_of(split.test_targets[USER], SELECTION_SCALE, purpose="test", seed=self.seed)
        kept = split.test_targets.filter(key < self.share * SELECTION_SCALE)
        return Split(split.protocol, split.train, split.valid_targets, split.test_history, kept,
                     split.info)

    def as_info(self) -> dict[str, Any]:
        """The sample as the split's ``info.json`` records it."""
        return {"share": self.share, "seed": self.seed}

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> EvalSample:
        """The sample an ``info.json`` records (every test user for a split written without)."""
        found = info.get("test_sample") or {}
        return cls(float(found.get("share", 1.0)), int(found.get("seed", 0)))
