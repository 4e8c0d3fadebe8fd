"""The ``implicit`` library's ALS and BPR as a shoprank recommender, for benchmarks only.

:class:`ImplicitPeer` learns from canonical events exactly like the baselines: ``fit(events)``
builds a user x item CSR matrix of summed event weights (the baselines' event weights) and trains
``implicit``'s CPU model; ``recommend(users, k, exclude_seen)`` comes from
:class:`models.base.Recommender`, so the popularity fallback, the exclusion of seen items and the
output columns are those of every shoprank model. ``score`` in the output is ``1 / position`` in
the factor model's ranking (the base class keeps only positive personal scores), not the raw dot
product.

``implicit`` warns when OpenBLAS runs its own threads next to its own; :meth:`ImplicitPeer.fit`
limits BLAS to one thread while it trains.

Saving is not supported: the peer exists to be measured, never to be served.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Self

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from models.base import (  # noqa: E402
    IdIndex,
    Recommender,
    check_events,
    event_weight_expr,
    popularity_table,
)
from models.baselines import DEFAULT_EVENT_WEIGHTS  # noqa: E402
from models.columns import ITEM, SCORE, USER  # noqa: E402
from models.errors import ConfigError  # noqa: E402

ALGORITHMS = ("als", "bpr")
_CHUNK = 4096  # users scored per call


class ImplicitPeer(Recommender):
    """``implicit`` ALS or BPR behind ``fit / recommend``.

    Args:
        algorithm: ``"als"`` (alternating least squares, confidence = ``alpha`` x weight) or
            ``"bpr"`` (Bayesian personalised ranking).
        factors: Latent dimensions.
        regularization: L2 penalty.
        iterations: ALS sweeps or BPR epochs.
        alpha: ALS confidence scale (ignored by BPR).
        learning_rate: BPR step size (ignored by ALS).
        event_weights: Weight per event type summed into the matrix; default the baselines'.
        num_threads: Threads of ``implicit`` (0: all cores).
        seed: ``random_state`` of the factor initialisation and sampling.
    """

    _state_tables = ("popularity_", "history_")

    def __init__(
        self,
        algorithm: str = "als",
        factors: int = 64,
        regularization: float = 0.01,
        iterations: int = 15,
        alpha: float = 1.0,
        learning_rate: float = 0.01,
        event_weights: dict[str, float] | None = None,
        num_threads: int = 0,
        seed: int = 0,
    ) -> None:
        self.algorithm = algorithm
        self.factors = factors
        self.regularization = regularization
        self.iterations = iterations
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.event_weights = event_weights
        self.num_threads = num_threads
        self.seed = seed

    def _model(self) -> Any:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ALGORITHMS}; got {self.algorithm!r}.")
        if self.algorithm == "als":
            from implicit.cpu.als import AlternatingLeastSquares

            return AlternatingLeastSquares(
                factors=self.factors, regularization=self.regularization, alpha=self.alpha,
                iterations=self.iterations, num_threads=self.num_threads,
                random_state=self.seed)
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        return BayesianPersonalizedRanking(
            factors=self.factors, learning_rate=self.learning_rate,
            regularization=self.regularization, iterations=self.iterations,
            num_threads=self.num_threads, random_state=self.seed)

    def fit(self, events: pl.DataFrame) -> Self:
        """Build the user x item matrix of summed event weights and train; returns ``self``."""
        check_events(events)
        weights = dict(DEFAULT_EVENT_WEIGHTS if self.event_weights is None else self.event_weights)
        pairs = (
            events.with_columns(event_weight_expr(weights))
            .group_by(USER, ITEM)
            .agg(pl.col("weight").sum())
            .filter(pl.col("weight") > 0)
        )
        self.users_ = IdIndex(pairs[USER].unique().sort())
        self.items_ = IdIndex(pairs[ITEM].unique().sort())
        rows, cols = self.users_.to_index(pairs[USER]), self.items_.to_index(pairs[ITEM])
        matrix = sp.csr_matrix(
            (pairs["weight"].to_numpy().astype(np.float32), (rows, cols)),
            shape=(len(self.users_), len(self.items_)),
        )
        self.model_ = self._model()
        with threadpool_limits(1, "blas"):
            self.model_.fit(matrix, show_progress=False)
        counts = pairs.group_by(ITEM).agg(pl.col("weight").sum().alias(SCORE))
        self.popularity_ = popularity_table(counts)
        self.history_ = events.select(USER, ITEM).unique()
        return self

    def _score(self, users: pl.DataFrame) -> pl.DataFrame | None:
        """Each known user's best ``max(depth)`` items by factor score, as ``1 / position``."""
        index = self.users_.to_index(users[USER])
        known = index >= 0
        if not known.any():
            return None
        n = int(min(users["depth"].max(), len(self.items_)))
        ids, rows = users[USER].filter(pl.Series(known)), index[known]
        parts = []
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            items, _ = self.model_.recommend(chunk, None, N=n, filter_already_liked_items=False)
            width = items.shape[1]
            parts.append(pl.DataFrame({
                USER: np.repeat(ids.slice(start, len(chunk)).to_numpy(), width),
                ITEM: self.items_.to_ids(items.ravel()),
                SCORE: np.tile(1.0 / np.arange(1, width + 1), len(chunk)),
            }))
        return pl.concat(parts)

    def save(self, path: Path) -> None:
        """Not supported: the peer is measured, never served."""
        raise NotImplementedError("ImplicitPeer is a benchmark peer and cannot be saved.")
