"""The ``train`` flow: load, validate, split, baselines, transformer, LightGBM ranker, release."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger

from flows.config import TrainConfig, data_name
from flows.promote import release_best_model
from models.seed import seed_everything
from tasks import tracking
from tasks.evaluate import (
    evaluate_baselines,
    evaluate_lgbm_ranker,
    evaluate_transformer,
    report_metrics,
)
from tasks.packaging import ReleaseRun
from tasks.prepare import catalogue_size, load_data, split_data, validate_data


def run_folder(config: TrainConfig) -> Path:
    """A fresh folder for this run's tables, split and models: earlier outputs stay untouched."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return Path(config.output_dir).resolve() / data_name(config) / stamp


@flow(name="train", log_prints=False)
def train(config: TrainConfig | None = None) -> dict[str, Any]:
    """Train and evaluate every model on one shop's data; one MLflow run records it all."""
    config = config or TrainConfig()
    logger = get_run_logger()
    seed_everything(config.seed)
    workdir = run_folder(config)
    cfg = config.data
    data = load_data(cfg.path, cfg.format, cfg.column_map, cfg.event_map, cfg.name, workdir,
                     cfg.demo_events, cfg.demo_seed)

    uri = tracking.tracking_uri(config.tracking_uri)
    experiment_id = tracking.ensure_experiment(data.name, uri)
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name=f"train-{workdir.name}").info.run_id
    logger.info("MLflow run %s in experiment %r at %s", run_id, data.name, uri)
    try:
        tracking.log_run_context(run_id, config.model_dump(mode="json"), data.name, data.source,
                                 data.fingerprint, data.rows)
        data = validate_data(data, config.validation, run_id)
        split = split_data(data, config.split.model_dump())
        protocol = split.protocol
        client.set_tag(run_id, "protocol", protocol)
        client.log_artifact(run_id, str(split.folder / "info.json"), "split")
        exclude_seen = config.evaluation.exclude_seen
        if exclude_seen is None:
            exclude_seen = protocol == "leave_one_out"
        client.log_param(run_id, "resolved.exclude_seen", exclude_seen)
        n_items = catalogue_size(data)
        scores = evaluate_baselines(
            split.folder, config.evaluation.ks, n_items, exclude_seen,
            config.baselines.recent_days, workdir / "models", run_id,
        )
        transformer = None
        sequence_config = config.transformer.settings(config.seed)
        if config.transformer.enabled:
            transformer = evaluate_transformer(
                split.folder, data.items, sequence_config, config.evaluation.ks, n_items,
                exclude_seen, workdir, run_id)
            scores["transformer"] = {"valid": transformer["valid"], "test": transformer["test"]}
        if config.ranker.enabled:
            scores["lgbm_ranker"] = evaluate_lgbm_ranker(
                split.folder, data.items, config.ranker.settings(config.seed),
                config.evaluation.ks, n_items, exclude_seen, data.ordered_only, workdir, run_id,
                transformer, sequence_config)
        report = report_metrics(scores, protocol, run_id)

        # ---- release: the best model on validation is packaged, registered and promoted ----
        release = None
        if config.registry.enabled:
            release = release_best_model(scores, config, ReleaseRun(
                run_id, uri, split.folder, workdir / "models", data.name, data.fingerprint,
                protocol, exclude_seen, config.model_dump(mode="json")))
        # ---- end of release ----
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    logger.info("run finished; outputs in %s\n%s", workdir, report)
    return {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri,
            "workdir": str(workdir), "protocol": protocol, "scores": scores,
            "release": release}

