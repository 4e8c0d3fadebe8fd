"""The bounded, seeded sample of training groups that the sharded ranker learns from.

Each shard's training windows are counted (:func:`window_stats`, :func:`kept_windows`); a
window's groups are its target users, drawn by a seeded hash of the group at the rate
``ranker.sample_groups`` / (such groups in every window), the held-out users' groups likewise
(:func:`draw`). Only drawn groups get labelled candidates and features, per shard
(:func:`shard_frames`), exactly as :meth:`tasks.ranking.reranker.RankingPipeline.training_frames`
builds them; one task gathers them in the local engine's row order (:func:`sample_groups`).
Steps 1, 3 and 4 of :mod:`tasks.ranking.rank_shards`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task

from models.columns import ITEM, TIMESTAMP, USER
from tasks.data.shards import shard_file, shard_of
from tasks.ranking.candidate_sources import CAND_RANK, LABEL
from tasks.ranking.candidates import recall_counts
from tasks.ranking.features import candidate_features, check_features
from tasks.ranking.rank_tables import (
    GROUP_KEY,
    HELPERS,
    POSITIVE,
    USER_KEY,
    VALID,
    WINDOW,
    external_candidates,
    shard_state,
    stage_events,
)
from tasks.ranking.reranker import (
    HOLDOUT_SCALE,
    QUERY,
    RankerConfig,
    TrainingData,
    every_window,
    holdout_key,
)
from tasks.resume import STAGE_CACHE
from tasks.splitting.split import Selection
from tasks.splitting.split_shards import read_split_shard


@task(name="ranker-windows", task_run_name="ranker-windows-{shard:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def window_stats(split_dir: Path, shard: int, config: RankerConfig, selection: Selection
                 ) -> list[dict[str, Any]]:
    """One shard's counts per training window, for :func:`kept_windows` and :func:`draw`.

    Per window: the latest history timestamp (None: no history), the target count, the target
    users outside and inside the holdout, and the shard's first validation user in the holdout
    draw (``(key, user)``, the fallback of a tiny shop). The selection holdout's validation
    targets are left out.
    """
    split = selection.tuning(read_split_shard(split_dir, shard))
    valid = split.valid_targets.select(USER).unique()
    first = None
    if valid.height:
        row = valid.with_columns(holdout_key(valid[USER], config.seed).alias("key")).sort(
            "key", USER).row(0)
        first = (row[1], row[0])
    stats = []
    for j, (history, targets) in enumerate(every_window(split, config.extra_windows,
                                                         config.window_stride)):
        users = _keys(targets.select(USER).unique(), valid, j, config.seed)
        held = users.select(_held(config).sum()).item()
        stats.append({"end": history[TIMESTAMP].max() if history.height else None,
                      "targets": targets.height, "held": held, "free": users.height - held,
                      "fallback": first})
    return stats


def kept_windows(stats: list[list[dict[str, Any]]]) -> dict[str, dt.datetime]:
    """``{w<j>: history end}`` of the windows to learn from (see the module docstring)."""
    kept = {}
    for j in range(len(stats[0]) if stats else 0):
        ends = [shard[j]["end"] for shard in stats if shard[j]["end"] is not None]
        if not ends or not sum(shard[j]["targets"] for shard in stats):
            break
        kept[f"w{j}"] = max(ends)
    return kept


@dataclass(frozen=True)
class Draw:
    """Which groups the ranker learns from: sampling rates and the tiny-shop fallback user."""

    train_rate: float
    held_rate: float
    fallback: str | None


def draw(stats: list[list[dict[str, Any]]], windows: int, config: RankerConfig) -> Draw:
    """Rates that bound the training groups to ``sample_groups`` (held-out: its share)."""
    rows = [shard[j] for shard in stats for j in range(windows)]
    free, held = sum(r["free"] for r in rows), sum(r["held"] for r in rows)
    fallback = None
    if not sum(shard[0]["held"] for shard in stats):  # a tiny shop: hold out one user
        fallback = min((s[0]["fallback"] for s in stats if s[0]["fallback"]),
                       default=(0, None))[1]
        held = max(held, windows)
    bound_held = max(1, round(config.sample_groups * config.holdout_share))
    return Draw(min(1.0, config.sample_groups / max(free, 1)),
                min(1.0, bound_held / max(held, 1)), fallback)


@task(name="ranker-frames", task_run_name="ranker-frames-{stage}-{shard:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def shard_frames(split_dir: Path, shard: int, stage: str, end: dt.datetime, draw: Draw,
                 config: RankerConfig, items_path: Path | None,
                 ordered_only: bool, work: Path, selection: Selection,
                 source: Path | None = None) -> dict[str, Any]:
    """Write one shard's drawn, labelled candidate groups of one window; return their counts.

    The selection holdout's validation targets are left out. ``source``: the saved external
    candidate source of the training windows (the transformer fitted before the earliest one),
    called on the drawn users of this shard.
    """
    split = selection.tuning(read_split_shard(split_dir, shard))
    history, targets = stage_events(split, stage, config)
    out: dict[str, Any] = {"positive_groups": 0, "held_groups": 0, "recall": None}
    if history.is_empty() or targets.is_empty():
        return out
    j = int(stage.removeprefix("w"))
    keys = _keys(targets.select(USER).unique(), split.valid_targets.select(USER).unique(), j,
                 config.seed)
    held = _held(config, draw.fallback)
    keys = keys.filter(pl.when(held).then(pl.col(GROUP_KEY) < draw.held_rate * HOLDOUT_SCALE)
                       .otherwise(pl.col(GROUP_KEY) < draw.train_rate * HOLDOUT_SCALE))
    targets = targets.join(keys.select(USER), on=USER, how="semi")
    if targets.is_empty():
        return out
    items = pl.read_parquet(items_path) if items_path else None
    tables, covis = shard_state(work, stage, history, end, config)
    external, vectors = external_candidates(source, history, keys[USER])
    frame = candidate_features(history, keys[USER], covis, config.candidates,
                               config.features, items, external, ordered_only, targets,
                               config.user_chunk, tables, vectors)
    if stage == "w0":
        out["recall"] = recall_counts(frame, targets)
        if config.check_features:
            check_features(frame)
    query = (pl.lit(f"{j}:") + pl.col(USER)).alias(QUERY)
    frame = frame.with_columns(query).join(keys, on=USER, how="left", maintain_order="left")
    frame = frame.with_columns((pl.col(LABEL).max().over(USER) > 0).alias(POSITIVE))
    out["positive_groups"] = frame.filter(~held & pl.col(POSITIVE))[USER].n_unique()
    out["held_groups"] = frame.filter(held)[USER].n_unique()
    for folder, table in (("frames", frame), ("targets", targets.select(USER, ITEM).unique()
                                              .with_columns(query).join(keys, on=USER))):
        path = shard_file(work / folder / stage, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        table.write_parquet(path)
    return out


def _keys(users: pl.DataFrame, valid: pl.DataFrame, window: int, seed: int) -> pl.DataFrame:
    """Per user: window, validation user or not, holdout key and the group's sampling key."""
    ids = users[USER]
    return users.with_columns(
        pl.lit(window, pl.Int32).alias(WINDOW),
        pl.col(USER).is_in(valid[USER].implode()).alias(VALID),
        holdout_key(ids, seed).alias(USER_KEY),
        shard_of(ids, HOLDOUT_SCALE, purpose=f"group:{window}", seed=seed).alias(GROUP_KEY))


