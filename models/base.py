"""What every shoprank recommender shares: the interface, persistence and the top-K builder.

A recommender follows the scikit-learn habit: ``__init__`` stores hyper-parameters only, ``fit``
learns state into attributes whose names end in ``_`` and returns ``self``. Learned state is a
few polars tables (:attr:`Recommender._state_tables`); :meth:`Recommender.save` writes them as
Parquet next to a JSON file of the hyper-parameters, so a saved model is plain data, never pickled
code.

:func:`top_k_with_fallback` turns personal scores into the ``recommend`` output: it removes
excluded items, keeps each user's best ``k`` and fills the rest of the list from a popularity
ranking, all with columnar operations over every user at once.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import polars as pl

from models.columns import EVENT_REQUIRED, EVENT_TYPE, EVENT_TYPES, ITEM, RANK, SCORE, USER
from models.errors import ConfigError, DataError, ShoprankError, require_columns

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
POP_RANK = "pop_rank"
_FORMAT_VERSION = 1


class NotFittedError(ShoprankError):
    """A recommender was used before ``fit`` (or ``load``)."""


class IdIndex:
    """A fixed mapping between string ids and dense integer indices ``0..n-1``.

    Args:
        ids: The ids to index, in the order that defines their indices (duplicates are dropped,
            keeping the first occurrence).
    """

    def __init__(self, ids: Sequence[str] | pl.Series) -> None:
        self.ids = pl.Series("id", ids, dtype=pl.String).unique(maintain_order=True)
        self._frame = pl.DataFrame({"id": self.ids, "index": np.arange(len(self.ids))})

    def __len__(self) -> int:
        return len(self.ids)

    def to_index(self, ids: Sequence[str] | pl.Series) -> np.ndarray:
        """Return the indices of ``ids`` (int64); ids not in the index map to ``-1``."""
        query = pl.DataFrame({"id": pl.Series(ids, dtype=pl.String)})
        found = query.join(self._frame, on="id", how="left", maintain_order="left")
        return found["index"].fill_null(-1).to_numpy().astype(np.int64)

    def to_ids(self, index: np.ndarray | Sequence[int]) -> pl.Series:
        """Return the ids at positions ``index`` (all must be in ``0..n-1``)."""
        return self.ids.gather(np.asarray(index, dtype=np.int64))

    def save(self, path: Path) -> None:
        """Write the ids, in index order, to a Parquet file."""
        self._frame.select("id").write_parquet(path)

    @classmethod
    def load(cls, path: Path) -> IdIndex:
        """Read an index written by :meth:`save`."""
        return cls(pl.read_parquet(path)["id"])


class Recommender:
    """Base of the recommenders: ``fit`` / ``recommend`` / ``save`` / ``load``.

    Subclasses implement :meth:`fit` and :meth:`_score` and list their learned tables in
    ``_state_tables``. Every learned table is a :class:`polars.DataFrame`; two are required:
    ``history_`` (``user_id, item_id``: what ``exclude_seen`` removes) and ``popularity_`` (from
    :func:`popularity_table`: the fallback and fill).
    """

    _state_tables: tuple[str, ...] = ()
    _fill_below: bool = True

    def fit(self, events: pl.DataFrame) -> Self:
        """Learn from canonical events; returns ``self``."""
        raise NotImplementedError

    def recommend(
        self, users: Sequence[str] | pl.Series, k: int = 10, exclude_seen: bool = False
    ) -> pl.DataFrame:
        """Top-``k`` items per user.

        Args:
            users: User ids (duplicates are answered once). Users unknown to the fitted data get
                the model's fallback (popularity).
            k: List length. Fewer rows come back only when the catalogue, minus the excluded
                items, is smaller than ``k``.
            exclude_seen: Remove the items of each user's fitted history from the ranking; the
                list is filled with the next best items.

        Returns:
            ``user_id, item_id, score, rank`` sorted by user then rank (1..k). ``score`` does not
            increase with rank: positive for personal evidence, in ``[-1, 0]`` for the
            popularity fill of models with personal scores.
        """
        self._check_fitted()
        if k < 1:
            raise ConfigError(f"k must be a positive integer; got {k}.")
        user_frame = pl.DataFrame({USER: pl.Series(users, dtype=pl.String)}).unique()
        exclude = None
        if exclude_seen:
            exclude = self.history_.join(user_frame, on=USER, how="semi")
        personal = self._score(list_depth(user_frame, exclude, k))
        return top_k_with_fallback(
            user_frame, personal, self.popularity_, k, exclude, fill_below=self._fill_below
        )

    def _score(self, users: pl.DataFrame) -> pl.DataFrame | None:
        """Personal ``user_id, item_id, score`` (score > 0) for ``users``; None for none.

        ``users`` has ``user_id`` and ``depth``: returning each user's best ``depth`` items
        (ties included) is enough, as at most ``depth - k`` of them are excluded.
        """
        raise NotImplementedError

    def get_params(self) -> dict[str, Any]:
        """Return the hyper-parameters given to ``__init__`` (scikit-learn style)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def save(self, path: Path) -> None:
        """Write hyper-parameters (JSON) and learned tables (Parquet) into the folder ``path``."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "class": type(self).__name__,
            "format_version": _FORMAT_VERSION,
            "params": self.get_params(),
            "tables": list(self._state_tables),
        }
        (path / PARAMS_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name in self._state_tables:
            getattr(self, name).write_parquet(path / f"{name.rstrip('_')}.parquet")
        logger.info("saved %s to %s", type(self).__name__, path)

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read a model written by :meth:`save` of the same class."""
        path = Path(path)
        meta_file = path / PARAMS_FILE
        if not meta_file.is_file():
            raise DataError(
                f"{path} is not a saved model folder: {PARAMS_FILE} is missing. "
                "Give the folder that save() wrote."
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("class") != cls.__name__:
            raise DataError(
                f"{path} holds a saved {meta.get('class')!r}, not a {cls.__name__!r}. "
                f"Load it with {meta.get('class')}.load()."
            )
        model = cls(**meta["params"])
        for name in cls._state_tables:
            setattr(model, name, pl.read_parquet(path / f"{name.rstrip('_')}.parquet"))
        return model

    def _check_fitted(self) -> None:
        if not all(hasattr(self, name) for name in self._state_tables):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted: call fit(events) or "
                f"{type(self).__name__}.load(path) before recommend() or save()."
            )


