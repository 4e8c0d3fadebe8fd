"""The LightGBM re-ranker of a sharded split: the same model as in one process, on a Dask cluster.

Each stage is a task per shard (or per item bucket) on the cluster; no task holds more than one
shard, one bucket, or the bounded training sample:

1. **windows**: each shard's training windows (:func:`tasks.ranking.reranker.every_window`); a
   window is kept when it has history and targets in some shard, up to the first that has none
   anywhere (as :func:`tasks.ranking.reranker.training_windows` does in one process).
2. **tables**, per window and for the test history, by map-reduce: each shard's item partials and
   co-visitation pair sums (:mod:`tasks.ranking.history_tables`), written by item bucket; summed per
   bucket; the neighbours pruned per bucket. A shard's task then reads the summed item table and
   only the neighbours of its users' items.
3. **draw**: a window's groups are its target users; the groups of users outside the holdout
   are drawn (seeded CRC-32 of the group) at the rate ``ranker.sample_groups`` / (such groups in
   every window), the held-out users' groups likewise, bounded by the holdout share of that size.
   Only drawn groups are built, so the frames' cost follows the sample, not the log; on a shop
   with fewer groups every group is drawn and the model is the one the local engine learns.
4. **frames**: per shard and window, the drawn groups' labelled candidates and features, exactly
   as :meth:`tasks.ranking.reranker.RankingPipeline.training_frames` builds them; then one task
   gathers them into the sample (training groups with a positive, held-out groups, held-out targets)
   in the local engine's row order. The candidate recall of the validation window is that of its
   drawn users.
5. **study**: the trials in parallel, one task per worker, each running its share of the missing
   trials of the study in its RDB storage (any SQLAlchemy URL; a server database when the
   workers are on several machines).
6. **refit and test**: the best parameters refitted on the sample; per shard, the test users'
   candidates, features, scores and top-K lists (``lists/shard-XXXXX.parquet``) and partial
   metrics, merged exactly (:func:`models.metrics.merge_partials`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger, task, unmapped

from models.baselines import (
    ALL_TIME,
    DEFAULT_EVENT_WEIGHTS,
    CoVisitation,
    SharedState,
    sum_partials,
    weighted_counts,
)
from models.columns import ITEM, SCORE, TIMESTAMP, USER
from models.errors import DataError
from models.lgbm_ranker import LightGBMRanker
from models.metrics import COUNT, merge_partials, partial_metrics
from tasks.checks.validate_shards import gather
from tasks.data.shards import host_cores, shard_file, shard_of
from tasks.evaluation.evaluate_shards import (
    history_end,
    read_bucket,
    read_neighbours,
    write_buckets,
)
from tasks.ranking.candidates import CAND_RANK, LABEL, merge_recall, prepare_history, recall_counts
from tasks.ranking.features import candidate_features, check_features, table_settings
from tasks.ranking.history_tables import (
    HistoryTables,
    TableSettings,
    finish_tables,
    item_partials,
    sum_item_partials,
)
from tasks.ranking.reranker import (
    HOLDOUT_SCALE,
    MODEL_NAME,
    QUERY,
    RankerConfig,
    RankingPipeline,
    TrainingData,
    every_window,
    holdout_key,
    rank_scored,
)
from tasks.ranking.study import (
    TrialLogger,
    default_storage,
    digest_study_name,
    finished_trials,
    open_study,
)
from tasks.ranking.tune import log_plots, log_results, make_objective
from tasks.resume import STAGE_CACHE
from tasks.splitting.split import Selection, Split
from tasks.splitting.split_shards import read_split_shard, split_shard_files

logger = logging.getLogger(__name__)

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


@task(name="ranker-windows", retries=1, persist_result=True, cache_policy=STAGE_CACHE)
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


# ---- 2. tables --------------------------------------------------------------------------------

@task(name="ranker-tables-map", retries=1, persist_result=True, cache_policy=STAGE_CACHE)
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


@task(name="ranker-tables-reduce-items", retries=1, persist_result=True, cache_policy=STAGE_CACHE)
def reduce_items(work: Path, stage: str, bucket: int) -> pl.DataFrame:
    """One bucket of the stage's summed item partials."""
    files = sorted((work / stage / "items").glob("*.parquet"))
    return sum_item_partials([read_bucket(files, bucket)])


