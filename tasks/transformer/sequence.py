"""The sequential transformer in the pipeline: tuned, refitted, tested, and a candidate source.

:func:`tune_and_evaluate_transformer` runs an Optuna study over the transformer's size, depth,
heads, dropout, sequence length, learning rate, negatives and epochs. Each trial trains on
``split.train``; after every epoch its recommendations for the validation users are scored
exactly as the baselines' (:func:`full_metrics`: the run's protocol, its ``exclude_seen`` and
targets), and the run's primary metric (``evaluation.primary_metric``, NDCG@10 by default)
early-stops the trial and goes to the pruner, which stops trials that fall below the median of
earlier ones at the same epoch. The loss, speed, NDCG@10, Recall@10 and the primary metric of
every epoch go to the trial's nested MLflow run as curves (``epoch.*``). A trial's value is the
primary metric of its kept weights, so the families compete on one metric.
With a ``content_encoder``, the catalogue's text is encoded once per call and every fit reads
the item vectors: the transformer then ranks catalogue items without events too.
The best parameters are refitted on train + validation for as many epochs as the best trial
needed, scored on the test window and saved as the servable ``transformer`` model. Beside it go
the validation lists behind its ``valid`` metrics (:data:`models.session_blend.VALID_LISTS`).

:class:`SequenceSource` turns a fitted transformer into an external candidate source of the
LightGBM ranker: each user's nearest items to the hidden state after their last event. So that
no training window of the ranker sees a model that learned its targets, the source used for
training is fitted once on the history before the earliest training window
(:func:`ranker_sources`); the one used for testing and serving is the refitted model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.columns import ITEM, SCORE, USER
from models.errors import ConfigError, DataError
from models.item_text import encode_items, encoder_from_spec, has_text
from models.metrics import ACCURACY_METRICS, evaluate
from models.session_blend import VALID_LISTS, save_valid_lists
from tasks.ranking.study import (
    NEW_ITEM_OFFSETS,
    TrialLogger,
    best_offset,
    derived_study_name,
    largest_within,
    offset_figure,
    open_study,
    run_study,
)
from tasks.splitting.split import Selection, Split

if TYPE_CHECKING:  # torch is imported only when a transformer is built
    from models.transformer import SequentialTransformer, TransformerConfig

logger = logging.getLogger(__name__)

MODEL_NAME = "transformer"
SOURCE_NAME = "seq"


class SearchSpace(BaseModel):
    """Values each trial may pick: lists are choices, pairs are ``[low, high]`` ranges."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: list[int] = Field([32, 64], description="Embedding width choices.")
    n_blocks: list[int] = Field([1, 2], description="Transformer depth choices.")
    n_heads: list[int] = Field([1, 2], description="Attention heads (divide every width).")
    dropout: tuple[float, float] = Field((0.1, 0.5), description="Dropout range.")
    max_len: list[int] = Field([20, 50], description="Most recent events per user, choices.")
    lr: tuple[float, float] = Field((3e-4, 3e-3), description="Learning rate range (log).")
    n_negatives: list[int] = Field([256, 1024], description="Sampled negatives per batch.")
    epochs: tuple[int, int] = Field((5, 30), description="Most epochs (early stopping inside).")

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpace:
        lists = {"hidden_size": self.hidden_size, "n_blocks": self.n_blocks,
                 "n_heads": self.n_heads, "max_len": self.max_len,
                 "n_negatives": self.n_negatives}
        empty = [name for name, values in lists.items() if not values or min(values) < 1]
        if empty:
            raise ValueError(f"{', '.join(empty)} must list at least one positive value")
        bad = [(h, d) for h in self.n_heads for d in self.hidden_size if d % h]
        if bad:
            raise ValueError(f"every n_heads must divide every hidden_size; {bad[0][0]} heads "
                             f"do not divide {bad[0][1]}")
        for name in ("dropout", "lr", "epochs"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high")
        if self.dropout[1] >= 1 or self.lr[0] <= 0 or self.epochs[0] < 1:
            raise ValueError("dropout must stay below 1, lr above 0 and epochs at least 1")
        return self


class SequenceConfig(BaseModel):
    """Settings of the transformer's study, refit and candidate source."""

    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any] = Field(
        default_factory=dict,
        description="Fixed TransformerConfig settings (batch_size, device, loss, ...).",
    )
    space: SearchSpace = Field(default_factory=SearchSpace)
    n_trials: int = Field(3, ge=1, description="Optuna trials of the study (in total).")
    timeout_s: float | None = Field(
        None, gt=0, description="Time budget of the study: no trial starts after it, and a "
        "running trial stops after its current epoch (keeping its best epoch).")
    storage: str | None = Field(
        None, description="Optuna storage URL; empty: sqlite:///mlruns/optuna.db."
    )
    study_name: str | None = Field(
        None, description="Study name; empty: derived from the data and settings (re-runs resume)."
    )
    patience: int = Field(3, ge=1, description="Epochs without a better validation primary "
                          "metric before a trial stops.")
    seed: int = Field(42, description="Seed of the sampler and of every model.")
    sampler_startup_trials: int = Field(3, ge=1, description="Random trials before TPE guides.")
    pruner_startup_trials: int = Field(1, ge=0, description="Trials before pruning starts.")
    pruner_warmup_epochs: int = Field(2, ge=0, description="Epochs before a trial can be pruned.")
    candidates: bool = Field(True, description="Feed the ranker's candidate stage.")
    n_candidates: int = Field(50, gt=0, description="Nearest items per user as candidates.")
    content_encoder: str | None = Field(
        None, description="Item text encoder ('wordllama' or 'sentence-transformers:<folder>'): "
        "every fit reads the catalogue's text vectors, so items without events are ranked too "
        "(model.use_item_text). Empty, or a catalogue without words: no text.")
    new_item_max_loss: float = Field(
        0.03, ge=0, lt=1, description="With item text: the offset of the items without events "
        "(model.new_item_offset) is the largest whose primary validation metric is within this "
        "share of the best offset's (choose_new_item_offset): new items get the room that costs "
        "at most this much. 0: the offset that best serves the primary metric.")
    sample_users: int = Field(
        100_000, ge=1, description="engine dask: users whose sequences the transformer learns "
        "from (a seeded sample, the same every epoch); the local engine learns from every user.")

    def transformer(self, params: dict[str, Any], **fixed: Any) -> TransformerConfig:
        """The :class:`TransformerConfig` of ``params`` on top of the fixed settings."""
        from models.transformer import TransformerConfig

        values = {"patience": self.patience, "seed": self.seed, **self.model, **params, **fixed}
        return TransformerConfig.from_dict(values)


