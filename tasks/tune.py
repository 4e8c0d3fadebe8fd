"""The LightGBM re-ranker end to end: training windows, an Optuna study, refit and test scores.

:class:`RankingPipeline` goes from a history to recommendations: co-visitation fitted on the
history, candidates, features, LambdaRank scores, popularity fill. It learns from the validation
window (features from ``split.train``, labels from ``split.valid_targets``) plus
``extra_windows`` earlier windows cut from ``split.train`` alone (the same cut shifted back by the
window length for a time split; one more item peeled off per user for leave-one-out). A share of
the validation-window users is held out from every window; their full-catalogue NDCG is what each
trial maximises, with early stopping and pruning on their candidate groups' NDCG per round. The
``valid`` metrics that model selection compares are those of the validation window's held-out
users alone, a random share of the users every other family is validated on.

The study lives in an RDB storage (``sqlite:///mlruns/optuna.db`` by default), so a re-run with
the same study name continues it: only the trials still missing are run. Each trial is a nested
MLflow run of the training run. The best parameters are refitted on all users, scored on the
test window and logged with plots.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import optuna
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from models.base import event_weight_expr, popularity_table, top_k_with_fallback
from models.baselines import CoVisitation
from models.columns import EVENT_TYPE, EVENT_TYPES, ITEM, SCORE, TIMESTAMP, USER
from models.errors import ConfigError, DataError
from models.lgbm_ranker import LightGBMRanker
from models.metrics import evaluate
from tasks.candidates import (
    BUILTIN_SOURCES,
    LABEL,
    RANK_PREFIX,
    CandidateConfig,
    candidate_recall,
    rank_columns,
    user_frame,
)
from tasks.features import USER_CHUNK, FeatureConfig, candidate_features, check_features
from tasks.shards import shard_of
from tasks.split import Selection, Split, leave_one_out
from tasks.study import TrialLogger, derived_study_name, open_study, run_study

logger = logging.getLogger(__name__)

MODEL_NAME = "lgbm_ranker"
QUERY = "query"
SOURCE_DIR = "source"

ExternalSources = Callable[[pl.DataFrame, pl.Series], dict[str, pl.DataFrame]]
"""``(history, users) -> {source name: user_id, item_id, score}``: extra candidate sources."""


class ExternalSource(Protocol):
    """A fitted external candidate source the pipeline keeps and saves (e.g. a transformer)."""

    def __call__(self, history: pl.DataFrame, users: Any) -> dict[str, pl.DataFrame]:
        """Each source's ``user_id, item_id, score`` for ``users`` given ``history``."""

    def save(self, path: Path) -> None:
        """Write the source into the folder ``path`` (read back by its ``load``)."""


class RankerConfig(BaseModel):
    """Settings of the LightGBM re-ranker, its candidates, features and Optuna study."""

    model_config = ConfigDict(extra="forbid")

    candidates: CandidateConfig = Field(default_factory=CandidateConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    covisitation: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the CoVisitation candidate model."
    )
    extra_windows: int = Field(3, ge=0, description="Earlier training windows cut from train.")
    window_stride: float = Field(
        1.0, gt=0, le=1, description="Step between time-split training windows, in window lengths."
    )
    holdout_share: float = Field(0.2, gt=0, lt=1, description="Users held out for early stopping.")
    sample_groups: int = Field(
        40_000, ge=1, description="engine dask: training groups (user x window) the ranker "
        "learns from, a seeded sample (the held-out groups are bounded alike, by the holdout "
        "share of it); the local engine learns from every group.")
    n_trials: int = Field(20, ge=1, description="Optuna trials of the study (in total).")
    timeout_s: float | None = Field(None, gt=0, description="Stop starting trials after this.")
    storage: str | None = Field(
        None, description="Optuna storage URL; empty: sqlite:///mlruns/optuna.db."
    )
    study_name: str | None = Field(
        None, description="Study name; empty: derived from the data and settings (re-runs resume)."
    )
    seed: int = Field(42, description="Seed of the sampler, the holdout and LightGBM.")
    num_boost_round: int = Field(1000, ge=1, description="Most boosting rounds per trial.")
    early_stopping_rounds: int = Field(50, ge=1, description="Patience of early stopping.")
    eval_at: int = Field(10, ge=1, description="K of the NDCG that stops, prunes and selects.")
    num_threads: int = Field(0, ge=0, description="LightGBM threads; 0: all cores.")
    sampler_startup_trials: int = Field(5, ge=1, description="Random trials before TPE guides.")
    pruner_startup_trials: int = Field(5, ge=0, description="Trials before pruning starts.")
    pruner_warmup_rounds: int = Field(20, ge=0, description="Rounds before a trial can be pruned.")
    check_features: bool = Field(True, description="Run the features expectation suite.")
    user_chunk: int = Field(
        USER_CHUNK, gt=0, description="Users whose candidates and features are built at once "
        "(working memory follows it; results do not depend on it).")


