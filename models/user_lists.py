"""Every known user's top list, precomputed once and read through memory-mapped arrays.

A served model answers a known user from this table instead of running the model: the lists are
built when the bundle is written (:meth:`UserLists.build`), to a depth of ``serve.max_k`` plus a
slack for exclusions, and stored in compressed-sparse-row form in a folder:

* ``offsets.npy``: ``int64[n_users + 1]``, user ``r``'s list is ``offsets[r]:offsets[r + 1]``;
* ``codes.npy``: ``int32[n_entries]``, positions in ``vocabulary.parquet``;
* ``scores.npy``: ``float64[n_entries]``, the model's scores (non-increasing within a list);
* ``users.parquet`` / ``vocabulary.parquet``: the user ids (row order) and item ids (code order);
  ``vocabulary.npy``: the item ids again as fixed-width bytes, memory-mapped (:class:`Vocabulary`).

:meth:`UserLists.open` memory-maps the arrays: opening costs the user index only, whatever the
number of users, and every server worker process shares the same pages of the operating system's
file cache. Memory on disk and in the cache: ``n_entries * 12`` bytes plus the ids.

:class:`UserItems` stores each known user's distinct history items the same way (``offsets.npy``,
``codes.npy``: ``int32`` positions in a sorted ``vocabulary.parquet``, 4 bytes a distinct
(user, item) pair), in the row order of the users of the lists it goes with; the served model
reads it to tell a live session's new items from those the model has already seen.

Each folder also holds ``index.npy``: the user ids sorted, as fixed-width UTF-8 bytes, beside
``index_rows.npy`` (each sorted id's row): :class:`IdIndex` memory-maps them and finds a user by
binary search, so that opening lists of millions of users builds no table in each server process
(lists written before the index existed get one built in memory when opened).

Lists computed elsewhere, a part per shard of users (:func:`write_part`), are merged into the same
files a part at a time (:meth:`UserLists.merge_parts`, :meth:`UserItems.merge_parts`): memory is
bounded by one part, not by the number of users.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from models.columns import ITEM, RANK, SCORE, USER
from models.errors import DataError, require_columns

logger = logging.getLogger(__name__)

Recommend = Callable[[list[str], int], Any]
"""``recommend(users, k)``: a model's lists as ``user_id, item_id, score, rank`` (any frame)."""


def as_lists_frame(frame: Any) -> pl.DataFrame:
    """A model's ``recommend`` output (polars or pandas) as ``user_id, item_id, score, rank``."""
    if not isinstance(frame, pl.DataFrame):
        frame = pl.from_pandas(frame)
    return frame.select(
        pl.col(USER).cast(pl.String),
        pl.col(ITEM).cast(pl.String),
        pl.col(SCORE).cast(pl.Float64),
        pl.col(RANK).cast(pl.Int64),
    )


class IdIndex:
    """Ids found by binary search in a sorted array of fixed-width UTF-8 bytes.

    Args:
        ids: The ids sorted, as a NumPy bytes array (``S<width>``, memory-mapped or not).
        rows: The row of each sorted id (None: the row is the position).
    """

    def __init__(self, ids: np.ndarray, rows: np.ndarray | None = None) -> None:
        # plain views of memory-maps: indexing a np.memmap costs ~10x more per call
        self.ids = np.asarray(ids)
        self.rows = None if rows is None else np.asarray(rows)
        self.width = ids.dtype.itemsize

    @staticmethod
    def encode(ids: pl.Series) -> np.ndarray:
        """``ids`` as a NumPy array of fixed-width UTF-8 bytes (their order kept)."""
        raw = [i.encode() for i in ids.cast(pl.String).fill_null("").to_list()]
        return np.array(raw, dtype=f"S{max((len(i) for i in raw), default=1) or 1}")

    @classmethod
    def build(cls, ids: pl.Series) -> IdIndex:
        """The index of distinct ``ids`` whose rows are their positions in ``ids``."""
        order = ids.cast(pl.String).arg_sort().to_numpy()
        return cls(cls.encode(ids.cast(pl.String).gather(order)), order.astype(np.int64))

    def save(self, folder: Path, name: str = "index") -> None:
        """Write ``<name>.npy`` (and ``<name>_rows.npy``) into ``folder``."""
        np.save(Path(folder) / f"{name}.npy", self.ids)
        if self.rows is not None:
            np.save(Path(folder) / f"{name}_rows.npy", self.rows)

    @classmethod
    def open(cls, folder: Path, name: str = "index") -> IdIndex | None:
        """Memory-map an index written by :meth:`save`; None where the folder has none."""
        folder = Path(folder)
        if not (folder / f"{name}.npy").is_file():
            return None
        rows = folder / f"{name}_rows.npy"
        return cls(np.load(folder / f"{name}.npy", mmap_mode="r"),
                   np.load(rows, mmap_mode="r") if rows.is_file() else None)

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, key: str) -> int | None:
        """The row of ``key``; None when it is not indexed."""
        raw = key.encode() if isinstance(key, str) else None
        if raw is None or len(raw) > self.width or not len(self.ids):
            return None
        at = int(np.searchsorted(self.ids, raw))
        if at >= len(self.ids) or self.ids[at] != raw:
            return None
        return at if self.rows is None else int(self.rows[at])

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


