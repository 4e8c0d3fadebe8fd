"""The validation report: each failed expectation said in words, with the rows it concerns.

:class:`ValidationReport` gathers the :class:`ExpectationFailure` of every suite (whole tables or
shard by shard), the warnings and the counts; :func:`failure` turns a Great Expectations result
into a sentence a person can act on (what was expected, what was found, example rows and where).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from models.columns import ITEM

MAX_EXAMPLES = 5
IS_DUPLICATE = "_is_duplicate"  # columns derived before the suites run
IN_CATALOGUE = "_item_in_catalogue"
DERIVED = (IS_DUPLICATE, IN_CATALOGUE)
EXIST = "expect_column_to_exist"
@dataclass
class ExpectationFailure:
    """One failed expectation, with what a person needs to find and fix the offending rows.

    Attributes:
        suite: ``events`` or ``items``.
        expectation: The GX expectation type (``expect_column_values_to_be_of_type`` for types).
        column: The column checked; None for table-level expectations.
        unexpected_count: Rows that break the expectation, when countable.
        unexpected_percent: Those rows as a percentage (0-100) of the table.
        examples: Offending values, or offending rows as dicts (null ids, duplicates).
        detail: One sentence saying what was found.
        hint: How to fix it, from the expectation's ``meta.fix`` in the suite file.
    """

    suite: str
    expectation: str
    column: str | None
    unexpected_count: int | None
    unexpected_percent: float | None
    examples: list[Any]
    detail: str
    hint: str = ""

    def to_markdown(self) -> str:
        """Render the failure as a Markdown list item: where, what, how many, examples, the fix."""
        where = f"`{self.column}`" if self.column else "table"
        lines = [f"- **{self.suite}: {where}**, `{self.expectation}`", f"  - found: {self.detail}"]
        if self.unexpected_count is not None:
            share = f" ({_percent(self.unexpected_percent)})" if self.unexpected_percent else ""
            lines.append(f"  - rows: {self.unexpected_count:,}{share}")
        if self.examples:
            lines.append(f"  - examples: {', '.join(_example(x) for x in self.examples)}")
        if self.hint:
            lines.append(f"  - fix: {self.hint}")
        return "\n".join(lines)


@dataclass
class ValidationReport:
    """The outcome of both suites.

    Attributes:
        success: True when no expectation failed.
        rows: Row count per table validated.
        failures: The failed expectations, per suite in the suite's order (type checks first).
        evaluated: Expectations and type checks evaluated.
        dropped_duplicates: Exact duplicate events removed from the returned events.
        dropped_item_duplicates: Catalogue rows dropped when the items were read, each an exact
            copy of another row (the first copy kept).
        warnings: Things a person should know that did not fail the run.
    """

    success: bool
    rows: dict[str, int]
    failures: list[ExpectationFailure] = field(default_factory=list)
    evaluated: int = 0
    dropped_duplicates: int = 0
    dropped_item_duplicates: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        """Render the report as Markdown: a verdict, one entry per failure, then the warnings."""
        tables = ", ".join(f"{name} ({n:,} rows)" for name, n in self.rows.items())
        if self.success:
            head = f"## Data validation passed: {self.evaluated} checks on {tables}"
        else:
            head = (
                f"## Data validation failed: {len(self.failures)} of {self.evaluated} checks "
                f"failed on {tables}"
            )
        parts = [head]
        if self.failures:
            parts += ["### Failures", "\n".join(f.to_markdown() for f in self.failures)]
        if self.warnings:
            parts += ["### Warnings", "\n".join(f"- {w}" for w in self.warnings)]
        return "\n\n".join(parts) + "\n"


def failure(suite: str, result: Any, frame: pl.DataFrame) -> ExpectationFailure:
    """Turn a failed GX result into an :class:`ExpectationFailure`, with counts from ``frame``."""
    config, res = result.expectation_config, result.result or {}
    failure = ExpectationFailure(
        suite=suite, expectation=config.type, column=config.kwargs.get("column"),
        unexpected_count=res.get("unexpected_count"),
        unexpected_percent=res.get("unexpected_percent"),
        examples=[c["value"] for c in res.get("partial_unexpected_counts", [])][:MAX_EXAMPLES],
        detail=describe(config.type, config.kwargs, res, frame), hint=config.meta.get("fix", ""),
    )
    error = result.exception_info or {}
    if error.get("raised_exception"):
        failure.detail = f"could not be evaluated: {error.get('exception_message')}"
    elif failure.column in frame and frame.height:
        count_rows(failure, config.kwargs, frame)
    return failure


_FOUND = {
    "expect_column_values_to_not_be_null": "no `{column}` in {rows}",
    "expect_column_values_to_be_in_set": "a value outside {value_set} in {rows}",
    "expect_column_values_to_be_unique": "a duplicated `{column}` in {rows}",
    "expect_column_values_to_be_between": "a value not {bounds} in {rows}",
    "expect_column_min_to_be_between": "the smallest value is {observed}; all must be {bounds}",
    "expect_column_max_to_be_between": "the largest value is {observed}; all must be {bounds}",
    "expect_table_row_count_to_be_between": "{observed} rows; expected {bounds}",
}
def describe(kind: str, kwargs: dict[str, Any], res: dict[str, Any], frame: pl.DataFrame) -> str:
    """Say in one sentence what the expectation found."""
    column, observed = kwargs.get("column"), res.get("observed_value")
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if kind == EXIST:
        found = ", ".join(c for c in frame.columns if c not in DERIVED) or "(none)"
        return f"column `{column}` is missing; found columns: {found}"
    if kind == "expect_table_row_count_to_be_between" and observed == 0:
        return "no rows"
    bad_share, mostly = (res.get("unexpected_percent") or 0) / 100, kwargs.get("mostly", 1)
    if column == IN_CATALOGUE:
        return (f"only {1 - bad_share:.1%} of events refer to an item of the items table; "
                f"at least {percentage(mostly)} required")
    if column == IS_DUPLICATE:
        return (f"{bad_share:.1%} of events are exact duplicates of another; "
                f"at most {percentage(1 - mostly)} allowed")
    strict = kwargs.get("strict_min")
    bounds = " and ".join(f"{sign} {_example(v)}" for sign, v in
                          ((">" if strict else ">=", low), ("<=", high)) if v is not None)
    value_set = ", ".join(map(str, kwargs.get("value_set") or []))
    template = _FOUND.get(kind, "observed {observed}; expected {kwargs}")
    count = res.get("unexpected_count") or 0
    rows = f"{count:,} row{'' if count == 1 else 's'}"
    return template.format(rows=rows, column=column, bounds=bounds, observed=_example(observed),
                           value_set=value_set, kwargs=kwargs)


def count_rows(failure: ExpectationFailure, kwargs: dict[str, Any], frame: pl.DataFrame) -> None:
    """Fill the row counts and examples GX does not give: nulls, derived columns, min and max."""
    col, kind = pl.col(failure.column), failure.expectation
    if kind == "expect_column_values_to_not_be_null":
        failure.examples = _rows(frame.with_row_index("row").filter(col.is_null()))
        return
    if failure.column == IS_DUPLICATE:
        bad, examples = col, _rows(frame.filter(col))
    elif failure.column == IN_CATALOGUE:
        bad = col.not_()
        examples = frame.filter(bad)[ITEM].unique(maintain_order=True).head(MAX_EXAMPLES).to_list()
    elif kind in ("expect_column_min_to_be_between", "expect_column_max_to_be_between"):
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        bad = (col < low) if "min" in kind else (col > high)
        worst = frame.filter(bad)[failure.column].unique().sort(descending="max" in kind)
        examples = worst.head(MAX_EXAMPLES).to_list()
    else:
        return
    count = frame.select(bad.sum()).item()
    failure.unexpected_count, failure.unexpected_percent = count, 100 * count / frame.height
    failure.examples = examples


def _rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Return the first rows of ``frame`` as dicts, without the derived columns."""
    return frame.drop(DERIVED, strict=False).head(3).to_dicts()


def percentage(value: float) -> str:
    """``value`` (a fraction) as a percentage with four significant digits."""
    return f"{100 * value:.4g}%"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2g}%" if value < 1 else f"{value:.1f}%"


def _example(value: Any) -> str:
    """Format a value for the report: ISO times, rows as ``key=value`` lists."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_example(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "isoformat"):
        return f"`{value.isoformat()}`"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"
