"""Baselines on Amazon Beauty (S3-Rec files) under the leave-one-out protocol.

Full-catalogue ranking, items of the visible history removed, k = 20, all 22,363 users.

    .venv/bin/python benchmarks/beauty_baselines.py            # validation and test tables
    .venv/bin/python benchmarks/beauty_baselines.py --tune     # also the CoVisitation grid

Validation: fit on ``split.train``, score ``split.valid_targets``. Test: fit on
``split.test_history`` (train + the validation item), score ``split.test_targets``. CoVisitation
hyper-parameters are chosen on validation NDCG@10 only.

Recorded (polars 2.1, CoVisitation defaults): validation NDCG@10 0.0684 / Recall@10 0.1067; test
NDCG@10 0.0612 / Recall@10 0.0961 (Popularity: test NDCG@10 0.0061 / Recall@10 0.0135).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.base import Recommender  # noqa: E402
from models.baselines import BuyAgain, CoVisitation, Popularity  # noqa: E402
from models.columns import ITEM, USER  # noqa: E402
from models.metrics import evaluate, metrics_table  # noqa: E402
from tasks.data.adapters import load_raw  # noqa: E402
from tasks.splitting.split import Split, leave_one_out  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_s3rec" / "Beauty.txt.gz"
N_ITEMS = 12_101
K = 20

GRID = {
    "max_gap": [1, 2, 3, 5, 8],
    "window": [2, 3, 5, 10, 20],
    "cooc_weight": [0.0, 0.1, 0.25, 0.5, 1.0, 2.0],
    "alpha": [0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0],
    "source_alpha": [0.0, 0.25, 0.5],
    "n_recent": [2, 3, 5, 10, 20, 50],
    "recency_decay": [0.3, 0.5, 0.7, 0.9],
    "n_neighbours": [50, 100, 200, 400],
}


def load_events(path: Path = DATA) -> pl.DataFrame:
    """Canonical events: one purchase per listed item, 2014-01-01 UTC + position seconds."""
    return load_raw(path, "s3rec").events


def score(model: Recommender, history: pl.DataFrame, targets: pl.DataFrame) -> dict[str, float]:
    """Fit on ``history`` and evaluate top-K with seen items removed."""
    model.fit(history)
    recs = model.recommend(targets[USER].unique(), k=K, exclude_seen=True)
    popularity = history.group_by(ITEM).agg(pl.len().alias("count"))
    return evaluate(recs, targets, ks=(10, 20), n_items=N_ITEMS, item_popularity=popularity)


def tune(split: Split, sweeps: int) -> dict[str, object]:
    """Coordinate search over GRID on validation NDCG@10, starting from the current defaults."""
    best = {name: getattr(CoVisitation(), name) for name in GRID}
    best_ndcg = score(CoVisitation(**best), split.train, split.valid_targets)["ndcg@10"]
    for _sweep, (name, values) in itertools.product(range(sweeps), GRID.items()):
        for value in values:
            trial = {**best, name: value}
            if trial == best:
                continue
            ndcg = score(CoVisitation(**trial), split.train, split.valid_targets)["ndcg@10"]
            print(f"  {trial} -> ndcg@10 {ndcg:.5f}", flush=True)
            if ndcg > best_ndcg:
                best, best_ndcg = trial, ndcg
    print(f"best on validation: {best} ndcg@10 {best_ndcg:.5f}")
    return best


def models() -> dict[str, Recommender]:
    return {"Popularity": Popularity(), "BuyAgain": BuyAgain(), "CoVisitation": CoVisitation()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tune", action="store_true", help="run the CoVisitation grid first")
    parser.add_argument("--sweeps", type=int, default=2, help="passes over the grid")
    args = parser.parse_args()
    events = load_events()
    split = leave_one_out(events)
    print(f"events {events.height}, users {events[USER].n_unique()}, items {N_ITEMS}")
    if args.tune:
        tune(split, args.sweeps)
    for name, history, targets in (
        ("validation", split.train, split.valid_targets),
        ("test", split.test_history, split.test_targets),
    ):
        results = {}
        for model_name, model in models().items():
            start = time.perf_counter()
            results[model_name] = score(model, history, targets)
            print(f"{name} {model_name}: {time.perf_counter() - start:.1f} s", flush=True)
        print(f"\n{name} (fit on {'train' if name == 'validation' else 'test_history'})\n")
        print(metrics_table(results, metrics=_columns()))
        print()


def _columns() -> list[str]:
    names = ("ndcg", "recall", "mrr", "map", "coverage", "novelty")
    return [f"{m}@{k}" for k in (10, 20) for m in names] + ["users"]


if __name__ == "__main__":
    main()