@task(name="ranker-tables-reduce-pairs", retries=1, persist_result=True, cache_policy=STAGE_CACHE)
def reduce_neighbours(work: Path, stage: str, bucket: int, popularity: pl.DataFrame,
                      config: RankerConfig) -> Path:
    """One bucket of source items' co-visitation neighbours; returns its file."""
    files = sorted((work / stage / "pairs").glob("*.parquet"))
    pairs = sum_partials([{"pairs": read_bucket(files, bucket)}])["pairs"]
    out = work / stage / "neighbours" / f"bucket-{bucket:05d}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    CoVisitation(**config.covisitation).neighbours_from(pairs, popularity).write_parquet(out)
    return out


def build_tables(split_dir: Path, shards: list[int], stage: str, end: dt.datetime,
                 config: RankerConfig, settings: TableSettings, work: Path,
                 neighbours: Path | None = None) -> None:
    """Map-reduce the stage's tables into ``work/<stage>/items.parquet`` and ``neighbours``.

    ``neighbours``: the same history's co-visitation neighbours, already reduced (by the
    baselines, with the same settings); the pairs are then not counted again.
    """
    n_buckets = len(shards)
    gather(map_tables.map(unmapped(split_dir), shards, stage=unmapped(stage), end=unmapped(end),
                          config=unmapped(config), settings=unmapped(settings),
                          n_buckets=unmapped(n_buckets), work=unmapped(work),
                          pairs=unmapped(neighbours is None)))
    items = pl.concat(gather(reduce_items.map(unmapped(work), unmapped(stage),
                                              list(range(n_buckets)))))
    items.write_parquet(work / stage / "items.parquet")
    if neighbours is not None:
        shutil.copyfile(neighbours, work / stage / "neighbours.parquet")
        return
    popularity = items.select(ITEM, pl.col(COVIS_ALL).alias(SCORE))
    files = gather(reduce_neighbours.map(unmapped(work), unmapped(stage), list(range(n_buckets)),
                                         popularity=unmapped(popularity),
                                         config=unmapped(config)))
    pl.concat([pl.read_parquet(f) for f in files]).write_parquet(
        work / stage / "neighbours.parquet")


def shard_state(work: Path, stage: str, history: pl.DataFrame, end: dt.datetime,
                config: RankerConfig, settings: TableSettings, items: pl.DataFrame | None
                ) -> tuple[HistoryTables, CoVisitation]:
    """The whole history's tables and a co-visitation model of this shard's users."""
    partials = pl.read_parquet(work / stage / "items.parquet")
    neighbours = read_neighbours(work / stage / "neighbours.parquet", history)
    counts = partials.select(ITEM, pl.col(COVIS_ALL).alias(SCORE), pl.col(COVIS_ALL)
                             .alias(ALL_TIME))
    covis = CoVisitation(**config.covisitation).fit(
        history, SharedState(end, {"counts": counts, "neighbours": neighbours}))
    return finish_tables(partials, end, settings, items), covis


# ---- 3. frames --------------------------------------------------------------------------------

