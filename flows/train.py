"""The ``train`` flow: load, validate, split, baselines, transformer, LightGBM ranker, release.

With ``engine: dask`` the events are user shards and the subflow ``train-shards`` runs the
per-shard tasks (validation, split, the baselines by map-reduce, the transformer from a sample,
the ranker, with the transformer's candidates) on a Dask cluster, and the release works from the
lists the shards' score tasks wrote (:mod:`tasks.release.release_shards`).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from prefect import flow, get_run_logger

from flows.cluster import dask_runner, prefect_api_url, shard_sizing  # noqa: F401 (tests use it)
from flows.config import TrainConfig, config_digest, data_name
from flows.promote import release_best_model
from flows.serve import default_workers
from models.seed import seed_everything
from tasks import tracking
from tasks.data.item_vectors import CACHE_FOLDER, item_vectors
from tasks.data.load_shards import load_sharded
from tasks.data.prepare import (
    DataPaths,
    catalogue_size,
    load_data,
    split_data,
    validate_data,
    validate_sharded,
)
from tasks.evaluation.evaluate import (
    evaluate_baselines,
    evaluate_lgbm_ranker,
    evaluate_transformer,
    report_metrics,
)
from tasks.evaluation.evaluate_shards import evaluate_baselines_sharded
from tasks.ranking.rank_shards import evaluate_ranker_sharded
from tasks.release.packaging import ReleaseRun, check_shop
from tasks.release.release_shards import list_depth
from tasks.resume import (
    DIGEST_TAG,
    FINGERPRINT_TAG,
    WORKDIR_TAG,
    reopen_run,
    resumed_workdir,
    unfinished_run,
)
from tasks.splitting.split_shards import split_event_shards
from tasks.transformer.sequence_shards import evaluate_transformer_sharded


def run_folder(config: TrainConfig) -> Path:
    """A fresh folder for this run's tables, split and models: earlier outputs stay untouched."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return Path(config.output_dir).resolve() / data_name(config) / stamp


@flow(name="train-shards", log_prints=False)
def sharded_stages(config: TrainConfig, data: DataPaths, run_id: str, work: Path
                   ) -> dict[str, Any]:
    """Validate, split, score the baselines, the transformer and the ranker shard by shard.

    Then, with ``registry.enabled``, the release (:mod:`tasks.release.release_shards`). The
    per-shard tasks of the ``dask`` engine run on this subflow's Dask task runner.
    """
    clock = StageClock()
    data = validate_sharded(data, config.validation, run_id)
    clock.done("validate")
    protocol, _ = split_event_shards(sorted(data.events.glob("*.parquet")),
                                     config.split.model_dump(), data.ordered_only,
                                     work / "split", config.evaluation.test_sample(config.seed))
    clock.done("split")
    exclude_seen = resolved_exclude_seen(config, protocol)
    n_items = catalogue_size(data)
    selection = config.evaluation.selection(config.seed)
    depth = list_depth(config.serve.max_k) if config.registry.enabled else None  # the release's
    scores = evaluate_baselines_sharded(work / "split", config.evaluation.ks, n_items,
                                        exclude_seen, config.baselines.recent_days,
                                        work / "baselines", selection, depth,
                                        n_buckets=config.dask.buckets)
    clock.done("baselines")
    uri = tracking.tracking_uri(config.tracking_uri)
    sequence = None
    if config.transformer.enabled:
        sequence = evaluate_transformer_sharded(
            work / "split", data.items, config.transformer.settings(config.seed),
            config.evaluation.ks, n_items, exclude_seen, work / "transformer",
            work / "baselines", run_id, uri, selection, config.evaluation.primary_metric, depth)
        scores["transformer"] = {"valid": sequence["valid"], "test": sequence["test"]}
        clock.done("transformer")
    if config.ranker.enabled:
        ranker = evaluate_ranker_sharded(
            work / "split", data.items, config.ranker.settings(config.seed),
            config.evaluation.ks, n_items, exclude_seen, data.ordered_only, work / "ranker",
            config.dask.workers or default_workers(), run_id, uri, work / "baselines",
            selection, sequence, config.transformer.settings(config.seed), depth,
            n_buckets=config.dask.buckets)
        scores["lgbm_ranker"] = {"valid": ranker["valid"], "test": ranker["test"]}
        clock.done("ranker")
    release = None
    if config.registry.enabled:
        release = release_best_model(scores, config, ReleaseRun(
            run_id, uri, work / "split", work, data.name, data.fingerprint, protocol,
            exclude_seen, config.model_dump(mode="json"), engine="dask", events=data.events,
            items=data.items, n_items=n_items))
        clock.done("release")
    return {"protocol": protocol, "exclude_seen": exclude_seen, "scores": scores,
            "rows": data.rows, "seconds": clock.seconds, "release": release}