def check_events(events: pl.DataFrame) -> None:
    """Raise a :class:`DataError` unless ``events`` is a non-empty canonical event table."""
    require_columns(events.columns, EVENT_REQUIRED, "events")
    if events.is_empty():
        raise DataError("the event table is empty: a recommender needs at least one event.")
    unknown = events.select(pl.col(EVENT_TYPE).unique()).filter(
        ~pl.col(EVENT_TYPE).is_in(list(EVENT_TYPES))
    )
    if not unknown.is_empty():
        examples = ", ".join(map(str, unknown[EVENT_TYPE].head(5).to_list()))
        raise DataError(
            f"events has event_type values outside {', '.join(EVENT_TYPES)}: {examples}. "
            "Map source event names to canonical ones in the adapter."
        )


def check_event_weights(weights: Mapping[str, float], name: str = "event_weights") -> None:
    """Raise a :class:`ConfigError` unless ``weights`` maps canonical event types to values >= 0."""
    bad = {t: w for t, w in weights.items() if t not in EVENT_TYPES or w < 0}
    if bad or not any(w > 0 for w in weights.values()):
        raise ConfigError(
            f"{name} must map event types among {', '.join(EVENT_TYPES)} to weights >= 0, at "
            f"least one positive; got {dict(weights)}."
        )


def event_weight_expr(weights: Mapping[str, float]) -> pl.Expr:
    """Expression giving each event its weight; types missing from ``weights`` weigh 0."""
    return (
        pl.col(EVENT_TYPE)
        .replace_strict(dict(weights), default=0.0, return_dtype=pl.Float64)
        .alias("weight")
    )


def popularity_table(scores: pl.DataFrame, tiebreak: str | None = None) -> pl.DataFrame:
    """Order ``item_id, score`` into ``item_id, score, pop_rank`` (1 = most popular).

    Ties are broken by the column ``tiebreak`` (descending) when given, then by item id, so the
    ranking is deterministic.
    """
    by = [SCORE] + ([tiebreak] if tiebreak else [])
    ordered = scores.sort([*by, ITEM], descending=[True] * len(by) + [False])
    return ordered.select(
        ITEM,
        pl.col(SCORE).cast(pl.Float64),
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias(POP_RANK),
    )


