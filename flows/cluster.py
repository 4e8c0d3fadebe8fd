"""The Dask cluster of ``engine: dask``: the task runner of its subflows (training, release)."""

from __future__ import annotations

from prefect_dask import DaskTaskRunner

from flows.config import DaskConfig
from flows.serve import default_workers
from models.errors import ConfigError
from tasks.data.load_shards import ShardSizing


def dask_runner(cfg: DaskConfig) -> DaskTaskRunner:
    """The task runner of ``engine: dask``: a running cluster, or a LocalCluster on 127.0.0.1.

    The LocalCluster's workers report their task runs to this process's Prefect API (the
    configured server, or the temporary one this process started): without it each worker
    would start a temporary server of its own (three processes each).
    """
    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    api = prefect_api_url()
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": cfg.workers or default_workers(), "threads_per_worker": 1,
        "processes": True, "memory_limit": cfg.memory_limit, "host": "127.0.0.1",
        "dashboard_address": None, **({"env": {"PREFECT_API_URL": api}} if api else {})})


def check_reachable(address: str, what: str) -> None:
    """A :class:`ConfigError` naming the ways out when the scheduler at ``address`` is down."""
    from distributed import Client

    try:
        with Client(address, timeout="10s"):
            return
    except OSError as err:
        raise ConfigError(
            f"{what}, and its scheduler does not answer ({err}). Start that cluster again, or "
            "give another: --dask-address tcp://HOST:PORT of a running scheduler, or "
            "--dask-address local for a LocalCluster on this machine.") from err


def shard_sizing(cfg: DaskConfig) -> ShardSizing:
    """The workers and the memory of each that the shards are sized to.

    A running cluster (``address``) is asked (its workers now, the smallest memory limit); a
    LocalCluster's are those ``dask_runner`` will start ('auto': the machine's memory shared
    equally).
    """
    from dask.utils import parse_bytes
    from distributed import Client
    from distributed.system import MEMORY_LIMIT

    if cfg.address:
        with Client(cfg.address, timeout="30s") as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            limits = [w.get("memory_limit") or 0 for w in workers]
        return ShardSizing(len(limits), min(limits) if limits and all(limits) else None)
    workers = cfg.workers or default_workers()
    memory = (MEMORY_LIMIT // workers if cfg.memory_limit == "auto"
              else parse_bytes(cfg.memory_limit))
    return ShardSizing(workers, memory)


def prefect_api_url() -> str | None:
    """The Prefect API this process reports to: the configured one, else its temporary server's.

    None when neither is known (no flow has run in this process yet).
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return str(PREFECT_API_URL.value())
    server = SubprocessASGIServer()  # the unique temporary server of this process
    return server.api_url if server.server_process is not None else None
