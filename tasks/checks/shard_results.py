"""What a shard's validation returns, and how the shards' results merge into one report.

Each shard's task returns a :class:`ShardResult`: its row-level outcomes (counts of failing rows
and examples per expectation), its column types and the partial counts of the checks that span
shards. :func:`merge_shard_results` decides those checks exactly on summed counts and writes one
:class:`~tasks.checks.report.ValidationReport` that names the shard files where rows fail.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from models.columns import EVENT_DTYPES
from models.errors import DataError
from tasks.checks.report import (
    EXIST,
    MAX_EXAMPLES,
    ExpectationFailure,
    ValidationReport,
    describe,
)
from tasks.checks.validate import (
    SUITES_DIR,
    _active_expectations,
    _build_suite,
    _dtype_name,
)

ROW_COUNT = "expect_table_row_count_to_be_between"
MIN_MAX = ("expect_column_min_to_be_between", "expect_column_max_to_be_between")
MAX_FILES = 10

Key = tuple[str, str | None]


def expectation_key(exp: dict[str, Any]) -> Key:
    """``(expectation type, column)``: how an expectation is known across shards."""
    return exp["type"], exp["kwargs"].get("column")


def resolve_kwargs(kwargs: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with each ``{"$PARAMETER": name}`` replaced by its value."""
    return {k: params[v["$PARAMETER"]] if isinstance(v, dict) and "$PARAMETER" in v else v
            for k, v in kwargs.items()}


@dataclass
class Outcome:
    """What one expectation found in one shard, as counts that add up across shards.

    Attributes:
        element_count: Rows looked at.
        missing_count: Nulls among them that GX skips; None where nulls are the rows counted.
        unexpected_count: Rows that break the expectation (beyond the bound, for a min or max).
        observed: The shard's minimum or maximum, for ``expect_column_min/max_to_be_between``.
        failure: The shard's own failure (examples, counts), or None when no row broke it.
    """

    element_count: int = 0
    missing_count: int | None = None
    unexpected_count: int = 0
    observed: Any = None
    failure: ExpectationFailure | None = None


@dataclass
class ShardResult:
    """The events suite's outcome on one shard.

    Attributes:
        path: The shard file.
        rows: Its rows.
        schema: Its columns and types, with the derived ``_is_duplicate`` and
            ``_item_in_catalogue`` columns when they could be computed.
        duplicates: Exact duplicate rows (extra copies); None without the required columns.
        type_failures: Canonical columns of the wrong type.
        outcomes: Per ``(expectation type, column)`` of the row-level, min and max expectations.
    """

    path: Path
    rows: int
    schema: dict[str, pl.DataType]
    duplicates: int | None
    type_failures: list[ExpectationFailure]
    outcomes: dict[Key, Outcome]


@dataclass
class ShardedFailure(ExpectationFailure):
    """A failed expectation over sharded events, with the offending rows per shard file."""

    files: dict[str, int] = field(default_factory=dict)

    def to_markdown(self) -> str:
        """Render the failure as :class:`ExpectationFailure` does, plus the shard files."""
        text = super().to_markdown()
        if not self.files:
            return text
        listed = [f"{name} ({n:,} row{'' if n == 1 else 's'})"
                  for name, n in list(self.files.items())[:MAX_FILES]]
        more = len(self.files) - MAX_FILES
        listed += [f"and {more} more shard files"] if more > 0 else []
        return f"{text}\n  - shard files: {', '.join(listed)}"


def merge_shard_results(
    results: list[ShardResult], spec: dict[str, Any], params: dict[str, Any]
) -> ValidationReport:
    """Merge the shards' outcomes into the events part of one report, as on the whole table.

    Raises:
        DataError: The shards differ in their columns or types.
    """
    schema = _common_schema(results)
    total = sum(r.rows for r in results)
    report = ValidationReport(success=True, rows={"events": total})
    shape = pl.DataFrame(schema=schema).clear(1 if total else 0)  # what the checks look at
    report.failures += _merge_type_failures(results, total)
    mistyped = {f.column for f in report.failures}
    active = _active_expectations(spec["expectations"], shape, mistyped)
    report.evaluated += len(active) + sum(c in schema for c in EVENT_DTYPES)
    built = _build_suite(spec, active, SUITES_DIR / "events.json").expectations  # GX's types
    for exp, gx_exp in zip(active, built, strict=True):
        kwargs = resolve_kwargs(gx_exp.configuration.kwargs, params)
        failure = _merge_expectation(exp, kwargs, results, total, shape)
        if failure is not None:
            failure.hint = exp.get("meta", {}).get("fix", "")
            report.failures.append(failure)
    return report