def list_depth(users: pl.DataFrame, exclude: pl.DataFrame | None, k: int) -> pl.DataFrame:
    """``user_id, depth``: how far down any ranking to read to find ``k`` allowed items.

    A user with ``n`` excluded items finds ``k`` allowed ones among the first ``k + n`` of any
    ranking of distinct items (if it holds that many).
    """
    if exclude is None:
        return users.select(USER, pl.lit(k, dtype=pl.Int64).alias("depth"))
    counts = exclude.select(USER, ITEM).unique().group_by(USER).agg(pl.len().alias("n"))
    return (
        users.select(USER)
        .join(counts, on=USER, how="left")
        .select(USER, (pl.col("n").fill_null(0).cast(pl.Int64) + k).alias("depth"))
    )


def top_k_with_fallback(
    users: pl.DataFrame,
    personal: pl.DataFrame | None,
    popularity: pl.DataFrame,
    k: int,
    exclude: pl.DataFrame | None = None,
    fill_below: bool = True,
) -> pl.DataFrame:
    """Build the ``recommend`` output for ``users``.

    Each user gets its best ``k`` personal items (score > 0, excluded items removed) followed by
    the most popular items it does not already have and has not excluded.

    Args:
        users: One column ``user_id``, distinct.
        personal: ``user_id, item_id, score`` or None.
        popularity: ``item_id, score, pop_rank`` from :func:`popularity_table`.
        k: List length.
        exclude: ``user_id, item_id`` pairs never to return.
        fill_below: Give fill rows the score ``popularity / max popularity - 1`` (in
            ``[-1, 0]``) so scores decrease with rank throughout; otherwise the raw popularity.

    Returns:
        ``user_id, item_id, score, rank`` sorted by user and rank.
    """
    empty_pairs = pl.DataFrame(schema={USER: pl.String, ITEM: pl.String})
    exclude = empty_pairs if exclude is None else exclude.select(USER, ITEM).unique()
    top = _top_personal(users, personal, exclude, k)
    blocked = pl.concat([exclude, top.select(USER, ITEM)])
    need = list_depth(users, exclude, k).with_columns(
        pl.col("depth").clip(upper_bound=popularity.height)
    )
    max_pop = popularity[SCORE].max() if popularity.height else None
    scale, shift = 1.0, 0.0
    if fill_below:
        scale, shift = (1.0 / max_pop if max_pop else 0.0), -1.0
    fill = (
        need.select(USER, pl.int_ranges(1, pl.col("depth") + 1).alias(POP_RANK))
        .explode(POP_RANK)
        .join(popularity, on=POP_RANK, how="inner")
        .join(blocked, on=[USER, ITEM], how="anti")
        .select(USER, ITEM, (pl.col(SCORE) * scale + shift).alias(SCORE), pl.col(POP_RANK))
    )
    both = pl.concat(
        [top.with_columns(pl.lit(0, dtype=pl.Int64).alias(POP_RANK)), fill], how="vertical"
    )
    return (
        both.sort([USER, SCORE, POP_RANK, ITEM], descending=[False, True, False, False])
        .with_columns(pl.int_range(1, pl.len() + 1).over(USER).cast(pl.Int64).alias(RANK))
        .filter(pl.col(RANK) <= k)
        .select(USER, ITEM, pl.col(SCORE).cast(pl.Float64), RANK)
    )


def _top_personal(
    users: pl.DataFrame, personal: pl.DataFrame | None, exclude: pl.DataFrame, k: int
) -> pl.DataFrame:
    """Each user's best ``k`` personal items (positive scores only, ``exclude`` removed)."""
    if personal is None or personal.is_empty():
        return pl.DataFrame(schema={USER: pl.String, ITEM: pl.String, SCORE: pl.Float64})
    return (
        personal.select(USER, ITEM, pl.col(SCORE).cast(pl.Float64))
        .filter(pl.col(SCORE) > 0)
        .join(users, on=USER, how="semi")
        .join(exclude, on=[USER, ITEM], how="anti")
        # a numeric per-user rank first (cheap), the full sort only on what survives it
        .filter(pl.col(SCORE).rank("min", descending=True).over(USER) <= k)
        .sort([USER, SCORE, ITEM], descending=[False, True, False])
        .filter(pl.int_range(pl.len()).over(USER) < k)
    )