class Vocabulary:
    """Item ids by code, as a lists or history folder keeps them.

    ``vocabulary.parquet`` holds the ids; ``vocabulary.npy`` the same ids as fixed-width UTF-8
    bytes (:meth:`IdIndex.encode`), memory-mapped by :meth:`open` so that a server process reads
    the names it needs instead of holding every id as a Python string; the Parquet file is read
    only when :attr:`strings` is asked for (a folder written before the bytes existed is read
    whole, and :attr:`names` is None).

    Args:
        ids: The ids by code, or the Parquet file that holds them.
        names: The ids as fixed-width bytes, or None.
    """

    def __init__(self, ids: pl.Series | Path, names: np.ndarray | None = None) -> None:
        self._strings = ids.to_numpy() if isinstance(ids, pl.Series) else None
        self._file = ids if isinstance(ids, Path) else None
        self.names = None if names is None else np.asarray(names)  # a plain view (IdIndex)

    @property
    def strings(self) -> np.ndarray:
        """The ids by code as Python strings."""
        if self._strings is None:
            self._strings = pl.read_parquet(self._file)[ITEM].to_numpy()
        return self._strings

    @staticmethod
    def write(folder: Path, ids: pl.Series) -> None:
        """Write ``ids`` as ``vocabulary.parquet`` and ``vocabulary.npy`` into ``folder``."""
        ids = ids.cast(pl.String).alias(ITEM)
        ids.to_frame().write_parquet(Path(folder) / "vocabulary.parquet")
        np.save(Path(folder) / "vocabulary.npy", IdIndex.encode(ids))

    @classmethod
    def open(cls, folder: Path) -> Vocabulary:
        """The vocabulary :meth:`write` wrote into ``folder`` (its bytes memory-mapped)."""
        folder = Path(folder)
        names = folder / "vocabulary.npy"
        if not names.is_file():
            return cls(pl.read_parquet(folder / "vocabulary.parquet")[ITEM])
        return cls(folder / "vocabulary.parquet", np.load(names, mmap_mode="r"))