def _held(config: RankerConfig, fallback: str | None = None) -> pl.Expr:
    """Held out: a validation user drawn into the holdout (or the fallback user)."""
    drawn = pl.col(USER_KEY) < config.holdout_share * HOLDOUT_SCALE
    if fallback is not None:
        drawn = drawn | (pl.col(USER) == fallback)
    return pl.col(VALID) & drawn


@task(name="ranker-sample", retries=1, persist_result=True, cache_policy=STAGE_CACHE)
def sample_groups(work: Path, stages: list[str], fallback: str | None, config: RankerConfig
                  ) -> dict[str, int]:
    """Write the drawn groups as ``train``, ``holdout`` and ``holdout_targets`` Parquet files.

    ``train`` keeps the groups with a positive that are not held out; the rows are in the local
    engine's order.
    """
    held = _held(config, fallback)
    frames = pl.scan_parquet([work / "frames" / s / "*.parquet" for s in stages])
    targets = pl.scan_parquet([work / "targets" / s / "*.parquet" for s in stages])
    order = [WINDOW, USER, CAND_RANK]
    train = frames.filter(~held & pl.col(POSITIVE)).sort(order).drop(HELPERS).collect()
    holdout = frames.filter(held).sort(order).drop(HELPERS).collect()
    holdout_targets = (targets.filter(held).sort(WINDOW, USER, ITEM).select(QUERY, ITEM)
                       .collect())
    train.write_parquet(work / "train.parquet")
    holdout.write_parquet(work / "holdout.parquet")
    holdout_targets.write_parquet(work / "holdout_targets.parquet")
    return {"train_groups": train[QUERY].n_unique(), "train_rows": train.height,
            "holdout_groups": holdout[QUERY].n_unique(), "holdout_rows": holdout.height}


def read_sample(work: Path) -> TrainingData:
    """The sample :func:`sample_groups` wrote, as the study's :class:`TrainingData`."""
    return TrainingData(pl.read_parquet(work / "train.parquet"),
                        pl.read_parquet(work / "holdout.parquet"),
                        pl.read_parquet(work / "holdout_targets.parquet"), {})
