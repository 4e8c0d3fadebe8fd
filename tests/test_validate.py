"""Data contracts: the real GX suites of expectations/ on a real Taobao slice and broken copies."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import polars as pl
import pydantic
import pytest

from models.errors import ConfigError, ValidationFailedError
from tasks.checks.validate import (
    SUITES_DIR,
    ExpectationFailure,
    ValidationReport,
    ValidationSettings,
    raise_on_failure,
    validate_tables,
)
from tasks.data.adapters import load_raw

NOW = dt.datetime(2018, 1, 1, tzinfo=dt.UTC)
BEHAVIOUR = {"pv": "view", "cart": "cart", "fav": "fav", "buy": "purchase"}


@pytest.fixture(scope="module")
def taobao(shared_data: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """5,000 real Taobao events in the canonical schema, and their items as a catalogue."""
    raw = pl.read_csv(
        shared_data / "taobao_userbehavior_sample" / "UserBehavior_sample.csv.gz", n_rows=5_000
    )
    events = raw.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("behavior_type").replace_strict(BEHAVIOUR).alias("event_type"),
        pl.from_epoch("timestamp", time_unit="s")
        .dt.cast_time_unit("us")
        .dt.replace_time_zone("UTC")
        .alias("timestamp"),
    )
    items = raw.select(pl.col("item_id").cast(pl.String), pl.col("category_id").cast(pl.String))
    return events, items.unique("item_id", maintain_order=True)


@pytest.fixture
def events(taobao: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    return taobao[0]


@pytest.fixture
def items(taobao: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    return taobao[1]


def only_failure(
    report: ValidationReport, expectation: str, column: str | None, suite: str = "events"
) -> ExpectationFailure:
    """The report failed, and exactly one failure of ``suite`` is ``expectation`` on ``column``."""
    assert not report.success
    key = (suite, expectation, column)
    found = [f for f in report.failures if (f.suite, f.expectation, f.column) == key]
    assert len(found) == 1, report.to_markdown()
    return found[0]


def set_rows(frame: pl.DataFrame, rows: list[int], column: str, value: object) -> pl.DataFrame:
    """``frame`` with ``column`` set to ``value`` on the given row numbers."""
    dtype = frame.schema.get(column, pl.Float64)
    hit = pl.int_range(pl.len()).is_in(rows)
    base = pl.col(column) if column in frame.columns else pl.lit(1.0, dtype)
    return frame.with_columns(
        pl.when(hit).then(pl.lit(value, dtype)).otherwise(base).alias(column)
    )


def test_clean_real_slice_passes(events: pl.DataFrame, items: pl.DataFrame) -> None:
    report, cleaned = validate_tables(events, items, now=NOW)
    assert report.success, report.to_markdown()
    assert report.failures == []
    assert report.rows == {"events": 5_000, "items": items.height}
    assert report.evaluated >= 20
    assert cleaned.equals(events)
    assert "Data validation passed" in report.to_markdown()
    raise_on_failure(report)


def test_events_alone_are_validated_without_catalogue_share(events: pl.DataFrame) -> None:
    report, _ = validate_tables(events, None, now=NOW)
    assert report.success, report.to_markdown()
    assert report.rows == {"events": 5_000}


def test_missing_column_is_named_not_a_key_error(events: pl.DataFrame) -> None:
    report, _ = validate_tables(events.drop("timestamp"), None, now=NOW)
    failure = only_failure(report, "expect_column_to_exist", "timestamp")
    assert "user_id, item_id, event_type" in failure.detail
    assert len(report.failures) == 1
    text = report.to_markdown()
    assert "`timestamp`" in text
    assert "is missing" in text
    assert "fix:" in text


def test_wrong_types_name_column_and_expected_type(events: pl.DataFrame) -> None:
    broken = events.with_columns(
        pl.col("user_id").cast(pl.Int64),
        pl.col("timestamp").dt.strftime("%Y-%m-%d %H:%M:%S"),
    )
    report, _ = validate_tables(broken, None, now=NOW)
    ids = only_failure(report, "expect_column_values_to_be_of_type", "user_id")
    assert "has type Int64; expected String" in ids.detail
    assert ids.unexpected_count == 5_000
    assert ids.examples == broken["user_id"].unique(maintain_order=True).head(3).to_list()
    times = only_failure(report, "expect_column_values_to_be_of_type", "timestamp")
    assert "expected Datetime(us, UTC)" in times.detail
    assert "str.to_datetime" in times.hint
    text = report.to_markdown()
    assert "`user_id`" in text
    assert "has type String; expected Datetime(us, UTC)" in text


def test_null_ids_are_counted_with_example_rows(events: pl.DataFrame) -> None:
    broken = set_rows(events, [3, 40, 41], "item_id", None)
    report, _ = validate_tables(broken, None, now=NOW)
    failure = only_failure(report, "expect_column_values_to_not_be_null", "item_id")
    assert failure.unexpected_count == 3
    assert failure.unexpected_percent == pytest.approx(0.06)
    assert [row["row"] for row in failure.examples] == [3, 40, 41]
    assert failure.examples[0]["user_id"] == events["user_id"][3]
    assert "no `item_id` in 3 rows" in report.to_markdown()


def test_unknown_event_type_lists_the_values(events: pl.DataFrame) -> None:
    broken = set_rows(events, [0, 1], "event_type", "click")
    broken = set_rows(broken, [2], "event_type", "remove_from_cart")
    report, _ = validate_tables(broken, None, now=NOW)
    failure = only_failure(report, "expect_column_values_to_be_in_set", "event_type")
    assert failure.unexpected_count == 3
    assert set(failure.examples) == {"click", "remove_from_cart"}
    text = report.to_markdown()
    assert "a value outside view, cart, fav, purchase in 3 rows" in text
    assert "`'click'`" in text


def test_negative_prices_fail_in_events_and_items(
    events: pl.DataFrame, items: pl.DataFrame
) -> None:
    priced = set_rows(events, [5, 6], "price", -4.5)
    priced_items = set_rows(items, [0], "price", -1.0)
    report, _ = validate_tables(priced, priced_items, now=NOW)
    in_events = only_failure(report, "expect_column_values_to_be_between", "price")
    assert in_events.unexpected_count == 2
    assert in_events.examples == [-4.5]
    in_items = only_failure(report, "expect_column_values_to_be_between", "price", "items")
    assert in_items.unexpected_count == 1
    assert len(report.failures) == 2
    assert "a value not >= `0.0` in 2 rows" in report.to_markdown()


def test_quantity_must_be_positive(events: pl.DataFrame) -> None:
    counted = events.with_columns(quantity=pl.lit(1, pl.Int64))
    report, _ = validate_tables(set_rows(counted, [7], "quantity", 0), None, now=NOW)
    failure = only_failure(report, "expect_column_values_to_be_between", "quantity")
    assert (failure.unexpected_count, failure.examples) == (1, [0])
    assert "a value not > `0.0` in 1 row" in report.to_markdown()


def test_future_and_ancient_timestamps_fail_with_counts(events: pl.DataFrame) -> None:
    future = NOW + dt.timedelta(days=2)
    broken = set_rows(events, [10, 11, 12], "timestamp", future)
    broken = set_rows(broken, [13], "timestamp", NOW + dt.timedelta(minutes=30))
    broken = set_rows(broken, [14], "timestamp", dt.datetime(1970, 1, 1, tzinfo=dt.UTC))
    report, _ = validate_tables(broken, None, now=NOW)
    late = only_failure(report, "expect_column_max_to_be_between", "timestamp")
    assert late.unexpected_count == 3  # the row within the 60-minute tolerance passes
    assert late.examples == [future]
    early = only_failure(report, "expect_column_min_to_be_between", "timestamp")
    assert early.unexpected_count == 1
    assert early.examples == [dt.datetime(1970, 1, 1, tzinfo=dt.UTC)]
    text = report.to_markdown()
    assert "the largest value is `2018-01-03T00:00:00+00:00`" in text
    assert "<= `2018-01-01T01:00:00+00:00`" in text

    later = ValidationSettings(earliest=dt.datetime(1960, 1, 1), future_tolerance_minutes=4 * 1440)
    assert validate_tables(broken, None, settings=later, now=NOW)[0].success


def test_empty_table_reports_no_rows(events: pl.DataFrame, items: pl.DataFrame) -> None:
    report, cleaned = validate_tables(events.clear(), items, now=NOW)
    failure = only_failure(report, "expect_table_row_count_to_be_between", None)
    assert failure.detail == "no rows"
    assert len(report.failures) == 1
    assert cleaned.height == 0
    assert "**events: table**" in report.to_markdown()


def test_few_duplicates_are_dropped_with_a_warning(events: pl.DataFrame) -> None:
    doubled = pl.concat([events, events.head(25)])
    report, cleaned = validate_tables(doubled, None, now=NOW)
    assert report.success, report.to_markdown()
    assert report.dropped_duplicates == 25
    assert cleaned.equals(events)
    assert "dropped 25 exact duplicate event rows" in report.warnings[0]
    assert "### Warnings" in report.to_markdown()

    kept, uncleaned = validate_tables(doubled, None, ValidationSettings(drop_duplicates=False), NOW)
    assert kept.success
    assert kept.dropped_duplicates == 0
    assert uncleaned.height == doubled.height
    assert "drop_duplicates is off" in kept.warnings[0]


def test_many_duplicates_fail_and_are_kept(events: pl.DataFrame) -> None:
    doubled = pl.concat([events, events.head(1_000)])
    report, cleaned = validate_tables(doubled, None, now=NOW)
    failure = only_failure(report, "expect_column_values_to_be_in_set", "_is_duplicate")
    assert failure.unexpected_count == 1_000
    assert failure.examples[0] == events.row(0, named=True)
    assert cleaned.height == doubled.height
    assert report.dropped_duplicates == 0
    assert "16.7% of events are exact duplicates of another; at most 5% allowed" in (
        report.to_markdown()
    )


def test_duplicate_catalogue_ids_fail_items_suite(
    events: pl.DataFrame, items: pl.DataFrame
) -> None:
    repeated = pl.concat([items, items.head(2).with_columns(category_id=pl.lit("other"))])
    report, _ = validate_tables(events, repeated, now=NOW)
    failure = only_failure(report, "expect_column_values_to_be_unique", "item_id", "items")
    assert failure.unexpected_count == 4
    assert set(failure.examples) == set(items["item_id"].head(2))
    assert "a duplicated `item_id` in 4 rows" in report.to_markdown()


def test_float_user_ids_with_nan_fail_as_missing_users(
    events: pl.DataFrame, tmp_path: Path
) -> None:
    codes = events["user_id"].cast(pl.Float64)
    floats = set_rows(events.with_columns(codes), [2, 30], "user_id", float("nan"))
    floats.write_parquet(tmp_path / "events.parquet")
    report, _ = validate_tables(load_raw(tmp_path, "parquet").events, None, now=NOW)
    failure = only_failure(report, "expect_column_values_to_not_be_null", "user_id")
    assert failure.unexpected_count == 2
    assert [row["user_id"] for row in failure.examples] == [None, None]
    assert len(report.failures) == 1  # the other ids read as "123", not "123.0"
    assert "no `user_id` in 2 rows" in report.to_markdown()
    assert "fix: Drop events without a user" in report.to_markdown()


def test_conflicting_catalogue_rows_fail_after_loading(
    events: pl.DataFrame, items: pl.DataFrame, tmp_path: Path
) -> None:
    events.write_parquet(tmp_path / "events.parquet")
    other = items.head(1).with_columns(category_id=pl.lit("other"))
    pl.concat([items, items.head(3), other]).write_parquet(tmp_path / "items.parquet")
    raw = load_raw(tmp_path, "parquet")
    assert raw.items is not None
    report, _ = validate_tables(raw.events, raw.items, now=NOW)
    failure = only_failure(report, "expect_column_values_to_be_unique", "item_id", "items")
    assert failure.unexpected_count == 2  # the exact copies were dropped when loading
    assert failure.examples == [items["item_id"][0]]
    assert "keep one row per item_id" in report.to_markdown()


def test_low_catalogue_share_lists_missing_items(
    events: pl.DataFrame, items: pl.DataFrame
) -> None:
    half = items.head(items.height // 2)
    report, _ = validate_tables(events, half, now=NOW)
    failure = only_failure(report, "expect_column_values_to_be_in_set", "_item_in_catalogue")
    missing = ~events["item_id"].is_in(half["item_id"].implode())
    assert failure.unexpected_count == missing.sum()
    assert set(failure.examples) <= set(events.filter(missing)["item_id"])
    assert len(failure.examples) == 5
    assert "of events refer to an item of the items table; at least 90% required" in (
        report.to_markdown()
    )
    lenient = ValidationSettings(min_catalogue_share=0.3)
    assert validate_tables(events, half, lenient, NOW)[0].success


def test_raise_on_failure_carries_the_report(events: pl.DataFrame) -> None:
    report, _ = validate_tables(events.drop("event_type"), None, now=NOW)
    with pytest.raises(ValidationFailedError, match="Data validation failed") as info:
        raise_on_failure(report)
    assert info.value.report == report.to_markdown()


def test_settings_read_naive_times_as_utc_and_reject_typos() -> None:
    settings = ValidationSettings(earliest=dt.datetime(2000, 1, 1))
    assert settings.earliest == dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(pydantic.ValidationError):
        ValidationSettings(min_catalog_share=0.5)
    with pytest.raises(pydantic.ValidationError):
        ValidationSettings(max_duplicate_share=1.5)


def test_a_typo_in_a_suite_file_fails_early(events: pl.DataFrame, tmp_path: Path) -> None:
    shutil.copy(SUITES_DIR / "items.json", tmp_path / "items.json")
    spec = json.loads((SUITES_DIR / "events.json").read_text())
    spec["expectations"][1]["kwargs"] = {"colum": "user_id"}
    (tmp_path / "events.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="events.json holds an invalid entry"):
        validate_tables(events, None, ValidationSettings(suites_dir=tmp_path), NOW)
