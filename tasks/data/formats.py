"""Readers of the public e-commerce datasets: each format's files into the canonical tables.

Taobao UserBehavior, REES46, DIGINETICA, H&M, S3-Rec (Amazon), UCI Online Retail and ReChorus,
each as its publisher ships it (see :data:`EXPECTED_FILES`); every value is
converted by :mod:`tasks.data.conversions`, which names the file, column and fix when one cannot
be read. :func:`tasks.data.adapters.load_raw` picks the reader of a format.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from models.columns import (
    ATTRIBUTES,
    BRAND,
    CART,
    CATEGORY,
    DESCRIPTION,
    EVENT_TYPE,
    FAV,
    ITEM,
    PRICE,
    PURCHASE,
    QUANTITY,
    SESSION,
    TIMESTAMP,
    TITLE,
    USER,
    VIEW,
)
from models.errors import DataError
from tasks.data.conversions import (
    convert,
    dropped_note,
    finish_events,
    finish_items,
    map_event_types,
    to_int,
)
from tasks.data.readers import (
    count_rows,
    csv_scan,
    empty_error,
    find_beside,
    find_files,
    first_line,
    is_gzip,
    locate,
    read_csv,
    reading,
    scan_batches,
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

SINGLE_EVENT_TYPE = ("diginetica", "hm", "s3rec", "uci-retail", "rechorus")
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

@dataclass
class RawData:
    """A dataset in the canonical tables, with what the adapter dropped or mapped.

    Attributes:
        events: Canonical events, sorted by timestamp then original order.
        items: Canonical items, or ``None`` when the source has no catalogue.
        name: The dataset name (the format, or the file or folder stem for csv/parquet).
        ordered_only: True when the source has order but no real timestamps (s3rec).
        notes: What the adapter dropped or mapped, for the run log.
        dropped_item_duplicates: Catalogue rows dropped as exact copies of another row (the
            first copy kept), for the validation report.
    """

    events: pl.DataFrame
    items: pl.DataFrame | None
    name: str
    ordered_only: bool = False
    notes: list[str] = field(default_factory=list)
    dropped_item_duplicates: int = 0


Scan = tuple[pl.LazyFrame, Path, str]
"""A lazy scan of a source file's raw rows, the file, and its kind for error messages."""


@dataclass
class Stream:
    """A source's canonical events a batch at a time, and what comes once every batch is read.

    A format whose conversion is row by row (``taobao``, ``rees46``, ``hm``, ``csv``,
    ``parquet``) reads its files as a stream, so the events of a log larger than memory can be
    written to shards a batch at a time; read whole (:func:`collect`) it is the eager loader.

    Attributes:
        name: The dataset name.
        scans: The raw files in reading order (counted by :meth:`rows`).
        batches: The canonical events, a frame per batch of raw rows in file order, each in time
            order (:func:`finish_events`).
        finish: Called after the last batch: the items (or None) and the notes.
        ordered_only: As :attr:`RawData.ordered_only`.
    """

    name: str
    scans: list[Scan]
    batches: Iterator[pl.DataFrame]
    finish: Callable[[], tuple[pl.DataFrame | None, list[str]]]
    ordered_only: bool = False

    def rows(self) -> int:
        """The raw rows of the source, counted by streaming scans (without reading a batch)."""
        return count_rows(self.scans)


def collect(stream: Stream) -> RawData:
    """A stream read whole: its events as one table in time order, as an eager loader's."""
    frames = list(stream.batches)
    events = frames[0] if len(frames) == 1 else finish_events(pl.concat(frames))
    items, notes = stream.finish()
    return RawData(events, items, stream.name, stream.ordered_only, notes)


