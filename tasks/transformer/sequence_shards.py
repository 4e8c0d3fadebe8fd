"""The sequential transformer on a sharded split: learnt from a bounded sample, scored per shard.

1. **sample**: the users drawn by a seeded hash of their id (the same in every process) at
   the rate ``transformer.sample_users`` / (users of the split), each shard writing its drawn
   users' four split tables to ``sample/<table>/shard-XXXXX.parquet``. Every epoch of every
   trial sees those sequences: the study's memory and time are bounded by the sample, not by
   the log.
2. **study and refit**, one task on a worker: the study of :mod:`tasks.transformer.sequence` on the
   sample (trials, pruning, nested MLflow runs), the best trial's model kept for validation, the
   best parameters refitted on the sample's train + validation events for the test.
3. **score**, a task per shard: the shard's validation users ranked from their train events by
   the best trial's model, its test users from their test history by the refitted one, with
   partial metrics merged exactly (:func:`models.metrics.merge_partials`). Users outside the
   sample are represented by their own events; items the sample never saw are not in the
   model's catalogue.
4. **ranker sources**, one task when the transformer feeds the ranker's candidates: the two
   candidate sources of :func:`tasks.transformer.sequence.ranker_sources` saved as folders that
   the ranker's per-shard tasks load and call on their own users (:func:`save_ranker_sources`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import polars as pl
from prefect import get_run_logger, task, unmapped

from models.columns import ITEM, RANK, USER
from models.errors import DataError
from models.metrics import COUNT, merge_partials, partial_metrics
from models.user_lists import write_part
from tasks.checks.validate_shards import gather
from tasks.data.shards import host_cores, shard_file, shard_of
from tasks.ranking.reranker import HOLDOUT_SCALE, every_window
from tasks.ranking.study import TrialLogger, default_storage
from tasks.release.recipes import transformer_recipe, write_recipe
from tasks.resume import STAGE_CACHE
from tasks.splitting.split import Selection, Split
from tasks.splitting.split_shards import TABLES, read_split_shard, split_shard_files
from tasks.transformer.sequence import (
    MODEL_NAME,
    SequenceConfig,
    best_epochs,
    best_offset,
    best_trial_model,
    fit_final,
    log_results,
    ranker_sources,
    run_transformer_study,
)

STAGES = {"valid": ("train", "valid_targets", "best"), "test": ("test_history", "test_targets",
                                                                 "model")}


@task(name="transformer-users", task_run_name="transformer-users-{shard:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def count_users(split_dir: Path, shard: int) -> int:
    """The users of one shard's test history (train + validation: every user of the split)."""
    return pl.scan_parquet(shard_file(split_dir / "test_history", shard)).select(
        pl.col(USER).n_unique()).collect().item()


