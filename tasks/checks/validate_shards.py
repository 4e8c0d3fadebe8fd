"""The events suite on a folder of Parquet shards by user, one Prefect task per shard.

:func:`validate_shard` reads one shard and runs the row-level expectations of
``expectations/events.json`` on it with Great Expectations, ``mostly`` left out, so that it
returns counts that add up across shards: rows looked at, nulls, rows breaking each expectation,
and the shard's minimum and maximum where the suite bounds them. :func:`validate_event_shards`
maps it over the shards (in parallel under a ``DaskTaskRunner``) and merges the counts into one
:class:`~tasks.checks.validate.ValidationReport`, evaluating what depends on the whole log (row
count, ``mostly`` shares such as the catalogue and duplicate shares, minimum and maximum) the way GX
does on the whole table, so the report says what :func:`~tasks.checks.validate.validate_tables` says
for the concatenated events. Exact duplicates are counted within a shard: every event of a user lies
in one shard, so every copy of an event does too.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task, unmapped
from prefect.futures import wait

from models.columns import EVENT_DTYPES, ITEM, ITEM_DTYPES
from models.errors import ConfigError, DataError
from tasks.checks.report import (
    EXIST,
    IS_DUPLICATE,
    ExpectationFailure,
    ValidationReport,
    count_rows,
    failure,
)
from tasks.checks.shard_results import (
    MIN_MAX,
    ROW_COUNT,
    Key,
    Outcome,
    ShardResult,
    expectation_key,
    merge_shard_results,
    resolve_kwargs,
)
from tasks.checks.validate import (
    SUITES_DIR,
    ValidationSettings,
    _active_expectations,
    _build_suite,
    _check_dtypes,
    _derive_events,
    _run_gx,
    _run_suite,
    _utc,
    decide_duplicates,
    load_suite_spec,
    note_item_duplicates,
    suite_parameters,
)
from tasks.data.readers import reading
from tasks.resume import STAGE_CACHE

logger = logging.getLogger(__name__)


def read_shard(path: Path) -> pl.DataFrame:
    """Read one Parquet shard; an unreadable file raises :class:`DataError` naming it."""
    with reading(path, "Parquet"):
        return pl.read_parquet(path)


def _retry_unless_bad_data(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed shard task on I/O trouble, not on a file that cannot be read as a shard."""
    try:
        state.result()
    except DataError:
        return False
    except Exception:  # any other failure is worth the one retry
        return True
    return True


@task(name="validate-shard", task_run_name="validate-{path.stem}", retries=1, persist_result=True,
      cache_policy=STAGE_CACHE, retry_condition_fn=_retry_unless_bad_data)
def validate_shard(
    path: Path, items: Path | None, settings: ValidationSettings, now: dt.datetime
) -> ShardResult:
    """Run the events suite on one shard, keeping the counts of what depends on all shards.

    Raises:
        DataError: The shard (or the items file) cannot be read as Parquet.
        ConfigError: The suite file cannot be read.
    """
    frame = read_shard(path)
    derived = _derive_events(frame, _catalogue(items))
    spec = load_suite_spec("events", settings.suites_dir)
    type_failures = _check_dtypes("events", frame, EVENT_DTYPES)
    active = _active_expectations(spec["expectations"], derived, {f.column for f in type_failures})
    params = suite_parameters(settings, _utc(now))
    row_level = [e for e in active if _is_row_level(e)]
    outcomes = _row_outcomes(spec, row_level, derived, params, settings)
    for exp in (e for e in active if e["type"] in MIN_MAX):
        outcomes[expectation_key(exp)] = _extreme(exp, derived, params)
    duplicates = int(derived[IS_DUPLICATE].sum()) if IS_DUPLICATE in derived else None
    return ShardResult(path, frame.height, dict(derived.schema), duplicates, type_failures,
                       outcomes)


