"""Data contracts on the canonical events and items tables, checked with Great Expectations.

The suites are the JSON files ``expectations/events.json`` and ``expectations/items.json``, run
on an in-memory pandas batch of an ephemeral GX context. Around them this module checks column
types against the canonical polars types of :mod:`models.columns`, adds the derived columns
``_is_duplicate`` and ``_item_in_catalogue``, fills the ``$PARAMETER`` bounds from
:class:`ValidationSettings`, skips what cannot run (mistyped columns, absent optional columns,
column values of an empty table) and turns failed results into :class:`ExpectationFailure`
records with row counts, examples and the ``meta.fix`` hint. ``great_expectations`` is imported
only where a suite runs: the import takes seconds.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.columns import EVENT_DTYPES, EVENT_REQUIRED, ITEM, ITEM_DTYPES
from models.errors import ConfigError, ValidationFailedError
from tasks.checks.report import (
    EXIST,
    IN_CATALOGUE,
    IS_DUPLICATE,
    ExpectationFailure,
    ValidationReport,
    failure,
    percentage,
)

logger = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).resolve().parents[2] / "expectations"
OF_TYPE = "expect_column_values_to_be_of_type"


class ValidationSettings(BaseModel):
    """Thresholds of the data contracts on events and items."""

    model_config = ConfigDict(extra="forbid")

    min_catalogue_share: float = Field(
        0.9, ge=0, le=1, description="Least share of events whose item is in the items table."
    )
    max_duplicate_share: float = Field(
        0.05, ge=0, le=1, description="Largest share of events that are exact copies of another."
    )
    earliest: dt.datetime = Field(
        dt.datetime(1990, 1, 1, tzinfo=dt.UTC),
        description="No event may be older than this (naive values are read as UTC).",
    )
    future_tolerance_minutes: float = Field(
        60, ge=0, description="How far past the current time an event may lie (clock skew)."
    )
    drop_duplicates: bool = Field(
        True, description="Drop exact duplicate events when their share is within the maximum."
    )
    suites_dir: Path | None = Field(
        None, description="Folder of events.json and items.json; default: the bundled suites."
    )

    @field_validator("earliest")
    @classmethod
    def _as_utc(cls, value: dt.datetime) -> dt.datetime:
        return _utc(value)


def validate_tables(
    events: pl.DataFrame,
    items: pl.DataFrame | None,
    settings: ValidationSettings | None = None,
    now: dt.datetime | None = None,
    dropped_item_duplicates: int = 0,
) -> tuple[ValidationReport, pl.DataFrame]:
    """Run the events suite and, when ``items`` is given, the items suite.

    Args:
        events: The canonical events table.
        items: The canonical items table, or None when the shop has no catalogue.
        settings: Thresholds; defaults to ``ValidationSettings()``.
        now: The reference time for "no event in the future"; defaults to the current UTC time.
        dropped_item_duplicates: Catalogue rows dropped when ``items`` was read as exact copies
            of another row (:attr:`tasks.data.formats.RawData.dropped_item_duplicates`); the
            report states them.

    Returns:
        The report and the events with exact duplicates dropped (when allowed and their share is
        within the maximum; the report's warnings give their count). Failed expectations never
        raise: the caller decides, for example with :func:`raise_on_failure`.

    Raises:
        ConfigError: A suite file cannot be read or holds an invalid expectation.
    """
    settings = settings or ValidationSettings()
    params = suite_parameters(settings, _utc(now or dt.datetime.now(dt.UTC)))
    report = ValidationReport(success=True, rows={"events": events.height})
    derived = _derive_events(events, items)
    _run_suite("events", derived, EVENT_DTYPES, params, settings, report)
    if items is not None:
        report.rows["items"] = items.height
        _run_suite("items", items, ITEM_DTYPES, params, settings, report)
    note_item_duplicates(dropped_item_duplicates, report)
    if IS_DUPLICATE in derived:
        events = _drop_duplicates(events, derived[IS_DUPLICATE], settings, report)
    report.success = not report.failures
    for warning in report.warnings:
        logger.warning(warning)
    logger.info("validation %s: %d checks, %d failed", "passed" if report.success else "failed",
                report.evaluated, len(report.failures))
    return report, events


def suite_parameters(settings: ValidationSettings, now: dt.datetime) -> dict[str, Any]:
    """The values of the suites' ``$PARAMETER`` bounds for these settings at time ``now``."""
    return {
        "earliest_timestamp": settings.earliest,
        "latest_timestamp": now + dt.timedelta(minutes=settings.future_tolerance_minutes),
        "min_catalogue_share": settings.min_catalogue_share,
        "min_distinct_share": 1 - settings.max_duplicate_share,
    }


def raise_on_failure(report: ValidationReport) -> None:
    """Raise :class:`ValidationFailedError` carrying the Markdown report when a check failed."""
    if not report.success:
        raise ValidationFailedError(report.to_markdown())


def load_suite_spec(name: str, suites_dir: Path | None = None) -> dict[str, Any]:
    """Read ``<suites_dir>/<name>.json`` and check that GX accepts every expectation in it.

    Raises:
        ConfigError: The file is missing, is not JSON, or holds an invalid expectation.
    """
    path = (suites_dir or SUITES_DIR) / f"{name}.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"Cannot read the expectation suite {path}: {err}. Restore the file, "
                          "fix its JSON, or set ValidationSettings.suites_dir.") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("expectations"), list):
        raise ConfigError(f"The expectation suite {path} must be a JSON object with a list "
                          "'expectations' (and a 'name'). Fix the file's structure.")
    _build_suite(spec, spec["expectations"], path)
    return spec


