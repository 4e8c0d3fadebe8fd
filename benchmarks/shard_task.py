"""What one baseline score task costs on shards of the same size from logs of growing size.

The demo shop's catalogue grows with its log (an item per 60 events), and a per-shard task of
``engine: dask`` holds one shard plus catalogue-sized tables. A stage grows linearly with the log
only if its per-shard task does not grow with the catalogue. This times the baselines' score
task (fit the four baselines on a shard's users, recommend, partial metrics) on kept runs of
``benchmarks/scale.py --keep``, validation stage, in two ways in the same process:

- ``sorted per task``: every baseline orders the whole catalogue's counts itself (what each
  task did before the orderings were written once per stage);
- ``ordered once``: the catalogue ordered once per stage (:func:`write_popularity`), each task
  reading the ordered tables.

Both give the same lists (checked: items and ranks, scores within 1e-9). The one-off ordering
per stage is timed apart.

    .venv/bin/python benchmarks/shard_task.py --runs /work/scale/30m/out-30000000-2/shop-*/* \
        /work/scale/100m/out-100000000-2/shop-*/* --shards 0 1 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.baselines import ALL_TIME, SharedState  # noqa: E402
from models.columns import ITEM, SCORE, USER  # noqa: E402
from models.metrics import COUNT, partial_metrics  # noqa: E402
from tasks.evaluation.evaluate import baseline_factories  # noqa: E402
from tasks.evaluation.evaluate_shards import (  # noqa: E402
    RECENT,
    _shared,
    history_end,
    read_neighbours,
    write_popularity,
)
from tasks.splitting.split import Selection  # noqa: E402
from tasks.splitting.split_shards import read_split_shard  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "shard_task.json"


def sorted_state(name: str, t_max: dt.datetime, counts: pl.DataFrame,
                 neighbours: pl.DataFrame) -> SharedState:
    """The shared state with the counts only: the baseline orders the catalogue itself."""
    score = RECENT if name == "recent_popularity" else ALL_TIME
    tables = {"counts": counts.select(ITEM, pl.col(score).alias(SCORE), ALL_TIME)}
    if name == "covisitation":
        tables["neighbours"] = neighbours
    return SharedState(t_max, tables)


def score(run: Path, shard: int, ordered_files: dict[str, Path] | None, ks: list[int]
          ) -> tuple[float, dict[str, pl.DataFrame]]:
    """Seconds of one validation score task (reading included) and its lists by baseline."""
    start = time.perf_counter()
    split = read_split_shard(run / "split", shard)
    history, targets = split.train, Selection().targets(split)
    stage = run / "baselines" / "valid"
    t_max = history_end(run / "split", "train")
    neighbours = read_neighbours(stage / "neighbours.parquet", history)
    if ordered_files is None:
        counts = pl.read_parquet(stage / "counts.parquet")
        item_counts = counts.select(ITEM, COUNT)
    else:
        item_counts = pl.read_parquet(stage / "counts.parquet", columns=[ITEM, COUNT])
        ordered = {name: pl.read_parquet(path) for name, path in ordered_files.items()}
    users = targets[USER].unique(maintain_order=True)
    lists = {}
    for name, factory in baseline_factories(7.0).items():
        state = (sorted_state(name, t_max, counts, neighbours) if ordered_files is None
                 else _shared(name, t_max, ordered, neighbours))
        recs = factory().fit(history, state).recommend(users, k=max(ks))
        partial_metrics(recs, targets, ks, item_counts)
        lists[name] = recs
    return time.perf_counter() - start, lists


def same_lists(old: pl.DataFrame, new: pl.DataFrame, what: str) -> None:
    """Raise unless both give the same items at the same ranks, with scores within 1e-9.

    Co-visitation's scores are float sums whose order of addition varies from run to run in
    the last bits, in either way.
    """
    assert old.select(USER, ITEM, "rank").equals(new.select(USER, ITEM, "rank")), what
    assert (old[SCORE] - new[SCORE]).abs().max() <= 1e-9, what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="run folders of kept `scale.py` runs (with baselines/valid)")
    parser.add_argument("--shards", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        stage = run / "baselines" / "valid"
        counts = pl.read_parquet(stage / "counts.parquet")
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            files = write_popularity(counts, Path(tmp))
            once = time.perf_counter() - start
            times: dict[str, list[float]] = {"sorted per task": [], "ordered once": []}
            for shard in args.shards:  # interleaved, so that both see the same machine
                before, old = score(run, shard, None, [10, 20])
                after, new = score(run, shard, files, [10, 20])
                for name in old:
                    same_lists(old[name], new[name], f"{name}, shard {shard}")
                times["sorted per task"].append(before)
                times["ordered once"].append(after)
        info = json.loads((run / "split" / "info.json").read_text())
        row = {"run": str(run), "events": info["summary"]["train_events"],
               "catalogue": counts.height, "shards": len(info["shards"]),
               "ordering once s": round(once, 2),
               **{k: round(statistics.median(v), 2) for k, v in times.items()}}
        rows.append(row)
        print(json.dumps(row))
    print("\n| train events | catalogue | shards | task, sorted per task s | task, ordered once s "
          "| ordering once per stage s |\n|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['events']:,} | {row['catalogue']:,} | {row['shards']} | "
              f"{row['sorted per task']} | {row['ordered once']} | {row['ordering once s']} |")
    RESULTS.parent.mkdir(exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    previous.append({"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "machine": platform.node(), "shards": args.shards, "rows": rows})
    RESULTS.write_text(json.dumps(previous, indent=1) + "\n")


if __name__ == "__main__":
    main()
