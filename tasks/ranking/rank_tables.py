"""The whole-history tables of the sharded ranker, by map-reduce over user shards.

Per window and for the test history: each shard's item partials and co-visitation pair sums
(:mod:`tasks.ranking.history_tables`), written by item bucket; summed per bucket; the neighbours
pruned per bucket; the summed item table finished once per stage into the
:class:`~tasks.ranking.history_tables.HistoryTables` every task reads (:func:`finish_stage`: a
task used to finish the catalogue-sized table itself). A shard's task then reads those tables and
only the neighbours of its users' items (:func:`shard_state`), and asks the saved external
candidate sources about its own users only (:func:`external_candidates`). Step 2 of
:mod:`tasks.ranking.rank_shards`.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import polars as pl
from prefect import task, unmapped

from models.baselines import (
    ALL_TIME,
    DEFAULT_EVENT_WEIGHTS,
    CoVisitation,
    SharedState,
    sum_partials,
    weighted_counts,
)
from models.columns import ITEM, SCORE
from tasks.checks.validate_shards import gather
from tasks.data.shards import BUCKETS, shard_file
from tasks.evaluation.evaluate_shards import (
    join_files,
    read_bucket,
    read_neighbours,
    write_buckets,
)
from tasks.ranking.candidates import prepare_history
from tasks.ranking.external_sources import content_vectors, load_source
from tasks.ranking.history_tables import (
    HistoryTables,
    TableSettings,
    finish_tables,
    item_partials,
    sum_item_partials,
)
from tasks.ranking.reranker import (
    RankerConfig,
    every_window,
)
from tasks.resume import STAGE_CACHE
from tasks.splitting.split import Split
from tasks.splitting.split_shards import read_split_shard

TEST = "test"
COVIS_ALL = "covis_all"
WINDOW = "__window"
VALID = "__valid"
USER_KEY = "__user_key"
GROUP_KEY = "__group_key"
POSITIVE = "__positive"
HELPERS = (WINDOW, VALID, USER_KEY, GROUP_KEY, POSITIVE)


def stage_events(split: Split, stage: str, config: RankerConfig
                 ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(history, targets)`` of a shard: window ``w<j>`` of the training windows, or ``test``."""
    if stage == TEST:
        return split.test_history, split.test_targets
    j = int(stage.removeprefix("w"))
    return every_window(split, j, config.window_stride)[j]


@task(name="ranker-tables-map", task_run_name="ranker-tables-map-{stage}-{shard:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def map_tables(split_dir: Path, shard: int, stage: str, end: dt.datetime, config: RankerConfig,
               settings: TableSettings, n_buckets: int, work: Path, pairs: bool) -> None:
    """Write one shard's item partials (and co-visitation pair sums) of a stage, by bucket."""
    history, _ = stage_events(read_split_shard(split_dir, shard), stage, config)
    if history.is_empty():
        return
    covis = CoVisitation(**config.covisitation)
    weights = covis.event_weights
    counts = weighted_counts(history, DEFAULT_EVENT_WEIGHTS if weights is None else weights, end)
    partials = item_partials(prepare_history(history, settings.candidate_weights), end,
                             settings).join(counts.select(
                                 ITEM, pl.col(ALL_TIME).alias(COVIS_ALL)), on=ITEM)
    name = shard_file(Path(), shard).name
    write_buckets(partials, ITEM, n_buckets, work / stage / "items" / name)
    if pairs:
        write_buckets(covis.partial(history, end)["pairs"], "src", n_buckets,
                      work / stage / "pairs" / name)