def _build_suite(spec: dict[str, Any], expectations: list[dict[str, Any]], path: Path) -> Any:
    """Build a ``gx.ExpectationSuite`` from ``spec`` with only ``expectations`` in it."""
    import great_expectations as gx
    from great_expectations.exceptions import GreatExpectationsError

    try:  # GX reports unknown keys as pydantic.v1 ValidationError, a ValueError
        suite = gx.ExpectationSuite(**{**spec, "expectations": expectations})
    except (GreatExpectationsError, ValueError, TypeError) as err:
        raise ConfigError(f"The expectation suite {path} holds an invalid entry: {err}. "
                          "Fix the expectation's type or kwargs (see the GX gallery).") from err
    if len(suite.expectations) != len(expectations):  # GX logs and skips some invalid entries
        raise ConfigError(f"The expectation suite {path} holds expectations GX rejected (see "
                          "the log above). Fix the expectation's type or kwargs.")
    return suite


def _derive_events(events: pl.DataFrame, items: pl.DataFrame | None) -> pl.DataFrame:
    """Add ``_is_duplicate`` and ``_item_in_catalogue`` when they can be computed."""
    derived = events
    if all(c in events for c in EVENT_REQUIRED):  # without them duplicates mean little
        is_dup = pl.struct(events.columns).is_first_distinct().not_()
        derived = events.with_columns(is_dup.alias(IS_DUPLICATE))
    if items is None:
        return derived
    if all(table.schema.get(ITEM) == pl.String for table in (events, items)):
        in_catalogue = pl.col(ITEM).is_in(items[ITEM].drop_nulls().unique().implode())
        derived = derived.with_columns(in_catalogue.fill_null(False).alias(IN_CATALOGUE))
    return derived


def _run_suite(name: str, frame: pl.DataFrame, dtypes: dict[str, str], params: dict[str, Any],
               settings: ValidationSettings, report: ValidationReport) -> None:
    """Check types, run the active expectations of suite ``name`` and record the failures."""
    spec = load_suite_spec(name, settings.suites_dir)
    type_failures = _check_dtypes(name, frame, dtypes)
    mistyped = {f.column for f in type_failures}
    active = _active_expectations(spec["expectations"], frame, mistyped)
    columns = [c for c in dict.fromkeys(e["kwargs"].get("column") for e in active) if c in frame]
    suite = _build_suite(spec, active, (settings.suites_dir or SUITES_DIR) / f"{name}.json")
    results = _run_gx(name, suite, frame.select(columns).to_pandas(), params)
    order = {(e["type"], e["kwargs"].get("column")): i for i, e in enumerate(active)}
    results.sort(key=lambda r: order.get((r.expectation_config.type,
                                          r.expectation_config.kwargs.get("column")), 0))
    report.evaluated += len(results) + sum(c in frame for c in dtypes)
    report.failures += type_failures
    report.failures += [failure(name, r, frame) for r in results if not r.success]


def _active_expectations(
    expectations: list[dict[str, Any]], frame: pl.DataFrame, mistyped: set[str | None]
) -> list[dict[str, Any]]:
    """Select the expectations that can run; a missing required column gets an existence check."""
    active, needed = [], set()
    for exp in expectations:
        column = exp.get("kwargs", {}).get("column")
        if column is None or exp["type"] == EXIST:
            active.append(exp)
        elif column not in frame:
            if not exp.get("meta", {}).get("optional", False):
                needed.add(column)
        elif frame.height and column not in mistyped:
            active.append(exp)
    existing = {e["kwargs"]["column"] for e in active if e["type"] == EXIST}
    return active + [{"type": EXIST, "kwargs": {"column": c}} for c in sorted(needed - existing)]


