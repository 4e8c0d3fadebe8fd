"""Bytes of one shard's metric partial: what a score task hands the flow process.

A shard of ``--users`` test users, each with a top-``K`` list drawn from a catalogue of
``--items`` items by a heavy-tailed popularity (a few items in many lists, most in none), is
reduced to its :func:`models.metrics.partial_metrics`; the pickled size of the part's
recommended-item sets (for ``coverage@K``) and of the whole part is printed. Run it with
another checkout on ``--code`` for a before/after comparison.

    .venv/bin/python benchmarks/partial_size.py
    .venv/bin/python benchmarks/partial_size.py --code /path/to/an/older/checkout
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_700_000, help="catalogue (1.7M)")
    parser.add_argument("--users", type=int, default=10_000, help="test users (10,000)")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout to measure")
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    import numpy as np
    import polars as pl

    from models.metrics import partial_metrics

    rng = np.random.default_rng(0)
    k = 20
    ids = pl.Series("item_id", [f"i{i:07d}" for i in range(args.items)])
    popularity = pl.DataFrame({"item_id": ids, "count": rng.integers(1, 100, args.items)})
    picks = np.minimum((rng.pareto(0.7, args.users * k * 2) * 1000).astype(np.int64),
                       args.items - 1)
    users = np.repeat([f"u{u}" for u in range(args.users)], k * 2)
    recs = (pl.DataFrame({"user_id": users, "item_id": ids.gather(picks)})
            .unique(["user_id", "item_id"], maintain_order=True)
            .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("rank"))
            .filter(pl.col("rank") <= k))
    targets = recs.group_by("user_id").agg(pl.col("item_id").first())
    part = partial_metrics(recs, targets, (10, k), popularity)
    print(f"{args.items:,} items, {args.users:,} users, {recs['item_id'].n_unique():,} distinct "  # noqa: T201
          f"items in the top {k}: item sets {len(pickle.dumps(part['items'])):,} bytes, the "
          f"whole part {len(pickle.dumps(part)):,} bytes ({args.code})")


if __name__ == "__main__":
    main()
