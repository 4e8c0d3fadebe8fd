"""The split of sharded events equals the split of the concatenated events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from prefect import flow

from models.errors import ShoprankError
from tasks.data.adapters import load_raw
from tasks.data.demo_data import generate_shop
from tasks.data.prepare import _choose_split, read_split, write_split
from tasks.data.shards import ShardWriter, shard_file, shard_of
from tasks.splitting.split import EvalSample, Split, cut_times
from tasks.splitting.split_shards import (
    TABLES,
    read_split_shard,
    shard_cut_times,
    split_event_shards,
    split_shard_files,
)

N_SHARDS = 4
BASE = {"protocol": "auto", "valid_share": 0.1, "test_share": 0.1, "valid_days": None,
        "test_days": None, "target_event_types": None}
CUT_SETTINGS: list[dict[str, Any]] = [
    {}, {"valid_share": 0.05, "test_share": 0.2}, {"valid_share": 0.3, "test_share": 0.45},
    {"valid_share": 1e-4, "test_share": 1e-4}, {"valid_days": 3, "test_days": 1.5},
    {"valid_days": 7, "test_days": None}, {"valid_days": 0, "test_days": 2},
    {"valid_share": 0.6, "test_share": 0.4}, {"valid_share": 0.0, "test_share": 0.1},
]


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    """A demo shop of about 20,000 events."""
    return generate_shop(n_events=20_000, seed=5)[0]


def write_shards(folder: Path, events: pl.DataFrame) -> list[Path]:
    with ShardWriter(folder, N_SHARDS) as writer:
        writer.write(events)
    return sorted(folder.glob("shard-*.parquet"))


@flow
def cuts_flow(shards: list[Path], settings: list[dict[str, Any]]) -> list[Any]:
    return [outcome(shard_cut_times, shards, **s) for s in settings]


@flow
def split_flow(shards: list[Path], cfg: dict, ordered_only: bool, split_dir: Path,
               sample: EvalSample | None = None) -> tuple[str, dict]:
    return split_event_shards(shards, cfg, ordered_only, split_dir, sample)


def outcome(function: Any, *args: Any, **kwargs: Any) -> Any:
    """The function's result, or the type and message of the error it raises."""
    try:
        return function(*args, **kwargs)
    except ShoprankError as error:
        return type(error).__name__, str(error)


def in_order(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, nulls_last=True)


def read_tables(split_dir: Path) -> dict[str, pl.DataFrame]:
    parts = [read_split_shard(split_dir, n) for n in split_shard_files(split_dir)]
    return {name: pl.concat([getattr(p, name) for p in parts]) for name in TABLES}


def assert_same_split(split_dir: Path, result: tuple[str, dict], expected: Split) -> None:
    assert result == (expected.protocol, expected.summary())
    info = json.loads((split_dir / "info.json").read_text())
    assert info["summary"] == json.loads(json.dumps(expected.summary(), default=str))
    for name, table in read_tables(split_dir).items():
        assert in_order(table).equals(in_order(getattr(expected, name))), name


def test_cut_times_equal_those_of_the_whole_log(
    prefect_server: None, events: pl.DataFrame, tmp_path: Path
) -> None:
    minutes = events.with_columns(pl.col("timestamp").dt.truncate("1m"))  # many equal times
    rough = minutes.with_columns(  # and nulls, and a few stray times years before the rest
        pl.when(pl.int_range(pl.len()) % 1_000 == 0).then(None)
        .when(pl.int_range(pl.len()) % 997 == 0).then(pl.col("timestamp").dt.offset_by("-3y"))
        .otherwise(pl.col("timestamp")).alias("timestamp"))
    for name, frame in {"demo": events, "rough": rough}.items():
        shards = write_shards(tmp_path / name, frame)
        expected = [outcome(cut_times, frame, **cut_args(s)) for s in CUT_SETTINGS]

        found = cuts_flow(shards, [cut_args(s) for s in CUT_SETTINGS])

        assert found == expected, name
    assert [isinstance(e[0], str) for e in expected] == [False] * 5 + [True] * 4


def test_cut_time_errors_on_empty_and_instant_logs(
    prefect_server: None, events: pl.DataFrame, tmp_path: Path
) -> None:
    instant = events.head(50).with_columns(pl.col("timestamp").min())
    empty = events.clear()
    shards = write_shards(tmp_path / "instant", instant)
    (tmp_path / "empty").mkdir()
    for n in range(N_SHARDS):
        empty.write_parquet(shard_file(tmp_path / "empty", n))

    found = [*cuts_flow(shards, [cut_args({})]),
             *cuts_flow(sorted((tmp_path / "empty").iterdir()), [cut_args({})])]

    assert found == [outcome(cut_times, instant), outcome(cut_times, empty)]
    assert [f[0] for f in found] == ["DataError", "DataError"]


def cut_args(settings: dict[str, Any]) -> dict[str, Any]:
    full = {**BASE, **settings}
    return {k: full[k] for k in ("valid_share", "test_share", "valid_days", "test_days")}


