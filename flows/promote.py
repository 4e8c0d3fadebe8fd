"""The ``promote`` flow, and the release step that ends ``train``: register, announce, promote.

``release_best_model`` runs inside ``train``: the best model on validation is packaged and
registered as the challenger, the event ``shoprank.model.evaluated`` announces it, and (unless
``registry.promote`` is false) it is promoted right away. The ``promote`` flow does the promotion
on its own, for a version given by number or for the current challenger; a deployment runs it
when the evaluation event arrives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import RegistryConfig, TrainConfig
from tasks import tracking
from tasks.release.gate import promote_version
from tasks.release.packaging import ReleaseRun, register_best
from tasks.release.registry import (
    EVALUATED,
    PROMOTED,
    REJECTED,
    Decision,
    PromotionPolicy,
    alias_version,
    emit_model_event,
    get_version,
    metrics_payload,
)

register_task = task(name="register", cache_policy=NO_CACHE)(register_best)
promote_task = task(name="promote-version", cache_policy=NO_CACHE)(promote_version)


def policy_of(registry: RegistryConfig, primary_metric: str, serve_session_items: int = 5
              ) -> PromotionPolicy:
    """The promotion policy of a registry config."""
    return PromotionPolicy(
        primary_metric=primary_metric, margin=registry.margin,
        coverage_tolerance=registry.coverage_tolerance,
        latency_tolerance=registry.latency_tolerance, latency_slack_ms=registry.latency_slack_ms,
        latency_requests=registry.latency_requests, session_items=serve_session_items)


def announce(decision: Decision) -> None:
    """Send the decision as ``shoprank.model.promoted`` (or ``.rejected``)."""
    if decision.decision == "unchanged":
        return
    event = PROMOTED if decision.promoted else REJECTED
    emit_model_event(event, decision.model_name, decision.version, decision.payload())


def release_best_model(scores: dict[str, dict[str, dict[str, float]]], config: TrainConfig,
                       run: ReleaseRun) -> dict[str, Any]:
    """Register the best model on validation, announce it and promote it if configured."""
    logger = get_run_logger()
    family, packaged = register_task(scores, run)
    name, version = packaged.name, packaged.version
    emit_model_event(EVALUATED, name, version, {
        "model": name, "version": version, "family": family, "run_id": run.run_id,
        "artifact_bytes": packaged.artifact_bytes, "load_seconds": packaged.load_seconds,
        "metrics": metrics_payload(scores, family)})
    result: dict[str, Any] = {"model": name, "version": version, "family": family,
                              "artifact_bytes": packaged.artifact_bytes,
                              "load_seconds": packaged.load_seconds, "decision": None}
    if config.registry.promote:
        policy = policy_of(config.registry, config.evaluation.primary_metric,
                           config.serve.session_items)
        decision = promote_task(name, version, run.tracking_uri, policy, run.split_dir)
        announce(decision)
        result.update(decision=decision.decision, reason=decision.reason,
                      released_version=decision.released_version,
                      champion=alias_version(MlflowClient(run.tracking_uri), name, "champion"))
        logger.info("%s v%s (%s): %s, %s", name, version, family, decision.decision,
                    decision.reason)
    return result


@flow(name="promote", log_prints=False)
def promote(
    version: str | None = None,
    model_name: str = "shoprank",
    registry: RegistryConfig | None = None,
    tracking_uri: str | None = None,
    split_dir: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Promote a registered version (default: the current challenger) if it beats the champion.

    Args:
        version: Model version number; empty means the version with alias ``challenger``.
        model_name: Registered model name.
        registry: Margin and guardrails (defaults when empty).
        tracking_uri: MLflow store; MLFLOW_TRACKING_URI or ./mlruns when empty.
        split_dir: Test split to compare on; default: the one recorded on the version.
        force: Decide again on a version that already carries a decision.
    """
    logger = get_run_logger()
    registry = registry or RegistryConfig()
    uri = tracking_uri or tracking.tracking_uri()
    client = MlflowClient(uri)
    version = version or alias_version(client, model_name, "challenger")
    metric = "ndcg@10"
    if version is not None:
        metric = get_version(client, model_name, str(version)).tags.get("primary_metric", metric)
    decision = promote_task(model_name, version, uri, policy_of(registry, metric),
                            Path(split_dir) if split_dir else None, force)
    announce(decision)
    logger.info("%s v%s: %s (%s)", model_name, decision.version, decision.decision,
                decision.reason)
    return {"model": model_name, "version": decision.version, "decision": decision.decision,
            "reason": decision.reason, "released_version": decision.released_version,
            "challenger": decision.challenger,
            "champion": decision.champion, "champion_version": decision.champion_version}