class FirstValues:
    """The first non-missing value of every column per item, over batches of rows.

    Rows are ordered by ``time`` when given, then by arrival, so each value is the one known when
    the item first appeared: a model fitted on any history that holds the item sees none from
    after that history (the last values would carry later prices and categories back into every
    earlier window). The items come in the order of their first row. Memory follows the
    catalogue, not the log: each batch is reduced to a row per item as it arrives.
    """

    _ROW = "__row"
    _KEEP = 8

    def __init__(self, time: str | None = None) -> None:
        self.time = time
        self.order = [time, self._ROW] if time else [self._ROW]
        self.seen = 0
        self.parts: dict[str, list[pl.DataFrame]] = {}

    def add(self, frame: pl.DataFrame) -> None:
        """Take the rows of ``frame`` (an ``item_id`` column, ``time`` when set, values)."""
        frame = frame.with_row_index(self._ROW, offset=self.seen)
        self.seen += frame.height
        for column in [ITEM, *(c for c in frame.columns if c not in (ITEM, *self.order))]:
            if column == ITEM:
                part = frame.select(ITEM, *self.order)
            else:
                part = frame.select(ITEM, *self.order, column).drop_nulls(column)
            parts = self.parts.setdefault(column, [])
            parts.append(self._first(part))
            if len(parts) > self._KEEP:
                self.parts[column] = [self._first(pl.concat(parts))]

    def _first(self, frame: pl.DataFrame) -> pl.DataFrame:
        return frame.sort(self.order, maintain_order=True).unique(ITEM, keep="first",
                                                                  maintain_order=True)

    def table(self) -> pl.DataFrame:
        """A row per item seen, in the order of their first rows."""
        items = self._first(pl.concat(self.parts[ITEM]))
        for column, parts in self.parts.items():
            if column != ITEM:
                first = self._first(pl.concat(parts)).select(ITEM, column)
                items = items.join(first, on=ITEM, how="left", maintain_order="left")
        return items.drop(self.order)


@dataclass(frozen=True)
class Options:
    """How ``load_raw`` was asked to read: the format and the column and event maps."""

    fmt: str
    column_map: Mapping[str, str]
    event_map: Mapping[str, str]