class UserLists:
    """Top lists of known users (see the module docstring).

    Args:
        users: User ids, in row order.
        offsets: Start of each user's list in ``codes``/``scores`` (length ``len(users) + 1``).
        codes: Item codes (positions in ``vocabulary``), list after list.
        scores: The model's score of each entry.
        vocabulary: Item ids by code (a :class:`Vocabulary` when read from a folder: :meth:`get`
            then reads its memory-mapped names).
        index: The users' :class:`IdIndex` (built from ``users`` when None).
    """

    def __init__(self, users: pl.Series, offsets: np.ndarray, codes: np.ndarray,
                 scores: np.ndarray, vocabulary: pl.Series | Vocabulary,
                 index: IdIndex | None = None) -> None:
        self.users = users
        self.offsets = offsets
        self.codes = codes
        self.scores = scores
        self._vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)
        self.depth = int(np.diff(offsets).max()) if len(offsets) > 1 else 0
        self._rows = index if index is not None else IdIndex.build(users)

    @property
    def vocabulary(self) -> np.ndarray:
        """Item ids by code (Python strings)."""
        return self._vocab.strings

    @property
    def _names(self) -> np.ndarray | None:
        return self._vocab.names

    def __contains__(self, user: str) -> bool:
        return user in self._rows

    def __len__(self) -> int:
        return self.users.len()

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays (what the lists cost in memory when every page is read)."""
        return int(self.offsets.nbytes + self.codes.nbytes + self.scores.nbytes)

    def row(self, user: str) -> int | None:
        """The row of ``user`` (the position in ``users``), None for an unknown user."""
        return self._rows.get(user)

    def get(self, user: str) -> list[tuple[str, float]]:
        """``[(item_id, score), ...]`` of a known user, best first (empty for unknown users)."""
        row = self._rows.get(user)
        if row is None:
            return []
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        codes = self.codes[start:end]
        items = (self.vocabulary[codes].tolist() if self._names is None
                 else [name.decode() for name in self._names[codes].tolist()])
        return list(zip(items, self.scores[start:end].tolist(), strict=True))

    # ------------------------------------------------------------------ building and files
    @classmethod
    def compute(cls, recommend: Recommend, users: pl.Series, items: pl.Series, depth: int,
                chunk: int = 20_000) -> UserLists:
        """Ask ``recommend`` for every user's top ``depth``, ``chunk`` users at a time.

        ``items`` seeds the vocabulary; items a model returns beyond it are appended.
        """
        users = users.cast(pl.String).unique(maintain_order=True)
        vocab = pl.DataFrame({ITEM: items.cast(pl.String).unique(maintain_order=True)})
        vocab = vocab.with_row_index("code")
        order = pl.DataFrame({USER: users}).with_row_index("row")
        counts, codes, scores = np.zeros(users.len(), np.int64), [], []
        for start in range(0, users.len(), chunk):
            part = users.slice(start, chunk)
            recs = as_lists_frame(recommend(part.to_list(), depth))
            extra = recs.select(ITEM).unique().join(vocab, on=ITEM, how="anti").sort(ITEM)
            if extra.height:
                vocab = pl.concat([vocab, extra.with_row_index("code", offset=vocab.height)
                                   .select("code", ITEM)])
            recs = (recs.join(order, on=USER).join(vocab, on=ITEM)
                    .sort("row", RANK).select("row", "code", SCORE))
            np.add.at(counts, recs["row"].to_numpy(), 1)
            codes.append(recs["code"].to_numpy().astype(np.int32))
            scores.append(recs[SCORE].to_numpy().astype(np.float64))
            logger.info("precomputed lists of %d / %d users", min(start + chunk, users.len()),
                        users.len())
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(users, offsets, _concat(codes, np.int32), _concat(scores, np.float64),
                   vocab[ITEM])

    def save(self, folder: Path) -> None:
        """Write the lists into ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "offsets.npy", np.asarray(self.offsets))
        np.save(folder / "codes.npy", np.asarray(self.codes))
        np.save(folder / "scores.npy", np.asarray(self.scores))
        pl.DataFrame({USER: self.users}).write_parquet(folder / "users.parquet")
        Vocabulary.write(folder, pl.Series(ITEM, self.vocabulary, dtype=pl.String))
        self._rows.save(folder)

    @classmethod
    def open(cls, folder: Path) -> UserLists:
        """Memory-map lists written by :meth:`save`, their user index and item names too.

        Lists written before the index and the names existed get them in memory.
        """
        folder = Path(folder)
        return cls(
            pl.read_parquet(folder / "users.parquet")[USER],
            np.load(folder / "offsets.npy", mmap_mode="r"),
            np.load(folder / "codes.npy", mmap_mode="r"),
            np.load(folder / "scores.npy", mmap_mode="r"),
            Vocabulary.open(folder),
            IdIndex.open(folder),
        )

    @classmethod
    def merge_parts(cls, parts: Sequence[Path], items: pl.Series, folder: Path) -> UserLists:
        """Merge list parts (:func:`write_part`) into ``folder``, a part at a time; open them.

        Rows follow the parts, then the users' order within a part; a user must be in one part
        only. ``items`` seeds the vocabulary, items beyond it are appended (as :meth:`compute`).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = pl.DataFrame({ITEM: items.cast(pl.String).unique(maintain_order=True)})
        vocab = vocab.with_row_index("code")
        users, counts = [], []
        with _NpyWriter(folder / "codes.npy", np.int32) as codes, \
                _NpyWriter(folder / "scores.npy", np.float64) as scores:
            for part in parts:
                recs = as_lists_frame(pl.read_parquet(part)).sort(USER, RANK)
                extra = recs.select(ITEM).unique().join(vocab, on=ITEM, how="anti").sort(ITEM)
                if extra.height:
                    vocab = pl.concat([vocab, extra.with_row_index("code", offset=vocab.height)
                                       .select("code", ITEM)])
                recs = recs.join(vocab, on=ITEM, maintain_order="left")
                codes.append(recs["code"].to_numpy())
                scores.append(recs[SCORE].to_numpy())
                sizes = recs.group_by(USER, maintain_order=True).len()
                users.append(sizes[USER])
                counts.append(sizes["len"].to_numpy())
        known = pl.concat(users) if users else pl.Series(USER, [], pl.String)
        if known.n_unique() != known.len():
            raise DataError(f"list parts {', '.join(str(p) for p in parts)} give a user more than "
                            "one list: each user's list must be in one part only.")
        np.save(folder / "offsets.npy", np.concatenate([[0], np.cumsum(_concat(counts, np.int64))])
                .astype(np.int64))
        pl.DataFrame({USER: known}).write_parquet(folder / "users.parquet")
        Vocabulary.write(folder, vocab[ITEM])
        IdIndex.build(known).save(folder)
        return cls.open(folder)


def write_part(frame: Any, path: Path) -> Path:
    """Write a part of the lists (``user_id, item_id, score, rank``) to ``path``, whole or not.

    Written beside the target and renamed, so that a process killed while writing leaves no
    part that a merge would read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    as_lists_frame(frame).write_parquet(partial)
    os.replace(partial, path)
    return path


