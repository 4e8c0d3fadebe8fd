"""What a ranker task of ``engine: dask`` pays for the whole history's item tables, per task.

Each frames and score task of the sharded ranker needs the stage's
:class:`~tasks.ranking.history_tables.HistoryTables` (the item features, the popularity
orderings, prices, categories): catalogue-sized tables. Until 2026-12-07 every task read the
summed item partials and finished them itself (:func:`finish_tables`); now one task per stage
finishes them (:func:`tasks.ranking.rank_tables.finish_stage`) and every task reads the result
(:func:`tasks.ranking.rank_tables.read_tables`). This times both ways in one process, in turn,
on a kept run's summed table (``benchmarks/scale.py --ranker-trials 1 --keep``) made
``--copies`` times larger (the items repeated under new ids, the catalogue alike), so that the
catalogue has the size of a larger shop's:

    .venv/bin/python benchmarks/finished_tables.py --run <run folder> --copies 40

Results: ``benchmarks/results/finished_tables.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import append_run  # noqa: E402 (benchmarks/, the script's folder, is on sys.path)

from flows.config import load_config  # noqa: E402
from models.columns import ITEM  # noqa: E402
from tasks.evaluation.evaluate_shards import history_end  # noqa: E402
from tasks.ranking.features import table_settings  # noqa: E402
from tasks.ranking.history_tables import finish_tables  # noqa: E402
from tasks.ranking.rank_tables import COVIS_ALL, TABLES, finish_stage, read_tables  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "finished_tables.json"


def copies(frame: pl.DataFrame, n: int) -> pl.DataFrame:
    """``frame`` repeated ``n`` times, the item ids of copy ``i`` suffixed ``~i``."""
    return pl.concat([frame.with_columns(pl.col(ITEM) + f"~{i}") for i in range(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True,
                        help="a kept run folder (with ranker/<stage>/items.parquet)")
    parser.add_argument("--stage", default="test", help="the ranker's stage (test)")
    parser.add_argument("--copies", type=int, default=40, help="catalogue copies (40)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each way (5)")
    args = parser.parse_args()
    config_file = args.run.parents[2] / "config.json"
    config = load_config(config_file if config_file.is_file() else None)
    ranker = config.ranker.settings(config.seed)
    settings = table_settings(ranker.candidates, ranker.features, False)
    end = history_end(args.run / "split", "test_history")
    with tempfile.TemporaryDirectory(prefix="shoprank-finished-tables-") as tmp:
        work, stage = Path(tmp), args.stage
        (work / stage).mkdir()
        partials = copies(pl.read_parquet(args.run / "ranker" / stage / "items.parquet"),
                          args.copies)
        partials.write_parquet(work / stage / "items.parquet")
        items = copies(pl.read_parquet(args.run / "items.parquet"), args.copies)
        items.write_parquet(work / "catalogue.parquet")
        start = time.perf_counter()
        finish_stage.fn(work, stage, end, settings, work / "catalogue.parquet")
        once = time.perf_counter() - start
        runs: dict[str, list[float]] = {"finished per task": [], "read once finished": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            finish_tables(pl.read_parquet(work / stage / "items.parquet"), end, settings, items)
            runs["finished per task"].append(time.perf_counter() - start)
            start = time.perf_counter()
            pl.read_parquet(work / stage / "items.parquet", columns=[ITEM, COVIS_ALL])
            read_tables(work / stage / TABLES, end)
            runs["read once finished"].append(time.perf_counter() - start)
    print(f"\n{partials.height:,} items ({args.copies} copies of {args.run.name}'s "  # noqa: T201
          f"{args.stage} table)\n\n| way | per task s (median of {args.repeats}) |\n|---|---:|")
    summary = {way: statistics.median(found) for way, found in runs.items()}
    for way, seconds in summary.items():
        print(f"| {way} | {seconds:.2f} |")  # noqa: T201
    print(f"| finishing once per stage (a task) | {once:.2f} |")  # noqa: T201
    append_run(RESULTS, args={**vars(args), "run": str(args.run)}, items=partials.height,
               per_task_s=summary, runs=runs, once_per_stage_s=once)


if __name__ == "__main__":
    main()
