"""The LightGBM re-ranker's Optuna study: trials on the training windows, refit, test scores.

The served pipeline itself (:class:`tasks.ranking.reranker.RankingPipeline`) learns from the
validation window plus ``extra_windows`` earlier windows; a share of the validation-window users is
held out from every window, and their full-catalogue NDCG is what each trial maximises, with early
stopping and pruning on their candidate groups' NDCG per round. The ``valid`` metrics that model
selection compares are those of the validation window's held-out users alone, a random share of the
users every other family is validated on.

The study lives in an RDB storage (``sqlite:///mlruns/optuna.db`` by default), so a re-run with
the same study name continues it: only the trials still missing are run. Each trial is a nested
MLflow run of the training run. The best parameters are refitted on all users, scored on the
test window and logged with plots. With a selection holdout, the refitted ranker's lists of its
users (behind ``valid``) are saved beside the model (:data:`models.session_blend.VALID_LISTS`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
import polars as pl

from models.columns import ITEM, SCORE, USER
from models.lgbm_ranker import LightGBMRanker, top_scored
from models.metrics import evaluate
from models.session_blend import VALID_LISTS, save_valid_lists
from tasks.ranking.candidate_sources import BUILTIN_SOURCES, RANK_PREFIX
from tasks.ranking.candidates import candidate_recall, rank_columns
from tasks.ranking.external_sources import content_vectors
from tasks.ranking.reranker import (
    MODEL_NAME,
    QUERY,
    ExternalSource,
    ExternalSources,
    RankerConfig,
    RankingPipeline,
    TrainingData,
)
from tasks.ranking.study import (
    NEW_ITEM_OFFSETS,
    RESUME_EXCLUDED,
    TrialLogger,
    best_offset,
    derived_study_name,
    largest_within,
    offset_figure,
    open_study,
    run_study,
)
from tasks.splitting.split import Selection, Split

logger = logging.getLogger(__name__)


def holdout_metrics(ranker: LightGBMRanker, data: TrainingData, ks: list[int],
                    window: int | None = None) -> dict[str, float]:
    """Metrics of ``ranker`` on the held-out groups of every window, full-catalogue style.

    Each (window, held-out user) counts once; a target outside the candidates is a miss.
    ``window`` keeps one window only (0: the validation window).
    """
    groups, targets = data.holdout, data.holdout_targets
    if window is not None:
        groups, targets = (frame.filter(pl.col(QUERY).str.starts_with(f"{window}:"))
                           for frame in (groups, targets))
    recs = ranker.recommend(groups.with_columns(pl.col(QUERY).alias(USER)), max(ks))
    return evaluate(recs, targets.rename({QUERY: USER}), ks=ks)


def offset_grid(ranker: LightGBMRanker, data: TrainingData, ks: list[int], primary: str
                ) -> list[tuple[dict[str, float], dict[str, float]]]:
    """The held-out groups ranked at each offset of :data:`NEW_ITEM_OFFSETS`.

    Per offset: a row of the ``primary`` metric and Recall@K (the largest K) of the held-out
    targets proposed as a candidate without events (``new``: what the offset can move) and of
    the other targets, and every metric of :func:`holdout_metrics`. The booster predicts once;
    the ranker's own offset is left as it was.
    """
    groups = data.holdout.with_columns(pl.col(QUERY).alias(USER))
    targets = data.holdout_targets.rename({QUERY: USER})
    offset, ranker.new_item_offset = ranker.new_item_offset, 0.0
    base, new = ranker.predict(groups), ranker.new_items(groups)
    ranker.new_item_offset = offset
    pairs = groups.select(USER, ITEM)
    proposed = pairs.filter(pl.Series(new > 0))
    parts = {"new": targets.join(proposed, on=[USER, ITEM], how="semi"),
             "other": targets.join(proposed, on=[USER, ITEM], how="anti")}
    k, grid = max(ks), []
    for value in NEW_ITEM_OFFSETS:
        recs = top_scored(pairs.with_columns(pl.Series(SCORE, base + value * new)), k)
        metrics = evaluate(recs, targets, ks=ks)
        row = {"offset": value, primary: metrics[primary]}
        for name, part in parts.items():
            row[f"{name}.recall@{k}"] = (evaluate(recs, part, ks=[k])[f"recall@{k}"]
                                         if part.height else 0.0)
        grid.append((row, metrics))
    return grid


def choose_new_item_offset(ranker: LightGBMRanker, data: TrainingData, ks: list[int],
                           primary: str, max_loss: float
                           ) -> tuple[float, dict[str, float], list[dict[str, float]]]:
    """Set ``ranker``'s offset for the items without events; returns it, its metrics, the grid.

    Of :func:`offset_grid`'s offsets, the largest whose ``primary`` on the held-out groups is
    within ``max_loss`` (relative) of the best offset's. Without a held-out target among the
    candidates without events (or without the events feature), the offset stays 0. The metrics
    are :func:`holdout_metrics`' at the chosen offset.
    """
    ranker.new_item_offset = 0.0
    if ranker.new_item_feature not in data.holdout.columns:
        return 0.0, holdout_metrics(ranker, data, ks), []
    grid = offset_grid(ranker, data, ks, primary)
    rows, k = [row for row, _ in grid], max(ks)
    if not any(row[f"new.recall@{k}"] for row in rows):
        return 0.0, grid[NEW_ITEM_OFFSETS.index(0.0)][1], rows
    chosen, metrics = grid[largest_within(rows, primary, max_loss)]
    ranker.new_item_offset = chosen["offset"]
    logger.info("lgbm ranker: items without events offset %+g (holdout %s %.4f against %.4f at "
                "best; recall@%d of new targets %.4f, of the others %.4f)", chosen["offset"],
                primary, chosen[primary], max(row[primary] for row in rows), k,
                chosen[f"new.recall@{k}"], chosen[f"other.recall@{k}"])
    return chosen["offset"], metrics, rows


def study_name(split: Split, config: RankerConfig, sources: list[str] | None = None,
               ks: list[int] | None = None, items: pl.DataFrame | None = None,
               selection: Selection | None = None,
               source_recipe: dict[str, Any] | None = None,
               content: dict[str, Any] | None = None) -> str:
    """The configured study name, else one derived from the data and settings (re-runs resume).

    ``sources`` names the external candidate sources (their features change what a trial
    learns): ``lgbm_ranker-seq-...`` is another study than ``lgbm_ranker-...``. The cut-offs
    and the items table (categories, prices) change what a trial measures: another study. So do
    the selection holdout (share and seed: the users whose targets no trial may learn or stop
    on) and ``source_recipe``, the recipe of the transformer that proposes the external
    candidates (its settings but the budget, best parameters and epochs), and ``content``, the
    content source's settings (the encoder and its quota), when it proposes candidates.
    """
    family = "-".join([MODEL_NAME, *sorted(sources or [])])
    chosen = selection or Selection()
    measured = {"ks": ks, "items": items, "selection": [chosen.share, chosen.seed],
                "source": without_budget(source_recipe)}
    return config.study_name or derived_study_name(
        family, split, config, {**measured, **({"content": content} if content else {})})


def without_budget(recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    """``recipe`` without the settings of :data:`RESUME_EXCLUDED` (its study's budget)."""
    if recipe is None:
        return None
    settings = {k: v for k, v in recipe.get("config", {}).items() if k not in RESUME_EXCLUDED}
    return {**recipe, "config": settings}


def suggest_params(trial: optuna.Trial, learning_rates: tuple[float, float]) -> dict[str, Any]:
    """The LightGBM search space of one trial (``RankerConfig.learning_rate_range``)."""
    low, high = learning_rates
    return {
        "learning_rate": trial.suggest_float("learning_rate", low, high, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 7, 255, log=True),
        "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 5, 500, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.4, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
        "bagging_freq": 1,
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 30.0, log=True),
        "lambdarank_truncation_level": trial.suggest_int("lambdarank_truncation_level", 10, 40),
    }


