"""Nearest items by exact products and by the HNSW graph of :mod:`models.ann`: cost and recall.

Synthetic clustered unit vectors stand in for item text vectors: ``--clusters`` centres in a
``--latent``-dimensional subspace of ``--dims`` dimensions, each item its centre plus Gaussian
spread in the subspace and a little noise in every dimension (text vectors of the built-in shop's
catalogue keep 90% of their variance in about 55 of their 256 dimensions). The queries are drawn
the same way. For each catalogue size: the exact answer's time per 1,000 queries
(:func:`models.ann.nearest` below its threshold), the graph's build time, its time per 1,000
queries and its recall against the exact answer at ``n`` = 200 and 20, and the queries from which
the graph, build included, costs less than exact products.

    .venv/bin/python benchmarks/ann.py                        # 50k, 200k and 500k items
    .venv/bin/python benchmarks/ann.py --sizes 1000000 --queries 1000

Results: appended to ``benchmarks/results/ann.json``; a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from record import append_run  # benchmarks/, the script's folder, is on sys.path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ann.json"
CHUNK = 100_000  # vectors generated at once


class Catalogue:
    """Clustered unit vectors: centres in a random subspace, spread within it, noise outside."""

    def __init__(self, dims: int, latent: int, clusters: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.standard_normal((clusters, latent)).astype(np.float32)
        self.basis = np.linalg.qr(self.rng.standard_normal((dims, latent)))[0].astype(np.float32)

    def draw(self, n: int) -> np.ndarray:
        out = np.empty((n, self.basis.shape[0]), dtype=np.float32)
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            z = self.centres[self.rng.integers(len(self.centres), size=m)]
            z = z + 0.5 * self.rng.standard_normal(z.shape, dtype=np.float32)
            x = z @ self.basis.T + 0.05 * self.rng.standard_normal((m, out.shape[1]),
                                                                   dtype=np.float32)
            out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact ``n`` best rows that ``found`` holds, over all queries."""
    hits = sum(np.intersect1d(f, t, assume_unique=True).size for f, t in zip(found, truth,
                                                                              strict=True))
    return hits / truth.size


def timed(call, *args, **kwargs):
    start = time.perf_counter()
    out = call(*args, **kwargs)
    return out, time.perf_counter() - start


def measure(size: int, queries: np.ndarray, catalogue: Catalogue) -> dict:
    """Exact and graph figures for one catalogue of ``size`` items."""
    from models.ann import nearest, searcher

    base = catalogue.draw(size)
    per_1k = 1000 / len(queries)
    (exact, _), exact_s = timed(nearest, queries, base, 200, exact_below=size + 1)
    search, build_s = timed(searcher, base, exact_below=0)
    row = {"items": size, "build_s": build_s, "exact_s_per_1k": exact_s * per_1k}
    for n in (200, 20):
        (found, _), took = timed(search, queries, n)
        row[f"ann_s_per_1k@{n}"] = took * per_1k
        row[f"recall@{n}"] = recall(found, exact[:, :n])
    saved = (row["exact_s_per_1k"] - row["ann_s_per_1k@200"]) / 1000
    row["break_even_queries@200"] = round(build_s / saved) if saved > 0 else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 500_000])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--dims", type=int, default=256)
    parser.add_argument("--latent", type=int, default=64, help="dimensions the clusters span")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import faiss

    from models import ann

    catalogue = Catalogue(args.dims, args.latent, args.clusters, args.seed)
    queries = catalogue.draw(args.queries)
    results = []
    print("| items | exact s / 1k queries | HNSW build s | HNSW s / 1k (n=200) | recall@200 | "
          "HNSW s / 1k (n=20) | recall@20 | queries to break even (n=200) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        row = measure(size, queries, catalogue)
        results.append(row)
        print(f"| {size:,} | {row['exact_s_per_1k']:.2f} | {row['build_s']:.1f} | "
              f"{row['ann_s_per_1k@200']:.2f} | {row['recall@200']:.4f} | "
              f"{row['ann_s_per_1k@20']:.2f} | {row['recall@20']:.4f} | "
              f"{row['break_even_queries@200'] or '-'} |", flush=True)
    append_run(RESULTS, faiss=faiss.__version__,
               settings={"M": ann.HNSW_M, "efConstruction": ann.EF_CONSTRUCTION,
                         "efSearch": f"max({ann.EF_SEARCH}, {ann.EF_PER_RESULT} * n)",
                         "build_threads": 1, "search_threads": faiss.omp_get_max_threads()},
               args=vars(args), results=results)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
