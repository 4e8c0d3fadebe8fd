"""The baselines of a sharded split, by map-reduce: same lists and metrics as in one process.

Per stage (``valid``: fitted on ``train``; ``test``: fitted on ``test_history``):

1. **map**, a task per shard: the shard's additive tables (:func:`models.baselines.weighted_counts`
   per item, with the plain event count for novelty; raw co-visitation pair sums), each written to
   one Parquet file per shard with a ``bucket`` column (the item id's hash keyed by purpose
   ``bucket``, mod the number of buckets) and one row group per bucket, so that a reducer reads
   only its bucket;
2. **reduce**, a task per bucket: the counts summed; then, with every bucket's counts at hand (one
   row per item), the pairs summed, normalised and pruned per source item
   (:meth:`models.baselines.CoVisitation.neighbours_from`); the catalogue's popularity orderings
   are written once (:func:`write_popularity`), so that no score task sorts the catalogue;
3. **score**, a task per shard: each baseline fitted on the shard's users with the whole history's
   tables (:class:`models.baselines.SharedState`), asked for the shard's target users, scored with
   :func:`models.metrics.partial_metrics`; the parts merge exactly into the metrics of one process.

Memory: a map or score task holds one shard plus the catalogue-sized counts and the neighbours of
the shard's items; a reduce task one bucket of every shard's pairs; the flow process the counts
(one row per item) and a row group of the neighbours at a time (:func:`join_files`).
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from prefect import get_run_logger, task, unmapped

from models.baselines import (
    ALL_TIME,
    DEFAULT_EVENT_WEIGHTS,
    CoVisitation,
    SharedState,
    sum_partials,
    weighted_counts,
)
from models.columns import ITEM, RANK, SCORE, TIMESTAMP, USER
from models.metrics import COUNT, merge_partials, partial_metrics
from models.partials import all_time_popularity, window_popularity
from models.user_lists import write_part
from tasks.checks.validate_shards import gather
from tasks.data.shards import BUCKETS, shard_file, shard_of
from tasks.evaluation.evaluate import baseline_factories
from tasks.release.recipes import baseline_recipe, write_recipe
from tasks.resume import STAGE_CACHE
from tasks.splitting.split import Selection
from tasks.splitting.split_shards import read_split_shard, split_shard_files

logger = logging.getLogger(__name__)

STAGES = {"valid": ("train", "valid_targets"), "test": ("test_history", "test_targets")}
BUCKET = "bucket"
RECENT = "recent"


def history_end(split_dir: Path, table: str) -> dt.datetime:
    """The latest timestamp of a sharded split table (``train``, ``test_history``)."""
    frame = pl.scan_parquet(split_dir / table / "*.parquet").select(pl.col(TIMESTAMP).max())
    return frame.collect().item()


def write_buckets(frame: pl.DataFrame, key: str, n_buckets: int, path: Path) -> None:
    """``frame`` with a bucket column, one row group per bucket (read back by filter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buckets = shard_of(frame[key], n_buckets, purpose="bucket").alias(BUCKET)
    bucketed = frame.with_columns(buckets).sort(BUCKET)
    with pq.ParquetWriter(path, bucketed.head(0).to_arrow().schema) as writer:
        for part in bucketed.partition_by(BUCKET, maintain_order=True):
            writer.write_table(part.to_arrow())


def read_bucket(files: list[Path], bucket: int) -> pl.DataFrame:
    """The rows of ``bucket`` in files written by :func:`write_buckets`."""
    return pl.scan_parquet(files).filter(pl.col(BUCKET) == bucket).drop(BUCKET).collect()


@task(name="baseline-map", task_run_name="baseline-map-{stage}-{shard:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def map_shard(split_dir: Path, shard: int, stage: str, t_max: dt.datetime, recent_days: float,
              n_buckets: int, work: Path) -> None:
    """Write one shard's additive tables of one stage's history (see the module docstring)."""
    history = getattr(read_split_shard(split_dir, shard), STAGES[stage][0])
    counts = weighted_counts(history, DEFAULT_EVENT_WEIGHTS, t_max, recent_days).rename(
        {SCORE: RECENT}).join(history.group_by(ITEM).len(COUNT), on=ITEM)
    pairs = CoVisitation().partial(history, t_max)["pairs"]
    write_buckets(counts, ITEM, n_buckets, work / stage / "counts" / f"shard-{shard:05d}.parquet")
    write_buckets(pairs, "src", n_buckets, work / stage / "pairs" / f"shard-{shard:05d}.parquet")


@task(name="baseline-reduce-counts", task_run_name="baseline-reduce-counts-{stage}-{bucket:05d}",
      retries=1, persist_result=True, cache_policy=STAGE_CACHE)
def reduce_counts(work: Path, stage: str, bucket: int) -> pl.DataFrame:
    """One bucket of the whole history's counts per item."""
    files = sorted((work / stage / "counts").glob("*.parquet"))
    return sum_partials([{"counts": read_bucket(files, bucket)}])["counts"]


@task(name="baseline-reduce-pairs", task_run_name="baseline-reduce-pairs-{stage}-{bucket:05d}",
      retries=1, persist_result=True, cache_policy=STAGE_CACHE)
def reduce_pairs(work: Path, stage: str, bucket: int) -> Path:
    """One bucket of source items' neighbours, from every shard's pairs; returns its file.

    The popularity that normalises the pairs is read from the stage's ``counts.parquet`` (a
    catalogue-sized table passed as an argument would travel with every task, through the
    scheduler).
    """
    popularity = pl.read_parquet(work / stage / "counts.parquet", columns=[ITEM, ALL_TIME]
                                 ).rename({ALL_TIME: SCORE})
    files = sorted((work / stage / "pairs").glob("*.parquet"))
    pairs = sum_partials([{"pairs": read_bucket(files, bucket)}])["pairs"]
    out = work / stage / "neighbours" / f"bucket-{bucket:05d}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    CoVisitation().neighbours_from(pairs, popularity).write_parquet(out)
    return out


def write_popularity(counts: pl.DataFrame, folder: Path) -> dict[str, Path]:
    """Order the catalogue once per stage for every score task: ``{ordering: file}``.

    ``all_time``: the popularity, co-visitation and buy-again baselines' ordering; ``recent``:
    the recent-popularity baseline's (its window's counts, ties by all time).
    """
    window = counts.select(ITEM, pl.col(RECENT).alias(SCORE), ALL_TIME)
    tables = {ALL_TIME: all_time_popularity(counts), RECENT: window_popularity(window)}
    files = {name: folder / f"popularity_{name}.parquet" for name in tables}
    for name, table in tables.items():
        table.write_parquet(files[name])
    return files


def _shared(name: str, t_max: dt.datetime, popularity: dict[str, pl.DataFrame],
            neighbours: pl.DataFrame) -> SharedState:
    """The shared state each baseline ``name`` fits with: its ordered popularity table."""
    ordering = RECENT if name == "recent_popularity" else ALL_TIME
    tables = {"popularity": popularity[ordering]}
    if name == "covisitation":
        tables["neighbours"] = neighbours
    return SharedState(t_max, tables)


def join_files(files: list[Path], out: Path) -> Path:
    """The rows of the Parquet ``files``, in order, streamed into ``out``; returns ``out``.

    Row groups pass through: the flow process never holds the whole table (the buckets'
    neighbours are catalogue x neighbours rows, 51M at 100M events: 2 GiB read whole).
    """
    pl.scan_parquet(files).sink_parquet(out)
    return out


def read_neighbours(path: Path, history: pl.DataFrame) -> pl.DataFrame:
    """The neighbours of the items in ``history`` only (a shard needs no other source items)."""
    items = history.select(ITEM).unique().lazy()
    return pl.scan_parquet(path).join(items, on=ITEM, how="semi").collect()


@task(name="baseline-score", task_run_name="baseline-score-{stage}-{shard:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def score_shard(split_dir: Path, shard: int, stage: str, t_max: dt.datetime, ks: list[int],
                exclude_seen: bool, recent_days: float, counts: Path,
                popularity: dict[str, Path], neighbours: Path, selection: Selection,
                lists: Path | None = None, depth: int | None = None, every_user: bool = False
                ) -> dict[str, dict[str, Any]]:
    """Fit every baseline on one shard's users with the shared tables; partial metrics.

    Validation is scored on the users of the selection holdout only. ``popularity``: the
    catalogue ordered once for all shards (:func:`write_popularity`); a task sorts no
    catalogue-sized table. With ``lists``, each baseline's lists ``depth`` deep are written to
    ``lists/<baseline>/shard-XXXXX.parquet`` (the serving lists): the target users', or with
    ``every_user`` every user of the history's (no metrics without targets).
    """
    split = read_split_shard(split_dir, shard)
    history_name, targets_name = STAGES[stage]
    history, targets = getattr(split, history_name), getattr(split, targets_name)
    if stage == "valid":
        targets = selection.targets(split)
    item_counts = pl.read_parquet(counts, columns=[ITEM, COUNT])
    ordered = {name: pl.read_parquet(path) for name, path in popularity.items()}
    neighbour_table = read_neighbours(neighbours, history)
    parts = {}
    users = (history if every_user else targets)[USER].unique(maintain_order=True)
    for name, factory in baseline_factories(recent_days).items():
        model = factory().fit(history, _shared(name, t_max, ordered, neighbour_table))
        recs = model.recommend(users, k=max(max(ks), depth or 0), exclude_seen=exclude_seen)
        if lists is not None:
            write_part(recs, shard_file(lists / name, shard))
        if targets.is_empty():
            continue
        parts[name] = partial_metrics(recs.filter(pl.col(RANK) <= max(ks)), targets, ks,
                                      item_counts)
    return parts


def evaluate_baselines_sharded(
    split_dir: Path, ks: list[int], n_items: int, exclude_seen: bool, recent_days: float,
    work: Path, selection: Selection | None = None, list_depth: int | None = None,
    stages: tuple[str, ...] = tuple(STAGES), every_user: bool = False, n_buckets: int = BUCKETS,
) -> dict[str, dict[str, dict[str, float]]]:
    """Every baseline's ``valid`` and ``test`` metrics on a sharded split (call inside a flow).

    ``valid`` is on the users of ``selection`` (default: every validation user). With
    ``list_depth``, each baseline's test lists that deep go to ``work/lists/<baseline>/``
    (every user's of the test history with ``every_user``), its validation lists (the
    selection's users, the largest cut-off deep) to ``work/valid-lists/<baseline>/``.
    ``stages``: those to fit and score (the release's refits: ``("test",)``). ``n_buckets``: the
    item buckets of the reducers (see :data:`BUCKETS`).

    Returns the same ``{name: {stage: metrics}}`` as
    :func:`tasks.evaluation.evaluate.evaluate_baselines`.
    """
    log = get_run_logger()
    shards = split_shard_files(split_dir)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for name in baseline_factories(recent_days):  # what the release refits
        write_recipe(work / "models" / name, baseline_recipe(name, recent_days, exclude_seen))
    for stage in stages:
        history_name = STAGES[stage][0]
        t_max = history_end(split_dir, history_name)
        gather(map_shard.map(unmapped(split_dir), shards, stage=unmapped(stage),
                             t_max=unmapped(t_max), recent_days=unmapped(recent_days),
                             n_buckets=unmapped(n_buckets), work=unmapped(work)))
        counts = pl.concat(gather(reduce_counts.map(unmapped(work), unmapped(stage),
                                                    list(range(n_buckets)))))
        counts_file = work / stage / "counts.parquet"
        counts.write_parquet(counts_file)
        ordered = write_popularity(counts, work / stage)
        files = gather(reduce_pairs.map(unmapped(work), unmapped(stage), list(range(n_buckets))))
        neighbours_file = join_files(files, work / stage / "neighbours.parquet")
        parts = gather(score_shard.map(
            unmapped(split_dir), shards, stage=unmapped(stage), t_max=unmapped(t_max),
            ks=unmapped(ks), exclude_seen=unmapped(exclude_seen),
            recent_days=unmapped(recent_days), counts=unmapped(counts_file),
            popularity=unmapped(ordered), neighbours=unmapped(neighbours_file),
            selection=unmapped(selection or Selection()),
            lists=unmapped(None if not list_depth else work / "lists" if stage == "test"
                           else work / "valid-lists"),
            depth=unmapped(list_depth if stage == "test" else None),
            every_user=unmapped(every_user and stage == "test")))
        for name in [name for name in baseline_factories(recent_days)
                     if any(name in part for part in parts)]:
            merged = merge_partials([part[name] for part in parts if name in part], n_items)
            scores.setdefault(name, {})[stage] = merged
            if stage == "valid":
                (selection or Selection()).check(int(merged.get("users", 0)))
        log.info("baselines %s: %d shards, %d items, %d neighbour rows", stage, len(shards),
                 counts.height, pl.scan_parquet(neighbours_file).select(pl.len()).collect().item())
    return scores
