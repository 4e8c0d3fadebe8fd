"""Events partitioned into Parquet shards by user: every event of a user lies in one shard.

A user's shard is a keyed BLAKE2b hash of the id's UTF-8 text modulo the number of shards
(:func:`shard_of`). BLAKE2b is fixed by its standard, so the same id goes to the same shard on
every machine, in every process and with every library version, unlike Python's salted
``hash()`` or polars' ``Series.hash()``. The same function draws the seeded samples of users
(the selection and ranker holdouts, the ranker's groups, the transformer's users): each draw
names its purpose and seed, which key the hash, so that draws are independent of one another
and of the shard. :class:`ShardWriter` appends frames to the shard files
``shard-00000.parquet`` ... one row group per shard and frame, so a dataset larger than memory can
be written a batch at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
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


BUCKETS = 8
"""Item buckets of a map-reduce stage (``dask.buckets``): fixed, not the number of shards, so a
stage writes shards x buckets row groups and a reducer reads one row group of each shard."""


def check_shards(n_shards: int) -> None:
    """Raise :class:`ConfigError` unless ``n_shards`` is 1 or more."""
    if n_shards < 1:
        raise ConfigError(f"the number of shards must be 1 or more, got {n_shards}: pass a "
                          "positive number of shards.")


def shard_of(user_ids: pl.Series, n_shards: int, purpose: str = "shard", seed: int = 0
             ) -> pl.Series:
    """Return the shard of each id: a keyed hash of its text modulo ``n_shards`` (null for null).

    The hash is BLAKE2b of the id's UTF-8 text with an 8-byte digest, read as an unsigned
    big-endian 64-bit integer, keyed by ``<purpose>:<seed>`` (for example ``shard:0``,
    ``holdout:42``, ``group:3:42``). Two purposes or seeds give independent values for the same
    id, unlike a fixed hash of the id with a prefix (a CRC of ``prefix + id`` is the CRC of the id
    XOR a constant of the prefix and the id's length). Each distinct id is hashed once, so the
    cost follows the number of users, not of events.

    Args:
        user_ids: The ids (any type; hashed as text).
        n_shards: The number of values, ``[0, n_shards)``: shards, buckets, or the scale of a
            draw (a user is drawn at rate ``r`` when its value is below ``r * n_shards``).
        purpose: What the value is for; each purpose draws independently of the others.
        seed: The draw's seed.

    Raises:
        ConfigError: If ``n_shards`` is less than 1, or the key is longer than 64 bytes.
    """
    check_shards(n_shards)
    key = f"{purpose}:{seed}".encode()
    if len(key) > hashlib.blake2b.MAX_KEY_SIZE:
        raise ConfigError(f"the hash key {key.decode()!r} is longer than "
                          f"{hashlib.blake2b.MAX_KEY_SIZE} bytes: use a shorter purpose.")
    keyed = hashlib.blake2b(digest_size=8, key=key)
    ids = user_ids.cast(pl.String)
    distinct = ids.drop_nulls().unique()
    digests = []
    for text in distinct:
        digest = keyed.copy()  # the keyed state is set up once, not once per id
        digest.update(text.encode())
        digests.append(digest.digest())
    values = np.frombuffer(b"".join(digests), dtype=">u8") % np.uint64(n_shards)
    shards = pl.Series(values, dtype=pl.UInt64).cast(pl.UInt32)
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
