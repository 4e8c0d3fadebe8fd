"""The train / validation / test split of events stored as Parquet shards by user.

The result equals :func:`~tasks.data.prepare.split_data` on the concatenated events, a shard at a
time:

* **Cut times** (``time`` protocol) by map-reduce, exactly. :func:`~tasks.splitting.split.cut_times`
  takes the ``lower`` quantile of the event times: the value at rank ``floor((n - 1) * q)`` of the
  ``n`` non-null timestamps in order. A first :func:`shard_time_stats` task per shard counts its
  rows and timestamps per hour and takes its latest timestamp (all the ``*_days`` variants need);
  adding the counts up says which hour holds each wanted rank, and the rank within that hour. A
  second :func:`shard_times_in` task per shard returns only the distinct timestamps of those hours,
  with their counts, from which the value at each rank is read. Memory is bounded by a shard in the
  tasks and by the timestamps of two hours of the log in the flow.
* **Tables**: a :func:`split_shard` task per shard cuts it with
  :func:`~tasks.splitting.split.time_split` or :func:`~tasks.splitting.split.leave_one_out` (per
  user, so per shard) and writes its four tables to ``split_dir/<table>/shard-XXXXX.parquet``, with
  the shard's number. The users of the shards are disjoint, so the shards' counts add up to
  :meth:`~tasks.splitting.split.Split.summary`.

Layout of ``split_dir``::

    info.json                        {"protocol", "summary", "shards"} as write_split writes
    train/shard-00000.parquet ...
    valid_targets/shard-00000.parquet ...
    test_history/shard-00000.parquet ...
    test_targets/shard-00000.parquet ...
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import task, unmapped
from prefect.futures import wait

from models.columns import TIMESTAMP
from models.errors import DataError
from tasks.checks.validate_shards import _retry_unless_bad_data, read_shard
from tasks.data.readers import reading
from tasks.data.shards import shard_file
from tasks.resume import STAGE_CACHE
from tasks.splitting.split import (
    EvalSample,
    Split,
    check_cut_settings,
    check_cuts,
    check_target_types,
    leave_one_out,
    require_events,
    require_targets,
    time_split,
)

TABLES = ("train", "valid_targets", "test_history", "test_targets")
COUNTS = ("train_events", "valid_users", "valid_targets", "test_history_events", "test_users",
          "test_targets")
HOUR_US = 3_600_000_000
_SHARD_NAME = re.compile(r"shard-(\d+)\.parquet")
_COUNT = "count"

Cuts = tuple[dt.datetime, dt.datetime]


@dataclass
class TimeStats:
    """One shard's rows, latest timestamp and non-null timestamps per hour (since the epoch)."""

    rows: int
    latest: dt.datetime | None
    hours: dict[int, int]


@dataclass
class ShardSplit:
    """One shard's split: its number, its rows and the counts of :meth:`Split.summary`."""

    shard: int
    rows: int
    summary: dict[str, Any]


def _hour() -> pl.Expr:
    return pl.col(TIMESTAMP).dt.epoch("us") // HOUR_US


def _timestamps(path: Path) -> pl.DataFrame:
    with reading(path, "Parquet"):
        return pl.read_parquet(path, columns=[TIMESTAMP])


