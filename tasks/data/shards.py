"""Events partitioned into Parquet shards by user: every event of a user lies in one shard.

A user's shard is the CRC-32 of the id's UTF-8 text modulo the number of shards
(:func:`shard_of`). CRC-32 is fixed by its standard, so the same id goes to the same shard on
every machine, in every process and with every library version, unlike Python's salted
``hash()`` or polars' ``Series.hash()``. :class:`ShardWriter` appends frames to the shard files
``shard-00000.parquet`` ... one row group per shard and frame, so a dataset larger than memory can
be written a batch at a time.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from types import TracebackType

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from models.columns import USER
from models.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

def host_cores() -> int:
    """The cores this process may run on: the threads of a task that runs alone on its host.

    A Dask worker runs one task per thread with BLAS/OpenMP pinned to one thread; a stage made of
    one task (the transformer's study, the ranker's refit) would leave the host's other cores idle.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shard_file(folder: Path, shard: int) -> Path:
    """The path of shard number ``shard`` in ``folder``."""
    return folder / f"shard-{shard:05d}.parquet"


def check_shards(n_shards: int) -> None:
    """Raise :class:`ConfigError` unless ``n_shards`` is 1 or more."""
    if n_shards < 1:
        raise ConfigError(f"the number of shards must be 1 or more, got {n_shards}: pass a "
                          "positive number of shards.")


def shard_of(user_ids: pl.Series, n_shards: int) -> pl.Series:
    """Return the shard of each id: CRC-32 of its text modulo ``n_shards`` (null for null).

    Each distinct id is hashed once, so the cost follows the number of users, not of events.

    Raises:
        ConfigError: If ``n_shards`` is less than 1.
    """
    check_shards(n_shards)
    ids = user_ids.cast(pl.String)
    distinct = ids.drop_nulls().unique()
    shards = pl.Series([zlib.crc32(i.encode()) % n_shards for i in distinct], dtype=pl.UInt32)
    return ids.replace_strict(distinct, shards, default=None, return_dtype=pl.UInt32).alias("shard")


class ShardWriter:
    """Append frames to ``n_shards`` Parquet files, partitioned by :func:`shard_of` of ``key``.

    Each :meth:`write` adds one row group to each shard it has rows for; :meth:`close` (or the
    end of a ``with`` block) writes an empty file, with the schema, for every shard that got no
    row, so the folder always holds all ``n_shards`` files. The first write removes the shard files
    of an earlier writer from the folder. Every frame must have the schema of the first.
    """

    def __init__(self, folder: Path, n_shards: int, key: str = USER) -> None:
        check_shards(n_shards)
        self.folder, self.n_shards, self.key = Path(folder), n_shards, key
        self.rows = 0
        self._schema: pa.Schema | None = None
        self._writers: dict[int, pq.ParquetWriter] = {}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def write(self, frame: pl.DataFrame) -> None:
        """Append the rows of ``frame`` to their shards."""
        if self._schema is None:  # the first write replaces the shards of an earlier one
            self.folder.mkdir(parents=True, exist_ok=True)
            for old in self.folder.glob("shard-*.parquet"):
                old.unlink()
        shard_column = shard_of(frame[self.key], self.n_shards)
        if shard_column.null_count():
            raise DataError(f"{shard_column.null_count():,} rows have no {self.key}: every row "
                            f"of a sharded table needs one. Drop or fill those rows first.")
        shards = shard_column.to_numpy()
        order = np.argsort(shards, kind="stable")  # rows keep their order within a shard
        bounds = np.searchsorted(shards[order], np.arange(self.n_shards + 1))
        for shard in map(int, np.flatnonzero(np.diff(bounds))):  # one shard copied at a time
            table = frame[order[bounds[shard]:bounds[shard + 1]]].to_arrow()
            self._schema = self._schema or table.schema
            if shard not in self._writers:
                self._writers[shard] = pq.ParquetWriter(shard_file(self.folder, shard),
                                                        self._schema, compression="zstd")
            self._writers[shard].write_table(table)
        self.rows += frame.height

    def close(self) -> None:
        """Close every shard file and write the empty ones."""
        written, self._writers = self._writers, {}
        for writer in written.values():
            writer.close()
        if self._schema is None:
            return
        for shard in sorted(set(range(self.n_shards)) - set(written)):
            pq.write_table(self._schema.empty_table(), shard_file(self.folder, shard))
        self._schema = None
        logger.info("wrote %s rows in %d shards to %s", f"{self.rows:,}", self.n_shards,
                    self.folder)
