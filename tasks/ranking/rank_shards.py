"""The LightGBM re-ranker of a sharded split: the same model as in one process, on a Dask cluster.

Each stage is a task per shard (or per item bucket) on the cluster; no task holds more than one
shard, one bucket, or the bounded training sample. The tables are :mod:`tasks.ranking.rank_tables`,
the windows, draw and frames :mod:`tasks.ranking.rank_sample`; this module runs the stages:

1. **windows**: each shard's training windows (:func:`tasks.ranking.reranker.every_window`); a
   window is kept when it has history and targets in some shard, up to the first that has none
   anywhere (as :func:`tasks.ranking.reranker.training_windows` does in one process).
2. **tables**, per window and for the test history, by map-reduce: each shard's item partials and
   co-visitation pair sums (:mod:`tasks.ranking.history_tables`), written by item bucket
   (``dask.buckets``); summed per bucket; the neighbours pruned per bucket; the item tables
   finished once per stage. A shard's task then reads the finished tables and only the
   neighbours of its users' items.
3. **draw**: a window's groups are its target users; the groups of users outside the holdout
   are drawn (seeded hash of the group) at the rate ``ranker.sample_groups`` / (such groups in
   every window), the held-out users' groups likewise, bounded by the holdout share of that size.
   Only drawn groups are built, so the frames' cost follows the sample, not the log; on a shop
   with fewer groups every group is drawn and the model is the one the local engine learns.
4. **frames**: per shard and window, the drawn groups' labelled candidates and features, exactly
   as :meth:`tasks.ranking.reranker.RankingPipeline.training_frames` builds them (with the
   transformer's candidates, source ``seq``, when it feeds the ranker: see **sources**); then one
   task gathers them into the sample (training groups with a positive, held-out groups, held-out
   targets) in the local engine's row order. The candidate recall of the validation window is
   that of its drawn users.
5. **study**: the trials in parallel, one task per worker, each running its share of the missing
   trials of the study in its RDB storage (any SQLAlchemy URL; a server database when the
   workers are on several machines).
6. **refit and test**: the best parameters refitted on the sample; per shard, the test users'
   candidates, features, scores and top-K lists (``lists/shard-XXXXX.parquet``) and partial
   metrics, merged exactly (:func:`models.metrics.merge_partials`); a score task takes its users
   ``ranker.user_chunk`` at a time, so it holds one chunk's candidates.

**sources**: when the transformer feeds the ranker's candidates, its two sources are saved once,
before the frames (:func:`tasks.transformer.sequence_shards.save_ranker_sources`): the training
source (``sources/train``: refitted on the history of the earliest training window), called for
every training window and for the selection holdout's users from train, and the serving source
(the transformer of the test, fitted on train + validation), saved with the model in
``model/source`` as :meth:`tasks.ranking.reranker.RankingPipeline.save` keeps it, and called for
the test users. A per-shard task loads the folder it is given and asks it about its own users.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger, task, unmapped

from models.columns import ITEM, RANK, USER
from models.errors import DataError
from models.lgbm_ranker import LightGBMRanker
from models.metrics import COUNT, merge_partials, partial_metrics
from models.user_lists import write_part
from tasks.checks.validate_shards import gather
from tasks.data.shards import BUCKETS, host_cores, shard_file
from tasks.evaluation.evaluate_shards import history_end
from tasks.ranking.candidates import add_counts, merge_recall, recall_counts, user_frame
from tasks.ranking.features import candidate_chunks, table_settings
from tasks.ranking.rank_sample import (
    draw,
    kept_windows,
    read_sample,
    sample_groups,
    shard_frames,
    window_stats,
)
from tasks.ranking.rank_tables import TEST, build_tables, external_candidates, shard_state
from tasks.ranking.reranker import (
    MODEL_NAME,
    SOURCE_DIR,
    RankerConfig,
    RankingPipeline,
    rank_scored,
)
from tasks.ranking.study import (
    TrialLogger,
    best_offset,
    default_storage,
    digest_study_name,
    finished_trials,
    open_study,
)
from tasks.ranking.tune import log_plots, log_results, make_objective, without_budget
from tasks.release.recipes import ranker_recipe, transformer_recipe, write_recipe
from tasks.resume import STAGE_CACHE
from tasks.splitting.split import Selection
from tasks.splitting.split_shards import read_split_shard, split_shard_files
from tasks.transformer.sequence import SOURCE_NAME, SequenceConfig
from tasks.transformer.sequence_shards import save_ranker_sources

logger = logging.getLogger(__name__)


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
def refit(work: Path, params: dict[str, Any], rounds: int, config: RankerConfig,
          new_item_offset: float = 0.0) -> Path:
    """Fit the best parameters on the whole sample (training and held-out groups); save it.

    ``new_item_offset``: the best trial's offset of the candidates without events.

    The refit is the stage's only task: it uses every core of its host unless
    ``ranker.num_threads`` is set; the saved model keeps the configured threads for scoring.
    """
    data = read_sample(work)
    everyone = pl.concat([data.train, data.holdout], how="diagonal_relaxed")
    ranker = RankingPipeline(config).new_ranker(params, num_boost_round=rounds)
    ranker.num_threads = config.num_threads or host_cores()
    ranker.fit(everyone)
    ranker.num_threads = config.num_threads
    ranker.new_item_offset = new_item_offset
    ranker.save(work / "model")
    return work / "model"


@task(name="ranker-score", task_run_name="ranker-score-{stage}-{shard:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def score_shard(split_dir: Path, shard: int, stage: str, end: dt.datetime, config: RankerConfig,
                items_path: Path | None, ordered_only: bool,
                work: Path, ks: list[int], model: Path, selection: Selection,
                source: Path | None = None, depth: int | None = None, every_user: bool = False
                ) -> dict[str, Any]:
    """One shard's partial metrics and candidate recall counts of a stage.

    ``test``: the test users from the test history (their lists, ``depth`` deep when given,
    are written; every user of the history with ``every_user``); ``w0``: the selection
    holdout's validation users from train (their lists written to ``work/lists/w0/`` when
    ``depth`` is given). ``source``: the saved external candidate source of
    the stage (the model's own, ``model/source``, for the test), asked about this shard's users.
    """
    split = read_split_shard(split_dir, shard)
    history, targets = split.test_history, split.test_targets
    if stage != TEST:
        history, targets = split.train, selection.targets(split)
    users = (history if every_user else targets)[USER].unique()
    if users.is_empty():
        return {"metrics": None, "recall": None}
    items = pl.read_parquet(items_path) if items_path else None
    tables, covis = shard_state(work, stage, history, end, config)
    external, vectors = external_candidates(source, history, users)
    exclude = history.select(USER, ITEM).unique() if config.candidates.exclude_seen else None
    ranker, parts, recall = LightGBMRanker.load(model), [], []
    for chunk, frame in candidate_chunks(history, users, covis, config.candidates,
                                         config.features, items, external, ordered_only, None,
                                         config.user_chunk, tables, vectors):
        # a chunk of users at a time: the task holds one chunk's candidates, not the shard's
        parts.append(rank_scored(ranker, frame, chunk, max(max(ks), depth or 0),
                                 tables.popularity, exclude))
        recall.append(recall_counts(frame, targets.join(chunk, on=USER, how="semi")))
        del frame
    unasked = targets.join(user_frame(users), on=USER, how="anti").select(USER, ITEM).unique()
    recall.append({"targets": float(unasked.height)})  # every target counts, found or not
    recs = pl.concat(parts)
    if stage == TEST:
        write_part(recs, shard_file(work / "lists", shard))
    elif depth:
        write_part(recs, shard_file(work / "lists" / stage, shard))
    if targets.is_empty():
        return {"metrics": None, "recall": None}
    recs = recs.filter(pl.col(RANK) <= max(ks))
    counts = pl.read_parquet(work / stage / "items.parquet").select(
        ITEM, pl.col("i_n_events").cast(pl.Int64).alias(COUNT))
    return {"metrics": partial_metrics(recs, targets, ks, counts),
            "recall": add_counts(recall)}


def tune(work: Path, split_dir: Path, config: RankerConfig, ks: list[int], tuned_on: Selection,
         source_recipe: dict[str, Any] | None, workers: int, run_id: str | None,
         tracking_uri: str) -> Any:
    """Run the study's missing trials on the workers (a rerun resumes it); the study."""
    storage = config.storage or default_storage()
    name = sharded_study_name(split_dir, config, tuned_on, source_recipe)
    study = open_study(name, storage, config.seed, config.sampler_startup_trials,
                       config.pruner_startup_trials, config.pruner_warmup_rounds)
    done = finished_trials(study)
    shares = trial_shares(config.n_trials - done, workers)
    seeds = [config.seed + done + i for i in range(len(shares))]  # a fresh study: seed first
    gather(run_trials.map(unmapped(work), unmapped(name), unmapped(storage), unmapped(config),
                          unmapped(ks), shares, seeds, unmapped(run_id), unmapped(tracking_uri)))
    return open_study(name, storage, config.seed, config.sampler_startup_trials,
                      config.pruner_startup_trials, config.pruner_warmup_rounds)


def sharded_study_name(split_dir: Path, config: RankerConfig, selection: Selection,
                       source_recipe: dict[str, Any] | None = None) -> str:
    """The configured name, else one derived from the split's summary and the settings.

    The selection holdout (share and seed: the users no trial learns or stops on) counts too,
    and so does ``source_recipe``, the recipe of the transformer that proposes candidates (but
    its study's budget): ``lgbm_ranker-seq-sharded-...`` then, as the local engine names it.
    """
    info = json.loads((split_dir / "info.json").read_text())
    data = [json.dumps(info, sort_keys=True), f"selection={[selection.share, selection.seed]}"]
    family = [MODEL_NAME, "sharded"]
    if source_recipe is not None:
        data.append(f"source={json.dumps(without_budget(source_recipe), sort_keys=True)}")
        family = [MODEL_NAME, SOURCE_NAME, "sharded"]
    return config.study_name or digest_study_name(
        "-".join(family), info["protocol"], data, config)


def sequence_sources(split_dir: Path, items_path: Path | None, config: RankerConfig,
                     windows: dict[str, dt.datetime], work: Path,
                     transformer: dict[str, Any] | None,
                     transformer_config: SequenceConfig | None) -> dict[str, Path | None]:
    """The saved candidate sources of the stages: ``train`` (every training window) and ``test``.

    None each unless the ``transformer`` result (:func:`evaluate_transformer_sharded`) is given
    and its config feeds the ranker's candidates; then both are saved here (see **sources** in
    the module docstring).
    """
    if not (transformer and transformer_config and transformer_config.candidates):
        return {"train": None, TEST: None}
    paths = {"train": work / "sources" / "train", TEST: work / "model" / SOURCE_DIR}
    needed = ("best_params", "best_epoch", "model_dir", "exclude_seen")
    gather([save_ranker_sources.submit(
        split_dir, Path(transformer["sample_dir"]), items_path, transformer_config,
        {key: transformer[key] for key in needed}, len(windows) - 1, config.window_stride,
        paths["train"], paths[TEST])])
    return paths


def evaluate_ranker_sharded(
    split_dir: Path, items_path: Path | None, config: RankerConfig, ks: list[int], n_items: int,
    exclude_seen: bool, ordered_only: bool, work: Path, workers: int, run_id: str | None,
    tracking_uri: str, baselines: Path | None = None, selection: Selection | None = None,
    transformer: dict[str, Any] | None = None, transformer_config: SequenceConfig | None = None,
    list_depth: int | None = None, recipe: dict[str, Any] | None = None, every_user: bool = False,
    n_buckets: int = BUCKETS,
) -> dict[str, Any]:
    """Tune, refit and test the re-ranker on a sharded split (call inside a flow).

    ``baselines``: the baselines' work folder, whose co-visitation neighbours of train and of
    the test history are the ranker's too when ``ranker.covisitation`` is left at its defaults.
    With a ``transformer`` result (:func:`evaluate_transformer_sharded`) and its config asking
    for candidates, the transformer's nearest items join the candidates under the source name
    ``seq``, as with the local engine. The test users' lists are written to
    ``work/lists/shard-XXXXX.parquet``, ``list_depth`` deep when given (else the largest cut-off);
    with ``list_depth``, the selection holdout's (``w0``) too, to ``work/lists/w0/``.

    With a ``recipe`` (the release's refit: :mod:`tasks.release.release_shards`), no study: its
    parameters, rounds and offset are refitted on the sample (its selection holdout kept out of
    the windows) and only the test stage is scored, every user of the test history with
    ``every_user``; ``selection`` is then ignored. ``n_buckets``: the tables' item buckets.

    Returns ``valid`` and ``test`` metrics like the local engine, plus ``candidate_recall``,
    ``sample`` (its size), ``best_params``, ``study_name``, ``n_trials`` and ``model_dir``.
    """
    log = get_run_logger()
    config = config.seen_excluded(exclude_seen)
    settings = table_settings(config.candidates, config.features, ordered_only)
    shards = split_shard_files(split_dir)
    common = {"config": unmapped(config), "work": unmapped(work)}
    tuned_on = selection or Selection()
    if recipe is not None:
        tuned_on, selection = Selection(*recipe.get("selection", [0.0, 0])), None
    stats = gather(window_stats.map(unmapped(split_dir), shards, config=unmapped(config),
                                    selection=unmapped(tuned_on)))
    windows = kept_windows(stats)
    if "w0" not in windows:
        raise DataError("the ranker has no training window: the validation window has no "
                        "targets with a history. Check the split.")
    drawn = draw(stats, len(windows), config)
    sources = sequence_sources(split_dir, items_path, config, windows, work, transformer,
                               transformer_config)
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
                     reused.get(stage), n_buckets, items_path)
        counts.append(gather(shard_frames.map(
            unmapped(split_dir), shards, stage=unmapped(stage), end=unmapped(end),
            draw=unmapped(drawn), items_path=unmapped(items_path),
            ordered_only=unmapped(ordered_only), selection=unmapped(tuned_on),
            source=unmapped(sources["train"]), **common)))
        log.info("ranker window %s: %d drawn groups with a positive", stage,
                 sum(c["positive_groups"] for c in counts[-1]))
    sample = gather([sample_groups.submit(work, list(windows), drawn.fallback, config)])[0]
    log.info("ranker sample: %s", sample)

    source_recipe = None
    if sources[TEST] is not None:  # another transformer proposes other candidates
        source_recipe = transformer_recipe(transformer_config, transformer)
    if recipe is None:
        study = tune(work, split_dir, config, ks, tuned_on, source_recipe, workers, run_id,
                     tracking_uri)
        best = study.best_trial
        chosen = {"best_params": dict(best.params), "best_trial": best.number,
                  "best_iteration": int(best.user_attrs.get("best_iteration",
                                                            config.num_boost_round)),
                  "study_name": study.study_name, "new_item_offset": best_offset(best),
                  "new_item_offsets": best.user_attrs.get("new_item_offsets", []),
                  "n_trials": len(study.trials)}
        valid = best.user_attrs.get("valid_metrics", {})
    else:
        chosen = {"best_params": dict(recipe["params"]), "best_trial": None,
                  "best_iteration": int(recipe["rounds"]), "study_name": None,
                  "new_item_offset": float(recipe.get("new_item_offset", 0.0)),
                  "new_item_offsets": [], "n_trials": 0}
        valid = {}
    model = gather([refit.submit(work, chosen["best_params"], chosen["best_iteration"], config,
                                 chosen["new_item_offset"])])[0]

    stages = {TEST: history_end(split_dir, "test_history")}
    build_tables(split_dir, shards, TEST, stages[TEST], config, settings, work, reused.get(TEST),
                 n_buckets, items_path)
    if selection is not None:  # the refitted ranker on the selection holdout, from train
        stages["w0"] = windows["w0"]
    merged = {}
    for stage, end in stages.items():
        parts = gather(score_shard.map(unmapped(split_dir), shards, stage=unmapped(stage),
                                       end=unmapped(end), items_path=unmapped(items_path),
                                       ordered_only=unmapped(ordered_only), ks=unmapped(ks),
                                       model=unmapped(model), selection=unmapped(tuned_on),
                                       source=unmapped(sources.get(stage, sources["train"])),
                                       depth=unmapped(list_depth if stage == TEST else
                                                      max(ks) if list_depth else None),
                                       every_user=unmapped(every_user and stage == TEST),
                                       **common))
        merged[stage] = merge_partials([p["metrics"] for p in parts if p["metrics"]], n_items)
        if stage == TEST:
            scored = [p for p in parts if p["metrics"] is not None]
    if selection is not None:
        valid = merged["w0"]
        selection.check(int(valid.get("users", 0)))
    test = merged[TEST]
    recall = {"valid": merge_recall([c["recall"] for c in counts[0] if c["recall"]]),
              "test": merge_recall([p["recall"] for p in scored]) if scored else {}}
    result = {"valid": valid, "test": test, "candidate_recall": recall, "sample": sample,
              **chosen, "model_dir": str(model)}
    write_recipe(model, recipe or ranker_recipe(
        {**result, "config": config.model_dump(mode="json"), "ordered_only": ordered_only,
         "exclude_seen": exclude_seen}, source_recipe, tuned_on))
    if run_id and recipe is None:
        log_results(run_id, result, config)
        log_plots(run_id, study, LightGBMRanker.load(model))
    log.info("lgbm ranker: test %s", {k: round(v, 4) for k, v in test.items() if "@" in k})
    return result
