"""``shoprank deploy``: the Prefect deployments that keep a shop's recommender fresh.

* ``train/train``: nightly on a cron schedule; it registers the best model as challenger and
  announces it with the event ``shoprank.model.evaluated`` (promotion is left to ``promote``
  unless ``promote_in_train``);
* ``promote/promote``: triggered by ``shoprank.model.evaluated``, for the version in the event;
* ``recommend/recommend``: triggered by ``shoprank.model.promoted``, writes the batch lists of
  the new champion;
* ``monitor/monitor``: on its own cron schedule (hourly by default), measures the champion on
  the events since its data and sends ``shoprank.model.decayed`` when it decayed or the shop
  drifted; ``train/train`` is also triggered by that event, so a decayed champion is retrained
  before the nightly run.

By default the deployments are created and then served from this process (``prefect.serve``:
blocking, each run a subprocess); with ``serve=False`` they are only created, and a later
``shoprank deploy`` serves them. With a work ``pool`` (a Prefect server's process work pool, see
:mod:`flows.team`) they are created on the pool and workers started with
``prefect worker start --pool NAME`` run them: ``train`` on the pool's work queue ``train``,
``promote`` and ``recommend`` on ``release``, so that training and releasing may run on
different machines (``prefect worker start --pool NAME --work-queue release``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.config import TrainConfig
from flows.monitor import monitor
from flows.promote import promote
from flows.recommend import recommend
from flows.train import train
from tasks import tracking
from tasks.release.registry import DECAYED, EVALUATED, PROMOTED

logger = logging.getLogger(__name__)

DEFAULT_CRON = "0 3 * * *"
MONITOR_CRON = "15 * * * *"
QUEUES = {"train": "train", "promote": "release", "recommend": "release", "monitor": "release"}
VERSION_FROM_EVENT = "{{ event.resource['shoprank.model.version'] }}"


def _model_events(event: str, model_name: str) -> dict[str, Any]:
    return {"expect": {event},
            "match": {"prefect.resource.id": f"mlflow.model-version.{model_name}.*"}}


def build_deployments(
    config: TrainConfig, cron: str = DEFAULT_CRON, timezone: str = "UTC",
    promote_in_train: bool = False, recommend_k: int = 10, recommend_out: str | None = None,
    pool: str | None = None, monitor_cron: str = MONITOR_CRON,
) -> list[RunnerDeployment]:
    """The four deployments, with absolute paths and the tracking URI baked in.

    The URI is ``config.tracking_uri``, else MLFLOW_TRACKING_URI, else ``./mlruns``.
    """
    uri = config.tracking_uri or tracking.tracking_uri()
    name = config.registry.model_name
    nightly = config.model_copy(deep=True)
    nightly.tracking_uri = uri
    nightly.output_dir = str(Path(config.output_dir).resolve())
    nightly.registry.promote = promote_in_train
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["shoprank"]}

    def queue(name: str) -> dict[str, Any]:
        return {"work_queue_name": QUEUES[name]} if pool else {}

    return [
        train.to_deployment(
            name="train", schedules=[Cron(cron, timezone=timezone)],
            parameters={"config": nightly.model_dump(mode="json")},
            triggers=[DeploymentEventTrigger(
                name="train-on-decay", **_model_events(DECAYED, name))],
            description=f"Retrain nightly ({cron} {timezone}), and when the champion decays; "
            "register the best model.",
            **queue("train"), **common),
        promote.to_deployment(
            name="promote",
            parameters={"model_name": name, "tracking_uri": uri,
                        "registry": config.registry.model_dump(mode="json")},
            triggers=[DeploymentEventTrigger(
                name="promote-on-evaluation", **_model_events(EVALUATED, name),
                parameters={"version": VERSION_FROM_EVENT})],
            description="Promote a registered version when its evaluation event arrives.",
            **queue("promote"), **common),
        recommend.to_deployment(
            name="recommend",
            parameters={"model_uri": f"models:/{name}@champion", "tracking_uri": uri,
                        "k": recommend_k, "out": recommend_out},
            triggers=[DeploymentEventTrigger(
                name="recommend-after-promotion", **_model_events(PROMOTED, name))],
            description="Write batch recommendations of the champion after each promotion.",
            **queue("recommend"), **common),
        monitor.to_deployment(
            name="monitor", schedules=[Cron(monitor_cron, timezone=timezone)],
            parameters={"config": nightly.model_dump(mode="json")},
            description=f"Measure the champion on new events ({monitor_cron} {timezone}); "
            "send shoprank.model.decayed on decay or drift.",
            **queue("monitor"), **common),
    ]


def deploy(config: TrainConfig, cron: str = DEFAULT_CRON, timezone: str = "UTC",
           promote_in_train: bool = False, recommend_k: int = 10,
           recommend_out: str | None = None, serve_them: bool = True,
           limit: int | None = None, pool: str | None = None,
           monitor_cron: str = MONITOR_CRON) -> list[str]:
    """Create the deployments on the Prefect API and (by default) serve them until stopped.

    With ``pool`` they are created on that work pool for its workers to run; nothing is served.

    Returns:
        The deployment names (``flow/deployment``) once created (or when serving stops).
    """
    deployments = build_deployments(config, cron, timezone, promote_in_train, recommend_k,
                                    recommend_out, pool, monitor_cron)
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    if pool:
        for deployment in deployments:
            deployment.apply(work_pool_name=pool)
        logger.info("created %s on the work pool %r; start workers with `prefect worker start "
                    "--pool %s` (add `--work-queue train` or `--work-queue release` to split "
                    "training from releasing)", ", ".join(names), pool, pool)
        return names
    # the flow runs of served deployments are subprocesses: they read the store from here
    os.environ["MLFLOW_TRACKING_URI"] = config.tracking_uri or tracking.tracking_uri()
    if not serve_them:
        for deployment in deployments:
            deployment.apply()
        logger.info("created %s; run `shoprank deploy` to serve them", ", ".join(names))
        return names
    logger.info("serving %s (Ctrl-C stops)", ", ".join(names))
    serve(*deployments, limit=limit)
    return names
