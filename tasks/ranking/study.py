"""Optuna studies shared by every tuned model family: storage, resumption and nested MLflow runs.

A study lives in an RDB storage (``sqlite:///<cwd>/mlruns/optuna.db`` by default) under a name
derived from the data and the settings, so a re-run with the same name continues it and only
runs the trials still missing. Each trial becomes a nested MLflow run of the training run, with
its parameters, its final metrics and, for models trained in epochs, one curve per metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import polars as pl
from pydantic import BaseModel

from models.errors import DataError

if TYPE_CHECKING:
    from tasks.splitting.split import Split

logger = logging.getLogger(__name__)

RESUME_EXCLUDED = {"n_trials", "timeout_s", "storage", "user_chunk"}
"""Settings that may change between runs of one study (the budget, where it is kept, and how
work is chunked)."""

NEW_ITEM_OFFSETS = (-4.0, -2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""Score offsets tried for the items without events (on logits, +1 multiplies their odds by e),
in increasing order."""


def largest_within(rows: list[dict[str, float]], primary: str, max_loss: float) -> int:
    """The index of the last row whose ``primary`` is within ``max_loss`` (relative) of the best.

    Rows come in increasing offset: the items nobody has touched yet get as much room as that
    loss buys.
    """
    best = max(row[primary] for row in rows)
    return [i for i, row in enumerate(rows) if row[primary] >= (1 - max_loss) * best][-1]


def best_offset(trial: optuna.trial.FrozenTrial) -> float:
    """The best trial's offset of the items without events (0 for a trial of older versions)."""
    return float(trial.user_attrs.get("new_item_offset", 0.0))


def offset_figure(grid: list[dict[str, float]], chosen: float) -> Any:
    """The trade-off of :func:`largest_within`: each validation metric by offset."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    offsets = [row["offset"] for row in grid]
    for name in (key for key in grid[0] if key != "offset"):
        axis.plot(offsets, [row[name] for row in grid], marker="o", label=name)
    axis.axvline(chosen, color="grey", linestyle="--", label=f"chosen {chosen:+g}")
    axis.set_xlabel("score offset of the items without events")
    axis.set_ylabel("validation")
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def derived_study_name(family: str, split: Split, settings: BaseModel,
                       measured: Mapping[str, Any] | None = None) -> str:
    """``<family>-<protocol>-<digest>``: the same for the same data tuned with the same settings.

    The digest covers the training events, the validation targets, every setting except the
    budget (:data:`RESUME_EXCLUDED`) and ``measured``: what else changes what a trial learns or
    measures (the cut-offs, whether seen items are removed, the items table, the selection
    holdout, the recipe of a model proposing candidates): tables, or values JSON can write
    (mappings digested whatever the order of their keys). A re-run with a larger budget resumes
    the study; one that would measure trials differently starts another.
    """
    data = [frame_digest(frame) for frame in (split.train, split.valid_targets)]
    for key, value in sorted((measured or {}).items()):
        text = (frame_digest(value) if isinstance(value, pl.DataFrame)
                else json.dumps(value, sort_keys=True))
        data.append(f"{key}={text}")
    return digest_study_name(family, split.protocol, data, settings)


def frame_digest(frame: pl.DataFrame | None) -> str:
    """Rows and a content hash of a table (``none`` for None)."""
    if frame is None:
        return "none"
    return str((frame.height, frame.hash_rows(seed=0).sum()))


def digest_study_name(family: str, protocol: str, data: list[str], settings: BaseModel) -> str:
    """``<family>-<protocol>-<digest>`` of texts naming the data and of the settings.

    Every setting counts except those of :data:`RESUME_EXCLUDED`.
    """
    digest = hashlib.sha256()
    for text in data:
        digest.update(text.encode())
    values = settings.model_dump(mode="json", exclude=RESUME_EXCLUDED)
    digest.update(json.dumps(values, sort_keys=True).encode())
    return f"{family}-{protocol}-{digest.hexdigest()[:12]}"


STORAGE_ENV = "SHOPRANK_OPTUNA_STORAGE"


def default_storage() -> str:
    """``SHOPRANK_OPTUNA_STORAGE``, else ``sqlite:///<cwd>/mlruns/optuna.db`` (folder created).

    The environment variable is how a shared storage's URL (with its password) reaches the
    studies without being written into the config, and so into MLflow params.
    """
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    folder = Path.cwd() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def open_study(name: str, storage: str | None, seed: int, sampler_startup_trials: int,
               pruner_startup_trials: int, pruner_warmup_steps: int) -> optuna.Study:
    """Create or continue study ``name``: TPE seeded with ``seed``, median pruning.

    Args:
        name: Study name (the same name resumes the study).
        storage: Optuna storage URL; None: :func:`default_storage`.
        seed: Seed of the TPE sampler.
        sampler_startup_trials: Random trials before TPE guides the search.
        pruner_startup_trials: Trials that run to the end before any is pruned.
        pruner_warmup_steps: Steps (rounds, epochs) of a trial before it can be pruned.
    """
    rdb = optuna.storages.RDBStorage(storage or default_storage())
    pruner = optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials,
                                         n_warmup_steps=pruner_warmup_steps)
    sampler = optuna.samplers.TPESampler(n_startup_trials=sampler_startup_trials, seed=seed)
    return optuna.create_study(study_name=name, storage=rdb, direction="maximize",
                               sampler=sampler, pruner=pruner, load_if_exists=True)


def finished_trials(study: optuna.Study) -> int:
    """Trials that completed or were pruned (a re-run only runs the missing ones)."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done))