class PruningCallback:
    """LightGBM callback: report the holdout NDCG of every round to the trial, prune if told.

    Args:
        trial: The running trial.
        metric: The evaluation name LightGBM uses (``ndcg@10``).
        dataset: The name of the validation set.
    """

    order = 30  # after early stopping has looked at the round

    def __init__(self, trial: optuna.Trial, metric: str, dataset: str = "valid") -> None:
        self.trial, self.metric, self.dataset = trial, metric, dataset

    def __call__(self, env: Any) -> None:
        """Report the round's value; raise :class:`optuna.TrialPruned` when the pruner says so."""
        for name, metric, value, *_ in env.evaluation_result_list:
            if name == self.dataset and metric == self.metric:
                self.trial.report(float(value), env.iteration)
                if self.trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at round {env.iteration}")
                return


def make_objective(pipe: RankingPipeline, data: TrainingData, ks: list[int],
                   runs: TrialLogger) -> Any:
    """The trial function: fit with sampled parameters, return the holdout NDCG@``eval_at``."""
    metric = f"ndcg@{pipe.config.eval_at}"

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, pipe.config.learning_rate_range)
        run_id = runs.start(trial, params)
        ranker = pipe.new_ranker(params)
        try:
            ranker.fit(data.train, data.holdout, callbacks=[PruningCallback(trial, metric)])
        except optuna.TrialPruned:
            runs.end(run_id, "KILLED", {})
            raise
        except Exception:
            runs.end(run_id, "FAILED", {})
            raise
        # the trial's value is NDCG@eval_at whether or not the reported cut-offs include it
        cuts = sorted({*ks, pipe.config.eval_at})
        # the metrics at the chosen offset come from its grid: the booster predicts once
        offset, metrics, grid = choose_new_item_offset(ranker, data, cuts, metric,
                                                       pipe.config.new_item_max_loss)
        trial.set_user_attr("new_item_offset", offset)
        trial.set_user_attr("new_item_offsets", grid)
        value = metrics[metric]
        metrics = _at(metrics, ks)
        trial.set_user_attr("best_iteration", ranker.best_iteration_)
        trial.set_user_attr("metrics", metrics)
        # the validation window alone: the users every other family is validated on
        trial.set_user_attr("valid_metrics", holdout_metrics(ranker, data, ks, window=0))
        runs.end(run_id, "FINISHED", {**metrics, "best_iteration": ranker.best_iteration_,
                                       "new_item_offset": offset})
        return value

    return objective