@task(name="ranker-tables-reduce-items",
      task_run_name="ranker-tables-reduce-items-{stage}-{bucket:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def reduce_items(work: Path, stage: str, bucket: int) -> pl.DataFrame:
    """One bucket of the stage's summed item partials."""
    files = sorted((work / stage / "items").glob("*.parquet"))
    return sum_item_partials([read_bucket(files, bucket)])


@task(name="ranker-tables-reduce-pairs",
      task_run_name="ranker-tables-reduce-pairs-{stage}-{bucket:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def reduce_neighbours(work: Path, stage: str, bucket: int, config: RankerConfig) -> Path:
    """One bucket of source items' co-visitation neighbours; returns its file.

    The popularity that normalises the pairs is read from the stage's ``items.parquet`` (a
    catalogue-sized table passed as an argument would travel with every task, through the
    scheduler).
    """
    popularity = pl.read_parquet(work / stage / "items.parquet", columns=[ITEM, COVIS_ALL]
                                 ).rename({COVIS_ALL: SCORE})
    files = sorted((work / stage / "pairs").glob("*.parquet"))
    pairs = sum_partials([{"pairs": read_bucket(files, bucket)}])["pairs"]
    out = work / stage / "neighbours" / f"bucket-{bucket:05d}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    CoVisitation(**config.covisitation).neighbours_from(pairs, popularity).write_parquet(out)
    return out


TABLES = "tables"
_TABLE_NAMES = ("popular", "popularity", "prices", "categories", "item_table")
_OPTIONAL = ("prices", "categories")


@task(name="ranker-tables-finish", task_run_name="ranker-tables-finish-{stage}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def finish_stage(work: Path, stage: str, end: dt.datetime, settings: TableSettings,
                 items_path: Path | None) -> Path:
    """The stage's summed item table finished once (:func:`finish_tables`) into ``tables/``."""
    items = pl.read_parquet(items_path) if items_path else None
    tables = finish_tables(pl.read_parquet(work / stage / "items.parquet"), end, settings, items)
    folder = work / stage / TABLES
    folder.mkdir(parents=True, exist_ok=True)
    for name in _TABLE_NAMES:
        table = getattr(tables, name)
        (folder / f"{name}.parquet").unlink(missing_ok=True)
        if table is not None:
            table.write_parquet(folder / f"{name}.parquet")
    return folder


def read_tables(folder: Path, end: dt.datetime) -> HistoryTables:
    """The :class:`HistoryTables` :func:`finish_stage` wrote (no prices, categories: None)."""
    def read(name: str) -> pl.DataFrame | None:
        path = folder / f"{name}.parquet"
        return pl.read_parquet(path) if path.is_file() or name not in _OPTIONAL else None

    return HistoryTables(end, **{name: read(name) for name in _TABLE_NAMES})


def build_tables(split_dir: Path, shards: list[int], stage: str, end: dt.datetime,
                 config: RankerConfig, settings: TableSettings, work: Path,
                 neighbours: Path | None = None, n_buckets: int = BUCKETS,
                 items_path: Path | None = None) -> None:
    """Map-reduce the stage's tables into ``work/<stage>/items.parquet`` and ``neighbours``.

    ``neighbours``: the same history's co-visitation neighbours, already reduced (by the
    baselines, with the same settings); the pairs are then not counted again. ``n_buckets``:
    the item buckets of the reducers. The finished tables (``tables/``) need the catalogue,
    ``items_path``.
    """
    gather(map_tables.map(unmapped(split_dir), shards, stage=unmapped(stage), end=unmapped(end),
                          config=unmapped(config), settings=unmapped(settings),
                          n_buckets=unmapped(n_buckets), work=unmapped(work),
                          pairs=unmapped(neighbours is None)))
    items = pl.concat(gather(reduce_items.map(unmapped(work), unmapped(stage),
                                              list(range(n_buckets)))))
    items.write_parquet(work / stage / "items.parquet")
    gather([finish_stage.submit(work, stage, end, settings, items_path)])
    if neighbours is not None:
        shutil.copyfile(neighbours, work / stage / "neighbours.parquet")
        return
    files = gather(reduce_neighbours.map(unmapped(work), unmapped(stage), list(range(n_buckets)),
                                         config=unmapped(config)))
    join_files(files, work / stage / "neighbours.parquet")


def shard_state(work: Path, stage: str, history: pl.DataFrame, end: dt.datetime,
                config: RankerConfig) -> tuple[HistoryTables, CoVisitation]:
    """The whole history's tables (finished once per stage); a co-visitation model of its users."""
    partials = pl.read_parquet(work / stage / "items.parquet", columns=[ITEM, COVIS_ALL])
    neighbours = read_neighbours(work / stage / "neighbours.parquet", history)
    counts = partials.select(ITEM, pl.col(COVIS_ALL).alias(SCORE), pl.col(COVIS_ALL)
                             .alias(ALL_TIME))
    covis = CoVisitation(**config.covisitation).fit(
        history, SharedState(end, {"counts": counts, "neighbours": neighbours}))
    return read_tables(work / stage / TABLES, end), covis


def external_candidates(source: Path | None, history: pl.DataFrame, users: pl.Series
                        ) -> tuple[dict[str, pl.DataFrame] | None, pl.DataFrame | None]:
    """The proposals of the source saved in ``source`` for ``users``, and its item vectors.

    As the local engine's ``external(history, users)``: ``history`` is the shard's history of
    the stage, so the source reads only these users' events. ``(None, None)`` without a source.
    """
    if source is None:
        return None, None
    loaded = load_source(source)
    return loaded(history, users), content_vectors(loaded)
