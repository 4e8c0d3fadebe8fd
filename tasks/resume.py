"""Resuming a ``train`` run: the MLflow run to continue, and the cache keys of the stages.

A training run is tagged at creation with the digest of its settings (:data:`DIGEST_TAG`) and its
run folder (:data:`WORKDIR_TAG`). ``train --resume`` continues the newest run with the digest of
its own settings that did not finish: the same MLflow run, the same run folder. The local
engine's stages persist their results in Prefect's result storage under a key of their inputs
and source code (:data:`STAGE_CACHE`), never of the flow run: the run folder and the MLflow run
id are among the inputs, so a fresh run never meets another run's results, while a resumed run
reads those of the stages that finished and computes only the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from models.errors import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from prefect.context import TaskRunContext

DIGEST_TAG = "shoprank.config_digest"
WORKDIR_TAG = "shoprank.workdir"
FINGERPRINT_TAG = "data.fingerprint"
UNFINISHED = ("RUNNING", "FAILED", "KILLED")
"""MLflow statuses of a run that can be resumed (a process killed by SIGKILL leaves RUNNING)."""

STAGE_CACHE: CachePolicy = INPUTS + TASK_SOURCE
"""Cache key of a local-engine stage: its inputs and its source, not the flow run id."""


def source_stamp(path: Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time (ns) of every file of ``path`` (a file or a folder).

    Cheap (no byte is read), and it changes whenever a file is rewritten, added or removed.
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path] if path.exists() else []
    stamps = []
    for file in files:
        stat = file.stat()
        name = file.name if file == path else str(file.relative_to(path))
        stamps.append((name, stat.st_size, stat.st_mtime_ns))
    return stamps


def source_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Cache key part of ``load``: :func:`source_stamp` of its ``path`` (None for the demo shop).

    The demo shop is defined by its inputs (events, seed); a source file that changes gives
    ``load`` a new key, so changed data is read again rather than taken from the cache.
    """
    path = parameters.get("path")
    if path is None:
        return None
    return hash_objects(source_stamp(Path(path)), raise_on_failure=True)


LOAD_CACHE: CachePolicy = STAGE_CACHE + CachePolicy.from_cache_key_fn(source_key)
"""Cache key of ``load``: :data:`STAGE_CACHE` and the source files' sizes and times."""


def unfinished_run(client: MlflowClient, digest: str) -> Run | None:
    """The newest top-level run tagged with ``digest`` whose status is in :data:`UNFINISHED`.

    Every experiment is searched: the digest covers the data settings, so it names the shop.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments, f"tags.`{DIGEST_TAG}` = '{digest}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=50)
    return next((run for run in runs if run.info.status in UNFINISHED), None)


def resumed_workdir(run: Run) -> Path:
    """The run folder of ``run``.

    Raises:
        ConfigError: The run has no recorded folder, or the folder no longer exists.
    """
    folder = run.data.tags.get(WORKDIR_TAG)
    if not folder or not Path(folder).is_dir():
        raise ConfigError(
            f"MLflow run {run.info.run_id} cannot be resumed: its run folder {folder} no longer "
            "exists. Run without --resume to start a fresh run.")
    return Path(folder)


def check_same_data(run: Run, fingerprint: str) -> None:
    """Raise :class:`ConfigError` when the data changed since ``run`` loaded it."""
    before = run.data.tags.get(FINGERPRINT_TAG)
    if before and before != fingerprint:
        raise ConfigError(
            f"the data changed since MLflow run {run.info.run_id} loaded it (fingerprint "
            f"{before[:12]} then, {fingerprint[:12]} now), so its finished stages do not apply. "
            "Run without --resume to train on the data as it is now.")


def reopen_run(client: MlflowClient, run: Run, fingerprint: str) -> str:
    """Check the data of ``run``, set its status back to RUNNING and return its id."""
    check_same_data(run, fingerprint)
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id