def purchases(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``frame`` as purchases (the event type of single-event datasets)."""
    return frame.with_columns(pl.lit(PURCHASE).alias(EVENT_TYPE))


def stream_taobao(path: Path, opts: Options, rows: int | None) -> Stream:
    """Taobao UserBehavior: pv/cart/fav/buy events with epoch-second timestamps.

    Read about ``rows`` raw rows at a time (None: the file at once).
    """
    patterns = ("UserBehavior*.csv.gz", "UserBehavior*.csv", "*.csv.gz", "*.csv")
    file = locate(path, patterns, expects("taobao"))
    headless = first_line(file).split(",")[0].strip().isdigit()  # the original file has none
    scan = csv_scan(file, _TAOBAO_COLUMNS, new_columns=_TAOBAO_COLUMNS if headless else None)
    spec = {USER: "user_id", ITEM: "item_id", EVENT_TYPE: "behavior_type",
            TIMESTAMP: "timestamp", CATEGORY: "category_id"}
    firsts = FirstValues()

    def batches() -> Iterator[pl.DataFrame]:
        for raw in scan_batches(scan, file, "CSV", rows):
            frame = convert(raw, str(file), spec)
            frame, _ = map_event_types(frame, {**_TAOBAO_EVENTS, **opts.event_map}, str(file))
            firsts.add(frame.select(ITEM, CATEGORY))
            yield finish_events(frame)

    def finish() -> tuple[pl.DataFrame, list[str]]:
        items = finish_items(firsts.table())
        return items, [f"items: {items.height:,} distinct items of the event log, with the "
                       "category of each item's first event"]

    return Stream("taobao", [(scan, file, "CSV")], batches(), finish)


def stream_rees46(path: Path, opts: Options, rows: int | None) -> Stream:
    """REES46 monthly files: events with sessions, prices, categories and brands.

    Read about ``rows`` raw rows at a time (None: each file at once).

    The files are read in name order; a column some files lack is missing in their rows.
    """
    found = [path] if path.is_file() else [*path.glob("*.csv"), *path.glob("*.csv.gz")]
    files = sorted(f for f in found if f.is_file())
    if not files:
        raise DataError(f"{path} holds no CSV file. {expects('rees46')}")
    required = ("event_time", "event_type", "product_id", "user_id")
    optional = ("category_id", "category_code", "brand", "price", "user_session")
    scans = [(csv_scan(f, required, optional), f, "CSV") for f in files]
    present = {c for scan, _, _ in scans for c in scan.collect_schema().names()}
    columns = [c for c in (*required, *optional) if c in present]  # every file's, alike
    drop = () if "remove_from_cart" in opts.event_map else ("remove_from_cart",)
    firsts, dropped = FirstValues(TIMESTAMP), Counter[str]()

    def batches() -> Iterator[pl.DataFrame]:
        for scan, file, kind in scans:
            for raw in scan_batches(scan, file, kind, rows):
                raw = raw.select(pl.col(c) if c in raw.columns else pl.lit(None, pl.String)
                                 .alias(c) for c in columns)
                frame = convert(raw, str(path), _REES46_SPEC).sort(TIMESTAMP,
                                                                   maintain_order=True)
                items = frame.select(c for c in (ITEM, TIMESTAMP, CATEGORY, BRAND, PRICE)
                                     if c in frame.columns)
                if "category_code" in frame.columns:
                    codes = pl.concat_list(pl.col("category_code")).list.drop_nulls()
                    items = pl.concat([items, frame.select(codes.alias(ATTRIBUTES))],
                                      how="horizontal")
                firsts.add(items)
                frame, _ = map_event_types(frame, opts.event_map, str(path), drop, dropped)
                yield finish_events(frame)

    def finish() -> tuple[pl.DataFrame, list[str]]:
        notes = [dropped_note(name, count, str(path)) for name, count in dropped.items()]
        notes.append("items: the first category, brand and price seen per product (known "
                     "before any window that holds it); category_code as the attribute")
        return finish_items(firsts.table()), notes

    return Stream("rees46", scans, batches(), finish)


def _diginetica_files(path: Path) -> dict[str, Path | None]:
    files: dict[str, Path | None] = {}
    for kind, pattern in _DIGINETICA_FILES.items():
        found = find_files(path, (pattern,)) if path.is_dir() else [path] * path.match(pattern)
        files[kind] = found[0] if found else None
    if not files["purchases"] and not files["views"]:
        raise DataError(f"{path} is not and holds no purchases or item-views file. "
                        f"{expects('diginetica')}")
    files["categories"] = find_beside(path, ("*categories*.csv*",))
    return files


def _diginetica_events(raw: pl.DataFrame, file: Path, event_type: str, counts: Counter[str]
                       ) -> pl.DataFrame:
    """A batch of a DIGINETICA events file, canonical.

    Adds the batch's rows, anonymous rows and timeframes of a day or more to ``counts``.
    """
    session, user, item = _DIGINETICA_COLUMNS[event_type]
    spec = {SESSION: session, USER: user, ITEM: item, TIMESTAMP: "eventdate"}
    frame = convert(raw, str(file), spec, ("%Y-%m-%d",))
    offset = to_int(raw["timeframe"], str(file))
    counts.update({"rows": frame.height, "anonymous": frame[USER].is_null().sum(),
                   "long": (offset >= _DAY_MS).sum()})
    return frame.with_columns(
        pl.coalesce(USER, pl.lit("s") + pl.col(SESSION)).alias(USER),
        (pl.col(TIMESTAMP) + pl.duration(milliseconds=offset % _DAY_MS)).alias(TIMESTAMP),
        pl.lit(event_type).alias(EVENT_TYPE),
    )


def stream_diginetica(path: Path, opts: Options, rows: int | None) -> Stream:
    """DIGINETICA: item views and purchases of sessions, with product categories.

    Read about ``rows`` raw rows at a time (None: each file at once).
    """
    files = _diginetica_files(path)
    parts = []
    for kind, event_type in (("purchases", PURCHASE), ("views", VIEW)):
        if (file := files[kind]) is not None:
            session, user, item = _DIGINETICA_COLUMNS[event_type]
            scan = csv_scan(file, (session, user, item, "timeframe", "eventdate"),
                            separator=";", null_values=["NA", ""])
            parts.append((scan, file, event_type, Counter[str]()))

    def batches() -> Iterator[pl.DataFrame]:
        for scan, file, event_type, counts in parts:
            for raw in scan_batches(scan, file, "CSV", rows):
                yield finish_events(_diginetica_events(raw, file, event_type, counts))

    def finish() -> tuple[pl.DataFrame | None, list[str]]:
        notes = []
        for _, file, _, counts in parts:
            notes.append(f"{counts['anonymous']:,} of {counts['rows']:,} rows of {file.name} "
                         "have no user id (NA): their session is the user ('s<sessionId>')")
            if counts["long"]:  # eventdate is the event's own day (order numbers agree)
                notes.append(f"{counts['long']:,} rows of {file.name} have a timeframe of a day "
                             "or more: only its time-of-day part is added to eventdate")
        items = None
        if (categories := files["categories"]) is not None:
            raw = read_csv(categories, ("itemId", "categoryId"), separator=";")
            spec = {ITEM: "itemId", CATEGORY: "categoryId"}
            items = finish_items(convert(raw, str(categories), spec))
        notes.append("timestamp = eventdate (day) + timeframe (ms since the session start)")
        return items, notes

    return Stream("diginetica", [(scan, file, "CSV") for scan, file, _, _ in parts], batches(),
                  finish)


def _hm_items(file: Path) -> pl.DataFrame:
    raw = read_csv(file, ("article_id",), ("prod_name", "detail_desc", "product_type_name",
                                           *_HM_ATTRIBUTES))
    frame = convert(raw, str(file), {ITEM: "article_id", TITLE: "prod_name",
                                     DESCRIPTION: "detail_desc"})
    types = [pl.col(c) for c in ("product_type_name", "product_group_name") if c in raw.columns]
    tags = [pl.lit(f"{short}:") + pl.col(c) for c, short in _HM_ATTRIBUTES.items()
            if c in raw.columns]
    extra = [pl.coalesce(types).alias(CATEGORY)] if types else []
    extra += [pl.concat_list(tags).list.drop_nulls().alias(ATTRIBUTES)] if tags else []
    return finish_items(pl.concat([frame, raw.select(extra)], how="horizontal"))


def stream_hm(path: Path, opts: Options, rows: int | None) -> Stream:
    """H&M transactions (purchases by day) with the articles' attributes.

    Read about ``rows`` transactions at a time (None: the file at once).
    """
    patterns = ("transactions_train*.csv.gz", "transactions_train*.csv", "transactions*.csv*")
    file = locate(path, patterns, expects("hm"))
    scan = csv_scan(file, ("t_dat", "customer_id", "article_id"), ("price",))
    spec = {USER: "customer_id", ITEM: "article_id", TIMESTAMP: "t_dat", PRICE: "price"}
    articles = find_beside(path, ("articles*.csv.gz", "articles*.csv"))
    items = None if articles is None else _hm_items(articles)
    described = [0, 0]  # transactions with an article described, and with an article id

    def batches() -> Iterator[pl.DataFrame]:
        for raw in scan_batches(scan, file, "CSV", rows):
            frame = purchases(convert(raw, str(file), spec, ("%Y-%m-%d",)))
            if items is not None:
                known = frame[ITEM].is_in(items[ITEM])
                described[0] += known.sum()
                described[1] += known.count()
            yield finish_events(frame)

    def finish() -> tuple[pl.DataFrame | None, list[str]]:
        notes = ["timestamps are days (t_dat): the order within a day is the file order"]
        if articles is None:
            notes.append("no articles*.csv[.gz] found: no items table")
        else:
            covered = described[0] / described[1] if described[1] else 0.0
            notes.append(f"{articles.name} describes the items of {covered:.1%} of the "
                         "transactions")
        return items, notes

    return Stream("hm", [(scan, file, "CSV")], batches(), finish)


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
    return finish_items(pl.DataFrame({ITEM: list(data), ATTRIBUTES: attributes}, schema=schema))


def stream_s3rec(path: Path, opts: Options, rows: int | None) -> Stream:
    """S3-Rec (Amazon): ordered item sequences per user with item attributes.

    Read about ``rows`` lines at a time (None: the file at once).

    A user's n-th item is numbered across batches (a user on several lines continues).
    """
    file = locate(path, ("*.txt.gz", "*.txt"), expects("s3rec"), exclude="_sample")
    with reading(file):  # one text column per line: \x1f does not occur in these files
        lines = pl.scan_csv(file, has_header=False, separator="\x1f", quote_char=None,
                            new_columns=["line"], infer_schema=False)
    tokens = pl.col("line").str.extract_all(r"\S+")
    numbered = pl.DataFrame(schema={USER: pl.String, "n": pl.Int64})  # items so far per user

    def batches() -> Iterator[pl.DataFrame]:
        nonlocal numbered
        produced = False
        for raw in scan_batches(lines, file, "CSV", rows):
            frame = raw.select(tokens.list.first().alias(USER),
                               tokens.list.slice(1).alias(ITEM))
            frame = frame.explode(ITEM).drop_nulls(ITEM)  # a line without items: no events
            if frame.is_empty():
                continue
            before = frame.join(numbered, on=USER, how="left", maintain_order="left")["n"]
            before = before.fill_null(0)
            position = pl.int_range(pl.len()).over(USER) + before
            frame = purchases(frame).with_columns(
                (pl.lit(S3REC_BASE_TIME) + pl.duration(seconds=position)).alias(TIMESTAMP))
            counts = frame.group_by(USER).len("n").with_columns(pl.col("n").cast(pl.Int64))
            numbered = pl.concat([numbered, counts]).group_by(USER).agg(pl.col("n").sum())
            produced = True
            yield finish_events(frame)
        if not produced:
            raise empty_error(file)

    def finish() -> tuple[pl.DataFrame | None, list[str]]:
        patterns = (f"{file_stem(file)}_item2attributes.json*", "*_item2attributes.json*")
        attributes = find_beside(file, patterns)
        notes = [f"no timestamps in {file.name}: each user's n-th item is at "
                 f"{S3REC_BASE_TIME:%Y-%m-%d} 00:00 UTC + n seconds (order only)"]
        return (_s3rec_items(attributes) if attributes else None), notes

    return Stream(f"s3rec-{file_stem(file)}".lower(), [(lines, file, "CSV")], batches(), finish,
                  ordered_only=True)


def stream_uci(path: Path, opts: Options, rows: int | None) -> Stream:
    """UCI Online Retail: invoice lines as purchases with quantities and prices.

    Read about ``rows`` invoice lines at a time (None: the file at once).
    """
    patterns = ("OnlineRetail*.csv*", "Online Retail*.csv*", "*.csv*")
    file = locate(path, patterns, expects("uci-retail"))
    required = ("InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "CustomerID")
    scan = csv_scan(file, required, ("Description", "UnitPrice"))
    spec = {USER: "CustomerID", ITEM: "StockCode", SESSION: "InvoiceNo", TITLE: "Description",
            TIMESTAMP: "InvoiceDate", PRICE: "UnitPrice", QUANTITY: "Quantity"}
    drops = (
        (pl.col(USER).is_not_null(), "without CustomerID"),
        (~pl.col(SESSION).str.starts_with("C"), "of cancelled invoices (InvoiceNo 'C...')"),
        ((pl.col(QUANTITY) > 0).fill_null(True), "with a Quantity of zero or less"),
    )
    firsts, dropped = FirstValues(TIMESTAMP), Counter[str]()

    def batches() -> Iterator[pl.DataFrame]:
        for raw in scan_batches(scan, file, "CSV", rows):
            raw = raw.with_columns(pl.col("CustomerID").str.strip_chars()
                                   .str.replace(r"\.0+$", ""))
            frame = purchases(convert(raw, str(file), spec, _UCI_FORMATS))
            priced = [pl.when(pl.col(PRICE) > 0).then(PRICE).alias(PRICE)] * (
                PRICE in frame.columns)
            firsts.add(frame.select(ITEM, TIMESTAMP, *[TITLE] * (TITLE in frame.columns),
                                    *priced))
            for keep, what in drops:
                before = frame.height
                frame = frame.filter(keep.fill_null(True))
                dropped[what] += before - frame.height
            yield finish_events(frame)

    def finish() -> tuple[pl.DataFrame, list[str]]:
        notes = [f"dropped {dropped[what]:,} rows {what}" for _, what in drops]
        return finish_items(firsts.table()), notes

    return Stream("uci-retail", [(scan, file, "CSV")], batches(), finish)


def stream_rechorus(path: Path, opts: Options, rows: int | None) -> Stream:
    """ReChorus: tab-separated user, item, time interactions with item metadata.

    Read about ``rows`` interactions at a time (None: each file at once).
    """
    files = [locate(path, ("train.csv.gz", "train.csv"), expects("rechorus"))]
    if path.is_dir():  # the full ReChorus layout adds each user's last two interactions
        files += [f for split in ("dev", "test") for f in find_files(path, (f"{split}.csv*",))[:1]]
    scans = [(csv_scan(f, ("user_id", "item_id", "time"), separator="\t"), f, "CSV")
             for f in files]
    spec = {USER: "user_id", ITEM: "item_id", TIMESTAMP: "time"}

    def batches() -> Iterator[pl.DataFrame]:
        for scan, file, kind in scans:
            for raw in scan_batches(scan, file, kind, rows):
                yield finish_events(purchases(convert(raw, str(path), spec)))

    def finish() -> tuple[pl.DataFrame | None, list[str]]:
        items = None
        if (meta := find_beside(path, ("item_meta.csv.gz", "item_meta.csv"))) is not None:
            raw_items = read_csv(meta, ("item_id",), ("i_category",), separator="\t")
            items = finish_items(convert(raw_items, str(meta), {ITEM: "item_id",
                                                                CATEGORY: "i_category"}))
        return items, [f"interactions from {', '.join(f.name for f in files)}"]

    folder = path if path.is_dir() else path.parent
    return Stream(f"rechorus-{folder.name}".lower(), scans, batches(), finish)


def expects(fmt: str) -> str:
    """What format ``fmt`` reads, for error messages."""
    return f"Format '{fmt}' expects {EXPECTED_FILES[fmt]}."


def file_stem(path: Path) -> str:
    """A file's name without its suffixes (``events.csv.gz`` -> ``events``)."""
    return path.name.split(".")[0]