def run_study(study: optuna.Study, objective: Any, n_trials: int, timeout_s: float | None
              ) -> optuna.Study:
    """Run the trials still missing from ``n_trials`` (none when the study is complete).

    Raises:
        DataError: No trial of the study completed (all pruned or failed).
    """
    missing = n_trials - finished_trials(study)
    if missing > 0:
        logger.info("study %s: %d trials to run", study.study_name, missing)
        study.optimize(objective, n_trials=missing, timeout=timeout_s)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise DataError(f"the study {study.study_name} has no completed trial: every trial was "
                        "pruned or failed (see the log). Raise n_trials or the pruner's warm-up.")
    return study


class TrialLogger:
    """Each trial as a nested MLflow run of ``parent_run_id`` (nothing when it is None).

    Args:
        parent_run_id: The training run; None logs nothing.
        prefix: Model family, the start of each trial run's name (``<prefix>-trial-<n>``).
        tracking_uri: The tracking store (default: the process's, as ``MlflowClient()``); give it
            in a process that did not set it, such as a Dask worker.
    """

    def __init__(self, parent_run_id: str | None, prefix: str,
                 tracking_uri: str | None = None) -> None:
        self.parent, self.prefix = parent_run_id, prefix
        if parent_run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)
            self.experiment = self.client.get_run(parent_run_id).info.experiment_id

    def start(self, trial: optuna.Trial, params: dict[str, Any]) -> str | None:
        """Open the trial's run with its parameters; returns its id."""
        if not self.parent:
            return None
        name = f"{self.prefix}-trial-{trial.number}"
        run = self.client.create_run(self.experiment, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent,
                                           "optuna.study": trial.study.study_name,
                                           "optuna.trial": str(trial.number),
                                           "model.family": self.prefix})
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    def step(self, run_id: str | None, metrics: dict[str, float], step: int) -> None:
        """Log one point of every curve (an epoch's loss, validation NDCG, speed)."""
        if run_id:
            for key, value in metrics.items():
                self.client.log_metric(run_id, _key(key), float(value), step=step)

    def end(self, run_id: str | None, status: str, metrics: dict[str, float]) -> None:
        """Log the trial's metrics and close its run with ``status``."""
        if run_id:
            for key, value in metrics.items():
                self.client.log_metric(run_id, _key(key), float(value))
            self.client.set_terminated(run_id, status)


def _key(name: str) -> str:
    return name.replace("@", "_at_")
