"""Turn canonical events into the integer sequences a sequential model reads (numpy/pandas only).

Every user becomes one time-ordered sequence of events, stored ragged (CSR): ``offsets[u]`` to
``offsets[u + 1]`` index the user's events in the flat arrays ``items`` (dense item index, 1..n;
0 is padding), ``types`` (event type index, 1..4) and ``gaps`` (bucketised log time gap to the
user's previous event). Models read fixed-width windows of the most recent events, right-padded
with zeros (:func:`padded_tail`), in length-sorted batches (:func:`epoch_plan`) so that a batch
carries little padding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.columns import (
    ATTRIBUTES,
    CATEGORY,
    EVENT_REQUIRED,
    EVENT_TYPE,
    EVENT_TYPES,
    ITEM,
    TIMESTAMP,
    USER,
)
from models.errors import DataError, require_columns

PAD = 0
FIRST_EVENT_BUCKET = 1


def as_pandas(frame: object, name: str) -> pd.DataFrame:
    """Return ``frame`` as a pandas DataFrame (polars frames are converted by ``.to_pandas()``).

    Raises:
        DataError: ``frame`` is neither a pandas DataFrame nor has a ``to_pandas`` method.
    """
    if isinstance(frame, pd.DataFrame):
        return frame
    if hasattr(frame, "to_pandas"):
        return frame.to_pandas()
    raise DataError(
        f"{name} must be a pandas or polars DataFrame; got {type(frame).__name__}. "
        "Load the table with pandas or polars first."
    )


def as_id_series(values: Iterable[object]) -> pd.Series:
    """User or item ids as a pandas Series of strings (ids are strings outside a model)."""
    if isinstance(values, pd.Series):
        series = values
    elif hasattr(values, "to_pandas"):
        series = values.to_pandas()
    else:
        series = pd.Series(list(values), dtype=object)
    return series.astype(str).reset_index(drop=True)


def check_events(events: pd.DataFrame) -> None:
    """Raise a :class:`DataError` unless ``events`` is a non-empty canonical event table."""
    require_columns(events.columns, EVENT_REQUIRED, "events")
    if events.empty:
        raise DataError("the event table is empty: a sequential model needs at least one event.")
    unknown = sorted(set(events[EVENT_TYPE].astype(str).unique()) - set(EVENT_TYPES))
    if unknown:
        raise DataError(
            f"events has event_type values outside {', '.join(EVENT_TYPES)}: "
            f"{', '.join(unknown[:5])}. Map source event names to canonical ones in the adapter."
        )


def time_gap_buckets(seconds: np.ndarray, first: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucketise the gap (in seconds) between each event and the user's previous event.

    Bucket 0 is padding, bucket 1 marks a user's first event, and a gap ``g >= 0`` falls in
    bucket ``2 + floor(log2(1 + g))``, capped at ``n_buckets - 1``.

    Args:
        seconds: Event times in seconds, ordered by user then time (float64, shape ``(E,)``).
        first: True where an event is its user's first (shape ``(E,)``).
        n_buckets: Number of buckets including padding and first-event; at least 3.

    Returns:
        int64 bucket ids of shape ``(E,)``.
    """
    gap = np.diff(seconds, prepend=seconds[:1] if len(seconds) else seconds)
    gap = np.clip(gap, 0.0, None)
    buckets = 2 + np.floor(np.log2(1.0 + gap)).astype(np.int64)
    buckets = np.minimum(buckets, n_buckets - 1)
    buckets[first] = FIRST_EVENT_BUCKET
    return buckets


