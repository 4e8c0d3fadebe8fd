"""Validation of sharded events: the merged report over 4 shards equals the whole-table one."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from prefect import flow

from models.errors import DataError
from tasks.checks.validate import ValidationReport, ValidationSettings, validate_tables
from tasks.checks.validate_shards import validate_event_shards
from tasks.data.demo_data import generate_shop
from tasks.data.shards import ShardWriter, shard_of

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
N_SHARDS = 4


@pytest.fixture(scope="module")
def shop() -> tuple[pl.DataFrame, pl.DataFrame]:
    """A demo shop of about 20,000 events and its catalogue."""
    return generate_shop(n_events=20_000, seed=3)


@flow
def validate_flow(
    shards: list[Path], items: Path | None, settings: ValidationSettings
) -> tuple[ValidationReport, list[Path]]:
    return validate_event_shards(shards, items, settings, NOW)


def write_shards(folder: Path, events: pl.DataFrame, items: pl.DataFrame | None
                 ) -> tuple[list[Path], Path | None]:
    with ShardWriter(folder / "events", N_SHARDS) as writer:
        writer.write(events)
    items_path = None
    if items is not None:
        items_path = folder / "items.parquet"
        items.write_parquet(items_path)
    return sorted((folder / "events").glob("shard-*.parquet")), items_path


def on_rows(frame: pl.DataFrame, every: int, column: str, value: pl.Expr) -> pl.DataFrame:
    """``frame`` with ``column`` set to ``value`` on every ``every``-th row."""
    hit = pl.int_range(pl.len()) % every == 0
    return frame.with_columns(pl.when(hit).then(value).otherwise(pl.col(column)).alias(column))


def with_copies(frame: pl.DataFrame, every: int) -> pl.DataFrame:
    """``frame`` with an exact copy of every ``every``-th row appended."""
    return pl.concat([frame, frame.gather_every(every)])


BAD: dict[str, Callable[[pl.DataFrame], pl.DataFrame]] = {
    "good": lambda f: f,
    "nulls and future times": lambda f: on_rows(
        on_rows(on_rows(f, 997, "item_id", pl.lit(None, pl.String)), 1_499, "timestamp",
                pl.lit(None, f.schema["timestamp"])),
        2_003, "timestamp", pl.col("timestamp") + pl.duration(days=400)),
    "duplicates over the limit": lambda f: with_copies(f, 10),
    "duplicates under the limit": lambda f: with_copies(f, 200),
    "unknown event type, negative price, low catalogue share": lambda f: on_rows(on_rows(
        on_rows(f, 1_009, "event_type", pl.lit("click")), 3_001, "price", pl.lit(-1.0)),
        5, "item_id", pl.lit("not-in-catalogue")),
}


def summary(report: ValidationReport) -> dict[str, object]:
    """What a person reads in a report, apart from the examples."""
    return {
        "success": report.success,
        "failures": [(f.suite, f.expectation, f.column, f.unexpected_count, f.detail, f.hint)
                     for f in report.failures],
        "percents": [pytest.approx(f.unexpected_percent) for f in report.failures],
        "rows": report.rows,
        "evaluated": report.evaluated,
        "dropped": report.dropped_duplicates,
        "warnings": report.warnings,
    }


def in_order(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, nulls_last=True)


@pytest.mark.parametrize("case", list(BAD))
def test_merged_report_equals_the_whole_table_report(
    prefect_server: None, shop: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path, case: str
) -> None:
    events, items = BAD[case](shop[0]), shop[1]
    settings = ValidationSettings()
    expected, clean = validate_tables(events, items, settings, NOW)
    shards, items_path = write_shards(tmp_path, events, items)

    report, clean_shards = validate_flow(shards, items_path, settings)

    assert summary(report) == summary(expected)
    assert report.success == (case in ("good", "duplicates under the limit"))
    merged = pl.concat([pl.read_parquet(p) for p in clean_shards])
    assert in_order(merged).equals(in_order(clean))
    assert not list((tmp_path / "events").glob(".*"))  # no temporary file left behind


def test_without_items_and_with_drops_off(
    prefect_server: None, shop: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    events = with_copies(shop[0], 200)
    settings = ValidationSettings(drop_duplicates=False)
    expected, _ = validate_tables(events, None, settings, NOW)
    shards, _ = write_shards(tmp_path, events, None)

    report, clean_shards = validate_flow(shards, None, settings)

    assert summary(report) == summary(expected)
    assert "drop_duplicates is off" in report.warnings[0]
    assert pl.concat([pl.read_parquet(p) for p in clean_shards]).height == events.height


def test_row_failures_name_their_shard_files(
    prefect_server: None, shop: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    first_user = shop[0]["user_id"][0]
    events = on_rows(shop[0], 4_001, "item_id", pl.lit(None, pl.String)).with_columns(
        pl.when(pl.col("user_id") == first_user).then(pl.lit("click"))
        .otherwise(pl.col("event_type")).alias("event_type"))
    shards, items_path = write_shards(tmp_path, events, shop[1])
    bad_shard = f"shard-{shard_of(pl.Series([first_user]), N_SHARDS)[0]:05d}.parquet"

    report, _ = validate_flow(shards, items_path, ValidationSettings())

    nulls, unknown = report.failures
    assert (unknown.column, unknown.examples, list(unknown.files)) == (
        "event_type", ["click"], [bad_shard])
    assert f"shard files: {bad_shard}" in report.to_markdown()
    assert nulls.unexpected_count == sum(nulls.files.values()) == events["item_id"].null_count()
    for row in nulls.examples:  # each example row is found at its row of its shard file
        shard = pl.read_parquet(tmp_path / "events" / row["file"])
        assert shard["item_id"][row["row"]] is None
        assert shard["user_id"][row["row"]] == row["user_id"]


def test_unreadable_shards_are_one_clear_error(
    prefect_server: None, shop: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    shards, items_path = write_shards(tmp_path, shop[0], shop[1])
    truncated, text = shards[1], shards[2]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    text.write_text("user_id,item_id\nu1,i1\n")

    with pytest.raises(DataError, match="2 event shards cannot be validated") as caught:
        validate_flow(shards, items_path, ValidationSettings())

    message = str(caught.value)
    assert f"{truncated} could not be read as Parquet" in message
    assert f"{text} could not be read as Parquet" in message
    assert "Traceback" not in message


def test_a_shard_missing_a_column_is_a_clear_error(
    prefect_server: None, shop: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    shards, items_path = write_shards(tmp_path, shop[0], shop[1])
    pl.read_parquet(shards[3]).drop("timestamp").write_parquet(shards[3])

    with pytest.raises(DataError, match="event shards differ in their columns") as caught:
        validate_flow(shards, items_path, ValidationSettings())

    assert f"{shards[3]} has user_id String, item_id String, event_type String, session_id" in (
        str(caught.value))


def test_dask_task_runner_gives_the_same_report(
    prefect_server: None, shop: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    from prefect_dask import DaskTaskRunner

    events = BAD["nulls and future times"](with_copies(shop[0], 200))
    default_dir, dask_dir = tmp_path / "default", tmp_path / "dask"
    settings = ValidationSettings()
    expected, _ = validate_flow(*write_shards(default_dir, events, shop[1]), settings)
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1,
                                            "processes": True, "dashboard_address": None})

    report, clean_shards = validate_flow.with_options(task_runner=runner)(
        *write_shards(dask_dir, events, shop[1]), settings)

    assert summary(report) == summary(expected)
    assert [f.files for f in report.failures] == [f.files for f in expected.failures]
    for path in clean_shards:
        assert pl.read_parquet(path).equals(pl.read_parquet(default_dir / "events" / path.name))