def catalogue_vectors(items: pl.DataFrame | None, config: SequenceConfig
                      ) -> pl.DataFrame | None:
    """``item_id, vector`` of the catalogue for the transformer, or None.

    None without a ``content_encoder``, with ``use_item_text`` off, without an items table or
    with one that says nothing in words (:func:`models.item_text.has_text`).
    """
    if (config.content_encoder is None or items is None or not has_text(items)
            or not config.transformer({}).use_item_text):
        return None
    return encode_items(items, encoder_from_spec(config.content_encoder))


def suggest_params(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """One trial's hyper-parameters from ``space``."""
    return {
        "hidden_size": trial.suggest_categorical("hidden_size", space.hidden_size),
        "n_blocks": trial.suggest_categorical("n_blocks", space.n_blocks),
        "n_heads": trial.suggest_categorical("n_heads", space.n_heads),
        "dropout": trial.suggest_float("dropout", *space.dropout),
        "max_len": trial.suggest_categorical("max_len", space.max_len),
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "n_negatives": trial.suggest_categorical("n_negatives", space.n_negatives),
        "epochs": trial.suggest_int("epochs", *space.epochs),
    }


def resolved_primary_metric(ks: list[int], primary_metric: str | None = None) -> str:
    """The metric that early-stops, prunes and ranks the trials.

    ``primary_metric`` is the run's ``evaluation.primary_metric``; without one, NDCG at 10 (at
    the smallest cut-off when ``ks`` leaves out 10).

    Raises:
        ConfigError: :func:`full_metrics` does not compute ``primary_metric`` at ``ks``.
    """
    if primary_metric is None:
        return f"ndcg@{10 if 10 in ks else min(ks)}"
    allowed = [f"{name}@{k}" for k in ks for name in (*ACCURACY_METRICS, "coverage", "novelty")]
    if primary_metric not in allowed:
        raise ConfigError(f"the transformer cannot be tuned on {primary_metric!r} with cut-offs "
                          f"{ks}; choose one of {', '.join(allowed)}.")
    return primary_metric


def study_name(split: Split, config: SequenceConfig, ks: list[int] | None = None,
               exclude_seen: bool | None = None, items: pl.DataFrame | None = None,
               primary_metric: str | None = None) -> str:
    """The configured study name, else one derived from the data and settings (re-runs resume).

    The cut-offs, ``exclude_seen``, the items table and the primary metric change what a trial
    measures, so they name another study.
    """
    metric = resolved_primary_metric(list(ks or [10, 20]), primary_metric)
    return config.study_name or derived_study_name(MODEL_NAME, split, config, {
        "ks": ks, "exclude_seen": exclude_seen, "items": items, "primary_metric": metric})


def validation_lists(model: SequentialTransformer, targets: pl.DataFrame, k: int,
                     exclude_seen: bool, exact: bool = True) -> pl.DataFrame:
    """``model``'s top ``k`` of every target user (the lists :func:`full_metrics` scores).

    ``exact``: the whole catalogue scored, even where ``ann_min_items`` would take the lists
    from the item graph (the test, like serving, takes them from the graph).
    """
    users = targets[USER].unique(maintain_order=True)
    return pl.from_pandas(model.recommend(users.to_list(), k=k, exclude_seen=exclude_seen,
                                          exact=exact))


def full_metrics(model: SequentialTransformer, history: pl.DataFrame, targets: pl.DataFrame,
                 ks: list[int], exclude_seen: bool, n_items: int | None,
                 lists_dir: Path | None = None, exact: bool = True) -> dict[str, float]:
    """Full-catalogue metrics of ``model``'s lists for the target users (as for the baselines).

    ``lists_dir``: where the scored lists go (:func:`models.session_blend.save_valid_lists`);
    ``exact``: as :func:`validation_lists`.
    """
    recs = validation_lists(model, targets, max(ks), exclude_seen, exact)
    if lists_dir is not None:
        save_valid_lists(recs, lists_dir, max(ks))
    counts = history.group_by(ITEM).len("count")
    return evaluate(recs, targets, ks=ks, n_items=n_items, item_popularity=counts)


def offset_grid(model: SequentialTransformer, history: pl.DataFrame, targets: pl.DataFrame,
                ks: list[int], exclude_seen: bool, n_items: int | None, primary: str
                ) -> list[tuple[dict[str, float], dict[str, float]]]:
    """``model`` scored on ``targets`` at each offset of :data:`NEW_ITEM_OFFSETS`.

    Per offset: a row of the ``primary`` metric and Recall@K (the largest K) on the targets whose
    item has no event in ``history`` (``cold0``) and on the others (``warm``), and every metric
    of :func:`full_metrics`. Leaves ``model`` at the last offset.
    """
    k = max(ks)
    counts = history.group_by(ITEM).len("count")
    warm = targets.join(counts.select(ITEM), on=ITEM, how="semi")
    grid = []
    for offset in NEW_ITEM_OFFSETS:
        model.config.new_item_offset = offset
        recs = validation_lists(model, targets, k, exclude_seen)
        metrics = evaluate(recs, targets, ks=ks, n_items=n_items, item_popularity=counts)
        grid.append(({"offset": offset, primary: metrics[primary],
                      f"cold0.recall@{k}": metrics.get(f"cold0.recall@{k}", 0.0),
                      f"warm.recall@{k}": evaluate(recs, warm, ks=[k])[f"recall@{k}"]},
                     metrics))
    return grid


def choose_new_item_offset(model: SequentialTransformer, history: pl.DataFrame,
                           targets: pl.DataFrame, ks: list[int], exclude_seen: bool,
                           n_items: int | None, primary: str, max_loss: float
                           ) -> tuple[float, dict[str, float], list[dict[str, float]]]:
    """Set ``model``'s offset for the items without events; returns it, its metrics and the grid.

    Of the offsets scored by :func:`offset_grid`, the largest whose ``primary`` is within
    ``max_loss`` (relative) of the best offset's is chosen: the items nobody has touched yet
    get as much room in the lists as that loss buys. Without items outside the fitted events,
    or without cold targets, the offset stays 0.
    """
    has_event = targets.join(history.select(ITEM).unique(), on=ITEM, how="semi")
    if model.n_event_items_ >= len(model.item_ids_) or has_event.height == targets.height:
        model.config.new_item_offset = 0.0
        return 0.0, full_metrics(model, history, targets, ks, exclude_seen, n_items), []
    grid = offset_grid(model, history, targets, ks, exclude_seen, n_items, primary)
    best = max(row[primary] for row, _ in grid)
    chosen, metrics = grid[largest_within([row for row, _ in grid], primary, max_loss)]
    model.config.new_item_offset = chosen["offset"]
    k = max(ks)
    logger.info("transformer: items without events offset %+g (validation %s %.4f against "
                "%.4f at best; cold0 recall@%d %.4f, other targets %.4f)", chosen["offset"],
                primary, chosen[primary], best, k, chosen[f"cold0.recall@{k}"],
                chosen[f"warm.recall@{k}"])
    return chosen["offset"], metrics, [row for row, _ in grid]


def epoch_curves(metrics: dict[str, float], primary: str) -> dict[str, float]:
    """An epoch's points of the trial's curves: loss, speed, NDCG@10, Recall@10 and ``primary``."""
    return {f"epoch.{k}": v for k, v in metrics.items() if k in ("ndcg@10", "recall@10", primary)
            or ("@" not in k and k not in ("epoch", "users"))}


class _Objective:
    """Trains one trial, reports every epoch to the pruner and MLflow; keeps the best model.

    Every epoch, and the trial's value, are scored by :meth:`validation` on ``primary_metric``.
    """

    def __init__(self, split: Split, items: pl.DataFrame | None, config: SequenceConfig,
                 runs: TrialLogger, ks: list[int], exclude_seen: bool, n_items: int | None,
                 primary_metric: str | None = None, vectors: pl.DataFrame | None = None):
        self.split, self.items, self.config, self.runs = split, items, config, runs
        self.vectors = vectors
        self.ks, self.exclude_seen, self.n_items = ks, exclude_seen, n_items
        self.primary = resolved_primary_metric(ks, primary_metric)
        self.best_value, self.best_model = float("-inf"), None
        self.deadline = (time.monotonic() + config.timeout_s) if config.timeout_s else None

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest_params(trial, self.config.space)
        run_id = self.runs.start(trial, params)
        pruned = False

        def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
            nonlocal pruned
            self.runs.step(run_id, epoch_curves(metrics, self.primary), epoch)
            if self.primary in metrics:
                trial.report(metrics[self.primary], epoch)
                pruned = trial.should_prune()
            if self.deadline is not None and time.monotonic() > self.deadline and not pruned:
                logger.info("trial %d: time budget spent, keeping its best epoch so far",
                            trial.number)
                return True
            return pruned

        from models.transformer import SequentialTransformer

        try:
            model = SequentialTransformer(self.config.transformer(params)).fit(
                self.split.train, None, self.items, on_epoch, self.validation, self.primary,
                self.vectors)
        except Exception:
            self.runs.end(run_id, "FAILED", {})
            raise
        if pruned:
            self.runs.end(run_id, "KILLED", {})
            raise optuna.TrialPruned(f"pruned after epoch {len(model.history_)}")
        offset, metrics, grid = choose_new_item_offset(  # the kept weights
            model, self.split.train, self.split.valid_targets, self.ks, self.exclude_seen,
            self.n_items, self.primary, self.config.new_item_max_loss)
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("best_epoch", model.best_epoch_)
        trial.set_user_attr("new_item_offset", offset)
        trial.set_user_attr("new_item_offsets", grid)
        self.runs.end(run_id, "FINISHED", {**metrics, "best_epoch": model.best_epoch_,
                                           "new_item_offset": offset})
        value = metrics[self.primary]
        if value > self.best_value:
            self.best_value, self.best_model = value, model
        return value

    def validation(self, model: SequentialTransformer) -> dict[str, float]:
        """The validation metrics of ``model``'s current weights, as the run scores every model."""
        return full_metrics(model, self.split.train, self.split.valid_targets, self.ks,
                            self.exclude_seen, self.n_items)


class SequenceSource:
    """A fitted transformer as an external candidate source: ``(history, users) -> {name: pairs}``.

    Args:
        model: The fitted transformer.
        n: Items proposed per user.
        exclude_seen: Leave out the items of each user's history.
    """

    name = SOURCE_NAME

    def __init__(self, model: SequentialTransformer, n: int, exclude_seen: bool) -> None:
        self.model, self.n, self.exclude_seen = model, n, exclude_seen

    def __call__(self, history: pl.DataFrame, users: Any) -> dict[str, pl.DataFrame]:
        """The nearest items to each user's state after the last event of ``history``."""
        users = pl.Series(USER, users, dtype=pl.String).unique(maintain_order=True)
        # only these users' events are encoded: a one-user request costs its own history
        events = history.join(users.to_frame(), on=USER, how="semi")
        recs = self.model.recommend(users.to_list(), k=self.n, exclude_seen=self.exclude_seen,
                                    history=events)
        return {self.name: pl.from_pandas(recs).select(USER, ITEM, SCORE)}

    def save(self, path: Path) -> None:
        """Write the model and the source settings into the folder ``path``."""
        self.model.save(path)
        (Path(path) / "source.json").write_text(json.dumps(
            {"n": self.n, "exclude_seen": self.exclude_seen}))

    @classmethod
    def load(cls, path: Path) -> SequenceSource:
        """Read a source written by :meth:`save`."""
        from models.transformer import SequentialTransformer

        meta = json.loads((Path(path) / "source.json").read_text())
        return cls(SequentialTransformer.load(path), meta["n"], meta["exclude_seen"])


def fit_final(history: pl.DataFrame, items: pl.DataFrame | None, config: SequenceConfig,
              params: dict[str, Any], epochs: int, vectors: pl.DataFrame | None = None,
              new_item_offset: float = 0.0) -> SequentialTransformer:
    """The tuned transformer fitted on ``history`` for exactly ``epochs`` epochs (no validation).

    ``vectors``: the catalogue's item vectors when already encoded (None: encoded here when
    the config asks for them, see :func:`catalogue_vectors`); ``new_item_offset``: the best
    trial's offset of the items without events (:func:`choose_new_item_offset`).
    """
    from models.transformer import SequentialTransformer

    if vectors is None:
        vectors = catalogue_vectors(items, config)
    settings = config.transformer(params, epochs=max(int(epochs), 1),
                                  new_item_offset=float(new_item_offset))
    return SequentialTransformer(settings).fit(history, None, items, item_vectors=vectors)


def run_transformer_study(split: Split, items: pl.DataFrame | None, config: SequenceConfig,
                          runs: TrialLogger, ks: list[int], exclude_seen: bool,
                          n_items: int | None, primary_metric: str | None = None,
                          vectors: pl.DataFrame | None = None
                          ) -> tuple[optuna.Study, _Objective]:
    """Run the study's missing trials; returns it and the objective (its ``best_model``).

    ``vectors``: as for :func:`fit_final` (encoded once here when None and asked for).
    """
    study = open_study(study_name(split, config, ks, exclude_seen, items, primary_metric),
                       config.storage, config.seed, config.sampler_startup_trials,
                       config.pruner_startup_trials, config.pruner_warmup_epochs)
    if vectors is None:
        vectors = catalogue_vectors(items, config)
    objective = _Objective(split, items, config, runs, ks, exclude_seen, n_items, primary_metric,
                           vectors)
    run_study(study, objective, config.n_trials, config.timeout_s)
    return study, objective


def best_epochs(trial: optuna.trial.FrozenTrial) -> int:
    """The epochs the best trial needed (its best epoch), to refit for."""
    return int(trial.user_attrs.get("best_epoch", trial.params.get("epochs", 1)))


def tune_and_evaluate_transformer(
    split: Split,
    items: pl.DataFrame | None,
    config: SequenceConfig,
    run_id: str | None,
    workdir: Path,
    ks: list[int] | None = None,
    exclude_seen: bool | None = None,
    n_items: int | None = None,
    selection: Selection | None = None,
    primary_metric: str | None = None,
) -> dict[str, Any]:
    """Tune, refit, test and save the transformer; log everything under ``run_id``.

    Args:
        split: The train / validation / test split.
        items: The items table (categories and attributes feed item embeddings), or None.
        config: Study, search space and fixed settings.
        run_id: The training run (trials become its nested runs); None logs nothing.
        workdir: The run folder; the model goes to ``workdir/models/transformer``.
        ks: Metric cut-offs (default 10 and 20).
        exclude_seen: Remove history items (default: True for leave-one-out, else False).
        n_items: Catalogue size for coverage; None leaves coverage out.
        selection: The selection holdout: the study is tuned on the other validation users and
            ``valid`` is the best trial's model on its users (None: the best trial's metrics on
            every validation user).
        primary_metric: The run's ``evaluation.primary_metric``: it early-stops, prunes and
            ranks the trials (default: NDCG@10, or NDCG at the smallest K without 10 in ``ks``).

    Returns:
        ``valid`` metrics, ``test`` metrics, ``best_params``, ``best_trial``,
        ``best_epoch``, ``study_name``, ``n_trials``, ``model_dir`` and ``curve`` (the refit's
        per-epoch loss). The lists behind ``valid`` are saved in ``model_dir``
        (:data:`models.session_blend.VALID_LISTS`; see :func:`save_best_trial_lists`).
    """
    ks = list(ks or [10, 20])
    seen = split.protocol == "leave_one_out" if exclude_seen is None else exclude_seen
    vectors = catalogue_vectors(items, config)  # encoded once for every fit below
    study, objective = run_transformer_study(
        split if selection is None else selection.tuning(split), items, config,
        TrialLogger(run_id, MODEL_NAME), ks, seen, n_items, primary_metric, vectors)
    best = study.best_trial
    epochs = best_epochs(best)
    model_dir = Path(workdir) / "models" / MODEL_NAME
    valid = best.user_attrs.get("metrics", {objective.primary: best.value})
    if selection is not None:
        valid = selected_metrics(split, items, config, study, objective, selection, ks, seen,
                                 n_items, lists_dir=model_dir)
    else:
        save_best_trial_lists(split, study, objective, max(ks), seen, model_dir)
    offset = best_offset(best)
    final = fit_final(split.test_history, items, config, dict(best.params), epochs, vectors,
                      offset)
    test = full_metrics(final, split.test_history, split.test_targets, ks, seen, n_items,
                        exact=False)  # as the lists are served
    final.save(model_dir)
    result = {
        "valid": valid, "test": test,
        "best_params": dict(best.params), "best_trial": best.number, "best_epoch": epochs,
        "new_item_offset": offset, "new_item_offsets": best.user_attrs.get("new_item_offsets", []),
        "study_name": study.study_name, "n_trials": len(study.trials),
        "model_dir": str(model_dir), "exclude_seen": seen,
        "curve": [{k: v for k, v in h.items() if k in ("epoch", "loss", "epoch_s")}
                  for h in final.history_],
    }
    if run_id:
        log_results(run_id, result, config, study)
    logger.info("transformer: best trial %d (%d epochs), test %s", best.number, epochs,
                {k: round(v, 4) for k, v in test.items() if "@" in k})
    return result


def best_trial_model(split: Split, items: pl.DataFrame | None, config: SequenceConfig,
                     study: optuna.Study, objective: _Objective) -> SequentialTransformer:
    """The best trial's model, fitted on ``split.train``.

    Refitted (with the objective's item vectors) when the best trial ran in an earlier process
    (a resumed study).
    """
    best = study.best_trial
    if objective.best_model is not None and objective.best_value == best.value:
        return objective.best_model
    return fit_final(split.train, items, config, dict(best.params), best_epochs(best),
                     objective.vectors, best_offset(best))


def selected_metrics(split: Split, items: pl.DataFrame | None, config: SequenceConfig,
                     study: optuna.Study, objective: _Objective, selection: Selection,
                     ks: list[int], exclude_seen: bool, n_items: int | None,
                     lists_dir: Path | None = None) -> dict[str, float]:
    """The best trial's model scored on the selection holdout's validation targets.

    ``lists_dir``: where its scored lists go (:func:`models.session_blend.save_valid_lists`).
    """
    targets = selection.targets(split)
    selection.check(targets[USER].n_unique())
    model = best_trial_model(split, items, config, study, objective)
    return full_metrics(model, split.train, targets, ks, exclude_seen, n_items, lists_dir)


def save_best_trial_lists(split: Split, study: optuna.Study, objective: _Objective, k: int,
                          exclude_seen: bool, folder: Path) -> None:
    """Save the best trial's validation lists (every validation user) in ``folder``.

    Only when the best trial ran in this process (its model is at hand): a resumed study's
    best model would have to be trained again, so no lists are saved then (and stale ones are
    removed).
    """
    model = objective.best_model
    if model is None or objective.best_value != study.best_trial.value:
        (Path(folder) / VALID_LISTS).unlink(missing_ok=True)
        logger.info("transformer: the best trial ran in an earlier process; no validation "
                    "lists saved")
        return
    save_valid_lists(validation_lists(model, split.valid_targets, k, exclude_seen), folder, k)


def ranker_sources(split: Split, items: pl.DataFrame | None, result: dict[str, Any],
                   config: SequenceConfig, earliest_history: pl.DataFrame
                   ) -> tuple[SequenceSource, SequenceSource]:
    """Candidate sources for the ranker: ``(training, serving)``.

    The training source is the tuned transformer refitted on ``earliest_history`` (the history
    of the ranker's earliest training window, so no window's targets were learned); the serving
    source is the saved model of :func:`tune_and_evaluate_transformer`, fitted on train +
    validation.
    """
    if earliest_history.is_empty():
        raise DataError("the ranker's earliest training window has no history for the "
                        "transformer; lower ranker.extra_windows.")
    seen = bool(result["exclude_seen"])
    from models.transformer import SequentialTransformer

    training = fit_final(earliest_history, items, config, result["best_params"],
                         result["best_epoch"], new_item_offset=result.get("new_item_offset", 0.0))
    serving = SequentialTransformer.load(result["model_dir"])
    return (SequenceSource(training, config.n_candidates, seen),
            SequenceSource(serving, config.n_candidates, seen))


def log_results(run_id: str, result: dict[str, Any], config: SequenceConfig,
                 study: optuna.Study) -> None:
    """Log the transformer's metrics, result and study plots to the run."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    from tasks import tracking

    for stage in ("valid", "test"):
        tracking.log_metrics(run_id, MODEL_NAME, stage, result[stage])
    tracking.log_json(run_id, {**result, "config": config.model_dump(mode="json")},
                      f"{MODEL_NAME}/result.json")
    with warnings.catch_warnings():  # the matplotlib plots are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figures = {"optimization_history": optuna_plots.plot_optimization_history(study).figure,
                   "intermediate_values": optuna_plots.plot_intermediate_values(study).figure}
    if result.get("new_item_offsets"):
        figures["new_item_offset"] = offset_figure(result["new_item_offsets"],
                                                   result["new_item_offset"])
    for name, figure in figures.items():
        tracking.log_figure(run_id, figure, f"{MODEL_NAME}/{name}.png")
        plt.close(figure)