def _at(metrics: dict[str, float], ks: list[int]) -> dict[str, float]:
    """The metrics at the cut-offs ``ks`` (and those without a cut-off)."""
    return {k: v for k, v in metrics.items() if "@" not in k or int(k.split("@")[1]) in ks}


def log_plots(run_id: str, study: optuna.Study, ranker: LightGBMRanker) -> None:
    """Optimisation history, parameter importances and feature importance as PNG artifacts.

    With the best trial's offset grid, its trade-off (:func:`choose_new_item_offset`) too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    from tasks import tracking

    importance = ranker.feature_importance()
    tracking.log_text(run_id, importance.write_csv(), f"{MODEL_NAME}/feature_importance.csv")
    top = importance.head(30).reverse()
    figure, axes = plt.subplots(figsize=(7, 0.25 * top.height + 1))
    axes.barh(top["feature"].to_list(), top["gain"].to_list())
    axes.set_xlabel("total gain")
    axes.set_title("LightGBM ranker: feature importance")
    plots = {"feature_importance": figure}
    with warnings.catch_warnings():  # the matplotlib plots are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        plots["optimization_history"] = optuna_plots.plot_optimization_history(study).figure
        try:
            plots["param_importances"] = optuna_plots.plot_param_importances(study).figure
        except (ValueError, RuntimeError) as err:  # fewer than two completed trials
            logger.warning("no parameter importance plot: %s", err)
    grid = study.best_trial.user_attrs.get("new_item_offsets")
    if grid:
        plots["new_item_offset"] = offset_figure(grid, best_offset(study.best_trial))
    for name, fig in plots.items():
        tracking.log_figure(run_id, fig, f"{MODEL_NAME}/{name}.png")
        plt.close(fig)


def log_results(run_id: str, result: dict[str, Any], config: RankerConfig) -> None:
    """Log the ranker's metrics, candidate recall and result (with its config) to the run."""
    from tasks import tracking

    for stage in ("valid", "test"):
        tracking.log_metrics(run_id, MODEL_NAME, stage, result[stage])
    for stage, recall in result["candidate_recall"].items():
        tracking.log_metrics(run_id, MODEL_NAME, f"candidates.{stage}",
                             {f"recall_{k}": v for k, v in recall.items()})
    tracking.log_json(run_id, {**result, "config": config.model_dump(mode="json")},
                      f"{MODEL_NAME}/result.json")