SPLITS: dict[str, dict[str, Any]] = {
    "shares": {},
    "days": {"protocol": "time", "valid_days": 2, "test_days": 3},
    "purchase targets": {"valid_share": 0.15, "target_event_types": ["purchase", "cart"]},
    "leave one out": {"protocol": "leave_one_out"},
}


@pytest.mark.parametrize("case", list(SPLITS))
def test_sharded_split_equals_the_whole_split(
    prefect_server: None, events: pl.DataFrame, tmp_path: Path, case: str
) -> None:
    cfg = {**BASE, **SPLITS[case]}
    shards = write_shards(tmp_path / "events", events)
    expected = _choose_split(events, cfg["protocol"], False, cfg)

    result = split_flow(shards, cfg, False, tmp_path / "split")

    assert_same_split(tmp_path / "split", result, expected)
    assert split_shard_files(tmp_path / "split") == list(range(N_SHARDS))
    for n in range(N_SHARDS):  # each shard's tables hold the users of that shard only
        part = read_split_shard(tmp_path / "split", n)
        assert (shard_of(part.train["user_id"], N_SHARDS) == n).all()
        assert (shard_of(part.test_targets["user_id"], N_SHARDS) == n).all()


def test_the_test_sample_is_the_same_users_in_both_engines(
    prefect_server: None, events: pl.DataFrame, tmp_path: Path
) -> None:
    """A seeded sample of the test users: the same from shards as from the whole split.

    The split keeps every target on disk; readers see the sample's; the release reads them all.
    """
    shards = write_shards(tmp_path / "events", events)
    whole = _choose_split(events, "time", False, BASE)
    sample = EvalSample(0.3, seed=7)
    write_split(whole, tmp_path / "local", sample)
    split_flow(shards, BASE, False, tmp_path / "split", sample)

    local = read_split(tmp_path / "local")
    sharded = read_tables(tmp_path / "split")
    assert in_order(sharded["test_targets"]).equals(in_order(local.test_targets))
    users, kept = (whole.test_targets["user_id"].n_unique(),
                   local.test_targets["user_id"].n_unique())
    assert abs(kept / users - 0.3) < 4 * (0.3 * 0.7 / users) ** 0.5  # a fair draw
    # every target of a drawn user is kept, and nothing but the test targets is sampled
    drawn = whole.test_targets.join(local.test_targets.select("user_id").unique(), on="user_id",
                                    how="semi")
    assert in_order(drawn).equals(in_order(local.test_targets))
    for name in ("train", "valid_targets", "test_history"):
        assert in_order(sharded[name]).equals(in_order(getattr(whole, name))), name
    assert read_split(tmp_path / "local", sampled=False).test_targets.equals(whole.test_targets)
    other = EvalSample(0.3, seed=8).apply(whole).test_targets["user_id"].unique().sort()
    assert not other.equals(local.test_targets["user_id"].unique().sort())  # the seed draws


def test_ordered_data_is_split_leave_one_out(
    prefect_server: None, shared_data: Path, tmp_path: Path
) -> None:
    raw = load_raw(shared_data / "amazon_s3rec", "s3rec")
    shards = write_shards(tmp_path / "events", raw.events)
    expected = _choose_split(raw.events, "auto", True, BASE)

    result = split_flow(shards, BASE, True, tmp_path / "split")

    assert result[0] == "leave_one_out"
    assert_same_split(tmp_path / "split", result, expected)


def test_split_errors_equal_the_whole_split_errors(
    prefect_server: None, events: pl.DataFrame, tmp_path: Path
) -> None:
    shards = write_shards(tmp_path / "events", events)
    late = events.filter(pl.col("timestamp") >= pl.col("timestamp").max().dt.offset_by("-1d"))
    late_shards = write_shards(tmp_path / "late", late)
    bad_types = {**BASE, "target_event_types": ["click"]}
    no_targets = {**BASE, "protocol": "time", "valid_days": 5, "test_days": 5}

    found = [outcome(split_flow, shards, bad_types, False, tmp_path / "a"),
             outcome(split_flow, late_shards, no_targets, False, tmp_path / "b")]

    assert found == [outcome(_choose_split, events, "auto", False, bad_types),
                     outcome(_choose_split, late, "time", False, no_targets)]
    assert [f[0] for f in found] == ["ConfigError", "DataError"]


def test_dask_task_runner_gives_the_same_split(
    prefect_server: None, events: pl.DataFrame, tmp_path: Path
) -> None:
    from prefect_dask import DaskTaskRunner

    cfg = {**BASE, **SPLITS["purchase targets"]}
    shards = write_shards(tmp_path / "events", events)
    expected = split_flow(shards, cfg, False, tmp_path / "default")
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1,
                                            "processes": True, "dashboard_address": None})

    result = split_flow.with_options(task_runner=runner)(shards, cfg, False, tmp_path / "dask")

    assert result == expected
    for name, table in read_tables(tmp_path / "dask").items():
        assert table.equals(read_tables(tmp_path / "default")[name]), name
