"""Reading raw files and converting their columns to the canonical dtypes.

Every failure a user can cause while reading (empty, corrupt or truncated files, text that is not
UTF-8, missing columns, values of the wrong type, unknown event types) becomes a
:class:`~models.errors.DataError` whose message names the file, the column, and the fix. Source
files are read with every column as text, so ids keep their leading zeros and each conversion can
count and show the values it cannot convert.
"""

from __future__ import annotations

import codecs
import gzip
import logging
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from models.columns import (
    EVENT_DTYPES,
    ITEM,
    ITEM_DTYPES,
)
from models.errors import DataError, MissingColumnsError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_MAX_LISTED = 10
_GZIP_WORDS = ("end of file", "end-of-stream", "deflate", "gzip", "compress", "crc", "corrupt")


# --- files ------------------------------------------------------------------------------------
def find_files(folder: Path, patterns: Sequence[str], exclude: str = "") -> list[Path]:
    """Return the files of ``folder`` matching the first of ``patterns`` that matches any."""
    for pattern in patterns:
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and not (
            exclude and exclude in p.name))
        if found:
            return found
    return []


def locate(path: Path, patterns: Sequence[str], expects: str, exclude: str = "") -> Path:
    """Return ``path`` if it is a file, else the one file of the folder matching ``patterns``."""
    if path.is_file():
        return path
    found = find_files(path, patterns, exclude)
    if not found:
        raise DataError(f"{path} holds no file named like {' or '.join(patterns)}. {expects}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(f"{path} holds several candidate files ({names}); pass one as the path.")
    return found[0]


def find_beside(path: Path, patterns: Sequence[str]) -> Path | None:
    """Return the first file matching ``patterns`` in the folder ``path`` is or is in."""
    found = find_files(path if path.is_dir() else path.parent, patterns)
    return found[0] if found else None


def is_gzip(path: Path) -> bool:
    """Tell whether ``path`` starts with the gzip magic bytes (whatever its name)."""
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def first_line(path: Path) -> str:
    """Return the first line of a text file, gzip or plain, without its line break."""
    with reading(path), (gzip.open if is_gzip(path) else open)(
        path, "rt", encoding="utf-8", errors="replace"
    ) as fh:
        return fh.readline().rstrip("\r\n")


def utf8_error_position(path: Path) -> tuple[int, int] | None:
    """Return ``(byte offset, line)`` of the first invalid UTF-8 byte of the (unpacked) text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed, lines = 0, 1
    try:
        with (gzip.open if is_gzip(path) else open)(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                pending = decoder.getstate()[0]
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    head = (pending + chunk)[: err.start]
                    return fed - len(pending) + err.start, lines + head.count(b"\n")
                fed, lines = fed + len(chunk), lines + chunk.count(b"\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return fed, lines
    except (OSError, EOFError, zlib.error):
        return None
    return None


def empty_error(path: Path) -> DataError:
    """Build the error for a file without data rows."""
    return DataError(f"{path} has no data rows (the file is empty or holds only a header). "
                     "Check that the export finished and point to the complete file.")


def _read_error(path: Path, kind: str, err: BaseException) -> DataError:
    text = str(err).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    if "utf-8" in text.lower() or "utf8" in text.lower():
        where = utf8_error_position(path)
        at = f" (first bad byte at offset {where[0]:,}, line {where[1]:,})" if where else ""
        return DataError(
            f"{path} is not UTF-8 text{at}. Re-encode it to UTF-8, for example `iconv -f latin1 "
            f"-t utf-8 {path.name} > fixed.csv`, or export it again as UTF-8.")
    if any(word in text.lower() for word in _GZIP_WORDS) and path.exists() and is_gzip(path):
        return DataError(f"{path} is a corrupt or truncated gzip file ({reason}). Download or "
                         "copy it again; `gzip -t` checks a file.")
    fix = ("check the separator, the quoting and that every line has the same number of fields"
           if kind == "CSV" else f"write the file again as valid {kind}")
    return DataError(f"{path} could not be read as {kind}: {reason}. Fix: {fix}.")


@contextmanager
def reading(path: Path, kind: str = "CSV") -> Iterator[None]:
    """Turn the errors of reading ``path`` into :class:`DataError` messages."""
    try:
        yield
    except pl.exceptions.NoDataError as err:
        raise empty_error(path) from err
    except (pl.exceptions.PolarsError, OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        raise _read_error(path, kind, err) from err


def require(present: Sequence[str], required: Iterable[str], table: str, hint: str = "") -> None:
    """Raise :class:`MissingColumnsError` (with ``hint`` appended) if a column is missing."""
    missing = [column for column in required if column not in present]
    if missing:
        err = MissingColumnsError(table, missing, present)
        if hint:
            err.args = (f"{err.args[0]} {hint}",)
        raise err


def csv_scan(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    separator: str = ",",
    new_columns: Sequence[str] | None = None,
    null_values: Sequence[str] | None = None,
) -> pl.LazyFrame:
    """The ``required`` and present ``optional`` columns of a CSV file, all as text, lazily.

    The header is read (and the required columns checked) at the call.
    """
    with reading(path):
        lazy = pl.scan_csv(
            path, separator=separator, has_header=new_columns is None, infer_schema=False,
            new_columns=list(new_columns) if new_columns else None,
            null_values=list(null_values) if null_values else None,
        )
        present = lazy.collect_schema().names()
    require(present, required, str(path))
    return lazy.select(list(dict.fromkeys([*required, *(c for c in optional if c in present)])))


def read_csv(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    separator: str = ",",
    new_columns: Sequence[str] | None = None,
    null_values: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Read the ``required`` and present ``optional`` columns of a CSV file, all as text."""
    lazy = csv_scan(path, required, optional, separator, new_columns, null_values)
    return next(scan_batches(lazy, path, "CSV", None))


def scan_batches(lazy: pl.LazyFrame, path: Path, kind: str, rows: int | None
                 ) -> Iterator[pl.DataFrame]:
    """The rows of ``lazy``, a scan of ``path``, about ``rows`` at a time, in file order.

    Polars' streaming engine reads the file once, so memory follows the batch, not the file;
    ``rows=None`` reads it whole, as one batch. Read errors are :class:`DataError` messages; a
    source without rows is :func:`empty_error`.
    """
    empty = True
    with reading(path, kind):
        batches = [lazy.collect()] if rows is None else lazy.collect_batches(chunk_size=rows)
        for batch in batches:
            if batch.height:
                empty = False
                yield batch
    if empty:
        raise empty_error(path)


def count_rows(scans: Sequence[tuple[pl.LazyFrame, Path, str]]) -> int:
    """The rows of every ``(scan, path, kind)``, counted by streaming scans."""
    total = 0
    for lazy, path, kind in scans:
        with reading(path, kind):
            total += lazy.select(pl.len()).collect().item()
    return total


def read_table(path: Path) -> pl.DataFrame:
    """Read a whole Parquet file or folder of Parquet shards, or a CSV file (all text).

    A Parquet file is told by its suffix; a folder's ``*.parquet`` files are read in name order;
    a CSV file's separator is sniffed from its header.
    """
    if path.is_dir():
        shards = find_files(path, ("*.parquet", "*.pq"))
        if not shards:
            raise DataError(f"{path} holds no Parquet file: point to a folder of *.parquet "
                            "shards of one table.")
        with reading(path, "Parquet"):
            frame = pl.read_parquet(shards)
    else:
        lazy, kind = scan_table(path)
        with reading(path, kind):
            frame = lazy.collect()
    if frame.is_empty():
        raise empty_error(path)
    return frame


def scan_table(path: Path) -> tuple[pl.LazyFrame, str]:
    """A lazy scan of one Parquet file (told by its suffix) or CSV file (all text), and its kind.

    A CSV file's separator is sniffed from its header.
    """
    if path.suffix.lower() in (".parquet", ".pq"):
        with reading(path, "Parquet"):
            return pl.scan_parquet(path), "Parquet"
    header = first_line(path)
    separator = max((",", ";", "\t", "|"), key=header.count)
    with reading(path):
        return pl.scan_csv(path, separator=separator, infer_schema=False), "CSV"


def apply_column_map(
    frame: pl.DataFrame, column_map: Mapping[str, str], keys: Sequence[str], file: Path
) -> pl.DataFrame:
    """Rename the mapped source columns among ``keys`` to their canonical names.

    A mapped column must exist unless its canonical name also belongs to the other table
    (``price``), so one map serves both the events and the items file.
    """
    mapped = {canon: column for canon, column in column_map.items() if canon in keys}
    shared = set(EVENT_DTYPES) & set(ITEM_DTYPES) - {ITEM}
    absent = [c for canon, c in mapped.items() if c not in frame.columns and canon not in shared]
    require(frame.columns, absent, str(file),
            "The column_map names them, so they must be in the file: fix the map or the file.")
    renames = {column: canon for canon, column in mapped.items()
               if column != canon and column in frame.columns}
    replaced = [c for c in renames.values() if c in frame.columns and c not in renames]
    return frame.drop(replaced).rename(renames)


# --- values -----------------------------------------------------------------------------------


# --- canonical tables -------------------------------------------------------------------------


