"""The rows of a matrix of unit vectors nearest to query vectors, by inner product (cosine).

Below :data:`EXACT_BELOW` rows the answer is exact: blocked matrix products, at most 2^24 scores
(64 MiB) held at once, every query against every row. From there on a faiss HNSW graph over the
inner product answers approximately: building it costs about one search per row, and a query
then compares itself with the rows met on a short walk through the graph (thousands to tens of
thousands) instead of with all of them (``benchmarks/ann.py`` measures both, and the recall of
the graph against the exact answer).

The graph is built on one thread: faiss's multi-threaded HNSW build inserts rows in an order that
depends on thread timing, so two builds on the same rows could differ. A single-threaded build is
deterministic, and so is the search (which uses every thread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DataError

logger = logging.getLogger(__name__)

EXACT_BELOW = 100_000
"""Rows from which the HNSW graph answers. Exact products cost time in proportion to the rows; a
graph search grows little with them, but building the graph costs about 0.3 ms per row. On 2
cores and 256 dims, at 50,000 rows the graph (n = 200) is no faster per query than exact products
(2.5 s against 2.2 s per 1,000 queries); at 200,000 it is 3.5 times faster and repays its 54 s
build after about 10,000 queries (``benchmarks/ann.py``)."""
HNSW_M = 32
"""Graph links per row (faiss's ``M``; the bottom level keeps twice as many)."""
EF_CONSTRUCTION = 80
"""Candidates kept while a row is linked into the graph (faiss's default is 40): a better graph
for twice the build time."""
EF_SEARCH = 128
"""Candidates a search keeps at least (``efSearch``); ``EF_PER_RESULT * n`` when more."""
EF_PER_RESULT = 3
"""Candidates per wanted row: at 3 x 200, recall@200 is 0.994 to 0.9998 on clustered vectors of
50,000 to 500,000 rows (``benchmarks/ann.py``)."""
_BLOCK_CELLS = 1 << 24  # exact scores held at once (queries x rows float32): 64 MiB

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""``(queries, n) -> (indices, scores)``: the ``n`` best rows of one base per query."""


def nearest(queries: np.ndarray, base: np.ndarray, n: int, *, exact_below: int = EXACT_BELOW
            ) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` rows of ``base`` nearest each row of ``queries``: ``(indices, scores)``.

    Args:
        queries: ``(q, d)`` query vectors (any norm: the ranking is by inner product).
        base: ``(m, d)`` unit vectors.
        n: Rows wanted per query; fewer columns come back when ``base`` is smaller.
        exact_below: Exact products when ``base`` has fewer rows, else an HNSW graph.

    Returns:
        ``(q, min(n, m))`` int64 row indices and float32 inner products, best first.
    """
    return searcher(base, exact_below=exact_below)(queries, n)


def searcher(base: np.ndarray, *, exact_below: int = EXACT_BELOW) -> Search:
    """:func:`nearest` against one ``base`` for many blocks of queries (a graph is built once)."""
    if base.ndim != 2:
        raise DataError(f"base must be a (rows, dims) matrix; got shape {base.shape}.")
    base = np.ascontiguousarray(base, dtype=np.float32)
    if base.shape[0] < exact_below:
        return partial(_checked, search=partial(_exact, base=base), dims=base.shape[1])
    return Graph(base).search


class Graph:
    """An HNSW graph over ``base``'s rows, kept to answer many searches.

    Built on one thread, or given as ``index`` (as :meth:`load` reads it); :meth:`save` writes it
    so that another process reads it instead of building it again.
    """

    def __init__(self, base: np.ndarray, index: Any = None, *,
                 ef_construction: int = EF_CONSTRUCTION, ef_per_result: int = EF_PER_RESULT
                 ) -> None:
        self.base = np.ascontiguousarray(base, dtype=np.float32)
        self.index = _hnsw(self.base, ef_construction) if index is None else index
        self.ef_per_result = ef_per_result

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`nearest`'s answer from the graph: ``(indices, scores)``, best first."""
        return _checked(queries, n, search=partial(
            _approximate, index=self.index, base=self.base, ef_per_result=self.ef_per_result),
            dims=self.base.shape[1])

    def save(self, path: Path) -> None:
        """Write the graph (faiss's index format) to ``path``."""
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, base: np.ndarray, ef_per_result: int = EF_PER_RESULT) -> Graph:
        """The graph written to ``path`` over ``base``'s rows.

        Raises:
            DataError: The file holds a graph over another number or width of rows.
        """
        import faiss

        index = faiss.read_index(str(path))
        if (index.ntotal, index.d) != base.shape:
            raise DataError(f"{path} is a graph over {index.ntotal} rows of {index.d} dims, not "
                            f"{base.shape[0]} of {base.shape[1]}: build it again.")
        return cls(base, index, ef_per_result=ef_per_result)


def _checked(queries: np.ndarray, n: int, *, search: Search, dims: int
             ) -> tuple[np.ndarray, np.ndarray]:
    if queries.ndim != 2 or queries.shape[1] != dims or n < 0:
        raise DataError(f"queries must be a (rows, {dims}) matrix and n >= 0; got shape "
                        f"{queries.shape} and n={n}.")
    return search(queries, n)


def _exact(queries: np.ndarray, n: int, *, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every query against every row, a block of queries at a time."""
    n = min(n, base.shape[0])
    index = np.zeros((queries.shape[0], n), dtype=np.int64)
    score = np.zeros((queries.shape[0], n), dtype=np.float32)
    if n == 0:
        return index, score
    step = max(1, _BLOCK_CELLS // max(1, base.shape[0]))
    for start in range(0, queries.shape[0], step):
        sims = queries[start:start + step] @ base.T
        top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        index[start:start + step] = np.take_along_axis(top, order, axis=1)
        score[start:start + step] = np.take_along_axis(top_sims, order, axis=1)
    return index, score


def _hnsw(base: np.ndarray, ef_construction: int = EF_CONSTRUCTION) -> Any:
    """An HNSW graph over the inner product of ``base``'s rows, built on one thread."""
    import faiss

    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(base.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(base)
    finally:
        faiss.omp_set_num_threads(threads)
    logger.info("HNSW graph over %d rows built in %.1f s", base.shape[0],
                time.perf_counter() - started)
    return index


def _approximate(queries: np.ndarray, n: int, *, index: Any, base: np.ndarray,
                 ef_per_result: int = EF_PER_RESULT) -> tuple[np.ndarray, np.ndarray]:
    """The graph's answer; a query it cannot fill with ``n`` rows is answered exactly."""
    import faiss

    n = min(n, base.shape[0])
    if n == 0 or queries.shape[0] == 0:
        return _exact(queries, n, base=base)
    params = faiss.SearchParametersHNSW(efSearch=max(EF_SEARCH, ef_per_result * n))
    score, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), n,
                                params=params)
    short = (found < 0).any(axis=1)
    if short.any():
        found[short], score[short] = _exact(queries[short], n, base=base)
    return found.astype(np.int64, copy=False), score