@task(name="drop-shard-duplicates", task_run_name="drop-duplicates-{path.stem}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE, retry_condition_fn=_retry_unless_bad_data)
def drop_shard_duplicates(path: Path) -> int:
    """Rewrite a shard without its exact duplicate rows (the first copy kept); return how many.

    The clean shard is written to a temporary file in the same folder, then moved over the
    shard, so an interrupted run leaves the old shard or the new one, never half of one.
    """
    frame = read_shard(path)
    clean = frame.filter(pl.struct(frame.columns).is_first_distinct())
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        clean.write_parquet(temporary, compression="zstd")
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return frame.height - clean.height


def validate_event_shards(
    shards: list[Path],
    items: Path | None,
    settings: ValidationSettings | None = None,
    now: dt.datetime | None = None,
    dropped_item_duplicates: int = 0,
) -> tuple[ValidationReport, list[Path]]:
    """Validate events stored as shards by user, and the items table; call it inside a flow.

    One :func:`validate_shard` task runs per shard on the flow's task runner; the items suite
    runs once here. When exact duplicates are dropped, each shard holding some is rewritten
    without them by a :func:`drop_shard_duplicates` task.

    Args:
        shards: The shard files; every event of a user must lie in one of them.
        items: The items table as one Parquet file, or None when the shop has no catalogue.
        settings: Thresholds; defaults to ``ValidationSettings()``.
        now: The reference time for "no event in the future"; defaults to the current UTC time.
        dropped_item_duplicates: Catalogue rows dropped as exact copies when the items were
            read; the report states them.

    Returns:
        The report, saying what :func:`~tasks.checks.validate.validate_tables` says for the
        concatenated events (with the shard files of the offending rows), and the clean shards.

    Raises:
        DataError: No shards are given, or shards cannot be read or differ in their columns;
            one error lists every such shard.
        ConfigError: A suite file cannot be read or holds an expectation that cannot be
            checked shard by shard.
    """
    if not shards:
        raise DataError("no event shards to validate: point to a folder of shard-*.parquet files.")
    settings = settings or ValidationSettings()
    now = _utc(now or dt.datetime.now(dt.UTC))
    params = suite_parameters(settings, now)
    spec = load_suite_spec("events", settings.suites_dir)
    _check_shardable(spec, settings)
    catalogue = _read_items(items) if items is not None else None
    futures = validate_shard.map(shards, items=unmapped(items), settings=unmapped(settings),
                                 now=unmapped(now))
    results = gather(futures)
    report = merge_shard_results(results, spec, params)
    if catalogue is not None:
        report.rows["items"] = catalogue.height
        _run_suite("items", catalogue, ITEM_DTYPES, params, settings, report)
    note_item_duplicates(dropped_item_duplicates, report)
    duplicates = [r for r in results if r.duplicates]
    count = sum(r.duplicates or 0 for r in duplicates)
    if decide_duplicates(count, report.rows["events"], settings, report):
        gather(drop_shard_duplicates.map([r.path for r in duplicates]))
    report.success = not report.failures
    for warning in report.warnings:
        logger.warning(warning)
    logger.info("validation of %d shards %s: %d checks, %d failed", len(shards),
                "passed" if report.success else "failed", report.evaluated, len(report.failures))
    return report, list(shards)


def _catalogue(items: Path | None) -> pl.DataFrame | None:
    """The items table's ``item_id`` column (all a shard needs), or None without items."""
    if items is None:
        return None
    with reading(items, "Parquet"):
        lazy = pl.scan_parquet(items)
        names = lazy.collect_schema().names()
        return lazy.select(ITEM).collect() if ITEM in names else pl.DataFrame()


def _read_items(items: Path) -> pl.DataFrame:
    with reading(items, "Parquet"):
        return pl.read_parquet(items)


def _is_row_level(exp: dict[str, Any]) -> bool:
    """Tell whether an active expectation is checked row by row (in GX, on each shard)."""
    return exp["kwargs"].get("column") is not None and exp["type"] not in (EXIST, *MIN_MAX)


def _check_shardable(spec: dict[str, Any], settings: ValidationSettings) -> None:
    """Refuse expectations whose outcome cannot be merged from per-shard counts."""
    from great_expectations.expectations.expectation import ColumnMapExpectation
    from great_expectations.expectations.registry import get_expectation_impl

    for exp in spec["expectations"]:
        kind, column = exp["type"], exp.get("kwargs", {}).get("column")
        if kind in (EXIST, ROW_COUNT, *MIN_MAX):
            continue
        row_level = column is not None and issubclass(get_expectation_impl(kind),
                                                      ColumnMapExpectation)
        if not row_level or kind == "expect_column_values_to_be_unique":
            path = (settings.suites_dir or SUITES_DIR) / "events.json"
            raise ConfigError(f"The expectation {kind} of {path} cannot be checked on event "
                              "shards one at a time: keep row-level expectations, the row count "
                              "and column min/max there, or validate the events unsharded.")


def _row_outcomes(spec: dict[str, Any], active: list[dict[str, Any]], frame: pl.DataFrame,
                  params: dict[str, Any], settings: ValidationSettings) -> dict[Key, Outcome]:
    """Run the row-level expectations without ``mostly`` (so every row counts) on one shard."""
    if not active:
        return {}
    exact = [{**e, "kwargs": {k: v for k, v in e["kwargs"].items() if k != "mostly"}}
             for e in active]
    suite = _build_suite(spec, exact, (settings.suites_dir or SUITES_DIR) / "events.json")
    columns = list(dict.fromkeys(e["kwargs"]["column"] for e in exact))
    outcomes = {}
    for result in _run_gx("events", suite, frame.select(columns).to_pandas(), params):
        res, config = result.result or {}, result.expectation_config
        outcomes[config.type, config.kwargs.get("column")] = Outcome(
            element_count=res.get("element_count") or 0, missing_count=res.get("missing_count"),
            unexpected_count=res.get("unexpected_count") or 0,
            failure=None if result.success else failure("events", result, frame),
        )
    return outcomes


def _extreme(exp: dict[str, Any], frame: pl.DataFrame, params: dict[str, Any]) -> Outcome:
    """A shard's minimum or maximum of a column, and the rows beyond the expectation's bound."""
    column, kwargs = exp["kwargs"]["column"], resolve_kwargs(exp["kwargs"], params)
    values = frame[column]
    failure = ExpectationFailure("events", exp["type"], column, None, None, [], "")
    count_rows(failure, kwargs, frame)
    observed = values.min() if exp["type"] == MIN_MAX[0] else values.max()
    count = failure.unexpected_count or 0
    return Outcome(values.len(), values.null_count(), count, observed, failure if count else None)


def gather(futures: Any) -> list[Any]:
    """The futures' results, in order.

    Tasks that failed on bad data (:class:`DataError`) are named together in one DataError;
    any other failure is raised as it is.
    """
    wait(futures)
    errors = []
    for future in futures:
        if future.state.is_failed():
            error = future.result(raise_on_failure=False)
            if not isinstance(error, DataError):
                future.result()  # raises anything else as it is
            errors.append(str(error))
    if len(errors) == 1:
        raise DataError(errors[0])
    if errors:
        raise DataError(f"{len(errors)} event shards cannot be validated:\n" +
                        "\n".join(f"- {e}" for e in errors))
    return [future.result() for future in futures]


