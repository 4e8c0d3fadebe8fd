"""How many training groups the LightGBM ranker needs: test NDCG@10, time and memory per size.

    nice -n 10 .venv/bin/python benchmarks/ranker_sample.py --events 3000000
    nice -n 10 .venv/bin/python benchmarks/ranker_sample.py --sizes 5000 10000 20000 40000

The built-in shop is cut with the default time split and the ranker's training groups are built
once, as the local engine builds them (every window of the default ``extra_windows``; every
group). Then, for each size, the groups with a positive are drawn as ``engine: dask`` draws them
(seeded hash of the group, no more than the size) and the ranker is fitted with fixed
parameters (early stopping on the same held-out groups), and its lists for the test users are
scored on the full catalogue. "all" is every group, the local engine's model. Each fit runs in a
fresh process so that its peak memory (resident set, from ``wait4``) is its own. Results are
appended to ``benchmarks/results/ranker_sample.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "ranker_sample.json"
PARAMS = {"learning_rate": 0.05, "num_leaves": 63, "min_data_in_leaf": 50,
          "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
          "lambdarank_truncation_level": 20}


def prepare(events: int, work: Path) -> None:
    """Write the split, the training groups and the test candidates under ``work``."""
    from models.columns import USER
    from tasks.data.demo_data import generate_shop
    from tasks.ranking.reranker import RankerConfig, RankingPipeline
    from tasks.splitting.split import cut_times, time_split

    shop, items = generate_shop(events, seed=1)
    split = time_split(shop, *cut_times(shop))
    pipe = RankingPipeline(RankerConfig(), items)
    start = time.perf_counter()
    data = pipe.training_frames(split)
    print(f"training groups built in {time.perf_counter() - start:.0f} s", flush=True)
    data.train.write_parquet(work / "train.parquet")
    data.holdout.write_parquet(work / "holdout.parquet")
    pipe.set_history(split.test_history)
    frame = pipe.pairs(split.test_history, split.test_targets[USER].unique(), covis=pipe.covis_)
    frame.write_parquet(work / "test_frame.parquet")
    split.test_targets.write_parquet(work / "test_targets.parquet")
    split.test_history.write_parquet(work / "test_history.parquet")


def fit_one(work: Path, size: int | None) -> dict:
    """Fit on ``size`` drawn groups (None: all) and score the test users; one result row."""
    import polars as pl

    from models.base import event_weight_expr
    from models.columns import ITEM, SCORE, USER
    from models.metrics import evaluate
    from tasks.data.shards import shard_of
    from tasks.ranking.candidate_sources import WEIGHT
    from tasks.ranking.reranker import (
        HOLDOUT_SCALE,
        QUERY,
        RankerConfig,
        RankingPipeline,
        rank_scored,
    )

    lazy = pl.scan_parquet(work / "train.parquet")
    queries = lazy.select(QUERY).unique().collect()
    if size is not None and size < queries.height:  # drawn as engine dask draws groups
        keys = shard_of(queries[QUERY], HOLDOUT_SCALE, purpose="group", seed=42)
        queries = queries.filter(keys < size / queries.height * HOLDOUT_SCALE)
    train = lazy.join(queries.lazy(), on=QUERY, how="semi").collect()
    holdout = pl.read_parquet(work / "holdout.parquet")
    start = time.perf_counter()
    pipe = RankingPipeline(RankerConfig())
    ranker = pipe.new_ranker(PARAMS).fit(train, holdout)
    fit_s = time.perf_counter() - start
    history = pl.read_parquet(work / "test_history.parquet")
    targets = pl.read_parquet(work / "test_targets.parquet")
    popularity = history.with_columns(event_weight_expr(
        RankerConfig().candidates.event_weights)).group_by(ITEM).agg(
        pl.col(WEIGHT).sum().alias(SCORE))
    users = targets[USER].unique()
    recs = rank_scored(ranker, pl.read_parquet(work / "test_frame.parquet"), users, 10,
                       popularity, None)
    metrics = evaluate(recs, targets, ks=[10])
    return {"size": size or "all", "groups": train[QUERY].n_unique(), "rows": train.height,
            "fit_s": round(fit_s, 1), "best_iteration": ranker.best_iteration_,
            "test_ndcg@10": metrics["ndcg@10"], "test_recall@10": metrics["recall@10"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 10_000, 20_000, 40_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shoprank-ranker-sample"))
    parser.add_argument("--fit", type=str, help=argparse.SUPPRESS)  # one fit, in a child
    args = parser.parse_args()
    if args.fit:
        print(json.dumps(fit_one(args.workdir, None if args.fit == "all" else int(args.fit))))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    prepare(args.events, args.workdir)
    rows = []
    for size in [*args.sizes, "all"]:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--workdir", str(args.workdir),
                                 "--fit", str(size)], stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        row = json.loads(proc.stdout.read().strip().splitlines()[-1])
        row.update({"peak_rss_mib": round(usage.ru_maxrss / 1024),
                    "wall_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(row), flush=True)
        rows.append(row)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    results.append({"events": args.events, "date": dt.date.today().isoformat(),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "params": PARAMS, "rows": rows})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print("\n| groups drawn | groups | rows | fit s | rounds | peak RSS MiB | test NDCG@10 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['groups']:,} | {r['rows']:,} | {r['fit_s']} | "
              f"{r['best_iteration']} | {r['peak_rss_mib']:,} | {r['test_ndcg@10']:.4f} |")


if __name__ == "__main__":
    main()
