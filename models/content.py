"""Content neighbours: the catalogue items nearest, in text space, to a user's recent items.

The one recommender that can put an item with no events in a list: it reads only the item
vectors of :mod:`models.item_text` and each user's last items. A user's profile is the
recency-weighted sum of the vectors of its ``n_recent`` latest distinct items; every catalogue
item is scored by its cosine with the profile (exact blocked matrix products: a block of users
against the whole catalogue at a time, at most 2^25 scores, 128 MiB, held at once). Users without
history get popularity. A large catalogue would want an ANN index here; not needed yet.
"""

from __future__ import annotations

from typing import Self

import numpy as np
import polars as pl

from models.base import Recommender, check_events, popularity_table
from models.columns import ITEM, SCORE, TIMESTAMP, USER
from models.errors import ConfigError
from models.item_text import VECTOR
from models.partials import sorted_history

_BLOCK_CELLS = 1 << 25  # scores held at once (users x catalogue float32): 128 MiB


class ContentNeighbours(Recommender):
    """Nearest catalogue items of a user's recent items in content space.

    Args:
        n_recent: The user's latest distinct items that make its profile.
        recency_decay: Weight of the ``r``-th latest item is ``recency_decay ** r``.

    Call :meth:`with_vectors` (``item_id, vector`` of :func:`models.item_text.encode_items`)
    before :meth:`fit`; the vectors are saved with the model.
    """

    _state_tables = ("vectors_", "recent_", "popularity_", "history_")

    def __init__(self, n_recent: int = 5, recency_decay: float = 0.7) -> None:
        self.n_recent = n_recent
        self.recency_decay = recency_decay

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

    def _score(self, users: pl.DataFrame) -> pl.DataFrame | None:
        items = self.vectors_[ITEM]
        matrix = self.vectors_[VECTOR].to_numpy().astype(np.float32, copy=False)
        code = pl.DataFrame({ITEM: items, "code": np.arange(items.len(), dtype=np.int64)})
        recent = (self.recent_.join(users.select(USER, "depth"), on=USER)
                  .join(code, on=ITEM).sort(USER))
        if recent.height == 0:
            return None
        ids, first = np.unique(recent[USER].to_numpy(), return_index=True)
        bounds = np.append(first, recent.height)
        depth = recent.group_by(USER, maintain_order=True).agg(pl.col("depth").first())
        depth_of = dict(zip(depth[USER].to_list(), depth["depth"].to_list(), strict=True))
        codes, weights = recent["code"].to_numpy(), recent["weight"].to_numpy().astype(np.float32)
        frames = []
        step = max(1, min(1024, _BLOCK_CELLS // max(1, matrix.shape[0])))
        for start in range(0, ids.size, step):
            block = ids[start:start + step]
            profile = np.zeros((block.size, matrix.shape[1]), dtype=np.float32)
            for row, index in enumerate(range(start, start + block.size)):
                lo, hi = bounds[index], bounds[index + 1]
                profile[row] = weights[lo:hi] @ matrix[codes[lo:hi]]
            scores = profile @ matrix.T
            for row, user in enumerate(block):
                n = min(int(depth_of[user]), scores.shape[1])
                top = np.argpartition(-scores[row], n - 1)[:n]
                keep = top[scores[row, top] > 0]
                frames.append(pl.DataFrame({USER: [user] * keep.size,
                                            ITEM: items.gather(keep),
                                            SCORE: scores[row, keep].astype(np.float64)}))
        return pl.concat(frames) if frames else None