class _NpyWriter:
    """A 1-D ``.npy`` file written chunk by chunk, its length known only at the end."""

    def __init__(self, path: Path, dtype: type) -> None:
        self.path, self.dtype, self.length = Path(path), np.dtype(dtype), 0
        self._raw = self.path.with_name(f".{self.path.name}.raw")

    def __enter__(self) -> _NpyWriter:
        self._file = self._raw.open("wb")
        return self

    def append(self, values: np.ndarray) -> None:
        """Add ``values`` (cast to the file's type) at the end."""
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.length += len(values)

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        self._file.close()
        if kind is None:
            with self.path.open("wb") as out, self._raw.open("rb") as raw:
                header = {"descr": np.lib.format.dtype_to_descr(self.dtype),
                          "fortran_order": False, "shape": (self.length,)}
                np.lib.format.write_array_header_1_0(out, header)
                shutil.copyfileobj(raw, out, 1 << 24)
        self._raw.unlink(missing_ok=True)


class UserItems:
    """Each user's distinct known items, by row (see the module docstring).

    Args:
        offsets: Start of each row's items in ``codes`` (length ``n_rows + 1``).
        codes: Item codes (positions in ``vocabulary``), ascending within a row.
        vocabulary: Item ids, sorted (a :class:`Vocabulary` when read from a folder:
            :meth:`unseen` then searches its memory-mapped names).
    """

    def __init__(self, offsets: np.ndarray, codes: np.ndarray,
                 vocabulary: pl.Series | Vocabulary) -> None:
        self.offsets = offsets
        self.codes = codes
        self._vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)

    @property
    def vocabulary(self) -> np.ndarray:
        """Item ids, sorted (Python strings): looked up by binary search."""
        return self._vocab.strings

    @property
    def _names(self) -> np.ndarray | None:
        return self._vocab.names

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the two arrays."""
        return int(self.offsets.nbytes + self.codes.nbytes)

    def unseen(self, row: int, items: Sequence[str]) -> list[str]:
        """The ``items`` (order and repeats kept) that are not among row ``row``'s items."""
        if not items:
            return []
        if self._names is None:
            known, wanted = self.vocabulary, np.asarray(items, dtype=object)
            fits = np.ones(len(items), dtype=bool)
        else:  # bytes of the names' own width (another type would copy the names at each call)
            known, raw = self._names, [str(item).encode() for item in items]
            fits = np.array([len(r) <= known.dtype.itemsize for r in raw])  # longer: unknown
            wanted = np.array([r if ok else b"" for r, ok in zip(raw, fits, strict=True)],
                              dtype=known.dtype)
        at = np.searchsorted(known, wanted)  # each item's code, where it is known
        found = fits & (at < len(known))
        found[found] = known[at[found]] == wanted[found]
        codes = self.codes[int(self.offsets[row]):int(self.offsets[row + 1])]
        place = np.searchsorted(codes, at)
        found &= place < len(codes)
        found[found] = codes[place[found]] == at[found]
        return [item for item, known in zip(items, found.tolist(), strict=True) if not known]

    @classmethod
    def build(cls, users: pl.Series, history: pl.DataFrame) -> UserItems:
        """The distinct items of ``history`` (``user_id, item_id``) of each of ``users``.

        Rows follow ``users`` (distinct, first occurrence first, as :meth:`UserLists.compute`
        orders them); a user without history has no items, history of other users is ignored.
        """
        require_columns(history.columns, (USER, ITEM), "history")
        users = users.cast(pl.String).unique(maintain_order=True)
        pairs = history.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String))
        pairs = pairs.drop_nulls().unique()
        vocab = pairs[ITEM].unique().sort()
        order = pl.DataFrame({USER: users}).with_row_index("row")
        coded = (pairs.join(order, on=USER)
                 .join(pl.DataFrame({ITEM: vocab}).with_row_index("code"), on=ITEM)
                 .sort("row", "code"))
        counts = np.bincount(coded["row"].to_numpy(), minlength=users.len())
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(offsets, coded["code"].to_numpy().astype(np.int32), vocab)

    def save(self, folder: Path) -> None:
        """Write the items into ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "offsets.npy", np.asarray(self.offsets))
        np.save(folder / "codes.npy", np.asarray(self.codes))
        Vocabulary.write(folder, pl.Series(ITEM, self.vocabulary, dtype=pl.String))

    @classmethod
    def open(cls, folder: Path) -> UserItems:
        """Memory-map items written by :meth:`save` (their names too, when written)."""
        folder = Path(folder)
        return cls(np.load(folder / "offsets.npy", mmap_mode="r"),
                   np.load(folder / "codes.npy", mmap_mode="r"), Vocabulary.open(folder))

    @classmethod
    def merge_parts(cls, parts: Iterable[tuple[pl.Series, pl.DataFrame]], items: pl.Series,
                    folder: Path) -> UserItems:
        """Each part's users' distinct history items, a part at a time, into ``folder``.

        ``parts``: ``(users, history)`` pairs, users in the row order of the lists they go with
        (:meth:`UserLists.merge_parts`); ``items`` must hold every history item (the vocabulary,
        sorted here). Memory: one part and the vocabulary.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = items.cast(pl.String).unique().sort()
        coder = pl.DataFrame({ITEM: vocab}).with_row_index("code")
        counts = []
        with _NpyWriter(folder / "codes.npy", np.int32) as codes:
            for users, history in parts:
                part = cls.build(users, history)
                known = pl.Series(ITEM, part.vocabulary, pl.String)
                missing = known.to_frame().join(coder, on=ITEM, how="anti")
                if missing.height:
                    raise DataError(f"{missing.height} history items are not in the items given "
                                    f"(first: {missing[ITEM][0]!r}): give every known item.")
                recode = pl.DataFrame({ITEM: known}).join(coder, on=ITEM, maintain_order="left")
                codes.append(recode["code"].to_numpy()[np.asarray(part.codes)])
                counts.append(np.diff(part.offsets))
        np.save(folder / "offsets.npy", np.concatenate([[0], np.cumsum(_concat(counts, np.int64))])
                .astype(np.int64))
        Vocabulary.write(folder, vocab)
        return cls.open(folder)


def _concat(parts: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def blend(model: Sequence[tuple[str, float]], session: Sequence[tuple[str, float]],
          weight: float, offset: float = 10.0) -> list[tuple[str, float]]:
    """Fuse a model's list with a live session's list by weighted reciprocal rank.

    Each item scores ``(1 - weight) / (offset + model_rank) + weight / (offset + session_rank)``
    (a term is 0 where the item is not in that list). Ties keep the model's order, then the
    session's. ``weight`` 0 returns the model's order, 1 the session's.
    """
    fused: dict[str, float] = {}
    for rank, (item, _) in enumerate(model, start=1):
        fused[item] = (1.0 - weight) / (offset + rank)
    for rank, (item, _) in enumerate(session, start=1):
        fused[item] = fused.get(item, 0.0) + weight / (offset + rank)
    # by score, then first appearance (the model's order, then the session's)
    ranked = sorted(zip([-score for score in fused.values()], range(len(fused)), fused,
                        strict=True))
    return [(item, -negated) for negated, _, item in ranked]
