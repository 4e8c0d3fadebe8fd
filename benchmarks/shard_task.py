"""What one score task costs on shards of the same size from logs of growing size.

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

With ``--ranker`` it times the ranker's test score task instead (:func:`score_shard`, the task
itself, on the run's refitted model), split into its parts: the shard's tables, candidates and
features, scoring and ranking (LightGBM's predict), the rest; with the candidate rows and the
model's trees, so that the predict's cost per row and tree compares across runs (the
transformer's candidates, when the run kept its source with the model, count in the rest). The
settings are those of the run (``config.json`` of its ``scale.py`` work folder, three levels up).

    .venv/bin/python benchmarks/shard_task.py --runs /work/scale/30m/out-30000000-2/shop-*/* \
        /work/scale/100m/out-100000000-2/shop-*/* --shards 0 1 2 [--ranker]
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tasks.ranking.rank_shards as rank_shards  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.train import resolved_exclude_seen  # noqa: E402
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
from tasks.ranking.rank_tables import TEST  # noqa: E402
from tasks.ranking.reranker import SOURCE_DIR  # noqa: E402
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


RANKER_PARTS = {"shard_state": "tables s", "candidate_chunks": "candidates and features s",
                "rank_scored": "predict and rank s"}
"""The functions of :func:`rank_shards.score_shard` timed apart, and their names in the rows."""


@contextmanager
def timed_parts(seconds: dict[str, float], sizes: dict[str, int]) -> Iterator[None]:
    """Time the :data:`RANKER_PARTS` of ``rank_shards`` while inside; count the candidate rows.

    A part called more than once (once per chunk of users) adds up; the chunks' generator is
    timed chunk by chunk.
    """
    originals = {name: getattr(rank_shards, name) for name in RANKER_PARTS}

    def add(name: str, start: float) -> None:
        key = RANKER_PARTS[name]
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start

    def chunks(function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Iterator[Any]:
            produced = function(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    chunk = next(produced)
                except StopIteration:
                    return
                finally:
                    add("candidate_chunks", start)
                sizes["rows"] = sizes.get("rows", 0) + chunk[1].height
                yield chunk
        return run

    def timer(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        if name == "candidate_chunks":
            return chunks(function)

        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = function(*args, **kwargs)
            add(name, start)
            return result
        return run

    for name, function in originals.items():
        setattr(rank_shards, name, timer(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(rank_shards, name, function)


def ranker_inputs(run: Path) -> dict[str, Any]:
    """The arguments of the run's test score task but the shard and the work folder."""
    config_file = run.parents[2] / "config.json"
    config = load_config(config_file if config_file.is_file() else None)
    info = json.loads((run / "split" / "info.json").read_text())
    ranker = config.ranker.settings(config.seed).seen_excluded(
        resolved_exclude_seen(config, info["protocol"]))
    source = run / "ranker" / "model" / SOURCE_DIR  # the transformer's candidates, when kept
    return {"split_dir": run / "split", "stage": TEST,
            "end": history_end(run / "split", "test_history"), "config": ranker,
            "items_path": run / "items.parquet", "ordered_only": False,
            "ks": config.evaluation.ks, "model": run / "ranker" / "model",
            "selection": config.evaluation.selection(config.seed),
            "source": source if source.is_dir() else None}


def ranker_score(run: Path, shard: int, inputs: dict[str, Any]) -> dict[str, float]:
    """Seconds of one ranker test score task by part, its users and candidate rows."""
    seconds: dict[str, float] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, timed_parts(seconds, sizes):
        (Path(tmp) / TEST).symlink_to(run / "ranker" / TEST)  # the stage's tables, read only
        start = time.perf_counter()
        out = rank_shards.score_shard.fn(shard=shard, work=Path(tmp), **inputs)
        total = time.perf_counter() - start
    rest = total - sum(seconds.values())
    return {"users": out["metrics"]["users"], "rows": sizes["rows"], **seconds,
            "rest s": rest, "task s": total}


def ranker_rows(runs: list[Path], shards: list[int]) -> list[dict[str, Any]]:
    """Per run, the median over ``shards`` of :func:`ranker_score`, shards interleaved."""
    inputs = {run: ranker_inputs(run) for run in runs}
    times: dict[Path, list[dict[str, float]]] = {run: [] for run in runs}
    for shard in shards:
        for run in runs:
            times[run].append(ranker_score(run, shard, inputs[run]))
    rows = []
    for run, parts in times.items():
        info = json.loads((run / "split" / "info.json").read_text())
        trees = json.loads((run / "ranker" / "model" / "ranker.json").read_text())[
            "params"]["num_boost_round"]
        row: dict[str, Any] = {"run": str(run), "task": "ranker-score",
                               "events": info["summary"]["train_events"],
                               "shards": len(info["shards"]), "trees": trees}
        row.update({key: round(statistics.median(p[key] for p in parts), 2)
                    for key in parts[0]})
        row["predict us per row and tree"] = round(
            1e6 * row["predict and rank s"] / (row["rows"] * trees), 3)
        rows.append(row)
        print(json.dumps(row))
    print("\n| train events | shards | trees | users | candidate rows | tables s | candidates and "
          "features s | predict and rank s | task s | predict µs per row and tree |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['events']:,} | {row['shards']} | {row['trees']} | {row['users']:,.0f} | "
              f"{row['rows']:,.0f} | {row['tables s']} | {row['candidates and features s']} | "
              f"{row['predict and rank s']} | {row['task s']} | "
              f"{row['predict us per row and tree']} |")
    return rows


def baseline_rows(runs: list[Path], shards: list[int]) -> list[dict[str, Any]]:
    """Per run, the baselines' validation score task both ways, median over ``shards``."""
    rows = []
    for run in runs:
        stage = run / "baselines" / "valid"
        counts = pl.read_parquet(stage / "counts.parquet")
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            files = write_popularity(counts, Path(tmp))
            once = time.perf_counter() - start
            times: dict[str, list[float]] = {"sorted per task": [], "ordered once": []}
            for shard in shards:  # interleaved, so that both see the same machine
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
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="run folders of kept `scale.py` runs (with baselines/valid)")
    parser.add_argument("--shards", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranker", action="store_true",
                        help="time the ranker's test score task (the runs need ranker/)")
    args = parser.parse_args()
    rows = (ranker_rows if args.ranker else baseline_rows)(args.runs, args.shards)
    RESULTS.parent.mkdir(exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    previous.append({"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "machine": platform.node(), "shards": args.shards, "rows": rows})
    RESULTS.write_text(json.dumps(previous, indent=1) + "\n")


if __name__ == "__main__":
    main()
