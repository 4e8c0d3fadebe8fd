"""Fit recommenders on a split and score them on validation and test with one metrics module."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from models.baselines import baseline_factories
from models.columns import ITEM, USER
from models.content import ContentNeighbours
from models.metrics import cold_metrics_table, evaluate, metrics_table
from models.session_blend import save_valid_lists
from tasks import tracking
from tasks.data.prepare import read_split
from tasks.ranking.reranker import RankerConfig
from tasks.release.recipes import (
    baseline_recipe,
    content_recipe,
    ranker_recipe,
    read_recipe,
    transformer_recipe,
    write_recipe,
)
from tasks.resume import STAGE_CACHE
from tasks.splitting.split import Selection, Split
from tasks.transformer.sequence import SequenceConfig


def item_counts(events: pl.DataFrame) -> pl.DataFrame:
    """Interactions per item, the popularity that novelty is measured against."""
    return events.group_by(ITEM).len("count")


def score_model(
    factory: Any, split: Split, ks: list[int], n_items: int, exclude_seen: bool,
    selection: Selection | None = None, lists_dir: Path | None = None,
) -> tuple[dict[str, dict[str, float]], Any]:
    """Fit on train → score validation; refit on train+validation → score test.

    ``selection``: validation is scored on its users only (default: every validation user).
    ``lists_dir``: where the validation lists of the scored users go (top ``max(ks)``,
    :func:`models.session_blend.save_valid_lists`); None writes none.
    Returns metrics per stage (``valid``, ``test``, with ``fit_seconds``) and the test model.
    """
    k = max(ks)
    results: dict[str, dict[str, float]] = {}
    model = None
    for stage, history, targets in (
        ("valid", split.train, (selection or Selection()).targets(split)),
        ("test", split.test_history, split.test_targets),
    ):
        start = time.perf_counter()
        model = factory().fit(history)
        fitted = time.perf_counter() - start
        recs = model.recommend(targets[USER].unique(maintain_order=True), k=k,
                               exclude_seen=exclude_seen)
        metrics = evaluate(recs, targets, ks=ks, n_items=n_items,
                           item_popularity=item_counts(history))
        results[stage] = {**metrics, "fit_seconds": fitted}
        if stage == "valid" and lists_dir is not None:
            save_valid_lists(recs, lists_dir, k)
    return results, model


@task(name="baselines", persist_result=True, cache_policy=STAGE_CACHE)
def evaluate_baselines(
    split_dir: Path, ks: list[int], n_items: int, exclude_seen: bool, recent_days: float,
    model_dir: Path, run_id: str | None, selection: Selection | None = None,
    vectors: Path | None = None, encoder: str | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Fit, score and save every baseline; log each metric per model, stage and K.

    ``valid`` metrics are on the users of ``selection`` (default: every validation user);
    their lists are saved beside each model (:data:`models.session_blend.VALID_LISTS`).
    With the catalogue's item ``vectors`` (made by ``encoder``), the content model too.
    """
    logger = get_run_logger()
    split = read_split(split_dir)
    selection = selection or Selection()
    selection.check(selection.targets(split)[USER].n_unique())
    scores: dict[str, dict[str, dict[str, float]]] = {}
    factories = {name: (factory, baseline_recipe(name, recent_days, exclude_seen))
                 for name, factory in baseline_factories(recent_days).items()}
    if vectors is not None and encoder is not None:
        table = pl.read_parquet(vectors)
        factories["content"] = (lambda: ContentNeighbours().with_vectors(table),
                                content_recipe(encoder, exclude_seen))
    for name, (factory, recipe) in factories.items():
        scores[name], model = score_model(factory, split, ks, n_items, exclude_seen, selection,
                                          lists_dir=model_dir / name)
        model.save(model_dir / name)
        write_recipe(model_dir / name, recipe)
        logger.info("%s: test %s", name, _brief(scores[name]["test"], ks))
        if run_id:
            for stage, metrics in scores[name].items():
                tracking.log_metrics(run_id, name, stage, metrics)
    return scores


