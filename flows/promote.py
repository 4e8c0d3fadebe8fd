"""The ``promote`` flow, and the release step that ends ``train``: register, announce, promote.

``release_best_model`` runs inside ``train``: the best model on validation is packaged and
registered as the challenger, the event ``shoprank.model.evaluated`` announces it, and (unless
``registry.promote`` is false) it is promoted right away. The ``promote`` flow does the promotion
on its own, for a version given by number or for the current challenger, under the settings of
the version's training run; a deployment runs it when the evaluation event arrives. Both steps
are restartable (:mod:`tasks.release.promotion`): registering again finds the version the run
registered, and the events carry stable ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.cluster import check_reachable, dask_runner
from flows.config import DaskConfig, RegistryConfig, TrainConfig
from tasks import tracking
from tasks.release.gate import run_config
from tasks.release.packaging import ReleaseRun, register_best
from tasks.release.promotion import promote_version
from tasks.release.registry import (
    EVALUATED,
    PromotionPolicy,
    alias_version,
    emit_model_event,
    get_version,
    metrics_payload,
)
from tasks.release.release_shards import ENGINE_TAG, register_evaluated


def register_release(scores: dict[str, dict[str, dict[str, float]]], run: ReleaseRun
                     ) -> tuple[str, Any]:
    """Register the run's evaluated copy: from its models (local) or its shards' lists (dask)."""
    if run.engine == "dask":
        return register_evaluated(scores, run)
    return register_best(scores, run)


register_task = task(name="register", cache_policy=NO_CACHE)(register_release)
promote_task = task(name="promote-version", cache_policy=NO_CACHE)(promote_version)


def policy_of(registry: RegistryConfig, primary_metric: str, serve_session_items: int = 5
              ) -> PromotionPolicy:
    """The promotion policy of a registry config."""
    return PromotionPolicy(
        primary_metric=primary_metric, margin=registry.margin,
        coverage_tolerance=registry.coverage_tolerance,
        latency_tolerance=registry.latency_tolerance, latency_slack_ms=registry.latency_slack_ms,
        latency_requests=registry.latency_requests, session_items=serve_session_items,
        cold_tolerance=registry.cold_tolerance, cold_min_users=registry.cold_min_users)


def trained_policy(client: MlflowClient, model_name: str, version: str,
                   registry: RegistryConfig | None = None) -> PromotionPolicy:
    """The policy a version is decided under: its training run's settings.

    The margin, tolerances and latency requests of the run's ``registry`` section (or
    ``registry`` when given), its primary metric and its ``serve.session_items``; defaults
    where the run logged no config.
    """
    found = get_version(client, model_name, version)
    config = run_config(client, found.run_id)
    registry = registry or RegistryConfig.model_validate(config.get("registry", {}))
    metric = found.tags.get("primary_metric") or config.get("evaluation", {}).get(
        "primary_metric", "ndcg@10")
    return policy_of(registry, metric, config.get("serve", {}).get("session_items", 5))


def release_best_model(scores: dict[str, dict[str, dict[str, float]]], config: TrainConfig,
                       run: ReleaseRun) -> dict[str, Any]:
    """Register the best model on validation, announce it and promote it if configured."""
    logger = get_run_logger()
    family, packaged = register_task(scores, run)
    name, version = packaged.name, packaged.version
    emit_model_event(EVALUATED, name, version, {  # a resumed release sends the same event
        "model": name, "version": version, "family": family, "run_id": run.run_id,
        "artifact_bytes": packaged.artifact_bytes, "load_seconds": packaged.load_seconds,
        "metrics": metrics_payload(scores, family)}, key=run.run_id)
    result: dict[str, Any] = {"model": name, "version": version, "family": family,
                              "artifact_bytes": packaged.artifact_bytes,
                              "load_seconds": packaged.load_seconds, "decision": None}
    if config.registry.promote:
        policy = policy_of(config.registry, config.evaluation.primary_metric,
                           config.serve.session_items)
        decision = promote_task(name, version, run.tracking_uri, policy, run.split_dir)
        result.update(decision=decision.decision, reason=decision.reason,
                      released_version=decision.released_version,
                      champion=alias_version(MlflowClient(run.tracking_uri), name, "champion"))
        logger.info("%s v%s (%s): %s, %s", name, version, family, decision.decision,
                    decision.reason)
    return result


def engine_cluster(client: MlflowClient, model_name: str, version: str,
                   address: str | None = None) -> DaskConfig | None:
    """The Dask settings of the run that made ``version`` when the engine made it, else None.

    ``address`` replaces the run's cluster: a scheduler's ``tcp://HOST:PORT``, or ``local``
    for a LocalCluster here. A recorded or given scheduler that does not answer is a
    :class:`ConfigError` that names both ways out.
    """
    found = get_version(client, model_name, version)
    if found.tags.get(ENGINE_TAG) != "dask":
        return None
    cfg = DaskConfig.model_validate(run_config(client, found.run_id).get("dask", {}))
    if address:
        cfg = cfg.model_copy(update={"address": None if address == "local" else address})
    if cfg.address:
        check_reachable(cfg.address, f"{model_name} v{version} was made on the Dask cluster at "
                        f"{cfg.address}" if not address else f"--dask-address {cfg.address}")
    return cfg


@flow(name="promote-on-cluster", log_prints=False)
def promote_on_cluster(model_name: str, version: str | None, tracking_uri: str,
                       policy: PromotionPolicy, split_dir: Path | None = None,
                       force: bool = False) -> Any:
    """:func:`promote_version` with its per-shard tasks on this subflow's Dask task runner."""
    return promote_task(model_name, version, tracking_uri, policy, split_dir, force)


@flow(name="promote", log_prints=False)
def promote(
    version: str | None = None,
    model_name: str = "shoprank",
    registry: RegistryConfig | None = None,
    tracking_uri: str | None = None,
    split_dir: str | None = None,
    force: bool = False,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Promote a registered version (default: the current challenger) if it beats the champion.

    Args:
        version: Model version number; empty means the version with alias ``challenger``.
        model_name: Registered model name.
        registry: Margin and guardrails; empty means those of the version's training run.
        tracking_uri: MLflow store; MLFLOW_TRACKING_URI or ./mlruns when empty.
        split_dir: Test split to compare on; default: the one recorded on the version.
        force: Decide again on a version that already carries a decision.
        dask_address: For a version the engine made, the cluster to use instead of its run's:
            ``tcp://HOST:PORT``, or ``local`` for a LocalCluster here.
    """
    logger = get_run_logger()
    uri = tracking_uri or tracking.tracking_uri()
    client = MlflowClient(uri)
    version = version or alias_version(client, model_name, "challenger")
    policy = policy_of(registry or RegistryConfig(), "ndcg@10")
    cluster = None
    if version is not None:
        policy = trained_policy(client, model_name, str(version), registry)
        cluster = engine_cluster(client, model_name, str(version), dask_address)
    args = (model_name, version, uri, policy, Path(split_dir) if split_dir else None, force)
    if cluster is not None:  # the gate and the refit of an engine's version run on its cluster
        decision = promote_on_cluster.with_options(task_runner=dask_runner(cluster))(*args)
    else:
        decision = promote_task(*args)
    logger.info("%s v%s: %s (%s)", model_name, decision.version, decision.decision,
                decision.reason)
    return {"model": model_name, "version": decision.version, "decision": decision.decision,
            "reason": decision.reason, "released_version": decision.released_version,
            "challenger": decision.challenger,
            "champion": decision.champion, "champion_version": decision.champion_version}