@task(name="transformer-sample", task_run_name="transformer-sample-{shard:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def sample_shard(split_dir: Path, shard: int, rate: float, seed: int, out: Path) -> int:
    """Write the drawn users' four split tables of one shard; returns how many were drawn."""
    split = read_split_shard(split_dir, shard)
    users = split.test_history[USER].unique()
    drawn = users.filter(shard_of(users, HOLDOUT_SCALE, purpose="sequence", seed=seed)
                         < rate * HOLDOUT_SCALE).implode()
    for table in TABLES:
        path = shard_file(out / table, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        getattr(split, table).filter(pl.col(USER).is_in(drawn)).write_parquet(path)
    return drawn.list.len().item()


def read_sample(split_dir: Path, sample: Path) -> Split:
    """The sample's four tables as one :class:`~tasks.splitting.split.Split`."""
    info = json.loads((split_dir / "info.json").read_text())
    tables = {t: pl.read_parquet(sample / t / "*.parquet") for t in TABLES}
    return Split(protocol=info["protocol"], info=info["summary"], **tables)


@contextmanager
def every_core(config: SequenceConfig) -> Iterator[None]:
    """Torch on every core of the host (or ``model.num_threads``) while inside.

    For a stage's one task; the threads are restored after it, since the score tasks run side
    by side, one thread each.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(config.model.get("num_threads") or host_cores())
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@task(name="transformer-study", persist_result=True, cache_policy=STAGE_CACHE)
def tune_on_sample(split_dir: Path, work: Path, items_path: Path | None, config: SequenceConfig,
                   ks: list[int], exclude_seen: bool, n_items: int, run_id: str | None,
                   tracking_uri: str, selection: Selection, primary_metric: str | None = None
                   ) -> dict[str, Any]:
    """Run the study on the sample; save the best trial's model and the refit; their summary.

    The study is tuned on the sample's validation users outside the selection holdout, on
    ``primary_metric`` (early stopping, pruning and the trials' values).
    """
    split = read_sample(split_dir, work / "sample")
    tuning = selection.tuning(split)
    if tuning.valid_targets.is_empty():
        raise DataError("the transformer's sample has no validation targets: raise "
                        "transformer.sample_users.")
    items = pl.read_parquet(items_path) if items_path else None
    with every_core(config):
        study, objective = run_transformer_study(
            tuning, items, config, TrialLogger(run_id, MODEL_NAME, tracking_uri), ks,
            exclude_seen, n_items, primary_metric)
        best = study.best_trial
        epochs = best_epochs(best)
        best_trial_model(split, items, config, study, objective).save(work / "best")
        fit_final(split.test_history, items, config, dict(best.params), epochs,
                  new_item_offset=best_offset(best)).save(work / "model")
    return {"best_params": dict(best.params), "best_trial": best.number, "best_epoch": epochs,
            "new_item_offset": best_offset(best), "study_name": study.study_name,
            "n_trials": len(study.trials),
            "sample_valid": best.user_attrs.get("metrics", {})}


@task(name="transformer-score", task_run_name="transformer-score-{stage}-{shard:05d}", retries=1,
      persist_result=True, cache_policy=STAGE_CACHE)
def score_shard(split_dir: Path, shard: int, stage: str, work: Path, counts: Path,
                ks: list[int], exclude_seen: bool, selection: Selection,
                depth: int | None = None, every_user: bool = False) -> dict[str, Any] | None:
    """One shard's partial metrics of a stage (None without targets).

    Validation is scored on the selection holdout's users. With ``depth``, the users' lists
    that deep are written to ``work/lists/<stage>/shard-XXXXX.parquet`` (the serving lists):
    the target users', or with ``every_user`` every user of the history's.
    """
    from models.transformer import SequentialTransformer

    history_name, targets_name, model_name = STAGES[stage]
    split = read_split_shard(split_dir, shard)
    history, targets = getattr(split, history_name), getattr(split, targets_name)
    if stage == "valid":
        targets = selection.targets(split)
    users = (history if every_user else targets)[USER].unique(maintain_order=True)
    if users.is_empty():
        return None
    model = SequentialTransformer.load(work / model_name)
    recs = pl.from_pandas(model.recommend(users.to_list(), k=max(max(ks), depth or 0),
                                          exclude_seen=exclude_seen, history=history))
    if depth:
        write_part(recs, shard_file(work / "lists" / stage, shard))
    if targets.is_empty():
        return None
    popularity = pl.read_parquet(counts).select(ITEM, COUNT)
    return partial_metrics(recs.filter(pl.col(RANK) <= max(ks)), targets, ks, popularity)


@task(name="transformer-refit", persist_result=True, cache_policy=STAGE_CACHE)
def fit_on_sample(split_dir: Path, work: Path, items_path: Path | None, config: SequenceConfig,
                  recipe: dict[str, Any]) -> dict[str, Any]:
    """Fit a recipe (parameters, epochs, offset; no study) on the sample's test history; save it.

    Returns what :func:`tune_on_sample` returns for the refit (no study: ``n_trials`` 0).
    """
    split = read_sample(split_dir, work / "sample")
    items = pl.read_parquet(items_path) if items_path else None
    params, epochs = dict(recipe["params"]), int(recipe["epochs"])
    offset = float(recipe.get("new_item_offset", 0.0))
    with every_core(config):
        fit_final(split.test_history, items, config, params, epochs,
                  new_item_offset=offset).save(work / "model")
    return {"best_params": params, "best_trial": None, "best_epoch": epochs,
            "new_item_offset": offset, "study_name": None, "n_trials": 0, "sample_valid": {}}


@task(name="transformer-ranker-sources", retries=1, persist_result=True,
      cache_policy=STAGE_CACHE)
def save_ranker_sources(split_dir: Path, sample: Path, items_path: Path | None,
                        config: SequenceConfig, result: dict[str, Any], window: int,
                        stride: float, training: Path, serving: Path) -> None:
    """Save the ranker's candidate sources, as the local engine makes them, in two folders.

    ``training``: the tuned transformer refitted (best parameters, best epoch) on the sample's
    history of the ranker's earliest training window ``w<window>`` (``stride``: the ranker's
    ``window_stride``), so that no window's targets were learned; ``serving``: the transformer
    of ``result["model_dir"]`` (the sample's train + validation). Both propose
    ``config.n_candidates`` items per user (:func:`tasks.transformer.sequence.ranker_sources`).
    """
    split = read_sample(split_dir, sample)
    items = pl.read_parquet(items_path) if items_path else None
    earliest = every_window(split, window, stride)[window][0]
    with every_core(config):
        sources = ranker_sources(split, items, result, config, earliest)
    for source, folder in zip(sources, (training, serving), strict=True):
        source.save(folder)


def evaluate_transformer_sharded(
    split_dir: Path, items_path: Path | None, config: SequenceConfig, ks: list[int],
    n_items: int, exclude_seen: bool, work: Path, baselines: Path, run_id: str | None,
    tracking_uri: str, selection: Selection | None = None, primary_metric: str | None = None,
    list_depth: int | None = None, recipe: dict[str, Any] | None = None,
    every_user: bool = False, score: bool = True,
) -> dict[str, Any]:
    """Tune on a sample, refit, and score the transformer shard by shard (call inside a flow).

    With a ``recipe`` (the release's refit: :mod:`tasks.release.release_shards`), no study:
    the recipe is fitted on the sample and only the test stage is scored (not at all unless
    ``score``), its lists written for every user of the test history with ``every_user``.

    ``baselines`` is the baselines' work folder (its ``<stage>/counts.parquet`` give novelty);
    ``primary_metric`` (the run's ``evaluation.primary_metric``) early-stops and ranks the trials.
    With ``list_depth``, the test users' lists that deep are written to ``work/lists/test/``,
    the validation users' (the largest cut-off deep) to ``work/lists/valid/``.
    Returns ``valid`` and ``test`` metrics like the local engine, with the study's summary,
    ``model_dir`` (the refit) and ``sample_dir`` (the sample's tables).
    """
    log = get_run_logger()
    shards = split_shard_files(split_dir)
    users = sum(gather(count_users.map(unmapped(split_dir), shards)))
    rate = min(1.0, config.sample_users / max(users, 1))
    drawn = sum(gather(sample_shard.map(unmapped(split_dir), shards, unmapped(rate),
                                        unmapped(config.seed), unmapped(work / "sample"))))
    log.info("transformer sample: %d of %d users", drawn, users)
    config = config.model_copy(update={"storage": config.storage or default_storage()})
    selection = selection or Selection()
    if recipe is None:
        result = gather([tune_on_sample.submit(split_dir, work, items_path, config, ks,
                                               exclude_seen, n_items, run_id, tracking_uri,
                                               selection, primary_metric)])[0]
    else:
        result = gather([fit_on_sample.submit(split_dir, work, items_path, config, recipe)])[0]
    stages = list(STAGES) if recipe is None else ["test"] if score else []
    for stage in stages:
        parts = gather(score_shard.map(unmapped(split_dir), shards, unmapped(stage),
                                       unmapped(work), unmapped(baselines / stage /
                                                                "counts.parquet"),
                                       unmapped(ks), unmapped(exclude_seen),
                                       unmapped(selection),
                                       unmapped(list_depth if stage == "test" else
                                                max(ks) if list_depth else None),
                                       unmapped(every_user)))
        result[stage] = merge_partials([p for p in parts if p is not None], n_items)
    if recipe is None:
        selection.check(int(result["valid"].get("users", 0)))
    result.update({"model_dir": str(work / "model"), "exclude_seen": exclude_seen,
                   "sample": {"users": drawn, "of": users}, "sample_dir": str(work / "sample")})
    write_recipe(work / "model", transformer_recipe(config, result))
    if run_id:
        study = optuna.load_study(study_name=result["study_name"], storage=config.storage)
        log_results(run_id, result, config, study)
    log.info("transformer: test %s", {k: round(v, 4) for k, v in result.get("test", {}).items()
                                      if "@" in k})
    return result