def score_window(pipe: RankingPipeline, targets: pl.DataFrame, ks: list[int],
                 n_items: int | None, external: ExternalSources | None = None,
                 lists_dir: Path | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Metrics (full catalogue) and candidate recall of the targets' users.

    The lists come from the pipeline's current history (the test history for the test window,
    train for validation); ``lists_dir``: where they go
    (:func:`models.session_blend.save_valid_lists`; None: nowhere).
    """
    users = targets[USER].unique()
    history = pipe.history_
    frame = pipe.candidate_frame(users, external(history, users) if external else None,
                                 content_vectors(external))
    recs = pipe.rank(frame, users, max(ks), pipe.config.candidates.exclude_seen)
    if lists_dir is not None:
        save_valid_lists(recs, lists_dir, max(ks))
    counts = history.group_by(ITEM).len("count")
    metrics = evaluate(recs, targets, ks=ks, n_items=n_items, item_popularity=counts)
    return metrics, candidate_recall(frame, targets)


def tune_and_evaluate_lgbm(
    split: Split,
    items: pl.DataFrame | None,
    config: RankerConfig,
    run_id: str | None,
    workdir: Path,
    ks: list[int] | None = None,
    exclude_seen: bool | None = None,
    ordered_only: bool | None = None,
    n_items: int | None = None,
    external: ExternalSources | None = None,
    source: ExternalSource | None = None,
    selection: Selection | None = None,
    source_recipe: dict[str, Any] | None = None,
    content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tune, refit, test and save the LightGBM re-ranker; log everything under ``run_id``.

    Args:
        split: The train / validation / test split.
        items: The items table, or None.
        config: Ranker, candidate, feature and study settings.
        run_id: The training run (trials become its nested runs); None logs nothing.
        workdir: The run folder; the model goes to ``workdir/models/lgbm_ranker``.
        ks: Metric cut-offs (default 10 and 20).
        exclude_seen: Remove history items (default: True for leave-one-out, else False).
        ordered_only: Timestamps only order events (default: True for leave-one-out).
        n_items: Catalogue size for coverage; None leaves coverage out.
        external: Extra candidate sources per history (for example a sequence model's nearest
            items), called for every training window (and for the test history when
            ``source`` is None).
        source: The external source the fitted pipeline keeps, saves and calls for the test
            window and for serving (for example the transformer refitted on train +
            validation); it must propose under the same names as ``external``.
        selection: The selection holdout: its users' validation targets train nothing (the
            windows, the holdout and the trials are the other users'), and ``valid`` is the
            refitted ranker on them (None: the best trial's metrics on the held-out users).
        source_recipe: The recipe of the transformer behind ``external`` and ``source``
            (:func:`tasks.release.recipes.transformer_recipe`): another transformer proposes
            other candidates, so it names another study (None: not known).
        content: The settings of the content source among ``external`` (``encoder``, ``n``):
            part of the study's name.

    Returns:
        ``valid`` metrics, ``test`` metrics,
        ``candidate_recall`` per stage, ``best_params``, ``best_trial``, ``study_name``,
        ``n_trials`` and ``model_dir``. With a ``selection``, the lists behind ``valid`` are
        saved in ``model_dir`` (:data:`models.session_blend.VALID_LISTS`); without one, the
        held-out users' lists of the best trial are not kept, and none are saved.
    """
    ks = list(ks or [10, 20])
    loo = split.protocol == "leave_one_out"
    seen = loo if exclude_seen is None else exclude_seen
    config = config.seen_excluded(seen)
    pipe = RankingPipeline(config, items, loo if ordered_only is None else ordered_only)
    data = pipe.training_frames(split if selection is None else selection.tuning(split),
                                external)
    external_names = [c.removeprefix(RANK_PREFIX) for c in rank_columns(data.train)
                      if c.removeprefix(RANK_PREFIX) not in BUILTIN_SOURCES]
    name = study_name(split, config, external_names, ks, items, selection, source_recipe,
                      content)
    study = open_study(name, config.storage, config.seed, config.sampler_startup_trials,
                       config.pruner_startup_trials, config.pruner_warmup_rounds)
    run_study(study, make_objective(pipe, data, ks, TrialLogger(run_id, MODEL_NAME)),
              config.n_trials, config.timeout_s)
    best = study.best_trial
    rounds = int(best.user_attrs.get("best_iteration", config.num_boost_round))
    everyone = pl.concat([data.train, data.holdout], how="diagonal_relaxed")
    pipe.ranker_ = pipe.new_ranker(dict(best.params), num_boost_round=rounds).fit(everyone)
    pipe.ranker_.new_item_offset = best_offset(best)
    valid = best.user_attrs.get("valid_metrics", best.user_attrs.get(
        "metrics", {"ndcg@10": best.value}))
    model_dir = Path(workdir) / "models" / MODEL_NAME
    (model_dir / VALID_LISTS).unlink(missing_ok=True)  # an earlier attempt's
    if selection is not None:  # the refitted ranker on the selection holdout
        targets = selection.targets(split)
        selection.check(targets[USER].n_unique())
        valid = score_window(pipe.set_history(split.train), targets, ks, n_items, external,
                             lists_dir=model_dir)[0]
    pipe.source = source
    pipe.set_history(split.test_history)
    test, test_recall = score_window(pipe, split.test_targets, ks, n_items,
                                     None if source is not None else external)
    pipe.save(model_dir)
    result = {
        "valid": valid, "test": test,
        "candidate_recall": {"valid": data.recall, "test": test_recall},
        "best_params": dict(best.params), "best_trial": best.number, "best_iteration": rounds,
        "new_item_offset": best_offset(best),
        "new_item_offsets": best.user_attrs.get("new_item_offsets", []),
        "study_name": study.study_name, "n_trials": len(study.trials), "model_dir": str(model_dir),
        "config": config.model_dump(mode="json"), "ordered_only": pipe.ordered_only,
        "exclude_seen": seen,
    }
    if run_id:
        log_results(run_id, result, config)
        log_plots(run_id, study, pipe.ranker_)
    logger.info("lgbm ranker: test %s", {k: round(v, 4) for k, v in test.items() if "@" in k})
    return result