@task(name="ranker-frames", retries=1, persist_result=True, cache_policy=STAGE_CACHE)
def shard_frames(split_dir: Path, shard: int, stage: str, end: dt.datetime, draw: Draw,
                 config: RankerConfig, settings: TableSettings, items_path: Path | None,
                 ordered_only: bool, work: Path, selection: Selection) -> dict[str, Any]:
    """Write one shard's drawn, labelled candidate groups of one window; return their counts.

    The selection holdout's validation targets are left out.
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
    tables, covis = shard_state(work, stage, history, end, config, settings, items)
    frame = candidate_features(history, keys[USER], covis, config.candidates,
                               config.features, items, None, ordered_only, targets,
                               config.user_chunk, tables)
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
        shard_of(f"{seed}:group:{window}:" + ids, HOLDOUT_SCALE).alias(GROUP_KEY))


def _held(config: RankerConfig, fallback: str | None = None) -> pl.Expr:
    """Held out: a validation user drawn into the holdout (or the fallback user)."""
    drawn = pl.col(USER_KEY) < config.holdout_share * HOLDOUT_SCALE
    if fallback is not None:
        drawn = drawn | (pl.col(USER) == fallback)
    return pl.col(VALID) & drawn


# ---- 4. sample --------------------------------------------------------------------------------

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


# ---- 5. study ---------------------------------------------------------------------------------

@task(name="ranker-trials", persist_result=True, cache_policy=STAGE_CACHE)
def run_trials(work: Path, study_name: str, storage: str, config: RankerConfig, ks: list[int],
               n_trials: int, seed: int, run_id: str | None, tracking_uri: str) -> int:
    """Run up to ``n_trials`` trials of the shared study on this worker; returns ``n_trials``.

    No trial starts after ``ranker.timeout_s``. ``seed`` seeds this worker's sampler: the same
    seed in two workers would propose the same random start-up trials twice.
    """
    study = open_study(study_name, storage, seed, config.sampler_startup_trials,
                       config.pruner_startup_trials, config.pruner_warmup_rounds)
    objective = make_objective(RankingPipeline(config), read_sample(work), ks,
                               TrialLogger(run_id, MODEL_NAME, tracking_uri))
    study.optimize(objective, n_trials=n_trials, timeout=config.timeout_s)
    return n_trials


def trial_shares(missing: int, workers: int) -> list[int]:
    """The missing trials spread over at most ``workers`` tasks (none when nothing is missing)."""
    tasks = min(max(missing, 0), max(workers, 1))
    return [missing // tasks + (i < missing % tasks) for i in range(tasks)]


# ---- 6. refit and test ------------------------------------------------------------------------

@task(name="ranker-refit", retries=1, persist_result=True, cache_policy=STAGE_CACHE)
def refit(work: Path, params: dict[str, Any], rounds: int, config: RankerConfig) -> Path:
    """Fit the best parameters on the whole sample (training and held-out groups); save it.

    The refit is the stage's only task: it uses every core of its host unless
    ``ranker.num_threads`` is set; the saved model keeps the configured threads for scoring.
    """
    data = read_sample(work)
    everyone = pl.concat([data.train, data.holdout], how="diagonal_relaxed")
    ranker = RankingPipeline(config).new_ranker(params, num_boost_round=rounds)
    ranker.num_threads = config.num_threads or host_cores()
    ranker.fit(everyone)
    ranker.num_threads = config.num_threads
    ranker.save(work / "model")
    return work / "model"


@task(name="ranker-score", retries=1, persist_result=True, cache_policy=STAGE_CACHE)
def score_shard(split_dir: Path, shard: int, stage: str, end: dt.datetime, config: RankerConfig,
                settings: TableSettings, items_path: Path | None, ordered_only: bool,
                work: Path, ks: list[int], model: Path, selection: Selection) -> dict[str, Any]:
    """One shard's partial metrics and candidate recall counts of a stage.

    ``test``: the test users from the test history (their lists are written); ``w0``: the
    selection holdout's validation users from train.
    """
    split = read_split_shard(split_dir, shard)
    history, targets = split.test_history, split.test_targets
    if stage != TEST:
        history, targets = split.train, selection.targets(split)
    users = targets[USER].unique()
    if users.is_empty():
        return {"metrics": None, "recall": None}
    items = pl.read_parquet(items_path) if items_path else None
    tables, covis = shard_state(work, stage, history, end, config, settings, items)
    frame = candidate_features(history, users, covis, config.candidates, config.features,
                               items, None, ordered_only, None, config.user_chunk, tables)
    exclude = history.select(USER, ITEM).unique() if config.candidates.exclude_seen else None
    recs = rank_scored(LightGBMRanker.load(model), frame, users, max(ks), tables.popularity,
                       exclude)
    if stage == TEST:
        path = shard_file(work / "lists", shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        recs.write_parquet(path)
    counts = pl.read_parquet(work / stage / "items.parquet").select(
        ITEM, pl.col("i_n_events").cast(pl.Int64).alias(COUNT))
    return {"metrics": partial_metrics(recs, targets, ks, counts),
            "recall": recall_counts(frame, targets)}


def sharded_study_name(split_dir: Path, config: RankerConfig) -> str:
    """The configured name, else one derived from the split's summary and the settings."""
    info = json.loads((split_dir / "info.json").read_text())
    return config.study_name or digest_study_name(
        f"{MODEL_NAME}-sharded", info["protocol"], [json.dumps(info, sort_keys=True)], config)