@task(name="shard-time-stats", task_run_name="time-stats-{path.stem}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE, retry_condition_fn=_retry_unless_bad_data)
def shard_time_stats(path: Path, hours: bool) -> TimeStats:
    """Count a shard's rows (and with ``hours`` its timestamps per hour); take its latest time."""
    frame = _timestamps(path)
    counts = {}
    if hours:
        per_hour = frame.drop_nulls().group_by(_hour().alias("hour")).len(_COUNT)
        counts = dict(zip(per_hour["hour"].to_list(), per_hour[_COUNT].to_list(), strict=True))
    return TimeStats(frame.height, frame[TIMESTAMP].max(), counts)


@task(name="shard-times-in", task_run_name="times-in-{path.stem}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE, retry_condition_fn=_retry_unless_bad_data)
def shard_times_in(path: Path, hours: list[int]) -> pl.DataFrame:
    """The distinct timestamps of a shard within ``hours``, with how often each occurs."""
    frame = _timestamps(path).drop_nulls().filter(_hour().is_in(hours))
    return frame.group_by(TIMESTAMP).len(_COUNT)


def _locate(hours: dict[int, int], rank: int) -> tuple[int, int]:
    """The hour holding the value of 0-based ``rank`` in time order, and its rank in the hour."""
    seen = 0
    for hour in sorted(hours):
        if rank < seen + hours[hour]:
            return hour, rank - seen
        seen += hours[hour]
    raise AssertionError(f"rank {rank} beyond the {seen} counted timestamps")


def _at_rank(values: pl.DataFrame, rank: int) -> dt.datetime:
    """The timestamp at ``rank`` among distinct ``values`` counted ``count`` times each."""
    ordered = values.group_by(TIMESTAMP).agg(pl.col(_COUNT).sum()).sort(TIMESTAMP)
    ends = ordered[_COUNT].cum_sum().to_numpy()
    return ordered[TIMESTAMP][int(np.searchsorted(ends, rank, side="right"))]


def _lower_quantiles(shards: list[Path], hours: dict[int, int], quantiles: tuple[float, ...]
                     ) -> list[dt.datetime | None]:
    """``Series.quantile(q, interpolation="lower")`` of the shards' timestamps, per ``q``."""
    n = sum(hours.values())
    if not n:
        return [None for _ in quantiles]
    places = [_locate(hours, math.floor((n - 1) * q)) for q in quantiles]  # as polars ranks
    wanted = sorted({hour for hour, _ in places})
    values = pl.concat(_results(shard_times_in.map(shards, hours=unmapped(wanted))))
    return [_at_rank(values.filter(_hour() == hour), rank) for hour, rank in places]


def shard_cut_times(
    shards: list[Path],
    valid_share: float = 0.1,
    test_share: float = 0.1,
    valid_days: float | None = None,
    test_days: float | None = None,
) -> Cuts:
    """:func:`~tasks.splitting.split.cut_times` of the concatenated shards, by map-reduce.

    Call it in a flow. Returns the same ``(t_valid, t_test)`` and raises the same errors.
    """
    by_days = valid_days is not None or test_days is not None
    stats = _results(shard_time_stats.map(shards, hours=unmapped(not by_days)))
    require_events(sum(s.rows for s in stats))
    if check_cut_settings(valid_share, test_share, valid_days, test_days):
        end = max((s.latest for s in stats if s.latest is not None), default=None)
        t_test = end - dt.timedelta(days=test_days)
        t_valid = t_test - dt.timedelta(days=valid_days)
    else:
        hours: Counter[int] = Counter()
        for s in stats:
            hours.update(s.hours)
        t_test, t_valid = _lower_quantiles(
            shards, hours, (1 - test_share, 1 - test_share - valid_share))
    check_cuts(t_valid, t_test)
    return t_valid, t_test


def shard_number(path: Path) -> int:
    """The number in a shard file's name ``shard-XXXXX.parquet``."""
    match = _SHARD_NAME.fullmatch(path.name)
    if match is None:
        raise DataError(f"{path} is not named like a shard (shard-00000.parquet): write the "
                        "events with tasks.data.shards.ShardWriter or name the files so.")
    return int(match.group(1))


@task(name="split-shard", task_run_name="split-{path.stem}", retries=1, persist_result=True,
      cache_policy=STAGE_CACHE, retry_condition_fn=_retry_unless_bad_data)
def split_shard(path: Path, cuts: Cuts | None, target_event_types: tuple[str, ...] | None,
                split_dir: Path) -> ShardSplit:
    """Split one shard (leave-one-out without ``cuts``) and write its four tables."""
    events = read_shard(path)
    if cuts is None:
        split = leave_one_out(events, check=False)
    else:
        split = time_split(events, *cuts, target_event_types, check=False)
    shard = shard_number(path)
    for name in TABLES:
        getattr(split, name).write_parquet(shard_file(split_dir / name, shard))
    return ShardSplit(shard, events.height, split.summary())


def split_event_shards(
    shards: list[Path], split_cfg: dict, ordered_only: bool, split_dir: Path,
    sample: EvalSample | None = None,
) -> tuple[str, dict[str, Any]]:
    """Split events stored as shards by user as ``split_data`` splits them; call in a flow.

    Args:
        shards: The shard files ``shard-XXXXX.parquet``; every event of a user in one of them.
        split_cfg: The ``split`` settings (``protocol``, shares, days, ``target_event_types``).
        ordered_only: The events have order but no real timestamps (``auto`` is leave-one-out).
        split_dir: Where the tables and ``info.json`` go (see the module docstring).
        sample: The test users scored (recorded in ``info.json``; default every one).

    Returns:
        The protocol and the summary of the whole split, equal to ``Split.summary()``.

    Raises:
        DataError: No events, no targets, coinciding cut times, or an unreadable shard.
        ConfigError: Settings out of range.
    """
    numbers = [shard_number(p) for p in shards]
    protocol = split_cfg["protocol"]
    cuts, types = None, None
    if not (protocol == "leave_one_out" or (protocol == "auto" and ordered_only)):
        cuts = shard_cut_times(shards, split_cfg["valid_share"], split_cfg["test_share"],
                               split_cfg["valid_days"], split_cfg["test_days"])
        types = tuple(split_cfg["target_event_types"] or ()) or None
        check_target_types(types)
    for name in TABLES:  # no shard of an earlier split may be left beside the new ones
        (split_dir / name).mkdir(parents=True, exist_ok=True)
        for old in (split_dir / name).glob("shard-*.parquet"):
            if shard_number(old) not in numbers:  # (a resumed run keeps its cached shards)
                old.unlink()
    parts = _results(split_shard.map(shards, cuts=unmapped(cuts), target_event_types=unmapped(
        types), split_dir=unmapped(split_dir)))
    require_events(sum(p.rows for p in parts))
    summary = {**parts[0].summary, **{k: sum(p.summary[k] for p in parts) for k in COUNTS}}
    require_targets(summary["valid_targets"], summary["test_targets"])
    info = {"protocol": summary["protocol"], "summary": summary, "shards": sorted(numbers)}
    if sample is not None:
        info["test_sample"] = sample.as_info()
    (split_dir / "info.json").write_text(json.dumps(info, indent=2, default=str))
    return summary["protocol"], summary


def split_shard_files(split_dir: Path) -> list[int]:
    """The numbers of the shards of a split written by :func:`split_event_shards`."""
    return json.loads((split_dir / "info.json").read_text())["shards"]


def read_split_shard(split_dir: Path, shard: int) -> Split:
    """Read one shard's four tables of a split written by :func:`split_event_shards`.

    The test targets are those of the split's test sample (:class:`EvalSample`).
    """
    info = json.loads((split_dir / "info.json").read_text())
    tables = {name: pl.read_parquet(shard_file(split_dir / name, shard)) for name in TABLES}
    return EvalSample.from_info(info).apply(
        Split(protocol=info["protocol"], info=info["summary"], **tables))


def _results(futures: Any) -> list[Any]:
    """The results of mapped task futures, in order; the first failure raises its error."""
    wait(futures)
    return [future.result() for future in futures]