def resolved_exclude_seen(config: TrainConfig, protocol: str) -> bool:
    """The configured ``evaluation.exclude_seen``; by default True for leave-one-out only."""
    if config.evaluation.exclude_seen is None:
        return protocol == "leave_one_out"
    return config.evaluation.exclude_seen


class StageClock:
    """Wall seconds of each stage, logged as each one ends (progress for a person watching)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def done(self, stage: str) -> None:
        """Record and log the stage that just ended."""
        now = time.perf_counter()
        self.seconds[stage] = now - self._start
        self._start = now
        get_run_logger().info("stage %s done in %.1f s", stage, self.seconds[stage])


def train_sharded(config: TrainConfig, data: DataPaths, run_id: str, workdir: Path
                  ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """The ``dask`` engine's stages: the protocol, every model's metrics and the release."""
    logger = get_run_logger()
    if config.content.enabled:
        logger.warning("engine dask: no item vectors yet: the content model and its candidates "
                       "run with engine local only (content.enabled is ignored)")
    result = sharded_stages.with_options(task_runner=dask_runner(config.dask))(
        config, data, run_id, workdir)
    client = MlflowClient(tracking.tracking_uri(config.tracking_uri))
    client.set_tag(run_id, "protocol", result["protocol"])
    client.set_tag(run_id, "engine", "dask")
    client.log_artifact(run_id, str(workdir / "split" / "info.json"), "split")
    client.log_param(run_id, "resolved.exclude_seen", result["exclude_seen"])
    for name, stages in result["scores"].items():
        for stage, metrics in stages.items():
            if name not in ("lgbm_ranker", "transformer"):  # logged with their plots
                tracking.log_metrics(run_id, name, stage, metrics)
    return result["protocol"], result["scores"], result["release"]


def train_local(config: TrainConfig, data: DataPaths, run_id: str, workdir: Path, uri: str
                ) -> tuple[str, dict[str, Any], str, dict[str, Any] | None]:
    """The ``local`` engine's stages: protocol, metrics, their report and the release.

    Every stage starts from the configured seed, so its result depends on no earlier stage nor
    on whether that stage ran or came from the result cache (``resume``).
    """
    client = MlflowClient(uri)
    seed_everything(config.seed)
    data = validate_data(data, config.validation, run_id)
    seed_everything(config.seed)
    split = split_data(data, config.split.model_dump(),
                       config.evaluation.test_sample(config.seed))
    protocol = split.protocol
    client.set_tag(run_id, "protocol", protocol)
    client.log_artifact(run_id, str(split.folder / "info.json"), "split")
    exclude_seen = resolved_exclude_seen(config, protocol)
    client.log_param(run_id, "resolved.exclude_seen", exclude_seen)
    n_items = catalogue_size(data)
    selection = config.evaluation.selection(config.seed)
    vectors = None
    if config.content.enabled:
        vectors = item_vectors(data.items, config.content.encoder,
                               workdir.parents[1] / CACHE_FOLDER, run_id, uri)
    seed_everything(config.seed)
    scores = evaluate_baselines(
        split.folder, config.evaluation.ks, n_items, exclude_seen,
        config.baselines.recent_days, workdir / "models", run_id, selection,
        vectors, config.content.encoder,
    )
    transformer = None
    sequence_config = config.transformer.settings(config.seed).model_copy(update={
        "content_encoder": config.content.encoder if vectors is not None else None})
    if config.transformer.enabled:
        seed_everything(config.seed)
        transformer = evaluate_transformer(
            split.folder, data.items, sequence_config, config.evaluation.ks, n_items,
            exclude_seen, workdir, run_id, selection, config.evaluation.primary_metric)
        scores["transformer"] = {"valid": transformer["valid"], "test": transformer["test"]}
    if config.ranker.enabled:
        seed_everything(config.seed)
        content = vectors if config.content.ranker_candidates else None
        scores["lgbm_ranker"] = evaluate_lgbm_ranker(
            split.folder, data.items, config.ranker.settings(config.seed),
            config.evaluation.ks, n_items, exclude_seen, data.ordered_only, workdir, run_id,
            transformer, sequence_config, selection, content, config.content.encoder)
    report = report_metrics(scores, protocol, run_id)
    # ---- release: the best model on validation is packaged, registered and promoted ----
    release = None
    if config.registry.enabled:
        release = release_best_model(scores, config, ReleaseRun(
            run_id, uri, split.folder, workdir / "models", data.name, data.fingerprint,
            protocol, exclude_seen, config.model_dump(mode="json")))
    return protocol, scores, report, release


def resumable_run(config: TrainConfig) -> Run | None:
    """The unfinished run that ``resume`` continues, or None (logged) to start a fresh run."""
    logger = get_run_logger()
    uri = tracking.tracking_uri(config.tracking_uri)
    found = unfinished_run(MlflowClient(uri), config_digest(config))
    if found is None:
        logger.info("resume: no unfinished run of %r with these settings in %s: nothing to "
                    "resume, starting a fresh run", data_name(config), uri)
        return None
    logger.info("resume: resuming MLflow run %s (%s, status %s) in %s; the stages it finished "
                "are read from Prefect's result storage", found.info.run_id,
                found.info.run_name, found.info.status, found.data.tags.get(WORKDIR_TAG))
    return found


def open_run(client: MlflowClient, experiment_id: str, config: TrainConfig, workdir: Path,
             fingerprint: str, previous: Run | None) -> str:
    """A new MLflow run tagged with the settings' digest and the run folder, or ``previous``.

    ``previous`` (a run to resume) is reopened after checking that the data did not change.
    """
    if previous is not None:
        return reopen_run(client, previous, fingerprint)
    tags = {DIGEST_TAG: config_digest(config), WORKDIR_TAG: str(workdir)}
    return client.create_run(experiment_id, run_name=f"train-{workdir.name}",
                             tags=tags).info.run_id


@flow(name="train", log_prints=False)
def train(config: TrainConfig | None = None, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate every model on one shop's data; one MLflow run records it all.

    Args:
        config: Every setting (the defaults when empty).
        resume: Continue the newest unfinished run (killed, failed, or left running) made with
            the same settings: its MLflow run and run folder, the stages it finished read from
            Prefect's result storage. Without one, a fresh run starts.
    """
    config = config or TrainConfig()
    logger = get_run_logger()
    seed_everything(config.seed)
    previous = resumable_run(config) if resume else None
    workdir = resumed_workdir(previous) if previous else run_folder(config)
    cfg = config.data
    sharded = config.engine == "dask"
    load = load_sharded if sharded else load_data
    extra = {}
    if sharded:  # the shards sized to the cluster's workers unless their number is set
        extra = {"n_shards": config.dask.shards,
                 "sizing": None if config.dask.shards else shard_sizing(config.dask)}
    start = time.perf_counter()
    data = load(cfg.path, cfg.format, cfg.column_map, cfg.event_map, cfg.name, workdir,
                cfg.demo_events, cfg.demo_seed, **extra)
    logger.info("stage load done in %.1f s", time.perf_counter() - start)

    uri = tracking.tracking_uri(config.tracking_uri)
    experiment_id = tracking.ensure_experiment(data.name, uri)
    client = MlflowClient(uri)
    if config.registry.enabled:  # before hours of training, not after
        check_shop(client, config.registry.model_name, data.name)
    run_id = open_run(client, experiment_id, config, workdir, data.fingerprint, previous)
    logger.info("MLflow run %s in experiment %r at %s", run_id, data.name, uri)
    try:
        if previous is None or FINGERPRINT_TAG not in previous.data.tags:
            tracking.log_run_context(run_id, config.model_dump(mode="json"), data.name,
                                     data.source, data.fingerprint, data.rows)
        release = None
        if sharded:
            protocol, scores, release = train_sharded(config, data, run_id, workdir)
            report = report_metrics(scores, protocol, run_id)
        else:
            protocol, scores, report, release = train_local(config, data, run_id, workdir, uri)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    logger.info("run finished; outputs in %s\n%s", workdir, report)
    return {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri,
            "workdir": str(workdir), "protocol": protocol, "scores": scores,
            "release": release, "resumed": previous is not None}