def evaluate_ranker_sharded(
    split_dir: Path, items_path: Path | None, config: RankerConfig, ks: list[int], n_items: int,
    exclude_seen: bool, ordered_only: bool, work: Path, workers: int, run_id: str | None,
    tracking_uri: str, baselines: Path | None = None, selection: Selection | None = None,
) -> dict[str, Any]:
    """Tune, refit and test the re-ranker on a sharded split (call inside a flow).

    ``baselines``: the baselines' work folder, whose co-visitation neighbours of train and of
    the test history are the ranker's too when ``ranker.covisitation`` is left at its defaults.

    Returns ``valid`` and ``test`` metrics like the local engine, plus ``candidate_recall``,
    ``sample`` (its size), ``best_params``, ``study_name``, ``n_trials`` and ``model_dir``.
    """
    log = get_run_logger()
    config = config.model_copy(update={"candidates": config.candidates.model_copy(
        update={"exclude_seen": exclude_seen})})
    settings = table_settings(config.candidates, config.features, ordered_only)
    shards = split_shard_files(split_dir)
    common = {"config": unmapped(config), "settings": unmapped(settings),
              "work": unmapped(work)}
    tuned_on = selection or Selection()
    stats = gather(window_stats.map(unmapped(split_dir), shards, config=unmapped(config),
                                    selection=unmapped(tuned_on)))
    windows = kept_windows(stats)
    if "w0" not in windows:
        raise DataError("the ranker has no training window: the validation window has no "
                        "targets with a history. Check the split.")
    drawn = draw(stats, len(windows), config)
    reused = {}  # the baselines' neighbours of the same histories, when counted alike
    if baselines is not None and not config.covisitation:
        reused = {"w0": baselines / "valid" / "neighbours.parquet",
                  TEST: baselines / "test" / "neighbours.parquet"}
        reused = {stage: path for stage, path in reused.items() if path.is_file()}
    log.info("ranker: %d windows; groups drawn at %.4f (held out at %.4f)", len(windows),
             drawn.train_rate, drawn.held_rate)
    counts = []
    for stage, end in windows.items():
        build_tables(split_dir, shards, stage, end, config, settings, work,
                     reused.get(stage))
        counts.append(gather(shard_frames.map(
            unmapped(split_dir), shards, stage=unmapped(stage), end=unmapped(end),
            draw=unmapped(drawn), items_path=unmapped(items_path),
            ordered_only=unmapped(ordered_only), selection=unmapped(tuned_on), **common)))
        log.info("ranker window %s: %d drawn groups with a positive", stage,
                 sum(c["positive_groups"] for c in counts[-1]))
    sample = gather([sample_groups.submit(work, list(windows), drawn.fallback, config)])[0]
    log.info("ranker sample: %s", sample)

    storage = config.storage or default_storage()
    name = sharded_study_name(split_dir, config)
    study = open_study(name, storage, config.seed, config.sampler_startup_trials,
                       config.pruner_startup_trials, config.pruner_warmup_rounds)
    done = finished_trials(study)
    shares = trial_shares(config.n_trials - done, workers)
    seeds = [config.seed + done + i for i in range(len(shares))]  # a fresh study: seed first
    gather(run_trials.map(unmapped(work), unmapped(name), unmapped(storage), unmapped(config),
                          unmapped(ks), shares, seeds, unmapped(run_id), unmapped(tracking_uri)))
    study = open_study(name, storage, config.seed, config.sampler_startup_trials,
                       config.pruner_startup_trials, config.pruner_warmup_rounds)
    best = study.best_trial
    rounds = int(best.user_attrs.get("best_iteration", config.num_boost_round))
    model = gather([refit.submit(work, dict(best.params), rounds, config)])[0]

    valid = best.user_attrs.get("valid_metrics", {})
    stages = {TEST: history_end(split_dir, "test_history")}
    build_tables(split_dir, shards, TEST, stages[TEST], config, settings, work, reused.get(TEST))
    if selection is not None:  # the refitted ranker on the selection holdout, from train
        stages["w0"] = windows["w0"]
    merged = {}
    for stage, end in stages.items():
        parts = gather(score_shard.map(unmapped(split_dir), shards, stage=unmapped(stage),
                                       end=unmapped(end), items_path=unmapped(items_path),
                                       ordered_only=unmapped(ordered_only), ks=unmapped(ks),
                                       model=unmapped(model), selection=unmapped(tuned_on),
                                       **common))
        merged[stage] = merge_partials([p["metrics"] for p in parts if p["metrics"]], n_items)
        if stage == TEST:
            scored = [p for p in parts if p["metrics"] is not None]
    if selection is not None:
        valid = merged["w0"]
        selection.check(int(valid.get("users", 0)))
    test = merged[TEST]
    recall = {"valid": merge_recall([c["recall"] for c in counts[0] if c["recall"]]),
              "test": merge_recall([p["recall"] for p in scored])}
    result = {"valid": valid, "test": test,
              "candidate_recall": recall, "sample": sample, "best_params": dict(best.params),
              "best_trial": best.number, "best_iteration": rounds, "study_name": name,
              "n_trials": len(study.trials), "model_dir": str(model)}
    if run_id:
        log_results(run_id, result, config)
        log_plots(run_id, study, LightGBMRanker.load(model))
    log.info("lgbm ranker: test %s", {k: round(v, 4) for k, v in test.items() if "@" in k})
    return result