def _run_gx(name: str, suite: Any, frame: Any, params: dict[str, Any]) -> list[Any]:
    """Validate a pandas frame against ``suite`` in an ephemeral GX context."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas(f"shoprank_{name}").add_dataframe_asset(name)
    definition = gx.ValidationDefinition(  # fetches the batch once; Batch.validate fetches twice
        name=name, data=asset.add_batch_definition_whole_dataframe("whole"),
        suite=context.suites.add(suite),
    )
    result = context.validation_definitions.add(definition).run(
        batch_parameters={"dataframe": frame}, expectation_parameters=params
    )
    return list(result.results)


def _check_dtypes(
    name: str, frame: pl.DataFrame, dtypes: dict[str, str]
) -> list[ExpectationFailure]:
    """Report each present canonical column whose polars type is not the canonical one."""
    failures = []
    for column, expected in dtypes.items():
        if column not in frame or (found := _dtype_name(frame.schema[column])) == expected:
            continue
        failures.append(ExpectationFailure(
            suite=name, expectation=OF_TYPE, column=column,
            unexpected_count=frame.height or None,
            unexpected_percent=100.0 if frame.height else None,
            examples=frame[column].drop_nulls().unique(maintain_order=True).head(3).to_list(),
            detail=f"column `{column}` has type {found}; expected {expected}",
            hint=_cast_hint(column, expected, found),
        ))
    return failures


def _dtype_name(dtype: pl.DataType) -> str:
    """Spell ``dtype`` as :mod:`models.columns` does (``Datetime(us, UTC)``, ``List(String)``)."""
    if isinstance(dtype, pl.Datetime):
        return f"Datetime({dtype.time_unit}, {dtype.time_zone})"
    if isinstance(dtype, pl.List):
        return f"List({_dtype_name(dtype.inner)})"
    return str(dtype)


def _cast_hint(column: str, expected: str, found: str) -> str:
    """Suggest the polars expression that converts ``column`` to its canonical type."""
    col = f'pl.col("{column}")'
    if expected.startswith("Datetime"):
        if found == "String":
            return f'Parse the text in the loader: {col}.str.to_datetime(time_zone="UTC").'
        if found.startswith(("Int", "UInt")):
            return (f'Convert unix times in the loader: pl.from_epoch("{column}", time_unit="s")'
                    '.dt.replace_time_zone("UTC") (time_unit "ms" for milliseconds).')
        return (f'Convert it in the loader: {col}.dt.cast_time_unit("us")'
                '.dt.replace_time_zone("UTC") for naive times, .dt.convert_time_zone("UTC") '
                "for times in another zone.")
    target = "pl.List(pl.String)" if expected == "List(String)" else f"pl.{expected}"
    return f"Cast it in the loader: {col}.cast({target})."


def _drop_duplicates(
    events: pl.DataFrame, is_dup: pl.Series, settings: ValidationSettings, report: ValidationReport
) -> pl.DataFrame:
    """Drop exact duplicate events when allowed and within the maximum share, with a warning."""
    if not decide_duplicates(int(is_dup.sum()), events.height, settings, report):
        return events
    return events.filter(is_dup.not_())


def decide_duplicates(
    count: int, rows: int, settings: ValidationSettings, report: ValidationReport
) -> bool:
    """Tell whether ``count`` exact duplicates among ``rows`` events are dropped; warn either way.

    They are dropped when ``drop_duplicates`` is on and their share is within the maximum; the
    report's ``dropped_duplicates`` and warnings say what was decided.
    """
    if not count:
        return False
    share = count / rows
    what = f"{count:,} exact duplicate event rows ({share:.2%} of {rows:,})"
    if share > settings.max_duplicate_share:
        report.warnings.append(f"{what} were kept: more than max_duplicate_share "
                               f"({percentage(settings.max_duplicate_share)}).")
        return False
    if not settings.drop_duplicates:
        report.warnings.append(f"{what} were kept: drop_duplicates is off.")
        return False
    report.dropped_duplicates = count
    report.warnings.append(f"dropped {what}; the first copy of each row is kept.")
    return True


def note_item_duplicates(count: int, report: ValidationReport) -> None:
    """Record in ``report`` the ``count`` catalogue rows dropped as exact copies, with a warning."""
    if not count:
        return
    report.dropped_item_duplicates = count
    report.warnings.append(f"dropped {count:,} catalogue rows that repeat another row exactly "
                           "(same item_id and values) when the items were read; the first copy "
                           "of each row is kept.")


def _utc(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC; a naive value is read as UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


