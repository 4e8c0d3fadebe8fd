"""Loading a shop's events as Parquet shards by user, for the ``dask`` engine.

:func:`load_sharded` is :func:`~tasks.data.prepare.load_data` with the events written as a folder of
shards (:mod:`tasks.data.shards`) instead of one file: ``workdir/events/shard-XXXXX.parquet`` and
``workdir/items.parquet``. Memory depends on the source:

* the demo shop is generated a batch of users at a time into a cache folder, then its shards are
  linked (or copied) into the run's folder;
* a canonical Parquet folder whose events are shards (``events/*.parquet``) is read and re-sharded
  a batch of one input file at a time, into the number of shards asked for, unless it already is
  this module's shards by user (canonical columns, ``shard-00000.parquet`` ..., every user in
  its shard): those files are copied as they are (neither decoded nor re-sharded);
* every other source is read as a stream of batches of ``SLICE_ROWS`` raw rows
  (:func:`~tasks.data.adapters.stream_raw`, the format's reader of
  :data:`~tasks.data.adapters.READERS`), each converted and written through
  :class:`~tasks.data.shards.ShardWriter`: memory follows a batch and the catalogue, not the
  log.

The run's shards may be replaced by later steps (validation rewrites a shard holding duplicates
into a new file moved over it); they are never written in place, so a linked demo shard in the
cache stays as it was.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task

from models.columns import EVENT_TYPE, EVENT_TYPES, USER
from models.errors import DataError
from tasks import tracking
from tasks.data.adapters import _generic_files, read_items, stream_raw
from tasks.data.conversions import drop_repeated_rows, has_event_schema
from tasks.data.demo_data import write_demo_shop
from tasks.data.prepare import DataPaths, shop_name
from tasks.data.readers import count_rows, find_files, reading
from tasks.data.shards import ShardWriter, shard_file, shard_of
from tasks.resume import LOAD_CACHE

EVENTS_PER_SHARD = 1_000_000
SHARD_BYTES_PER_EVENT = 2048
"""A worker's memory planned per event of its shard: the baselines' tasks grow by about 800 bytes
per shard event (measured: BENCHMARKS.md, "How large a shard"), the lists of every user of the
shard that the release writes by about 500 more; the rest is margin."""
SLICE_ROWS = 1_000_000
_PARQUET = ("*.parquet", "*.pq")


@dataclass(frozen=True)
class ShardSizing:
    """What the shards are sized to when their number is not set: the cluster's workers.

    ``workers``: the cluster's worker processes; ``worker_memory``: the smallest worker's memory
    limit in bytes (None: no limit known).
    """

    workers: int = 1
    worker_memory: int | None = None

    def events_per_shard(self) -> int:
        """The largest shard for one worker: half its memory at :data:`SHARD_BYTES_PER_EVENT`."""
        if not self.worker_memory:
            return EVENTS_PER_SHARD
        return max(100_000, self.worker_memory // 2 // SHARD_BYTES_PER_EVENT)

    def shards(self, events: int) -> int:
        """Shards for ``events`` events: as few as fit a worker's memory, a multiple of the workers.

        Few: a task's catalogue-sized work (the summed tables, the neighbours) is done once per
        shard. A multiple of the workers (2 at least): every worker gets as many equal shards.
        """
        workers = max(self.workers, 1)
        needed = max(2, workers, math.ceil(events / self.events_per_shard()))
        return math.ceil(needed / workers) * workers


def demo_shard_source(root: Path, n_events: int, seed: int, n_shards: int) -> Path:
    """Folder of the demo shop ``(n_events, seed)`` in ``n_shards`` shards, made on first use."""
    folder = root / "demo" / f"shop-{n_events}-seed{seed}-shards{n_shards}"
    if not (folder / "items.parquet").is_file():  # written after the shards
        write_demo_shop(folder, n_events=n_events, seed=seed, shards=n_shards)
    return folder


def _rows(files: list[Path]) -> int:
    return count_rows([(pl.scan_parquet(file), file, "Parquet") for file in files])


def _link_shards(source: Path, folder: Path) -> None:
    """Hard-link (or copy, across file systems) the shard files of ``source`` into ``folder``."""
    for shard in sorted(source.glob("shard-*.parquet")):
        try:
            os.link(shard, folder / shard.name)
        except OSError:
            shutil.copyfile(shard, folder / shard.name)


def _reshard_parquet(files: list[Path], events_dir: Path, n_shards: int,
                     column_map: dict[str, str], event_map: dict[str, str]) -> list[str]:
    """Convert and re-shard canonical Parquet event files a batch at a time; return the notes."""
    notes: list[str] = []
    schema = None
    with ShardWriter(events_dir, n_shards) as writer:
        for file in files:
            if not _rows([file]):
                continue
            stream = stream_raw(file, "parquet", column_map or None, event_map or None,
                                SLICE_ROWS)
            for events in stream.batches:
                if schema is not None and events.schema != schema:
                    raise DataError(f"{file} has other columns or types than the event files "
                                    f"before it ({', '.join(events.columns)} against "
                                    f"{', '.join(schema)}): write every events file with the "
                                    "same columns.")
                schema = events.schema
                writer.write(events)
            notes += [n for n in stream.finish()[1] if n not in notes]
    return notes


@dataclass
class _Loaded:
    """Where the events came from, and what the reading found."""

    source: Path
    ordered_only: bool = False
    notes: list[str] = field(default_factory=list)
    dropped_item_duplicates: int = 0


def _from_demo(workdir: Path, demo_events: int, demo_seed: int, n_shards: int | None,
               sizing: ShardSizing) -> _Loaded:
    source = demo_shard_source(workdir.parents[1], demo_events, demo_seed,
                               n_shards or sizing.shards(demo_events))
    _link_shards(source / "events", workdir / "events")
    shutil.copyfile(source / "items.parquet", workdir / "items.parquet")
    return _Loaded(source)


def _from_parquet_shards(source: Path, workdir: Path, n_shards: int | None,
                         column_map: dict[str, str], event_map: dict[str, str],
                         sizing: ShardSizing) -> _Loaded:
    events_source, items_source = _generic_files(source, "parquet")  # refuses two event tables
    files = find_files(events_source, _PARQUET)
    if not column_map and not event_map and _sharded_as_ours(files, n_shards):
        for file in files:  # copied, not linked: a source rewritten in place changes no run
            shutil.copyfile(file, workdir / "events" / file.name)
        get_run_logger().info("%s holds canonical event shards by user: copied, not re-sharded",
                              events_source)
        notes = []
    else:
        notes = _reshard_parquet(files, workdir / "events",
                                 n_shards or sizing.shards(_rows(files)), column_map, event_map)
    dropped = 0
    if items_source is not None:
        items, dropped = read_items(items_source, column_map)
        items.write_parquet(workdir / "items.parquet")
    return _Loaded(source, notes=notes, dropped_item_duplicates=dropped)


def _sharded_as_ours(files: list[Path], n_shards: int | None) -> bool:
    """Tell whether ``files`` are canonical event shards by user, as this module writes them.

    They are when they are ``shard-00000.parquet`` ... of ``n_shards`` files (any number when
    None), with canonical columns and types and event types, and every user of file ``k`` has
    shard ``k`` (:func:`~tasks.data.shards.shard_of`). Only the schema, the user ids and the
    distinct event types are read.
    """
    n = len(files)
    if not n or n_shards not in (None, n) or [f.name for f in files] != [
            shard_file(f.parent, k).name for k, f in enumerate(files)]:
        return False
    for number, file in enumerate(files):
        with reading(file, "Parquet"):
            scan = pl.scan_parquet(file)
            if not has_event_schema(scan.collect_schema()):
                return False
            types = scan.select(pl.col(EVENT_TYPE).unique()).collect()[EVENT_TYPE]
            users = scan.select(pl.col(USER).unique()).collect()[USER]
        if not types.drop_nulls().is_in(EVENT_TYPES).all() or users.null_count():
            return False
        if not (shard_of(users, n) == number).all():
            return False
    return True


def _from_raw(source: Path, fmt: str, workdir: Path, n_shards: int | None,
              column_map: dict[str, str], event_map: dict[str, str], sizing: ShardSizing
              ) -> _Loaded:
    stream = stream_raw(source, fmt, column_map or None, event_map or None, SLICE_ROWS)
    with ShardWriter(workdir / "events", n_shards or sizing.shards(stream.rows())) as writer:
        for events in stream.batches:
            writer.write(events)
    items, notes = stream.finish()
    dropped = 0
    if items is not None:
        items, dropped = drop_repeated_rows(items, f"the items table of {source}")
        items.write_parquet(workdir / "items.parquet")
    return _Loaded(source, stream.ordered_only, notes, dropped)


@task(name="load-sharded", persist_result=True, cache_policy=LOAD_CACHE)
def load_sharded(
    path: str | None, fmt: str, column_map: dict[str, str], event_map: dict[str, str],
    name: str | None, workdir: Path, demo_events: int, demo_seed: int, n_shards: int | None,
    sizing: ShardSizing | None = None,
) -> DataPaths:
    """Read raw data (or the demo shop) into event shards and an items table under ``workdir``.

    Every source is written a batch at a time (see the module docstring).

    Args:
        path: A file or folder of the format ``fmt``; None for the demo shop.
        fmt: The format (see :data:`tasks.data.adapters.FORMATS`).
        column_map: For ``csv``/``parquet``: canonical column name to source column name.
        event_map: Source event name to canonical event type.
        name: The dataset name; by default :func:`~tasks.data.prepare.shop_name`'s.
        workdir: The run's folder for ``events/`` and ``items.parquet``.
        demo_events: The demo shop's number of events.
        demo_seed: The demo shop's seed.
        n_shards: The number of shards; by default sized by ``sizing``.
        sizing: The cluster the shards are sized to (:class:`ShardSizing`); by default a
            million events each (2 at least).

    Returns:
        The tables, ``events`` being the folder ``workdir/events`` of ``shards`` shard files.

    Raises:
        DataError: The path does not exist or cannot be read as ``fmt`` (as ``load_data``).
        ConfigError: A map or the number of shards is invalid.
    """
    logger = get_run_logger()
    events_dir, items_path = workdir / "events", workdir / "items.parquet"
    events_dir.mkdir(parents=True, exist_ok=True)
    for old in [*events_dir.glob("shard-*.parquet"), items_path]:  # of an earlier run
        old.unlink(missing_ok=True)
    sizing = sizing or ShardSizing()
    if path is None:
        loaded = _from_demo(workdir, demo_events, demo_seed, n_shards, sizing)
    elif fmt == "parquet" and find_files(Path(path).expanduser() / "events", _PARQUET):
        loaded = _from_parquet_shards(Path(path).expanduser(), workdir, n_shards, column_map,
                                      event_map, sizing)
    else:
        loaded = _from_raw(Path(path), fmt, workdir, n_shards, column_map, event_map, sizing)
    for note in loaded.notes:
        logger.warning(note)
    shards = sorted(events_dir.glob("shard-*.parquet"))
    rows = {"events": _rows(shards), "items": _rows([items_path]) if items_path.is_file() else 0}
    if not rows["events"]:
        raise DataError(f"{loaded.source} gives no events after loading "
                        f"({'; '.join(loaded.notes)}).")
    shop = shop_name(path, fmt, name)
    logger.info("loaded %s: %d events in %d shards, %d items", shop, rows["events"],
                len(shards), rows["items"])
    return DataPaths(events_dir, items_path if items_path.is_file() else None, shop,
                     loaded.source, tracking.fingerprint([loaded.source]), loaded.ordered_only,
                     rows, len(shards), loaded.dropped_item_duplicates)