@task(name="transformer", persist_result=True, cache_policy=STAGE_CACHE)
def evaluate_transformer(
    split_dir: Path, items_path: Path | None, config: SequenceConfig, ks: list[int],
    n_items: int, exclude_seen: bool, workdir: Path, run_id: str | None,
    selection: Selection | None = None, primary_metric: str | None = None,
) -> dict[str, Any]:
    """Tune (Optuna, per-epoch pruning), refit and test the sequential transformer.

    ``primary_metric`` (the run's) early-stops, prunes and ranks its trials. Returns the result
    of :func:`tasks.transformer.sequence.tune_and_evaluate_transformer` (``valid`` and ``test``
    metrics like the baselines, the best parameters and the saved model's folder).
    """
    from tasks.transformer.sequence import tune_and_evaluate_transformer

    split = read_split(split_dir)
    items = pl.read_parquet(items_path) if items_path else None
    result = tune_and_evaluate_transformer(split, items, config, run_id, workdir, ks=ks,
                                           exclude_seen=exclude_seen, n_items=n_items,
                                           selection=selection, primary_metric=primary_metric)
    write_recipe(Path(result["model_dir"]), transformer_recipe(config, result))
    get_run_logger().info("transformer: best trial %s of %s (%s epochs), test %s",
                          result["best_trial"], result["n_trials"], result["best_epoch"],
                          _brief(result["test"], ks))
    return result


@task(name="lgbm-ranker", persist_result=True, cache_policy=STAGE_CACHE)
def evaluate_lgbm_ranker(
    split_dir: Path, items_path: Path | None, config: RankerConfig, ks: list[int], n_items: int,
    exclude_seen: bool, ordered_only: bool, workdir: Path, run_id: str | None,
    transformer: dict[str, Any] | None = None, transformer_config: SequenceConfig | None = None,
    selection: Selection | None = None, vectors: Path | None = None, encoder: str | None = None,
) -> dict[str, dict[str, float]]:
    """Tune (Optuna), refit and test the LightGBM re-ranker; metrics per stage like baselines.

    With a ``transformer`` result (and its config asking for candidates), the transformer's
    nearest items join the candidates under the source name ``seq``; with the catalogue's item
    ``vectors`` (made by ``encoder``), the content neighbours under ``content``.
    """
    from tasks.ranking.external_sources import ContentSource, combined
    from tasks.ranking.reranker import training_windows
    from tasks.ranking.tune import tune_and_evaluate_lgbm

    split = read_split(split_dir)
    items = pl.read_parquet(items_path) if items_path else None
    external = source = recipe = content = settings = None
    if transformer and transformer_config and transformer_config.candidates:
        from tasks.transformer.sequence import ranker_sources

        earliest = training_windows(split, config.extra_windows, config.window_stride)[-1][0]
        external, source = ranker_sources(split, items, transformer, transformer_config,
                                          earliest)
        recipe = read_recipe(Path(transformer["model_dir"]))  # part of the study's name
    if vectors is not None and encoder is not None:
        settings = {"encoder": encoder, "n": config.candidates.n_external,
                    "n_new": config.candidates.n_new}
        content = ContentSource(pl.read_parquet(vectors), settings["n"], exclude_seen, encoder,
                                settings["n_new"])
    external, source = combined(external, content), combined(source, content)
    result = tune_and_evaluate_lgbm(split, items, config, run_id, workdir, ks=ks,
                                    exclude_seen=exclude_seen, ordered_only=ordered_only,
                                    n_items=n_items, external=external, source=source,
                                    selection=selection, source_recipe=recipe,
                                    content=settings)
    write_recipe(Path(result["model_dir"]),
                 ranker_recipe(result, recipe, selection, settings))
    recall = result["candidate_recall"]
    get_run_logger().info("lgbm ranker: best trial %s of %s, candidate recall %s",
                          result["best_trial"], result["n_trials"], recall["test"])
    return {"valid": result["valid"], "test": result["test"]}


@task(name="report")
def report_metrics(
    scores: dict[str, dict[str, dict[str, float]]], protocol: str, run_id: str | None
) -> str:
    """Publish the metrics tables as a Prefect artifact and an MLflow artifact.

    The test metrics on cold targets (:func:`models.metrics.cold_metrics_table`) get their own
    table after the test one, when the models have them.
    """
    test = {name: stages["test"] for name, stages in scores.items()}
    valid = metrics_table({name: stages["valid"] for name, stages in scores.items()})
    markdown = f"## Test metrics ({protocol})\n\n{metrics_table(test)}\n\n"
    if cold := cold_metrics_table(test):
        markdown += (
            "## Test metrics on cold targets\n\nTargets whose item had at most N events in the "
            f"history the model was fitted on; users: those with such a target.\n\n{cold}\n\n"
        )
    markdown += f"## Validation metrics\n\n{valid}\n"
    create_markdown_artifact(markdown, key="metrics", description="Metrics per model")
    if run_id:
        tracking.log_text(run_id, markdown, "metrics.md")
        tracking.log_json(run_id, scores, "metrics.json")
    return markdown


def _brief(metrics: dict[str, float], ks: list[int]) -> str:
    k = min(ks)
    return ", ".join(f"{m}@{k}={metrics.get(f'{m}@{k}', float('nan')):.4f}"
                     for m in ("ndcg", "recall", "hitrate"))