def training_windows(split: Split, n: int, stride: float = 1.0
                     ) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """``(history, targets)`` of the validation window, then up to ``n`` earlier ones from train.

    Leave-one-out peels one more item off every user per window. A time split cuts windows of
    the validation window's length that end by ``t_valid``, each ``stride`` window lengths
    before the previous one (below 1 they overlap). Nothing at or after ``t_valid`` is used.
    The windows stop at the first one without history or targets.
    """
    windows = []
    for history, targets in every_window(split, n, stride):
        if history.is_empty() or targets.is_empty():
            logger.warning("training window %d skipped: no history or no targets", len(windows))
            break
        windows.append((history, targets))
    return windows


def every_window(split: Split, n: int, stride: float = 1.0
                 ) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """All ``n + 1`` windows of :func:`training_windows`, empty ones included.

    For one shard of a split (some users): a window empty here may not be empty elsewhere.
    """
    windows = [(split.train, split.valid_targets)]
    history = split.train
    for j in range(n):
        if split.protocol == "leave_one_out":
            earlier = leave_one_out(history, check=False)
            history = earlier.test_history
            windows.append((history, earlier.test_targets))
        else:
            windows.append(_time_window(split, j, stride))
    return windows


def _time_window(split: Split, j: int, stride: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    t_valid, t_test = (_as_time(split.info[k]) for k in ("t_valid", "t_test"))
    types = str(split.info.get("target_event_types") or ",".join(EVENT_TYPES)).split(",")
    start = t_valid - (t_test - t_valid) * (1 + j * stride)
    history = split.train.filter(pl.col(TIMESTAMP) < start)
    window = split.train.filter(pl.col(TIMESTAMP).is_between(
        start, start + (t_test - t_valid), closed="left"))
    targets = (window.filter(pl.col(EVENT_TYPE).is_in(types)).select(USER, ITEM).unique()
               .join(history.select(USER).unique(), on=USER, how="semi"))
    return history, targets


def _as_time(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError as err:
        raise ConfigError(f"the split's cut time {value!r} is not an ISO datetime; split the "
                          "data with tasks.split.time_split.") from err


HOLDOUT_SCALE = 1_000_000


def holdout_key(users: pl.Series, seed: int) -> pl.Series:
    """A user's place in the holdout draw: CRC-32 of ``<seed>:<user_id>`` in [0, 10^6).

    The same in every process and shard (:func:`tasks.shards.shard_of`), so a user sharded
    anywhere is held out or not alike.
    """
    return shard_of(f"{seed}:" + users.cast(pl.String), HOLDOUT_SCALE)


def holdout_users(users: pl.Series, share: float, seed: int) -> pl.Series:
    """The ``users`` drawn into the holdout: those whose :func:`holdout_key` is below the share.

    The caller holds out the user with the smallest key when none is drawn (a tiny shop).
    """
    return users.filter(holdout_key(users, seed) < share * HOLDOUT_SCALE)


@dataclass
class TrainingData:
    """What the ranker learns and is tuned on, built once for the whole study.

    Attributes:
        train: Candidate groups with a positive of every window, held-out users removed;
            ``query`` (``<window>:<user>``) names the group.
        holdout: Every candidate group of the held-out users, in every window.
        holdout_targets: ``query, item_id``: the held-out users' targets.
        recall: Candidate recall of the validation window.
    """

    train: pl.DataFrame
    holdout: pl.DataFrame
    holdout_targets: pl.DataFrame
    recall: dict[str, float]


class RankingPipeline:
    """History → candidates → features → LambdaRank scores, as ``fit / recommend / save / load``.

    Args:
        config: The ranker settings.
        items: The items table (categories, prices, attributes feed candidates and features).
        ordered_only: Timestamps only order events: no time windows or time features.
    """

    def __init__(self, config: RankerConfig | None = None, items: pl.DataFrame | None = None,
                 ordered_only: bool = False) -> None:
        self.config = config or RankerConfig()
        self.items = items
        self.ordered_only = ordered_only
        self.source: ExternalSource | None = None

    def pairs(self, history: pl.DataFrame, users: Any, targets: pl.DataFrame | None = None,
              external: dict[str, pl.DataFrame] | None = None,
              covis: CoVisitation | None = None) -> pl.DataFrame:
        """Candidates of ``users`` from ``history`` with their features (and labels).

        ``covis`` is a :class:`CoVisitation` already fitted on ``history``; fitted here if None.
        """
        cfg = self.config
        covis = covis or CoVisitation(**cfg.covisitation).fit(history)
        return candidate_features(history, users, covis, cfg.candidates, cfg.features,
                                  self.items, external, self.ordered_only, targets,
                                  cfg.user_chunk)

    def training_frames(self, split: Split, external: ExternalSources | None = None
                        ) -> TrainingData:
        """Labelled candidate groups of every training window of ``split`` (see the module doc).

        ``external(history, users)`` gives the external candidate sources of each window (a
        model fitted on that window's history only); the validation window's candidate recall
        is returned with the frames.
        """
        valid_users = user_frame(split.valid_targets)[USER]
        held = holdout_users(valid_users, self.config.holdout_share, self.config.seed)
        held = held if held.len() else valid_users.sort_by(holdout_key(valid_users,
                                                                       self.config.seed)).head(1)
        held = held.implode()
        train, holdout, targets, recall = [], [], [], {}
        for j, (history, window) in enumerate(
                training_windows(split, self.config.extra_windows, self.config.window_stride)):
            users = window[USER].unique()
            sources = external(history, users) if external else None
            frame = self.pairs(history, users, window, sources)
            if j == 0:
                recall = candidate_recall(frame, window)
                if self.config.check_features:
                    check_features(frame)
            query = (pl.lit(f"{j}:") + pl.col(USER)).alias(QUERY)
            is_held = pl.col(USER).is_in(held)
            holdout.append(frame.filter(is_held).with_columns(query))
            targets.append(window.filter(is_held).select(query, ITEM))
            train.append(frame.filter(~is_held & (pl.col(LABEL).max().over(USER) > 0))
                         .with_columns(query))
            logger.info("training window %d: %d groups with a positive", j,
                        train[-1][USER].n_unique())
        return TrainingData(pl.concat(train, how="diagonal_relaxed"),
                            pl.concat(holdout, how="diagonal_relaxed"), pl.concat(targets), recall)

    def new_ranker(self, params: dict[str, Any] | None = None,
                   num_boost_round: int | None = None) -> LightGBMRanker:
        """An unfitted :class:`LightGBMRanker` with the pipeline's settings."""
        cfg = self.config
        return LightGBMRanker(params, num_boost_round or cfg.num_boost_round,
                              cfg.early_stopping_rounds, cfg.eval_at, seed=cfg.seed,
                              num_threads=cfg.num_threads, group=QUERY)

    def fit(self, split: Split, params: dict[str, Any] | None = None) -> Self:
        """Learn the ranker on the split's training windows (early stopping on the holdout)."""
        data = self.training_frames(split)
        self.candidate_recall_ = data.recall
        self.ranker_ = self.new_ranker(params).fit(data.train, data.holdout)
        return self.set_history(split.test_history)

    def set_history(self, history: pl.DataFrame) -> Self:
        """Use ``history`` (for example train + validation) for the next recommendations."""
        self.history_ = history
        self.covis_ = CoVisitation(**self.config.covisitation).fit(history)
        return self

    def candidate_frame(self, users: Any, external: dict[str, pl.DataFrame] | None = None
                        ) -> pl.DataFrame:
        """Candidates and features of ``users`` from the current history (unscored)."""
        if not hasattr(self, "ranker_"):
            raise ConfigError("this RankingPipeline is not fitted: call fit() or load() first.")
        if external is None and self.source is not None:
            external = self.source(self.history_, users)
        return self.pairs(self.history_, users, external=external, covis=self.covis_)

    def rank(self, frame: pl.DataFrame, users: Any, k: int, exclude_seen: bool) -> pl.DataFrame:
        """Top-``k`` of scored candidate pairs, filled with popular items, like a recommender."""
        counts = self.history_.group_by(ITEM).agg(
            event_weight_expr(self.config.candidates.event_weights).sum().alias(SCORE))
        exclude = self.history_.select(USER, ITEM).unique() if exclude_seen else None
        return rank_scored(self.ranker_, frame, users, k, counts, exclude)

    def recommend(self, users: Any, k: int = 10, exclude_seen: bool | None = None,
                  external: dict[str, pl.DataFrame] | None = None) -> pl.DataFrame:
        """``user_id, item_id, score, rank`` for ``users`` from the current history.

        Users unknown to the history get popular items; ``exclude_seen`` defaults to the
        candidate setting (True for leave-one-out).
        """
        frame = self.candidate_frame(users, external)
        exclude = self.config.candidates.exclude_seen if exclude_seen is None else exclude_seen
        return self.rank(frame, users, k, exclude)

    def save(self, path: Path) -> None:
        """Write the ranker, the config, the history and the items into the folder ``path``."""
        path = Path(path)
        self.ranker_.save(path / "ranker")
        self.history_.write_parquet(path / "history.parquet")
        if self.items is not None:
            self.items.write_parquet(path / "items.parquet")
        if self.source is not None:
            self.source.save(path / SOURCE_DIR)
        meta = {"config": self.config.model_dump(mode="json"), "ordered_only": self.ordered_only}
        (path / "pipeline.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: Path) -> RankingPipeline:
        """Read a pipeline written by :meth:`save`."""
        path = Path(path)
        if not (path / "pipeline.json").is_file():
            raise DataError(f"{path} is not a saved RankingPipeline: pipeline.json is missing. "
                            "Give the folder that save() wrote.")
        meta = json.loads((path / "pipeline.json").read_text())
        items = pl.read_parquet(path / "items.parquet") if (path / "items.parquet").is_file() \
            else None
        pipe = cls(RankerConfig.model_validate(meta["config"]), items, meta["ordered_only"])
        pipe.ranker_ = LightGBMRanker.load(path / "ranker")
        if (path / SOURCE_DIR).is_dir():  # a transformer's nearest items feed the candidates
            from tasks.sequence import SequenceSource

            pipe.source = SequenceSource.load(path / SOURCE_DIR)
        return pipe.set_history(pl.read_parquet(path / "history.parquet"))


def above_fill(score: pl.Expr) -> pl.Expr:
    """``softplus(score)``: the same order and every value above the fill's [-1, 0].

    Each score is mapped on its own (a shift by the batch's minimum made a user's scores depend
    on who else was asked). Computed as ``max(x, 0) + log1p(exp(-|x|))``: no overflow, and
    relative precision kept for very negative scores.
    """
    return pl.max_horizontal(score, pl.lit(0.0)) + (-score.abs()).exp().log1p()


def rank_scored(ranker: LightGBMRanker, frame: pl.DataFrame, users: Any, k: int,
                popularity: pl.DataFrame, exclude: pl.DataFrame | None) -> pl.DataFrame:
    """Each user's top ``k`` of the ranker's scores of ``frame``, filled with popular items.

    ``popularity`` is ``item_id, score`` of the history; ``exclude`` the pairs never returned.
    """
    personal = ranker.recommend(frame, k) if frame.height else None
    if personal is not None:  # above the fill's [-1, 0], whoever else is in the batch
        personal = personal.with_columns(above_fill(pl.col(SCORE)))
    return top_k_with_fallback(user_frame(users), personal, popularity_table(popularity), k,
                               exclude)


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


def study_name(split: Split, config: RankerConfig, sources: list[str] | None = None,
               ks: list[int] | None = None, items: pl.DataFrame | None = None) -> str:
    """The configured study name, else one derived from the data and settings (re-runs resume).

    ``sources`` names the external candidate sources (their features change what a trial
    learns): ``lgbm_ranker-seq-...`` is another study than ``lgbm_ranker-...``. The cut-offs
    and the items table (categories, prices) change what a trial measures: another study.
    """
    family = "-".join([MODEL_NAME, *sorted(sources or [])])
    return config.study_name or derived_study_name(family, split, config,
                                                   {"ks": ks, "items": items})


def suggest_params(trial: optuna.Trial) -> dict[str, Any]:
    """The LightGBM search space of one trial."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.2, log=True),
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
        params = suggest_params(trial)
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
        metrics = holdout_metrics(ranker, data, sorted({*ks, pipe.config.eval_at}))
        value = metrics[metric]
        metrics = _at(metrics, ks)
        trial.set_user_attr("best_iteration", ranker.best_iteration_)
        trial.set_user_attr("metrics", metrics)
        # the validation window alone: the users every other family is validated on
        trial.set_user_attr("valid_metrics", holdout_metrics(ranker, data, ks, window=0))
        runs.end(run_id, "FINISHED", {**metrics, "best_iteration": ranker.best_iteration_})
        return value

    return objective


def _at(metrics: dict[str, float], ks: list[int]) -> dict[str, float]:
    """The metrics at the cut-offs ``ks`` (and those without a cut-off)."""
    return {k: v for k, v in metrics.items() if "@" not in k or int(k.split("@")[1]) in ks}


def log_plots(run_id: str, study: optuna.Study, ranker: LightGBMRanker) -> None:
    """Optimisation history, parameter importances and feature importance as PNG artifacts."""
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
                 n_items: int | None, external: ExternalSources | None = None
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Metrics (full catalogue) and candidate recall of the targets' users.

    The lists come from the pipeline's current history (the test history for the test window,
    train for validation).
    """
    users = targets[USER].unique()
    history = pipe.history_
    frame = pipe.candidate_frame(users, external(history, users) if external else None)
    recs = pipe.rank(frame, users, max(ks), pipe.config.candidates.exclude_seen)
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

    Returns:
        ``valid`` metrics, ``test`` metrics,
        ``candidate_recall`` per stage, ``best_params``, ``best_trial``, ``study_name``,
        ``n_trials`` and ``model_dir``.
    """
    ks = list(ks or [10, 20])
    loo = split.protocol == "leave_one_out"
    seen = loo if exclude_seen is None else exclude_seen
    config = config.model_copy(update={"candidates": config.candidates.model_copy(
        update={"exclude_seen": seen})})
    pipe = RankingPipeline(config, items, loo if ordered_only is None else ordered_only)
    data = pipe.training_frames(split if selection is None else selection.tuning(split),
                                external)
    external_names = [c.removeprefix(RANK_PREFIX) for c in rank_columns(data.train)
                      if c.removeprefix(RANK_PREFIX) not in BUILTIN_SOURCES]
    study = open_study(study_name(split, config, external_names, ks, items), config.storage,
                       config.seed, config.sampler_startup_trials,
                       config.pruner_startup_trials, config.pruner_warmup_rounds)
    run_study(study, make_objective(pipe, data, ks, TrialLogger(run_id, MODEL_NAME)),
              config.n_trials, config.timeout_s)
    best = study.best_trial
    rounds = int(best.user_attrs.get("best_iteration", config.num_boost_round))
    everyone = pl.concat([data.train, data.holdout], how="diagonal_relaxed")
    pipe.ranker_ = pipe.new_ranker(dict(best.params), num_boost_round=rounds).fit(everyone)
    valid = best.user_attrs.get("valid_metrics", best.user_attrs.get(
        "metrics", {"ndcg@10": best.value}))
    if selection is not None:  # the refitted ranker on the selection holdout
        targets = selection.targets(split)
        selection.check(targets[USER].n_unique())
        valid = score_window(pipe.set_history(split.train), targets, ks, n_items, external)[0]
    pipe.source = source
    pipe.set_history(split.test_history)
    test, test_recall = score_window(pipe, split.test_targets, ks, n_items,
                                     None if source is not None else external)
    model_dir = Path(workdir) / "models" / MODEL_NAME
    pipe.save(model_dir)
    result = {
        "valid": valid, "test": test,
        "candidate_recall": {"valid": data.recall, "test": test_recall},
        "best_params": dict(best.params), "best_trial": best.number, "best_iteration": rounds,
        "study_name": study.study_name, "n_trials": len(study.trials), "model_dir": str(model_dir),
        "config": config.model_dump(mode="json"), "ordered_only": pipe.ordered_only,
        "exclude_seen": seen,
    }
    if run_id:
        log_results(run_id, result, config)
        log_plots(run_id, study, pipe.ranker_)
    logger.info("lgbm ranker: test %s", {k: round(v, 4) for k, v in test.items() if "@" in k})
    return result
