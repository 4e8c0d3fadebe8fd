"""Adapters from raw dataset files to the canonical events and items tables.

:func:`load_raw` reads one of :data:`FORMATS` from a file or a folder and returns a
:class:`RawData`: the canonical events (``models.columns``), the canonical items when the source
has a catalogue, and notes on what was dropped or mapped. Null ids are kept: the validation step
reports them. Every problem a user can cause raises a :class:`~models.errors.DataError` that names
the file, the problem and the fix.
"""

from __future__ import annotations

import datetime as dt
import difflib
import gzip
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from models.columns import (
    ATTRIBUTES,
    BRAND,
    CART,
    CATEGORY,
    EVENT_DTYPES,
    EVENT_REQUIRED,
    EVENT_TYPE,
    EVENT_TYPES,
    FAV,
    ITEM,
    ITEM_DTYPES,
    ITEM_REQUIRED,
    PRICE,
    PURCHASE,
    QUANTITY,
    SESSION,
    TIMESTAMP,
    TITLE,
    USER,
    VIEW,
)
from models.errors import ConfigError, DataError, MissingColumnsError
from tasks.data.conversions import (
    convert,
    finish_events,
    finish_items,
    first_per_item,
    map_event_types,
    to_attributes,
    to_int,
)
from tasks.data.readers import (
    apply_column_map,
    empty_error,
    find_beside,
    find_files,
    first_line,
    is_gzip,
    locate,
    read_csv,
    read_table,
    reading,
    require,
)

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = (
    "taobao", "rees46", "diginetica", "hm", "s3rec", "uci-retail", "rechorus", "csv", "parquet",
)
EXPECTED_FILES: dict[str, str] = {  # what a format reads, for error messages
    "taobao": "UserBehavior*.csv[.gz] (user_id,item_id,category_id,behavior_type,timestamp)",
    "rees46": "monthly *.csv[.gz] files (event_time,event_type,product_id,...,user_session)",
    "diginetica": "train-purchases.csv[.gz] and/or train-item-views.csv[.gz] (';'-separated) "
    "+ product-categories.csv[.gz]",
    "hm": "transactions_train*.csv[.gz] (t_dat,customer_id,article_id,price) + articles*.csv[.gz]",
    "s3rec": "NAME.txt[.gz] (lines 'user item item ...') + NAME_item2attributes.json[.gz]",
    "uci-retail": "OnlineRetail.csv (InvoiceNo,StockCode,Quantity,InvoiceDate,CustomerID,...)",
    "rechorus": "train.csv[.gz] (tab-separated user_id, item_id, time) + item_meta.csv[.gz]",
    "csv": "an events CSV file, or a folder with events.csv[.gz] (+ items.csv[.gz])",
    "parquet": "an events Parquet file, or a folder with events.parquet or a folder events/ of "
    "Parquet shards (+ items.parquet)",
}
S3REC_BASE_TIME = dt.datetime(2014, 1, 1, tzinfo=dt.UTC)

_SINGLE_EVENT_TYPE = ("diginetica", "hm", "s3rec", "uci-retail", "rechorus")
_TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
_TAOBAO_EVENTS = {"pv": VIEW, "cart": CART, "fav": FAV, "buy": PURCHASE}
_REES46_SPEC = {
    USER: "user_id", ITEM: "product_id", EVENT_TYPE: "event_type", TIMESTAMP: "event_time",
    SESSION: "user_session", PRICE: "price", CATEGORY: "category_id", BRAND: "brand",
    "category_code": "category_code",
}
_DIGINETICA_FILES = {"purchases": "*purchases*.csv*", "views": "*item-views*.csv*"}
_DAY_MS = 86_400_000
_DIGINETICA_COLUMNS = {  # (session, user, item) per event type
    PURCHASE: ("sessionId", "userId", "itemId"), VIEW: ("session_id", "user_id", "item_id"),
}
_HM_ATTRIBUTES = {
    "product_group_name": "group", "graphical_appearance_name": "appearance",
    "colour_group_name": "colour", "department_name": "department", "index_name": "index",
    "section_name": "section", "garment_group_name": "garment",
}
_UCI_FORMATS = ("%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M")
_GENERIC_SUFFIXES = {
    "parquet": ("parquet", "pq"), "csv": ("csv", "csv.gz", "tsv", "tsv.gz", "txt", "txt.gz"),
}
_MAP_HINT = (
    "Name the columns user_id, item_id, event_type and timestamp, or map yours with column_map "
    "(canonical name to your column), e.g. column_map={'user_id': 'visitorid', "
    "'timestamp': 'ts'}. An event_type column is required: map the source one (and its values "
    "with event_map) or add one with values view, cart, fav or purchase."
)


