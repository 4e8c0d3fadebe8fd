"""Adapters from raw dataset files to the canonical events and items tables.

:func:`load_raw` reads one of :data:`FORMATS` from a file or a folder and returns a
:class:`RawData`: the canonical events (``models.columns``), the canonical items when the source
has a catalogue, and notes on what was dropped or mapped. Null ids are kept: the validation step
reports them. Every problem a user can cause raises a :class:`~models.errors.DataError` that names
the file, the problem and the fix.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from models.columns import (
    ATTRIBUTES,
    BRAND,
    CATEGORY,
    EVENT_DTYPES,
    EVENT_REQUIRED,
    EVENT_TYPE,
    EVENT_TYPES,
    ITEM,
    ITEM_DTYPES,
    ITEM_REQUIRED,
    PRICE,
    SESSION,
    TIMESTAMP,
    USER,
)
from models.errors import ConfigError, DataError, MissingColumnsError
from tasks.data.conversions import (
    convert,
    drop_repeated_rows,
    finish_events,
    finish_items,
    map_event_types,
    to_attributes,
)
from tasks.data.formats import (
    FORMATS,
    SINGLE_EVENT_TYPE,
    Options,
    RawData,
    Stream,
    collect,
    expects,
    file_stem,
    stream_diginetica,
    stream_hm,
    stream_rechorus,
    stream_rees46,
    stream_s3rec,
    stream_taobao,
    stream_uci,
)
from tasks.data.readers import (
    apply_column_map,
    find_files,
    read_table,
    require,
    scan_batches,
    scan_table,
)

logger = logging.getLogger(__name__)


_REES46_SPEC = {
    USER: "user_id", ITEM: "product_id", EVENT_TYPE: "event_type", TIMESTAMP: "event_time",
    SESSION: "user_session", PRICE: "price", CATEGORY: "category_id", BRAND: "brand",
    "category_code": "category_code",
}
_GENERIC_SUFFIXES = {
    "parquet": ("parquet", "pq"), "csv": ("csv", "csv.gz", "tsv", "tsv.gz", "txt", "txt.gz"),
}
_MAP_HINT = (
    "Name the columns user_id, item_id, event_type and timestamp, or map yours with column_map "
    "(canonical name to your column), e.g. column_map={'user_id': 'visitorid', "
    "'timestamp': 'ts'}. An event_type column is required: map the source one (and its values "
    "with event_map) or add one with values view, cart, fav or purchase."
)


def load_raw(
    path: str | Path,
    fmt: str,
    column_map: dict[str, str] | None = None,
    event_map: dict[str, str] | None = None,
) -> RawData:
    """Load a raw dataset into the canonical events and items tables.

    Args:
        path: A file, or a folder in which the format's known file names are looked up.
        fmt: One of :data:`FORMATS`.
        column_map: For ``csv``/``parquet``: canonical column name to source column name.
        event_map: Source event name to canonical event type (``view``, ``cart``, ``fav``,
            ``purchase``); added to the built-in names of ``taobao`` and ``rees46``.

    Returns:
        The events sorted by timestamp (then file order), the items or ``None`` (exact copies of
        a catalogue row dropped, and counted), and notes.

    Raises:
        DataError: the path, a file or its values cannot be turned into the canonical tables.
        ConfigError: ``column_map`` or ``event_map`` names something that does not exist.
    """
    path, opts, notes = _checked(path, fmt, column_map, event_map)
    with _explained(fmt):
        raw = collect(READERS[fmt](path, opts, None))
    raw.notes[:0] = notes
    if raw.items is not None:
        raw.items, raw.dropped_item_duplicates = drop_repeated_rows(
            raw.items, f"the items table of {path}")
    if raw.events.is_empty():
        raise DataError(f"{path} gives no events after loading ({'; '.join(raw.notes)}).")
    for note in raw.notes:
        logger.info("%s: %s", raw.name, note)
    n_items = "no" if raw.items is None else f"{raw.items.height:,}"
    logger.info("loaded %s: %s events, %s items", raw.name, f"{raw.events.height:,}", n_items)
    return raw


def stream_raw(
    path: str | Path,
    fmt: str,
    column_map: dict[str, str] | None,
    event_map: dict[str, str] | None,
    rows: int,
) -> Stream:
    """:func:`load_raw`'s events about ``rows`` raw rows at a time.

    The stream's items are as :func:`load_raw` reads them, before exact copies are dropped.
    """
    path, opts, notes = _checked(path, fmt, column_map, event_map)
    with _explained(fmt):
        stream = READERS[fmt](path, opts, rows)
    finish = stream.finish

    def finish_with_notes() -> tuple[pl.DataFrame | None, list[str]]:
        items, more = finish()
        return items, [*notes, *more]

    stream.finish = finish_with_notes
    return stream


def _checked(path: str | Path, fmt: str, column_map: dict[str, str] | None,
             event_map: dict[str, str] | None) -> tuple[Path, Options, list[str]]:
    """The path and options of a load, checked, and the notes on the maps."""
    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"Unknown data format '{fmt}'{guess}. Use one of: {', '.join(FORMATS)}.")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist. {expects(fmt)} Check the path and the format "
                        f"(one of: {', '.join(FORMATS)}).")
    opts = Options(fmt, dict(column_map or {}), dict(event_map or {}))
    return path, opts, _check_maps(opts)


@contextmanager
def _explained(fmt: str) -> Iterator[None]:
    """Add to a missing-columns error of a fixed-column format what it expects."""
    try:
        yield
    except MissingColumnsError as err:
        if fmt not in _GENERIC_SUFFIXES:  # fixed columns: say which, and how to map others
            err.args = (f"{err.args[0]} {expects(fmt)} A column_map applies to the csv and "
                        "parquet formats: load a file with other columns as csv.",)
        raise


def _check_maps(opts: Options) -> list[str]:
    allowed = {*EVENT_DTYPES, *ITEM_DTYPES}
    unknown = sorted(set(opts.column_map) - allowed)
    if unknown:
        raise ConfigError(
            f"column_map has keys that are not canonical column names: {', '.join(unknown)}. "
            f"Use keys from: {', '.join(sorted(allowed))} (canonical name to source column).")
    bad = {k: v for k, v in opts.event_map.items() if v not in EVENT_TYPES}
    if bad:
        raise ConfigError(f"event_map maps to names that are not event types: {bad}. Map every "
                          f"source name to one of {', '.join(EVENT_TYPES)}.")
    notes = []
    if opts.column_map and opts.fmt not in _GENERIC_SUFFIXES:
        notes.append(f"column_map ignored: format '{opts.fmt}' has fixed columns")
    if opts.event_map and opts.fmt in SINGLE_EVENT_TYPE:
        notes.append(f"event_map ignored: format '{opts.fmt}' has fixed event types")
    return notes


# --- formats ----------------------------------------------------------------------------------


# --- generic csv / parquet --------------------------------------------------------------------


def _generic_files(path: Path, fmt: str) -> tuple[Path, Path | None]:
    if path.is_file():
        return path, None
    other = "csv" if fmt == "parquet" else "parquet"
    suffixes = (*_GENERIC_SUFFIXES[fmt], *_GENERIC_SUFFIXES[other])
    events = find_files(path, [f"events.{s}" for s in suffixes])
    shards = path / "events"  # a folder of Parquet shards, as demo-data --shards writes
    if find_files(shards, ("*.parquet", "*.pq")):
        if events:
            raise DataError(f"{path} holds both {events[0].name} and a folder {shards.name}/ of "
                            "Parquet shards of events: move one of them away, so that the "
                            "folder holds one events table.")
        events = [shards]
    if not events:
        raise DataError(f"{path} holds no events file. {expects(fmt)}")
    items = find_files(path, [f"items.{s}" for s in suffixes])
    return events[0], (items[0] if items else None)


def read_items(file: Path, column_map: Mapping[str, str]) -> tuple[pl.DataFrame, int]:
    """A canonical items table from a CSV or Parquet catalogue (``column_map`` renames).

    Returns:
        The items, exact copies of a row dropped, and the number of rows dropped.
    """
    return drop_repeated_rows(_catalogue(file, column_map), str(file))


def _catalogue(file: Path, column_map: Mapping[str, str]) -> pl.DataFrame:
    """:func:`read_items` with every row, exact copies included."""
    raw = apply_column_map(read_table(file), column_map, list(ITEM_DTYPES), file)
    require(raw.columns, ITEM_REQUIRED, str(file), _MAP_HINT)
    frame = convert(raw, str(file), {c: c for c in ITEM_DTYPES if c != ATTRIBUTES})
    if ATTRIBUTES in raw.columns:
        frame = frame.with_columns(to_attributes(raw[ATTRIBUTES]).alias(ATTRIBUTES))
    return finish_items(frame)


def _stream_generic(path: Path, opts: Options, rows: int | None) -> Stream:
    """The ``csv``/``parquet`` events about ``rows`` rows at a time (a folder of shards whole)."""
    events_file, items_file = _generic_files(path, opts.fmt)
    scans = []
    if events_file.is_dir():  # a folder of shards: one table, read whole
        tables: Iterator[pl.DataFrame] = iter([read_table(events_file)])
    else:
        lazy, kind = scan_table(events_file)
        scans.append((lazy, events_file, kind))
        tables = scan_batches(lazy, events_file, kind, rows)
    unused: list[str] = []

    def batches() -> Iterator[pl.DataFrame]:
        for table in tables:
            raw = apply_column_map(table, opts.column_map, list(EVENT_DTYPES), events_file)
            require(raw.columns, EVENT_REQUIRED, str(events_file), _MAP_HINT)
            frame = convert(raw, str(events_file), {c: c for c in EVENT_DTYPES})
            frame, _ = map_event_types(frame, opts.event_map, str(events_file))
            unused[:] = [c for c in raw.columns if c not in EVENT_DTYPES]
            yield finish_events(frame)

    def finish() -> tuple[pl.DataFrame | None, list[str]]:
        notes = [f"columns of {events_file.name} not used: {', '.join(unused)}"] * bool(unused)
        # load_raw drops the exact copies of a catalogue row, as for every format
        return (_catalogue(items_file, opts.column_map) if items_file else None), notes

    return Stream(file_stem(path), scans, batches(), finish)


READERS: dict[str, Callable[[Path, Options, int | None], Stream]] = {
    "taobao": stream_taobao, "rees46": stream_rees46, "diginetica": stream_diginetica,
    "hm": stream_hm, "s3rec": stream_s3rec, "uci-retail": stream_uci,
    "rechorus": stream_rechorus, "csv": _stream_generic, "parquet": _stream_generic,
}
"""The reader of each format: its events a batch of raw rows at a time (None: each file whole,
as :func:`load_raw` reads them)."""