def _common_schema(results: list[ShardResult]) -> dict[str, pl.DataType]:
    """The columns and types all shards share; a shard that differs raises :class:`DataError`."""
    schemas = Counter(tuple(r.schema.items()) for r in results)
    common = dict(schemas.most_common(1)[0][0])
    odd = [r for r in results if r.schema != common]
    if odd:
        def spell(schema: dict[str, pl.DataType]) -> str:
            return ", ".join(f"{c} {_dtype_name(t)}" for c, t in schema.items() if c[0] != "_")

        raise DataError("event shards differ in their columns: " + "; ".join(
            f"{r.path} has {spell(r.schema) or '(none)'}" for r in odd
        ) + f"; the other shards have {spell(common)}. Write those shards again with the "
            "columns and types of the others.")
    return common


def _merge_type_failures(results: list[ShardResult], total: int) -> list[ExpectationFailure]:
    """One failure per mistyped column, counted over all shards (their schemas are equal)."""
    merged = []
    for first in (results[0].type_failures if results else []):
        parts = [f for r in results for f in r.type_failures if f.column == first.column]
        examples = list(dict.fromkeys(x for f in parts for x in f.examples))[:3]
        merged.append(ShardedFailure(
            suite=first.suite, expectation=first.expectation, column=first.column,
            unexpected_count=total or None, unexpected_percent=100.0 if total else None,
            examples=examples, detail=first.detail, hint=first.hint,
        ))
    return merged


def _merge_expectation(exp: dict[str, Any], kwargs: dict[str, Any], results: list[ShardResult],
                       total: int, shape: pl.DataFrame) -> ShardedFailure | None:
    """Evaluate one expectation over all shards as GX does on the whole table; None if it holds."""
    kind, column = exp["type"], kwargs.get("column")
    if kind == EXIST:
        ok, res = column in shape, {}
    elif kind == ROW_COUNT:
        ok, res = _within(total, kwargs), {"observed_value": total}
    else:
        parts = [(r, r.outcomes.get(expectation_key(exp))) for r in results]
        return _merge_counts(kind, kwargs, parts, total, shape)
    if ok:
        return None
    return ShardedFailure("events", kind, column, None, None, [],
                          describe(kind, kwargs, res, shape))


def _merge_counts(kind: str, kwargs: dict[str, Any], parts: list[tuple[ShardResult, Any]],
                  total: int, shape: pl.DataFrame) -> ShardedFailure | None:
    """Add up a row-level, min or max expectation's counts over the shards and judge them."""
    found = [(r, o) for r, o in parts if o is not None]
    unexpected = sum(o.unexpected_count for _, o in found)
    if kind in MIN_MAX:
        values = [o.observed for _, o in found if o.observed is not None]
        observed = (min if kind == MIN_MAX[0] else max)(values, default=None)
        ok = observed is not None and _within(observed, kwargs)
        share = 100 * unexpected / total if total else None
    else:
        observed = None
        elements = sum(o.element_count for _, o in found)
        missing = [o.missing_count for _, o in found if o.missing_count is not None]
        considered = elements - sum(missing)
        share = 100 * unexpected / considered if considered else None
        ok = not considered or (considered - unexpected) / considered >= kwargs.get("mostly", 1)
    if ok:
        return None
    failed = [(r, o.failure) for r, o in found if o.failure is not None]
    res = {"unexpected_count": unexpected, "unexpected_percent": share, "observed_value": observed}
    return ShardedFailure(
        "events", kind, kwargs["column"], unexpected if found else None, share,
        _merge_examples(kind, failed), describe(kind, kwargs, res, shape),
        files={r.path.name: f.unexpected_count or 0 for r, f in failed},
    )


def _merge_examples(kind: str, failed: list[tuple[ShardResult, ExpectationFailure]]) -> list[Any]:
    """Examples over the shards: rows with their shard file, worst values, or values."""
    if kind in MIN_MAX:
        worst = sorted({x for _, f in failed for x in f.examples}, reverse=kind == MIN_MAX[1])
        return worst[:MAX_EXAMPLES]
    rows = [{"file": r.path.name, **x} for r, f in failed for x in f.examples
            if isinstance(x, dict)]
    if rows:
        return rows[:3]
    return list(dict.fromkeys(x for _, f in failed for x in f.examples))[:MAX_EXAMPLES]


def _within(value: Any, kwargs: dict[str, Any]) -> bool:
    """Tell whether ``value`` lies within the expectation's ``min_value`` and ``max_value``."""
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    above = low is None or (value > low if kwargs.get("strict_min") else value >= low)
    below = high is None or (value < high if kwargs.get("strict_max") else value <= high)
    return above and below