@dataclass
class RawData:
    """A dataset in the canonical tables, with what the adapter dropped or mapped.

    Attributes:
        events: Canonical events, sorted by timestamp then original order.
        items: Canonical items, or ``None`` when the source has no catalogue.
        name: The dataset name (the format, or the file or folder stem for csv/parquet).
        ordered_only: True when the source has order but no real timestamps (s3rec).
        notes: What the adapter dropped or mapped, for the run log.
    """

    events: pl.DataFrame
    items: pl.DataFrame | None
    name: str
    ordered_only: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Options:
    fmt: str
    column_map: Mapping[str, str]
    event_map: Mapping[str, str]


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
        The events sorted by timestamp (then file order), the items or ``None``, and notes.

    Raises:
        DataError: the path, a file or its values cannot be turned into the canonical tables.
        ConfigError: ``column_map`` or ``event_map`` names something that does not exist.
    """
    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"Unknown data format '{fmt}'{guess}. Use one of: {', '.join(FORMATS)}.")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist. {_expects(fmt)} Check the path and the format "
                        f"(one of: {', '.join(FORMATS)}).")
    opts = _Options(fmt, dict(column_map or {}), dict(event_map or {}))
    notes = _check_maps(opts)
    try:
        raw = _LOADERS[fmt](path, opts)
    except MissingColumnsError as err:
        if fmt not in _GENERIC_SUFFIXES:  # fixed columns: say which, and how to map others
            err.args = (f"{err.args[0]} {_expects(fmt)} A column_map applies to the csv and "
                        "parquet formats: load a file with other columns as csv.",)
        raise
    raw.notes[:0] = notes
    if raw.events.is_empty():
        raise DataError(f"{path} gives no events after loading ({'; '.join(raw.notes)}).")
    for note in raw.notes:
        logger.info("%s: %s", raw.name, note)
    n_items = "no" if raw.items is None else f"{raw.items.height:,}"
    logger.info("loaded %s: %s events, %s items", raw.name, f"{raw.events.height:,}", n_items)
    return raw


def _expects(fmt: str) -> str:
    return f"Format '{fmt}' expects {EXPECTED_FILES[fmt]}."


def _check_maps(opts: _Options) -> list[str]:
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
    if opts.event_map and opts.fmt in _SINGLE_EVENT_TYPE:
        notes.append(f"event_map ignored: format '{opts.fmt}' has fixed event types")
    return notes


def _stem(path: Path) -> str:
    return path.name.split(".")[0]


def _purchases(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.lit(PURCHASE).alias(EVENT_TYPE))


# --- formats ----------------------------------------------------------------------------------


def _load_taobao(path: Path, opts: _Options) -> RawData:
    patterns = ("UserBehavior*.csv.gz", "UserBehavior*.csv", "*.csv.gz", "*.csv")
    file = locate(path, patterns, _expects("taobao"))
    headless = first_line(file).split(",")[0].strip().isdigit()  # the original file has none
    raw = read_csv(file, _TAOBAO_COLUMNS, new_columns=_TAOBAO_COLUMNS if headless else None)
    spec = {USER: "user_id", ITEM: "item_id", EVENT_TYPE: "behavior_type",
            TIMESTAMP: "timestamp", CATEGORY: "category_id"}
    frame = convert(raw, str(file), spec)
    frame, notes = map_event_types(frame, {**_TAOBAO_EVENTS, **opts.event_map}, str(file))
    items = finish_items(frame.select(ITEM, CATEGORY).unique(ITEM, keep="first",
                                                             maintain_order=True))
    notes.append(f"items: {items.height:,} distinct items of the event log, with the category "
                 "of each item's first event")
    return RawData(finish_events(frame), items, "taobao", notes=notes)


def _load_rees46(path: Path, opts: _Options) -> RawData:
    found = [path] if path.is_file() else [*path.glob("*.csv"), *path.glob("*.csv.gz")]
    files = sorted(f for f in found if f.is_file())
    if not files:
        raise DataError(f"{path} holds no CSV file. {_expects('rees46')}")
    required = ("event_time", "event_type", "product_id", "user_id")
    optional = ("category_id", "category_code", "brand", "price", "user_session")
    raw = pl.concat([read_csv(f, required, optional) for f in files], how="diagonal")
    frame = convert(raw, str(path), _REES46_SPEC).sort(TIMESTAMP, maintain_order=True)
    items = frame.select(c for c in (ITEM, CATEGORY, BRAND, PRICE) if c in frame.columns)
    if "category_code" in frame.columns:
        codes = pl.concat_list(pl.col("category_code")).list.drop_nulls().alias(ATTRIBUTES)
        items = pl.concat([items, frame.select(codes)], how="horizontal")
    drop = () if "remove_from_cart" in opts.event_map else ("remove_from_cart",)
    frame, notes = map_event_types(frame, opts.event_map, str(path), drop)
    notes.append("items: the first category, brand and price seen per product (known "
                 "before any window that holds it); category_code as the attribute")
    return RawData(finish_events(frame), finish_items(first_per_item(items)), "rees46",
                   notes=notes)


def _diginetica_files(path: Path) -> dict[str, Path | None]:
    files: dict[str, Path | None] = {}
    for kind, pattern in _DIGINETICA_FILES.items():
        found = find_files(path, (pattern,)) if path.is_dir() else [path] * path.match(pattern)
        files[kind] = found[0] if found else None
    if not files["purchases"] and not files["views"]:
        raise DataError(f"{path} is not and holds no purchases or item-views file. "
                        f"{_expects('diginetica')}")
    files["categories"] = find_beside(path, ("*categories*.csv*",))
    return files


def _diginetica_events(file: Path, event_type: str) -> tuple[pl.DataFrame, list[str]]:
    session, user, item = _DIGINETICA_COLUMNS[event_type]
    required = (session, user, item, "timeframe", "eventdate")
    raw = read_csv(file, required, separator=";", null_values=["NA", ""])
    spec = {SESSION: session, USER: user, ITEM: item, TIMESTAMP: "eventdate"}
    frame = convert(raw, str(file), spec, ("%Y-%m-%d",))
    offset = to_int(raw["timeframe"], str(file))
    anonymous, long = frame[USER].is_null().sum(), (offset >= _DAY_MS).sum()
    frame = frame.with_columns(
        pl.coalesce(USER, pl.lit("s") + pl.col(SESSION)).alias(USER),
        (pl.col(TIMESTAMP) + pl.duration(milliseconds=offset % _DAY_MS)).alias(TIMESTAMP),
        pl.lit(event_type).alias(EVENT_TYPE),
    )
    notes = [f"{anonymous:,} of {frame.height:,} rows of {file.name} have no user id (NA): "
             "their session is the user ('s<sessionId>')"]
    if long:  # eventdate is the event's own day (order numbers agree), so stay on that day
        notes.append(f"{long:,} rows of {file.name} have a timeframe of a day or more: only "
                     "its time-of-day part is added to eventdate")
    return frame, notes


def _load_diginetica(path: Path, opts: _Options) -> RawData:
    files = _diginetica_files(path)
    frames, notes = [], []
    for kind, event_type in (("purchases", PURCHASE), ("views", VIEW)):
        if (file := files[kind]) is not None:
            frame, file_notes = _diginetica_events(file, event_type)
            frames.append(finish_events(frame))
            notes += file_notes
    items = None
    if (categories := files["categories"]) is not None:
        raw = read_csv(categories, ("itemId", "categoryId"), separator=";")
        spec = {ITEM: "itemId", CATEGORY: "categoryId"}
        items = finish_items(convert(raw, str(categories), spec), str(categories))
    notes.append("timestamp = eventdate (day) + timeframe (ms since the session start)")
    return RawData(finish_events(pl.concat(frames)), items, "diginetica", notes=notes)


def _hm_items(file: Path, events: pl.DataFrame) -> tuple[pl.DataFrame, str]:
    raw = read_csv(file, ("article_id",), ("prod_name", "product_type_name", *_HM_ATTRIBUTES))
    frame = convert(raw, str(file), {ITEM: "article_id", TITLE: "prod_name"})
    types = [pl.col(c) for c in ("product_type_name", "product_group_name") if c in raw.columns]
    tags = [pl.lit(f"{short}:") + pl.col(c) for c, short in _HM_ATTRIBUTES.items()
            if c in raw.columns]
    extra = [pl.coalesce(types).alias(CATEGORY)] if types else []
    extra += [pl.concat_list(tags).list.drop_nulls().alias(ATTRIBUTES)] if tags else []
    items = finish_items(pl.concat([frame, raw.select(extra)], how="horizontal"), str(file))
    covered = events[ITEM].is_in(items[ITEM]).mean() or 0.0
    return items, f"{file.name} describes the items of {covered:.1%} of the transactions"


def _load_hm(path: Path, opts: _Options) -> RawData:
    patterns = ("transactions_train*.csv.gz", "transactions_train*.csv", "transactions*.csv*")
    file = locate(path, patterns, _expects("hm"))
    raw = read_csv(file, ("t_dat", "customer_id", "article_id"), ("price",))
    spec = {USER: "customer_id", ITEM: "article_id", TIMESTAMP: "t_dat", PRICE: "price"}
    frame = _purchases(convert(raw, str(file), spec, ("%Y-%m-%d",)))
    notes = ["timestamps are days (t_dat): the order within a day is the file order"]
    items = None
    if (articles := find_beside(path, ("articles*.csv.gz", "articles*.csv"))) is None:
        notes.append("no articles*.csv[.gz] found: no items table")
    else:
        items, note = _hm_items(articles, frame)
        notes.append(note)
    return RawData(finish_events(frame), items, "hm", notes=notes)


def _s3rec_items(file: Path) -> pl.DataFrame:
    with reading(file, "JSON"), (gzip.open if is_gzip(file) else open)(
        file, "rt", encoding="utf-8"
    ) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as err:
            raise DataError(f"{file} is not valid JSON ({err}). Restore the original file."
                            ) from err
    if not isinstance(data, dict):
        raise DataError(f"{file} must hold a JSON object {{item_id: [attribute, ...]}}.")
    attributes = [[str(a) for a in v] if isinstance(v, list) else [str(v)] for v in data.values()]
    schema = {ITEM: pl.String, ATTRIBUTES: pl.List(pl.String)}
    return finish_items(pl.DataFrame({ITEM: list(data), ATTRIBUTES: attributes}, schema=schema),
                        str(file))


def _load_s3rec(path: Path, opts: _Options) -> RawData:
    file = locate(path, ("*.txt.gz", "*.txt"), _expects("s3rec"), exclude="_sample")
    with reading(file):  # one text column per line: \x1f does not occur in these files
        lines = pl.scan_csv(file, has_header=False, separator="\x1f", quote_char=None,
                            new_columns=["line"], infer_schema=False).collect()
    tokens = pl.col("line").str.extract_all(r"\S+")
    frame = lines.select(tokens.list.first().alias(USER), tokens.list.slice(1).alias(ITEM))
    frame = frame.explode(ITEM).drop_nulls(ITEM)  # a line without items gives no events
    if frame.is_empty():
        raise empty_error(file)
    position = pl.int_range(pl.len()).over(USER)
    frame = _purchases(frame).with_columns(
        (pl.lit(S3REC_BASE_TIME) + pl.duration(seconds=position)).alias(TIMESTAMP))
    patterns = (f"{_stem(file)}_item2attributes.json*", "*_item2attributes.json*")
    attributes = find_beside(file, patterns)
    notes = [f"no timestamps in {file.name}: each user's n-th item is at "
             f"{S3REC_BASE_TIME:%Y-%m-%d} 00:00 UTC + n seconds (order only)"]
    return RawData(finish_events(frame), _s3rec_items(attributes) if attributes else None,
                   f"s3rec-{_stem(file)}".lower(), ordered_only=True, notes=notes)


def _load_uci(path: Path, opts: _Options) -> RawData:
    patterns = ("OnlineRetail*.csv*", "Online Retail*.csv*", "*.csv*")
    file = locate(path, patterns, _expects("uci-retail"))
    required = ("InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "CustomerID")
    raw = read_csv(file, required, ("Description", "UnitPrice"))
    raw = raw.with_columns(pl.col("CustomerID").str.strip_chars().str.replace(r"\.0+$", ""))
    spec = {USER: "CustomerID", ITEM: "StockCode", SESSION: "InvoiceNo", TITLE: "Description",
            TIMESTAMP: "InvoiceDate", PRICE: "UnitPrice", QUANTITY: "Quantity"}
    frame = _purchases(convert(raw, str(file), spec, _UCI_FORMATS))
    priced = [pl.when(pl.col(PRICE) > 0).then(PRICE).alias(PRICE)] * (PRICE in frame.columns)
    items = first_per_item(frame.sort(TIMESTAMP, maintain_order=True).select(
        ITEM, *[TITLE] * (TITLE in frame.columns), *priced))
    notes = []
    for keep, what in (
        (pl.col(USER).is_not_null(), "without CustomerID"),
        (~pl.col(SESSION).str.starts_with("C"), "of cancelled invoices (InvoiceNo 'C...')"),
        ((pl.col(QUANTITY) > 0).fill_null(True), "with a Quantity of zero or less"),
    ):
        before = frame.height
        frame = frame.filter(keep.fill_null(True))
        notes.append(f"dropped {before - frame.height:,} rows {what}")
    return RawData(finish_events(frame), finish_items(items), "uci-retail", notes=notes)


def _load_rechorus(path: Path, opts: _Options) -> RawData:
    files = [locate(path, ("train.csv.gz", "train.csv"), _expects("rechorus"))]
    if path.is_dir():  # the full ReChorus layout adds each user's last two interactions
        files += [f for split in ("dev", "test") for f in find_files(path, (f"{split}.csv*",))[:1]]
    raw = pl.concat([read_csv(f, ("user_id", "item_id", "time"), separator="\t") for f in files])
    spec = {USER: "user_id", ITEM: "item_id", TIMESTAMP: "time"}
    frame = _purchases(convert(raw, str(path), spec))
    items = None
    if (meta := find_beside(path, ("item_meta.csv.gz", "item_meta.csv"))) is not None:
        raw_items = read_csv(meta, ("item_id",), ("i_category",), separator="\t")
        spec = {ITEM: "item_id", CATEGORY: "i_category"}
        items = finish_items(convert(raw_items, str(meta), spec), str(meta))
    folder = path if path.is_dir() else path.parent
    notes = [f"interactions from {', '.join(f.name for f in files)}"]
    return RawData(finish_events(frame), items, f"rechorus-{folder.name}".lower(), notes=notes)


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
        raise DataError(f"{path} holds no events file. {_expects(fmt)}")
    items = find_files(path, [f"items.{s}" for s in suffixes])
    return events[0], (items[0] if items else None)


def _generic_items(file: Path, column_map: Mapping[str, str]) -> pl.DataFrame:
    raw = apply_column_map(read_table(file), column_map, list(ITEM_DTYPES), file)
    require(raw.columns, ITEM_REQUIRED, str(file), _MAP_HINT)
    frame = convert(raw, str(file), {c: c for c in ITEM_DTYPES if c != ATTRIBUTES})
    if ATTRIBUTES in raw.columns:
        frame = frame.with_columns(to_attributes(raw[ATTRIBUTES]).alias(ATTRIBUTES))
    return finish_items(frame, str(file))


def _load_generic(path: Path, opts: _Options) -> RawData:
    events_file, items_file = _generic_files(path, opts.fmt)
    table = read_table(events_file)
    raw = apply_column_map(table, opts.column_map, list(EVENT_DTYPES), events_file)
    require(raw.columns, EVENT_REQUIRED, str(events_file), _MAP_HINT)
    frame = convert(raw, str(events_file), {c: c for c in EVENT_DTYPES})
    frame, notes = map_event_types(frame, opts.event_map, str(events_file))
    if unused := [c for c in raw.columns if c not in EVENT_DTYPES]:
        notes.append(f"columns of {events_file.name} not used: {', '.join(unused)}")
    items = _generic_items(items_file, opts.column_map) if items_file else None
    return RawData(finish_events(frame), items, _stem(path), notes=notes)


_LOADERS: dict[str, Callable[[Path, _Options], RawData]] = {
    "taobao": _load_taobao, "rees46": _load_rees46, "diginetica": _load_diginetica,
    "hm": _load_hm, "s3rec": _load_s3rec, "uci-retail": _load_uci, "rechorus": _load_rechorus,
    "csv": _load_generic, "parquet": _load_generic,
}
