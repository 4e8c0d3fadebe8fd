"""A LightGBM LambdaRank ranker over candidate groups.

Input frames hold one row per (user, candidate) pair: ``user_id``, ``item_id``, numeric feature
columns and, for training, an integer ``label`` (1 for a target, 0 otherwise). Rows of one user
(or, with ``group``, of one value of another key such as window and user) form one query group,
in any row order; the booster learns to order each group with the ``lambdarank`` objective
and stops early on the validation groups' NDCG@``eval_at``.

Groups without any positive carry no ranking signal (every order is equally good), so ``fit``
drops them from both the training and the validation groups; LightGBM would otherwise count them
as perfect and flatten the early-stopping curve.

An optional ``new_item_offset`` is added to the score of every row whose ``new_item_feature``
(an item's events in the history, ``i_n_events``) is 0 or missing: the candidates nobody has
touched yet, which the trees can only judge by their text, get that much room. It is chosen
outside the booster (on held-out groups, :func:`tasks.ranking.tune.choose_new_item_offset`) and
applies in :meth:`LightGBMRanker.predict`, so in every list the ranker makes.

An optional cascade (``cascade_trees``, ``cascade_keep``) makes :meth:`LightGBMRanker.recommend`
cheaper on large candidate groups: every candidate is scored by the booster's first
``cascade_trees`` trees, each user keeps the ``cascade_keep`` best (never fewer than ``k``), and
only those are scored by the whole booster. LightGBM's cost is a tree walk per tree and row, so
with 150 candidates, 50 kept and 10% of the trees in the first stage the rows x trees fall to
about 43%.

Scoring many rows with many trees (``compile_trees``: ``auto`` from :data:`COMPILE_MIN_TREES`
trees and :data:`COMPILE_WORK` rows x trees in one call) runs the booster compiled to machine
code (:mod:`models.compiled_trees`): the same scores in about 40% of LightGBM's time. Without a C
compiler ``auto`` falls back to LightGBM.

Saved as two files: the booster as LightGBM's text model (``booster.txt``) and ``ranker.json``
with the feature names, parameters, the offset and training summary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import lightgbm as lgb
import numpy as np
import polars as pl

from models.columns import ITEM, RANK, SCORE, USER
from models.compiled_trees import CompiledTrees
from models.errors import ConfigError, DataError, ShoprankError, require_columns

logger = logging.getLogger(__name__)

LABEL = "label"
NEW_ITEM_FEATURE = "i_n_events"
BOOSTER_FILE = "booster.txt"
META_FILE = "ranker.json"
VALID = "valid"
COMPILE_MODES = ("auto", "always", "never")
COMPILE_MIN_TREES = 100
"""Below this many trees LightGBM scores as fast as the compiled library, whose fixed cost per
row (each feature looked up among the thresholds) the few trees do not repay."""
COMPILE_WORK = 50_000_000
"""Rows x trees of one scoring call from which ``compile_trees: auto`` compiles the booster:
about a second of LightGBM on one core, against a few seconds to compile a few hundred trees
once per machine (a score task's chunks, the test users' lists and the release reuse it)."""

DEFAULT_PARAMS: dict[str, Any] = {
    "learning_rate": 0.05,
    "num_leaves": 63,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
}
"""Hyper-parameters used when none are given (a sensible start for a few dozen features)."""

_FIXED: dict[str, Any] = {
    "objective": "lambdarank",
    "metric": "ndcg",
    "verbosity": -1,
    "deterministic": True,
    "force_row_wise": True,
}


class NotFittedError(ShoprankError):
    """The ranker was used before ``fit`` or ``load``."""


def group_sizes(users: pl.Series) -> np.ndarray:
    """Sizes of the runs of equal consecutive user ids (the query groups, in order)."""
    if users.is_empty():
        return np.zeros(0, dtype=np.int64)
    return users.rle().struct.field("len").to_numpy().astype(np.int64)


def positive_groups(frame: pl.DataFrame, group: str = USER) -> pl.DataFrame:
    """Only the rows of groups (users) with at least one positive ``label``."""
    return frame.filter(pl.col(LABEL).max().over(group) > 0)


class LightGBMRanker:
    """LambdaRank gradient-boosted trees over candidate groups.

    Args:
        params: LightGBM parameters (merged over :data:`DEFAULT_PARAMS`; ``objective``,
            ``metric`` and determinism switches are fixed).
        num_boost_round: Largest number of boosting rounds.
        early_stopping_rounds: Stop when validation NDCG has not improved for this many rounds
            (only with validation groups).
        eval_at: The cut-off ``k`` of the validation NDCG.
        features: Feature columns; None uses every numeric column except ids and ``label``.
        seed: Seed of LightGBM's bagging and feature sampling.
        num_threads: LightGBM threads (0: OpenMP's default, all cores; on a machine shared
            with other jobs 1 is often much faster).
        group: Column whose runs of equal values form the query groups (default ``user_id``;
            frames holding several training windows per user give each window its own key).
        new_item_offset: Added to the score of the rows whose ``new_item_feature`` is 0 or
            missing (items without events); 0: scores as the booster gives them.
        new_item_feature: The column that counts an item's events in the history.
        cascade_trees: Trees of the cascade's first stage in :meth:`recommend`; 0 (or as many
            as the booster has): no cascade, every candidate scored by every tree.
        cascade_keep: Candidates per user the first stage keeps for the whole booster (``k``
            at least).
        compile_trees: ``auto``: score with the compiled booster once a call scores
            :data:`COMPILE_WORK` rows x trees of at least :data:`COMPILE_MIN_TREES` trees
            (LightGBM when no C compiler is found);
            ``always``: always compiled (an error without a compiler); ``never``: LightGBM.
    """

    def __init__(
        self,
        params: dict[str, Any] | None = None,
        num_boost_round: int = 500,
        early_stopping_rounds: int = 30,
        eval_at: int = 10,
        features: list[str] | None = None,
        seed: int = 0,
        num_threads: int = 0,
        group: str = USER,
        new_item_offset: float = 0.0,
        new_item_feature: str = NEW_ITEM_FEATURE,
        cascade_trees: int = 0,
        cascade_keep: int = 50,
        compile_trees: str = "auto",
    ) -> None:
        self.params = params
        self.num_boost_round = num_boost_round
        self.early_stopping_rounds = early_stopping_rounds
        self.eval_at = eval_at
        self.features = features
        self.seed = seed
        self.num_threads = num_threads
        self.group = group
        self.new_item_offset = new_item_offset
        self.new_item_feature = new_item_feature
        self.cascade_trees = cascade_trees
        self.cascade_keep = cascade_keep
        self.compile_trees = compile_trees
        self._libraries: dict[int, CompiledTrees | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the loaded libraries (each process loads its own)."""
        return {**self.__dict__, "_libraries": {}}

    def _lgb_params(self) -> dict[str, Any]:
        return {
            **DEFAULT_PARAMS,
            **(self.params or {}),
            **_FIXED,
            "eval_at": [self.eval_at],
            "seed": self.seed,
            "num_threads": self.num_threads,
        }

    def _dataset(self, frame: pl.DataFrame, reference: lgb.Dataset | None = None
                 ) -> tuple[lgb.Dataset, int, int]:
        """The positive groups of ``frame`` as a LightGBM dataset, its rows and its groups.

        Groups are sorted by name.

        Only the columns LightGBM reads are selected, as float32, before filtering and sorting:
        at 12M rows x 66 features every full copy of the frame would cost 6 GB.
        """
        narrow = (
            frame.lazy()
            .select(pl.col(self.group), pl.col(LABEL), pl.col(self.features_).cast(pl.Float32))
            .filter(pl.col(LABEL).max().over(self.group) > 0)
            .sort(self.group, maintain_order=True)
            .collect()
        )
        x = narrow.select(self.features_).to_numpy()
        y, sizes = narrow[LABEL].to_numpy(), group_sizes(narrow[self.group])
        rows = narrow.height
        del narrow
        dataset = lgb.Dataset(x, y, group=sizes, feature_name=self.features_, reference=reference,
                              free_raw_data=True)
        return dataset, rows, len(sizes)

    def fit(
        self,
        train_groups: pl.DataFrame,
        valid_groups: pl.DataFrame | None = None,
        callbacks: Sequence[Callable[..., Any]] = (),
    ) -> Self:
        """Train on ``train_groups``, stopping early on ``valid_groups``; returns ``self``.

        Args:
            train_groups: ``user_id, item_id, label`` and the features.
            valid_groups: Same columns, other users; None trains ``num_boost_round`` rounds.
            callbacks: Extra LightGBM callbacks (for example a pruning callback that reads
                ``env.evaluation_result_list``).
        """
        self._check_params()
        require_columns(train_groups.columns, (self.group, ITEM, LABEL), "training groups")
        self.features_ = list(self.features or _numeric_features(train_groups, self.group))
        require_columns(train_groups.columns, self.features_, "training groups")
        if not (train_groups[LABEL] > 0).any():
            raise DataError(
                f"none of the {train_groups[self.group].n_unique()} training groups has a positive "
                "candidate: the candidates miss every target. Raise the candidate quotas or "
                "check that the targets follow the history."
            )
        dtrain, train_rows, train_groups_n = self._dataset(train_groups)
        sets, names, stop = [dtrain], ["train"], []
        if valid_groups is not None and (valid_groups[LABEL] > 0).any():
            dvalid = self._dataset(valid_groups, reference=dtrain)[0]
            sets, names = [*sets, dvalid], [*names, VALID]
            stop = [
                lgb.early_stopping(
                    self.early_stopping_rounds, first_metric_only=True, verbose=False
                )
            ]
        self.evals_result_: dict[str, Any] = {}
        self.booster_ = lgb.train(
            self._lgb_params(),
            dtrain,
            num_boost_round=self.num_boost_round,
            valid_sets=sets,
            valid_names=names,
            callbacks=[*stop, lgb.record_evaluation(self.evals_result_), *callbacks],
        )
        booster = self.booster_
        self._libraries = {}
        self.best_iteration_ = int(booster.best_iteration or booster.current_iteration())
        curve = self.evals_result_.get(VALID, {}).get(f"ndcg@{self.eval_at}", [])
        self.best_score_ = float(curve[self.best_iteration_ - 1]) if curve else None
        logger.info(
            "lambdarank: %d rows, %d groups, best iteration %d, valid ndcg@%d %s",
            train_rows,
            train_groups_n,
            self.best_iteration_,
            self.eval_at,
            self.best_score_,
        )
        return self

    def _check_params(self) -> None:
        if self.compile_trees not in COMPILE_MODES:
            raise ConfigError(f"LightGBMRanker.compile_trees must be one of {COMPILE_MODES}; "
                              f"got {self.compile_trees!r}.")
        if self.cascade_trees < 0 or self.cascade_keep < 1:
            raise ConfigError(f"LightGBMRanker needs cascade_trees >= 0 and cascade_keep >= 1; "
                              f"got {self.cascade_trees} and {self.cascade_keep}.")
        for name in ("num_boost_round", "early_stopping_rounds", "eval_at"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"LightGBMRanker.{name} must be a positive integer; got {value}.")
        self._check_offset()

    def _check_offset(self) -> None:
        if not np.isfinite(self.new_item_offset):
            raise ConfigError(f"LightGBMRanker.new_item_offset must be a finite number; got "
                              f"{self.new_item_offset}.")

    def _check_fitted(self) -> None:
        if not hasattr(self, "booster_"):
            raise NotFittedError(
                "this LightGBMRanker is not fitted: call fit() or LightGBMRanker.load(path) first."
            )

    def predict(self, frame: pl.DataFrame, trees: int | None = None) -> np.ndarray:
        """Scores of the rows of ``frame`` (higher ranks first), in row order.

        The booster's scores (of its first ``trees`` trees when given), plus
        ``new_item_offset`` on the rows of items without events.
        """
        self._check_fitted()
        require_columns(frame.columns, self.features_, "feature frame")
        features = pl.col(self.features_).cast(pl.Float32)  # the values LightGBM learned from
        trees = trees or self.best_iteration_
        compiled = self._compiled(trees, frame.height)
        if compiled is not None:  # the same float32 values, as the doubles the library reads
            scores = compiled.predict(frame.select(features.cast(pl.Float64)).to_numpy(order="c"))
        else:
            threads = {"num_threads": self.num_threads} if self.num_threads else {}
            scores = self.booster_.predict(frame.select(features).to_numpy(),
                                           num_iteration=trees, **threads)
        if self.new_item_offset:
            self._check_offset()
            scores = scores + self.new_item_offset * self.new_items(frame)
        return scores

    def _compiled(self, trees: int, rows: int) -> CompiledTrees | None:
        """The booster's first ``trees`` trees compiled, when ``compile_trees`` asks for it."""
        self._check_params()
        if self.compile_trees == "never":
            return None
        if trees in self._libraries:
            return self._libraries[trees]
        if self.compile_trees == "auto" and (trees < COMPILE_MIN_TREES
                                             or rows * trees < COMPILE_WORK):
            return None
        try:
            self._libraries[trees] = CompiledTrees(self.booster_, trees, self.num_threads)
        except (ConfigError, ImportError, OSError) as err:
            if self.compile_trees == "always":
                raise ConfigError(f"compile_trees is 'always' but the trees cannot be compiled: "
                                  f"{err}") from err
            logger.warning("scoring with LightGBM, not compiled trees: %s", err)
            self._libraries[trees] = None
        return self._libraries[trees]

    def new_items(self, frame: pl.DataFrame) -> np.ndarray:
        """1.0 on the rows of ``frame`` whose item has no event (``new_item_feature``), else 0."""
        require_columns(frame.columns, (self.new_item_feature,),
                        "feature frame (a ranker with a new-item offset)")
        return (frame[self.new_item_feature].fill_null(0) == 0).cast(pl.Float64).to_numpy()

    def recommend(self, frame: pl.DataFrame, k: int = 10) -> pl.DataFrame:
        """Each user's ``k`` best candidates of ``frame`` as ``user_id, item_id, score, rank``.

        With a cascade, only the candidates its first stage keeps are scored by every tree.
        """
        if k < 1:
            raise ConfigError(f"k must be a positive integer; got {k}.")
        frame = self.cascade(frame, k)
        return top_scored(frame.select(USER, ITEM).with_columns(
            pl.Series(SCORE, self.predict(frame))), k)

    def cascade(self, frame: pl.DataFrame, k: int) -> pl.DataFrame:
        """The rows of ``frame`` that the cascade's first stage keeps for lists of ``k``.

        Each user's ``max(cascade_keep, k)`` best rows by the first ``cascade_trees`` trees, in
        their order in ``frame``; every row without a cascade.
        """
        self._check_fitted()
        keep = max(self.cascade_keep, k)
        if not 0 < self.cascade_trees < self.best_iteration_ or frame.height <= keep:
            return frame
        first = "__first"
        return (frame.with_columns(pl.Series(first, self.predict(frame, self.cascade_trees)))
                .filter(pl.col(first).rank("ordinal", descending=True).over(USER) <= keep)
                .drop(first))

    def feature_importance(self) -> pl.DataFrame:
        """``feature, gain, split`` per feature, highest total gain first."""
        self._check_fitted()
        return pl.DataFrame(
            {
                "feature": self.features_,
                "gain": self.booster_.feature_importance("gain", self.best_iteration_),
                "split": self.booster_.feature_importance("split", self.best_iteration_),
            }
        ).sort(["gain", "feature"], descending=[True, False])

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments."""
        return {
            name: getattr(self, name)
            for name in (
                "params",
                "num_boost_round",
                "early_stopping_rounds",
                "eval_at",
                "features",
                "seed",
                "num_threads",
                "group",
                "new_item_offset",
                "new_item_feature",
                "cascade_trees",
                "cascade_keep",
                "compile_trees",
            )
        }

    def save(self, path: Path) -> None:
        """Write ``booster.txt`` and ``ranker.json`` into the folder ``path``."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.booster_.save_model(str(path / BOOSTER_FILE), num_iteration=self.best_iteration_)
        meta = {
            "class": type(self).__name__,
            "params": self.get_params(),
            "features": self.features_,
            "best_iteration": self.best_iteration_,
            "best_score": self.best_score_,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read a ranker written by :meth:`save`."""
        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / BOOSTER_FILE).is_file():
            raise DataError(
                f"{path} is not a saved LightGBMRanker: {META_FILE} or "
                f"{BOOSTER_FILE} is missing. Give the folder that save() wrote."
            )
        meta = json.loads((path / META_FILE).read_text())
        ranker = cls(**meta["params"])
        ranker.booster_ = lgb.Booster(model_file=str(path / BOOSTER_FILE))
        ranker.features_ = list(meta["features"])
        ranker.best_iteration_ = int(meta["best_iteration"])
        ranker.best_score_ = meta["best_score"]
        ranker.evals_result_ = {}
        return ranker


def top_scored(scored: pl.DataFrame, k: int) -> pl.DataFrame:
    """Each user's ``k`` highest ``score`` rows of ``user_id, item_id, score``, with ``rank``."""
    return (
        scored.filter(pl.col(SCORE).rank("ordinal", descending=True).over(USER) <= k)
        .sort([USER, SCORE, ITEM], descending=[False, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(USER).alias(RANK))
    )


def _numeric_features(frame: pl.DataFrame, group: str) -> list[str]:
    skip = {USER, ITEM, LABEL, group}
    return [c for c, t in frame.schema.items() if c not in skip and t.is_numeric()]
