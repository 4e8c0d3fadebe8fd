"""Content neighbours: the catalogue items nearest, in text space, to a user's recent items.

The one recommender that can put an item with no events in a list: it reads only the item
vectors of :mod:`models.item_text` and each user's last items. A user's profile is the
recency-weighted sum of the vectors of its ``n_recent`` latest distinct items; a user's best items
are those with the largest inner product with the profile (the cosine times the profile's norm),
found by :func:`models.ann.nearest`: exact products against the whole catalogue below
``exact_below`` items, an approximate HNSW graph from there on. Users without history get
popularity.
"""

from __future__ import annotations

from typing import Self

import numpy as np
import polars as pl

from models.ann import EXACT_BELOW, searcher
from models.base import Recommender, check_events, popularity_table
from models.columns import ITEM, SCORE, TIMESTAMP, USER
from models.errors import ConfigError
from models.item_text import VECTOR
from models.partials import sorted_history

_USERS_PER_BLOCK = 1024  # profiles searched at once


class ContentNeighbours(Recommender):
    """Nearest catalogue items of a user's recent items in content space.

    Args:
        n_recent: The user's latest distinct items that make its profile.
        recency_decay: Weight of the ``r``-th latest item is ``recency_decay ** r``.
        exact_below: Catalogues with fewer items are scored exactly; larger ones through an
            approximate nearest-neighbour (HNSW) graph.

    Call :meth:`with_vectors` (``item_id, vector`` of :func:`models.item_text.encode_items`)
    before :meth:`fit`; the vectors are saved with the model.
    """

    _state_tables = ("vectors_", "recent_", "popularity_", "history_")

    def __init__(self, n_recent: int = 5, recency_decay: float = 0.7,
                 exact_below: int = EXACT_BELOW) -> None:
        self.n_recent = n_recent
        self.recency_decay = recency_decay
        self.exact_below = exact_below

    def with_vectors(self, vectors: pl.DataFrame) -> Self:
        """The catalogue's item vectors; returns ``self``."""
        if VECTOR not in vectors.columns or ITEM not in vectors.columns:
            raise ConfigError("ContentNeighbours needs item vectors (item_id, vector): "
                              "models.item_text.encode_items(items, encoder).")
        self.vectors_ = vectors.select(ITEM, VECTOR)
        return self

    def fit(self, events: pl.DataFrame) -> Self:
        """Keep each user's latest distinct items and the popularity fallback."""
        check_events(events)
        if not hasattr(self, "vectors_"):
            raise ConfigError("ContentNeighbours.fit: call with_vectors(vectors) first.")
        if self.n_recent < 1 or not 0 < self.recency_decay <= 1:
            raise ConfigError(f"n_recent must be >= 1 and recency_decay in (0, 1]; got "
                              f"{self.n_recent}, {self.recency_decay}.")
        latest = (events.group_by(USER, ITEM).agg(pl.col(TIMESTAMP).max())
                  .sort([USER, TIMESTAMP, ITEM], descending=[False, True, False]))
        self.recent_ = (latest.with_columns(pl.int_range(pl.len()).over(USER).alias("r"))
                        .filter(pl.col("r") < self.n_recent)
                        .select(USER, ITEM, (pl.lit(self.recency_decay) ** pl.col("r"))
                                .alias("weight")))
        self.popularity_ = popularity_table(events.group_by(ITEM).len(SCORE))
        self.history_ = sorted_history(events)
        return self

    def among(self, items: pl.Series | None) -> Self:
        """Recommend only ``items`` (None: every item with a vector); profiles use them all.

        What lets a caller ask for the best items nobody has touched yet, say, without a
        second model: a user's profile still comes from its recent items.
        """
        self.among_ = None if items is None else items.cast(pl.String)
        return self

    def _score(self, users: pl.DataFrame) -> pl.DataFrame | None:
        items = self.vectors_[ITEM]
        matrix = self.vectors_[VECTOR].to_numpy().astype(np.float32, copy=False)
        allowed = np.arange(items.len())  # the rows that may be recommended
        if getattr(self, "among_", None) is not None:
            allowed = np.flatnonzero(
                items.cast(pl.String).is_in(self.among_.implode()).to_numpy())
            if allowed.size == 0:
                return None
        code = pl.DataFrame({ITEM: items, "code": np.arange(items.len(), dtype=np.int64)})
        recent = (self.recent_.join(users.select(USER, "depth"), on=USER)
                  .join(code, on=ITEM).sort(USER, "code"))  # a fixed order: same sums every run
        if recent.height == 0:
            return None
        _, first = np.unique(recent[USER].to_numpy(), return_index=True)  # recent is sorted
        users_of, depths = recent[USER].gather(first), recent["depth"].to_numpy()[first]
        bounds = np.append(first, recent.height)
        codes, weights = recent["code"].to_numpy(), recent["weight"].to_numpy().astype(np.float32)
        search = searcher(matrix[allowed], exact_below=self.exact_below)
        frames = []
        for start in range(0, first.size, _USERS_PER_BLOCK):
            stop = min(start + _USERS_PER_BLOCK, first.size)
            profile = np.zeros((stop - start, matrix.shape[1]), dtype=np.float32)
            for row, index in enumerate(range(start, stop)):
                lo, hi = bounds[index], bounds[index + 1]
                profile[row] = weights[lo:hi] @ matrix[codes[lo:hi]]
            depth = depths[start:stop]
            found, scores = search(profile, int(depth.max()))  # (users, depth) best first
            keep = (np.arange(found.shape[1]) < depth[:, None]) & (scores > 0)
            rows = np.repeat(np.arange(start, stop), keep.sum(axis=1))
            frames.append(pl.DataFrame({USER: users_of.gather(rows),
                                        ITEM: items.gather(allowed[found[keep]]),
                                        SCORE: scores[keep].astype(np.float64)}))
        return pl.concat(frames) if frames else None
