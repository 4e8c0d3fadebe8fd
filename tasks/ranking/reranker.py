"""The LightGBM re-ranker that is served: :class:`RankingPipeline` and its settings.

:class:`RankingPipeline` goes from a history to recommendations: co-visitation fitted on the
history, candidates, features, LambdaRank scores, popularity fill. It learns from the validation
window (features from ``split.train``, labels from ``split.valid_targets``) plus
``extra_windows`` earlier windows cut from ``split.train`` alone (the same cut shifted back by the
window length for a time split; one more item peeled off per user for leave-one-out). A share of
the validation-window users is held out from every window (:func:`holdout_users`).

The Optuna study that chooses its parameters is :mod:`tasks.ranking.tune`; the serving bundle loads
a saved pipeline by the family name ``lgbm_ranker`` (:mod:`tasks.release.packaging`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Self

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.base import event_weight_expr, popularity_table, top_k_with_fallback
from models.baselines import CoVisitation
from models.columns import EVENT_TYPE, EVENT_TYPES, ITEM, SCORE, TIMESTAMP, USER
from models.errors import ConfigError, DataError
from models.lgbm_ranker import LightGBMRanker
from tasks.data.shards import shard_of
from tasks.ranking.candidate_sources import LABEL, CandidateConfig
from tasks.ranking.candidates import candidate_recall, user_frame
from tasks.ranking.external_sources import content_vectors
from tasks.ranking.features import USER_CHUNK, FeatureConfig, candidate_features, check_features
from tasks.splitting.split import Split, leave_one_out

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
    learning_rate_range: tuple[float, float] = Field(
        (0.03, 0.2), description="The learning rates trials draw from (log scale). Below 0.03 "
        "a trial needs several hundred rounds for the same holdout NDCG: each trial, the "
        "refit and every release's refit take twice as long (BENCHMARKS.md).")
    num_boost_round: int = Field(1000, ge=1, description="Most boosting rounds per trial.")
    early_stopping_rounds: int = Field(50, ge=1, description="Patience of early stopping.")
    eval_at: int = Field(10, ge=1, description="K of the NDCG that stops, prunes and selects.")
    num_threads: int = Field(0, ge=0, description="LightGBM threads; 0: all cores.")
    sampler_startup_trials: int = Field(5, ge=1, description="Random trials before TPE guides.")
    pruner_startup_trials: int = Field(5, ge=0, description="Trials before pruning starts.")
    pruner_warmup_rounds: int = Field(20, ge=0, description="Rounds before a trial can be pruned.")
    new_item_max_loss: float = Field(
        0.02, ge=0, lt=1, description="The score offset of candidates without events "
        "(the ranker's new_item_offset) is the largest whose holdout NDCG is within this share "
        "of the best offset's (tasks.ranking.tune.choose_new_item_offset): items nobody has "
        "touched yet get the room that costs at most this much. 0: the offset that best "
        "serves the holdout NDCG.")
    cascade_trees: int = Field(
        0, ge=0, description="Trees of the cascade's first stage: every candidate is scored by "
        "the ranker's first cascade_trees trees and each user's cascade_keep best go on to the "
        "whole ranker (models.lgbm_ranker); 0: no cascade.")
    cascade_keep: int = Field(50, ge=1, description="Candidates per user the cascade keeps.")
    compile_trees: Literal["auto", "always", "never"] = Field(
        "auto", description="Score with the booster compiled to machine code by Treelite and "
        "TL2cgen (same scores, about 40% of LightGBM's time; models.compiled_trees). auto: once "
        "a call scores 5 x 10^7 rows x trees of a booster of 100 trees or more, with LightGBM "
        "where no C compiler is found; always: every call (an error without a compiler); "
        "never: LightGBM only.")
    check_features: bool = Field(True, description="Run the features expectation suite.")
    user_chunk: int = Field(
        USER_CHUNK, gt=0, description="Users whose candidates and features are built at once "
        "(working memory follows it; results do not depend on it).")

    @field_validator("learning_rate_range")
    @classmethod
    def _rates(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"learning_rate_range must be [low, high] with 0 < low <= high <= 1;"
                             f" got [{low}, {high}].")
        return value

    def seen_excluded(self, exclude_seen: bool) -> RankerConfig:
        """These settings with the candidates' ``exclude_seen`` set (the evaluation decides it)."""
        return self.model_copy(update={"candidates": self.candidates.model_copy(
            update={"exclude_seen": exclude_seen})})


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
                          "data with tasks.splitting.split.time_split.") from err


HOLDOUT_SCALE = 1_000_000


def holdout_key(users: pl.Series, seed: int) -> pl.Series:
    """A user's place in the holdout draw: its id's hash keyed by ``holdout`` and ``seed``.

    In [0, 10^6); the same in every process and shard (:func:`tasks.data.shards.shard_of`), so a
    user sharded anywhere is held out or not alike, and independent of the shard and of the
    other draws.
    """
    return shard_of(users, HOLDOUT_SCALE, purpose="holdout", seed=seed)


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
              covis: CoVisitation | None = None, vectors: pl.DataFrame | None = None
              ) -> pl.DataFrame:
        """Candidates of ``users`` from ``history`` with their features (and labels).

        ``covis`` is a :class:`CoVisitation` already fitted on ``history``; fitted here if None.
        ``vectors``: the catalogue's item vectors (text-similarity features); by default those
        of the pipeline's content source, when it has one.
        """
        cfg = self.config
        covis = covis or CoVisitation(**cfg.covisitation).fit(history)
        if vectors is None:
            vectors = content_vectors(self.source)
        return candidate_features(history, users, covis, cfg.candidates, cfg.features,
                                  self.items, external, self.ordered_only, targets,
                                  cfg.user_chunk, vectors=vectors)

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
            frame = self.pairs(history, users, window, sources,
                               vectors=content_vectors(external))
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
                              num_threads=cfg.num_threads, group=QUERY,
                              cascade_trees=cfg.cascade_trees, cascade_keep=cfg.cascade_keep,
                              compile_trees=cfg.compile_trees)

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

    def candidate_frame(self, users: Any, external: dict[str, pl.DataFrame] | None = None,
                        vectors: pl.DataFrame | None = None) -> pl.DataFrame:
        """Candidates and features of ``users`` from the current history (unscored).

        ``external``: proposals of sources other than the pipeline's own ``source``, and
        ``vectors`` the item vectors of their content source (text features).
        """
        if not hasattr(self, "ranker_"):
            raise ConfigError("this RankingPipeline is not fitted: call fit() or load() first.")
        if external is None and self.source is not None:
            external = self.source(self.history_, users)
        return self.pairs(self.history_, users, external=external, covis=self.covis_,
                          vectors=vectors)

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
        if (path / SOURCE_DIR).is_dir():  # external sources feed the candidates
            from tasks.ranking.external_sources import load_source

            pipe.source = load_source(path / SOURCE_DIR)
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