@dataclass
class Sequences:
    """Users' event sequences, ragged.

    Attributes:
        users: User ids, shape ``(U,)``, sorted.
        offsets: Start of each user's events in the flat arrays, shape ``(U + 1,)``.
        items: Item indices (1..n_items), shape ``(E,)``.
        types: Event type indices (1..len(EVENT_TYPES)), shape ``(E,)``.
        gaps: Time-gap buckets (see :func:`time_gap_buckets`), shape ``(E,)``.
    """

    users: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    types: np.ndarray
    gaps: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Number of events per user, shape ``(U,)``."""
        return np.diff(self.offsets)

    def rows(self, users: pd.Series) -> np.ndarray:
        """Row of each user id in this table; ``-1`` for users it does not hold."""
        return pd.Index(self.users).get_indexer(users.astype(str))


def item_vocabulary(events: pd.DataFrame, extra_items: np.ndarray | None = None) -> np.ndarray:
    """Sorted distinct item ids of the events, then the sorted other ``extra_items``.

    Item index = position + 1. Without ``extra_items``, only items of the history a model is
    fitted on: a catalogue item first seen later (in a validation or test window) would otherwise
    be ranked with an embedding nothing trained. ``extra_items`` are items a model can represent
    without events (by their text); coming after the event items, they leave the event items'
    indices unchanged.
    """
    seen = np.sort(np.asarray(events[ITEM].astype(str).unique(), dtype=str))
    if extra_items is None:
        return seen
    extra = np.setdiff1d(np.asarray(extra_items, dtype=str), seen)  # sorted, distinct
    return np.concatenate([seen, extra])


def item_vector_matrix(ids: np.ndarray, vectors: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """Vectors aligned with the item vocabulary: row ``i`` is item index ``i``.

    Args:
        ids: Item ids of ``vectors``, shape ``(N,)``, distinct.
        vectors: One vector per id, ``(N, D)``.
        item_ids: The item vocabulary from :func:`item_vocabulary`.

    Returns:
        float32 ``(n_items + 1, D)``; row 0 (padding) and items without a vector are zero.
    """
    matrix = np.zeros((len(item_ids) + 1, vectors.shape[1]), dtype=np.float32)
    where = pd.Index(ids).get_indexer(item_ids)  # (n_items,), -1: no vector
    matrix[1:][where >= 0] = vectors[where[where >= 0]]
    return matrix


def build_sequences(events: pd.DataFrame, item_ids: np.ndarray, n_time_buckets: int) -> Sequences:
    """Encode canonical events into :class:`Sequences`.

    Events are ordered by user, then timestamp; events with equal timestamps keep their input
    order. Events of items outside ``item_ids`` are dropped.

    Args:
        events: Canonical events (``user_id, item_id, event_type, timestamp``).
        item_ids: The item vocabulary from :func:`item_vocabulary`.
        n_time_buckets: Number of time-gap buckets (see :func:`time_gap_buckets`).
    """
    frame = pd.DataFrame(
        {
            "u": events[USER].astype(str).to_numpy(),
            "i": pd.Index(item_ids).get_indexer(events[ITEM].astype(str)) + 1,
            "t": pd.Index(EVENT_TYPES).get_indexer(events[EVENT_TYPE].astype(str)) + 1,
            "s": _seconds(events[TIMESTAMP]),
        }
    )
    frame = frame[frame["i"] > 0].sort_values(["u", "s"], kind="stable")
    users, starts = np.unique(frame["u"].to_numpy(), return_index=True)
    offsets = np.append(starts, len(frame)).astype(np.int64)
    first = np.zeros(len(frame), dtype=bool)
    first[starts] = True
    return Sequences(
        users=users.astype(str),
        offsets=offsets,
        items=frame["i"].to_numpy(np.int64),
        types=np.maximum(frame["t"].to_numpy(np.int64), 1),
        gaps=time_gap_buckets(frame["s"].to_numpy(np.float64), first, n_time_buckets),
    )


def _seconds(timestamps: pd.Series) -> np.ndarray:
    """Timestamps as float seconds (datetimes of any unit or numbers)."""
    if pd.api.types.is_datetime64_any_dtype(timestamps):
        values = timestamps.dt.tz_localize(None) if timestamps.dt.tz is not None else timestamps
        return values.astype("datetime64[us]").to_numpy().astype(np.int64) / 1e6
    return pd.to_numeric(timestamps).to_numpy(np.float64)


def padded_tail(
    seqs: Sequences, rows: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Take the last ``width`` events of each selected user, right-padded with zeros.

    Args:
        seqs: The sequences.
        rows: Rows of ``seqs`` to take, shape ``(B,)``.
        width: Window width ``W``.

    Returns:
        ``items, types, gaps`` of shape ``(B, W)`` (int64) and the window lengths ``(B,)``.
    """
    ends = seqs.offsets[rows + 1]
    lengths = np.minimum(ends - seqs.offsets[rows], width)
    cols = np.arange(width)
    real = cols[None, :] < lengths[:, None]
    index = np.where(real, (ends - lengths)[:, None] + cols[None, :], 0)
    arrays = (seqs.items, seqs.types, seqs.gaps)
    out = [np.where(real, a[index] if len(a) else PAD, PAD) for a in arrays]
    return out[0], out[1], out[2], lengths


