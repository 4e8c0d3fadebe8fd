"""Typed columns from raw text: ids, numbers, timestamps, attributes and event types.

Each conversion names the source column, the bad values and the fix when a value cannot be read
(:class:`models.errors.DataError`); :func:`finish_events` and :func:`finish_items` give the
canonical tables their final types and order, :func:`drop_repeated_rows` drops the exact copies
of a catalogue row. Reading files is :mod:`tasks.data.readers`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import polars as pl

from models.columns import (
    AVAILABLE,
    BRAND,
    CATEGORY,
    EVENT_DTYPES,
    EVENT_OPTIONAL,
    EVENT_REQUIRED,
    EVENT_TYPE,
    EVENT_TYPES,
    ITEM,
    ITEM_DTYPES,
    ITEM_OPTIONAL,
    ITEM_REQUIRED,
    PRICE,
    QUANTITY,
    SESSION,
    TIMESTAMP,
    TITLE,
    USER,
)
from models.errors import DataError

logger = logging.getLogger(__name__)

_EXAMPLES = 3
_MAX_LISTED = 10
_POLARS_DTYPES: dict[str, pl.DataType] = {
    "String": pl.String(), "Float64": pl.Float64(), "Int64": pl.Int64(),
    "Datetime(us, UTC)": pl.Datetime("us", "UTC"), "List(String)": pl.List(pl.String()),
    "Boolean": pl.Boolean(),
}
_TRUE, _FALSE = ("true", "1", "yes", "y", "t"), ("false", "0", "no", "n", "f")
_EPOCH_UNITS = ((1e11, "s", 1e6), (1e14, "ms", 1e3), (1e17, "us", 1.0), (float("inf"), "ns", 1e-3))


def _bad_values(source: str, bad: pl.Series, total: int, expected: str, fix: str) -> DataError:
    examples = ", ".join(repr(v) for v in bad.unique(maintain_order=True).head(_EXAMPLES))
    return DataError(f"Column '{bad.name}' of {source} has {bad.len():,} of {total:,} values that "
                     f"are not {expected}, e.g. {examples}. {fix}")


def to_id(values: pl.Series, source: str = "") -> pl.Series:
    """Return ids as text; NaN and null are missing (null), never an id.

    Whole-number floats (ids read through a float column, often because of missing values) are
    written as integers, ``7.0`` as ``"7"``, with a logged note, in every file alike (one user
    is never ``"7"`` in one file and ``"7.0"`` in another).

    Raises:
        DataError: A float id is not a whole number, or lies beyond the integers its float type
            holds exactly (2^24 for Float32, 2^53 for Float64), where distinct ids merge.
    """
    if not values.dtype.is_float():
        return values.cast(pl.String)
    values = values.fill_nan(None)
    present = values.drop_nulls()
    fractional = present.filter(present % 1 != 0)
    if fractional.len():
        raise _bad_values(source or "the table", fractional, values.len(), "whole numbers",
                          "An id read as a number must be a whole number: write the ids as "
                          "text (or integers) if they have decimals.")
    bits = 24 if values.dtype == pl.Float32 else 53
    lossy = present.filter(present.abs() > 2**bits)
    if lossy.len():
        raise _bad_values(source or "the table", lossy, values.len(),
                          f"exact in {values.dtype} (beyond 2^{bits} distinct ids round to one "
                          "value)", "Write the ids as integers or text, not floats.")
    logger.info("column '%s' of %s holds ids as %s: %s whole numbers read as integer ids "
                "(7.0 as '7'), %s missing (NaN or null) kept as null", values.name,
                source or "the table", values.dtype, f"{present.len():,}",
                f"{values.null_count():,}")
    return values.cast(pl.Int64).cast(pl.String)


def to_float(values: pl.Series, source: str) -> pl.Series:
    """Return numbers as Float64; text that is not a number raises :class:`DataError`."""
    if values.dtype.is_numeric():
        return values.cast(pl.Float64)
    text = values.cast(pl.String).str.strip_chars()
    out = text.cast(pl.Float64, strict=False)
    bad = text.filter(out.is_null() & text.is_not_null())
    if bad.len():
        fix = "Fix or blank those cells (blank means unknown), or leave the column out."
        raise _bad_values(source, bad, values.len(), "numbers", fix)
    return out


def to_int(values: pl.Series, source: str) -> pl.Series:
    """Return whole numbers as Int64; fractions or text raise :class:`DataError`."""
    numbers = to_float(values, source)
    bad = values.filter(numbers.is_not_null() & (numbers % 1 != 0))
    if bad.len():
        fix = "Give whole numbers, or leave the column out."
        raise _bad_values(source, bad, values.len(), "whole numbers", fix)
    return numbers.cast(pl.Int64)


def _from_epoch(numbers: pl.Series) -> pl.Series:
    """Read unix time in s, ms, us or ns (told apart by the median magnitude) as UTC."""
    present = numbers.drop_nulls()
    sample = present.gather_every(max(1, present.len() // 100_000))  # enough to tell the unit
    magnitude = sample.abs().median() or 0.0
    unit, per_us = next((u, f) for limit, u, f in _EPOCH_UNITS if magnitude < limit)
    if numbers.dtype.is_integer():
        stamps = pl.from_epoch(numbers, time_unit=unit)  # type: ignore[arg-type]
    else:
        stamps = pl.from_epoch((numbers * per_us).round(0).cast(pl.Int64), time_unit="us")
    return stamps.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def _parse_text(text: pl.Series, formats: Sequence[str]) -> pl.Series:
    """Parse with the first of ``formats`` (then an inferred one) that reads every value."""
    cleaned = text.str.strip_suffix(" UTC").str.strip_suffix(" GMT")
    best = pl.Series(text.name, [None] * text.len(), dtype=pl.Datetime("us", "UTC"))
    for fmt in [*formats, None]:
        try:
            parsed = cleaned.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
        except pl.exceptions.PolarsError:
            continue
        best = parsed if parsed.null_count() < best.null_count() else best
        if best.null_count() == text.null_count():
            break
    return best


def to_timestamp(values: pl.Series, source: str, formats: Sequence[str] = ()) -> pl.Series:
    """Return UTC datetimes from datetimes, dates, unix s/ms numbers or text.

    Text is ISO 8601 (a UTC offset or a trailing ``UTC`` allowed), or one of ``formats``.

    Raises:
        DataError: some non-empty values are not timestamps (count and examples given).
    """
    if isinstance(values.dtype, pl.Datetime | pl.Date):
        stamps = values.cast(pl.Datetime("us")) if values.dtype == pl.Date else values
        if stamps.dtype.time_zone is None:  # type: ignore[union-attr]
            stamps = stamps.dt.replace_time_zone("UTC")
        return stamps.dt.convert_time_zone("UTC").cast(pl.Datetime("us", "UTC"))
    if values.dtype.is_numeric():
        return _from_epoch(values)
    text = values.cast(pl.String).str.strip_chars()
    present = text.drop_nulls()
    sample = present.gather_every(max(1, present.len() // 10_000))
    if sample.len() and 2 * sample.cast(pl.Float64, strict=False).count() >= sample.len():
        numbers = text.cast(pl.Int64, strict=False)  # mostly numbers: unix time
        if numbers.count() < present.len():
            numbers = text.cast(pl.Float64, strict=False)
        parsed = _from_epoch(numbers)
        expected = "unix timestamps"
    else:
        parsed = _parse_text(text, formats)
        expected = "timestamps" + (f" in the format {formats[0]!r}" if formats else "")
    bad = text.filter(parsed.is_null() & text.is_not_null())
    if bad.len():
        fix = ("Give datetimes, ISO 8601 text (2024-05-01T13:45:00, a UTC offset is allowed) or "
               "unix seconds or milliseconds, one kind per column; fix or blank the bad cells.")
        raise _bad_values(source, bad, values.len(), expected, fix)
    return parsed


def to_attributes(values: pl.Series) -> pl.Series:
    """Return attributes as lists of text: lists are kept, text is split on ``|``."""
    if isinstance(values.dtype, pl.List):
        return values.cast(pl.List(pl.String))
    parts = values.cast(pl.String).str.split("|").list.eval(pl.element().str.strip_chars())
    return parts.list.eval(pl.element().filter(pl.element() != ""))


def to_bool(values: pl.Series, source: str) -> pl.Series:
    """Booleans from booleans, 0/1 numbers or text (true/false, yes/no, 1/0; case ignored)."""
    if values.dtype == pl.Boolean:
        return values
    text = pl.col("t").cast(pl.String).str.strip_chars().str.to_lowercase()
    result = pl.DataFrame({"t": values}).select(
        pl.when(text.is_in(_TRUE)).then(True).when(text.is_in(_FALSE)).then(False)
        .otherwise(None)).to_series()
    bad = values.filter(result.is_null() & values.is_not_null())
    if bad.len():
        raise _bad_values(source, bad.cast(pl.String), values.len(), "true or false",
                          "Write true/false (or 1/0, yes/no).")
    return result.alias(values.name)


def convert(
    raw: pl.DataFrame, source: str, spec: Mapping[str, str], formats: Sequence[str] = ()
) -> pl.DataFrame:
    """Build canonical columns from the source columns ``spec`` names (absent ones skipped).

    Other names in ``spec`` are copied as they are.
    """
    columns = []
    for canon, column in ((c, s) for c, s in spec.items() if s in raw.columns):
        values = raw[column]
        if canon in (USER, ITEM, SESSION, CATEGORY):
            values = to_id(values, source)
        elif canon in (PRICE, QUANTITY):
            values = (to_float if canon == PRICE else to_int)(values, source)
        elif canon == TIMESTAMP:
            values = to_timestamp(values, source, formats)
        elif canon in (EVENT_TYPE, BRAND, TITLE):
            values = values.cast(pl.String)
        elif canon == AVAILABLE:
            values = to_bool(values, source)
        columns.append(values.alias(canon))
    return pl.DataFrame(columns)


def map_event_types(
    frame: pl.DataFrame,
    mapping: Mapping[str, str],
    source: str,
    drop: Collection[str] = (),
    tally: Counter[str] | None = None,
) -> tuple[pl.DataFrame, list[str]]:
    """Map the source event names of ``event_type`` to canonical ones; drop the ``drop`` names.

    ``tally`` adds up the rows dropped per name, over the batches of a source read in parts.

    Canonical names map to themselves unless ``mapping`` says otherwise. Missing values stay
    missing (validation reports them).

    Returns:
        The mapped frame and notes on the dropped rows.

    Raises:
        DataError: the column holds names that are neither canonical, mapped nor dropped.
    """
    full = {**{name: name for name in EVENT_TYPES}, **mapping}
    counts = frame[EVENT_TYPE].drop_nulls().value_counts(sort=True)
    unknown = counts.filter(~pl.col(EVENT_TYPE).is_in([*full, *drop]))
    if unknown.height:
        rows = unknown.head(_MAX_LISTED).rows()
        listed = ", ".join(f"'{name}' ({count:,})" for name, count in rows)
        more = f" and {unknown.height - len(rows)} more" if unknown.height > len(rows) else ""
        example = ", ".join(f"'{name}': '...'" for name, _ in rows[:3])
        raise DataError(
            f"The event types of {source} include names shoprank does not know: {listed}{more}. "
            f"Map each to one of {', '.join(EVENT_TYPES)} with event_map, e.g. "
            f"event_map={{{example}}}.")
    dropped = counts.filter(pl.col(EVENT_TYPE).is_in(list(drop)))
    notes = [dropped_note(name, count, source) for name, count in dropped.iter_rows()]
    if tally is not None:
        tally.update(dict(dropped.iter_rows()))
    if dropped.height:
        frame = frame.filter(pl.col(EVENT_TYPE).is_in(list(drop)).not_().fill_null(True))
    mapped = pl.col(EVENT_TYPE).replace_strict(full, default=None, return_dtype=pl.String)
    return frame.with_columns(mapped), notes


def dropped_note(name: str, count: int, source: str) -> str:
    """The note of ``count`` events named ``name`` dropped from ``source``."""
    return f"dropped {count:,} '{name}' events of {source} (no canonical event type)"


def _select_cast(frame: pl.DataFrame, columns: Sequence[str], dtypes: Mapping[str, str]
                 ) -> pl.DataFrame:
    present = [column for column in columns if column in frame.columns]
    return frame.select(pl.col(c).cast(_POLARS_DTYPES[dtypes[c]]) for c in present)


def finish_events(frame: pl.DataFrame) -> pl.DataFrame:
    """Keep the canonical columns and dtypes, sorted by timestamp then original order."""
    events = _select_cast(frame, (*EVENT_REQUIRED, *EVENT_OPTIONAL), EVENT_DTYPES)
    stamps = events[TIMESTAMP]
    if stamps.null_count() == 0 and stamps.is_sorted():  # many logs are already in time order
        return events
    return events.sort(TIMESTAMP, maintain_order=True, nulls_last=True)


def has_event_schema(schema: Mapping[str, pl.DataType]) -> bool:
    """Tell whether a table of ``schema`` has canonical event columns only, of their types."""
    return set(EVENT_REQUIRED) <= set(schema) and all(
        column in EVENT_DTYPES and dtype == _POLARS_DTYPES[EVENT_DTYPES[column]]
        for column, dtype in schema.items())


def finish_items(frame: pl.DataFrame) -> pl.DataFrame:
    """Keep the canonical columns and dtypes (exact copies of a row: :func:`drop_repeated_rows`)."""
    return _select_cast(frame, (*ITEM_REQUIRED, *ITEM_OPTIONAL), ITEM_DTYPES)


def drop_repeated_rows(items: pl.DataFrame, source: str = "the items table"
                       ) -> tuple[pl.DataFrame, int]:
    """Drop the catalogue rows that repeat another row exactly; the first copy is kept.

    Rows that share an ``item_id`` but differ elsewhere are all kept: the catalogue cannot tell
    which one is right, and the items suite's unique-ids expectation reports them.

    Returns:
        The items, in their order, and the number of rows dropped (the validation report
        states it).
    """
    unique = items.unique(maintain_order=True)
    dropped = items.height - unique.height
    if dropped:
        logger.info("dropped %s rows of %s that repeat another row exactly (same item_id and "
                    "values); the first copy is kept", f"{dropped:,}", source)
    return unique, dropped