def seen_pairs(seqs: Sequences, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(position in rows, item index)`` of every event of the selected users (full history).

    Rows equal to ``-1`` (users without history) contribute nothing.
    """
    rows = np.asarray(rows)
    valid = rows >= 0
    starts = np.where(valid, seqs.offsets[np.maximum(rows, 0)], 0)
    counts = np.where(valid, seqs.offsets[np.maximum(rows, 0) + 1] - starts, 0)
    which = np.repeat(np.arange(len(rows)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return which, seqs.items[np.repeat(starts, counts) + within]


@dataclass
class EpochPlan:
    """The batches of one training epoch, as flat arrays plus bounds (cheap to move to a GPU).

    Attributes:
        rows: Training rows of all batches, concatenated, shape ``(R,)``.
        row_bounds: Batch ``b`` holds ``rows[row_bounds[b]:row_bounds[b + 1]]``.
        widths: Columns kept for batch ``b`` (its longest window).
        targets: For each batch, the flat positions ``r * width + j`` of its real targets,
            concatenated; batch ``b`` owns ``targets[target_bounds[b]:target_bounds[b + 1]]``.
        target_bounds: Bounds into ``targets``.
    """

    rows: np.ndarray
    row_bounds: np.ndarray
    widths: np.ndarray
    targets: np.ndarray
    target_bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.widths)


def epoch_plan(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, sort_chunk: int = 8
) -> EpochPlan:
    """Shuffle training rows into batches of similar length.

    Rows are shuffled, cut into chunks of ``sort_chunk`` batches, sorted by length inside each
    chunk and cut into batches; the batch order is then shuffled. Batches keep variety (each
    chunk is a random sample) while a batch's rows have similar lengths, so trimming each batch
    to its longest row removes most padding. The plan depends only on ``rng``'s state.

    Args:
        lengths: Number of targets per training row (>= 1), shape ``(N,)``.
        batch_size: Rows per batch.
        rng: Source of randomness.
        sort_chunk: Batches per length-sorted chunk (1: plain shuffling).
    """
    order = rng.permutation(len(lengths))
    chunk = batch_size * max(sort_chunk, 1)
    parts = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        parts.append(part[np.argsort(-lengths[part], kind="stable")])
    order = np.concatenate(parts) if parts else order
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    batches = [batches[b] for b in rng.permutation(len(batches))]
    widths = np.array([lengths[b].max() for b in batches], dtype=np.int64)
    targets = [
        np.flatnonzero(np.arange(w)[None, :] < lengths[b][:, None])
        for b, w in zip(batches, widths, strict=True)
    ]
    return EpochPlan(
        rows=np.concatenate(batches).astype(np.int64),
        row_bounds=np.cumsum([0] + [len(b) for b in batches]),
        widths=widths,
        targets=np.concatenate(targets).astype(np.int64),
        target_bounds=np.cumsum([0] + [len(t) for t in targets]),
    )


def item_attribute_matrix(
    items: pd.DataFrame | None, item_ids: np.ndarray, max_attributes: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Attribute ids per item (category and ``attributes`` list), zero-padded.

    Args:
        items: Catalogue with ``item_id`` and optional ``category_id`` and ``attributes``
            (a list of values per item); None gives no attributes.
        item_ids: The item vocabulary (item index = position + 1).
        max_attributes: Attributes kept per item (the first ones).

    Returns:
        ``(matrix, names)``: int64 ``(n_items + 1, A)`` of attribute indices (1..len(names); 0 is
        padding; row 0 is the padding item) and the attribute names (``"category:..."`` or
        ``"attr:..."``).
    """
    empty = np.zeros((len(item_ids) + 1, 1), dtype=np.int64), np.array([], dtype=str)
    if items is None:
        return empty
    parts = []
    if CATEGORY in items.columns:
        known = items[items[CATEGORY].notna()]
        names = "category:" + known[CATEGORY].astype(str)
        parts.append(pd.DataFrame({ITEM: known[ITEM], "a": names}))
    if ATTRIBUTES in items.columns:
        exploded = items[[ITEM, ATTRIBUTES]].explode(ATTRIBUTES).dropna()
        names = "attr:" + exploded[ATTRIBUTES].astype(str)
        parts.append(pd.DataFrame({ITEM: exploded[ITEM], "a": names}))
    if not parts:
        return empty
    pairs = pd.concat(parts, ignore_index=True).drop_duplicates()
    pairs["i"] = pd.Index(item_ids).get_indexer(pairs[ITEM].astype(str)) + 1
    pairs = pairs[pairs["i"] > 0]
    if pairs.empty:
        return empty
    names, codes = np.unique(pairs["a"].to_numpy(str), return_inverse=True)
    pairs = pairs.assign(code=codes + 1).sort_values(["i", "code"], kind="stable")
    slot = pairs.groupby("i").cumcount().to_numpy()
    keep = slot < max_attributes
    matrix = np.zeros((len(item_ids) + 1, max(int(slot[keep].max()) + 1, 1)), dtype=np.int64)
    matrix[pairs["i"].to_numpy()[keep], slot[keep]] = pairs["code"].to_numpy()[keep]
    return matrix, names.astype(str)
