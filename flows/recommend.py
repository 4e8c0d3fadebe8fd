"""The ``recommend`` flow: batch top-K lists for every known user (or a given list) to Parquet.

The lists come from a registered model (default ``models:/shoprank@champion``) and are stamped
with the model version that produced them: a ``model_version`` column and Parquet metadata
(``shoprank.model_name``, ``shoprank.model_version``, ``shoprank.model_uri``,
``shoprank.created_at``).

A version the Dask engine made is answered on that run's cluster (as ``promote`` refits it
there): the version downloaded once beside the output (a path every worker reads), the users cut
into contiguous parts, a ``recommend-part`` task per part writing its lists, then the parts'
row groups streamed into the stamped file in order: the same file as in one process.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from models.columns import USER
from models.errors import ConfigError, DataError
from models.serving import ServingModel
from tasks import tracking
from tasks.checks.validate_shards import gather
from tasks.release.registry import load_version, resolve_model

MODEL_VERSION = "model_version"
CHUNK = 20_000
PART_USERS = 200_000
"""Users of one ``recommend-part`` task on a cluster (at least two parts a worker)."""


def read_users(path: Path) -> pl.Series:
    """User ids from a Parquet/CSV file with a ``user_id`` column, or a text file, one a line."""
    if not path.is_file():
        raise DataError(f"users file {path} does not exist; give a file of user ids.")
    if path.suffix == ".parquet":
        frame = pl.read_parquet(path)
    elif path.suffix == ".csv":
        frame = pl.read_csv(path, infer_schema=False)
    else:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        frame = pl.DataFrame({USER: lines})
    if USER not in frame.columns:
        raise DataError(f"users file {path} has no {USER!r} column (found "
                        f"{', '.join(frame.columns)}); name the column user_id.")
    return frame[USER].cast(pl.String).drop_nulls().unique(maintain_order=True)


def recommend_chunks(serving: ServingModel, users: pl.Series, k: int, chunk: int = CHUNK
                     ) -> Iterator[pl.DataFrame]:
    """Top-``k`` lists of ``users``, ``chunk`` users at a time (at least one frame)."""
    if users.is_empty():
        yield serving.recommend_users([], k)
    for start in range(0, users.len(), chunk):
        yield serving.recommend_users(users.slice(start, chunk), k)


def recommend_all(serving: ServingModel, users: pl.Series, k: int, chunk: int = CHUNK
                  ) -> pl.DataFrame:
    """Top-``k`` lists of ``users`` in one frame (:func:`recommend_chunks` concatenated)."""
    return pl.concat(list(recommend_chunks(serving, users, k, chunk)))


def write_frames(frames: Iterable[pl.DataFrame], path: Path,
                 metadata: dict[bytes, bytes] | None = None) -> int:
    """Write the frames into one Parquet file, a row group each; returns the rows.

    Written beside and renamed: a killed write leaves no file. Memory holds one frame.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    writer, rows = None, 0
    try:
        for frame in frames:
            table = frame.to_arrow()
            if writer is None:
                schema = table.schema.with_metadata({**(table.schema.metadata or {}),
                                                     **(metadata or {})})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.cast(writer.schema))
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    return rows


def write_stamped(frames: pl.DataFrame | Iterable[pl.DataFrame], path: Path, name: str,
                  version: str, uri: str) -> tuple[Path, int]:
    """Write the frames with a ``model_version`` column and the model in the Parquet metadata.

    Frame after frame (a row group each): memory holds one frame, whatever the number of users
    (the lists of an engine's champion: millions of users). Returns the path and the rows.
    """
    frames = [frames] if isinstance(frames, pl.DataFrame) else frames
    meta = {b"shoprank.model_name": name.encode(), b"shoprank.model_version": version.encode(),
            b"shoprank.model_uri": uri.encode(),
            b"shoprank.created_at": dt.datetime.now(dt.UTC).isoformat().encode()}
    stamped = (frame.with_columns(pl.lit(version).alias(MODEL_VERSION)) for frame in frames)
    return path, write_frames(stamped, path, meta)


def output_path(out: str | None, name: str, version: str) -> Path:
    """The output file: ``out``, else ``outputs/recommendations/NAME-vVERSION.parquet``."""
    return Path(out) if out else Path("outputs") / "recommendations" / f"{name}-v{version}.parquet"


def checked_k(serving: ServingModel, k: int) -> int:
    """``k`` when the bundle's lists reach it; else a :class:`ConfigError` naming the range."""
    if not 1 <= k <= serving.max_k:
        raise ConfigError(f"--k must be from 1 to {serving.max_k}; got {k}.")
    return k


@task(name="batch-recommend", cache_policy=NO_CACHE)
def batch_recommend(model_uri: str, tracking_uri: str, users_file: str | None, k: int,
                    out: str | None, resolved: tuple[str, str] | None = None) -> dict[str, Any]:
    """Load the model, answer every user and write the stamped Parquet file.

    ``resolved``: ``(name, version)`` of ``model_uri`` when the caller has resolved it already.
    """
    client = MlflowClient(tracking_uri)
    name, version = resolved or resolve_model(model_uri, client)
    serving = load_version(client, name, version).unwrap_python_model().serving
    checked_k(serving, k)
    users = read_users(Path(users_file)) if users_file else serving.users
    path = output_path(out, name, version)
    _, rows = write_stamped(recommend_chunks(serving, users, k), path, name, version, model_uri)
    return {"path": str(path.resolve()), "model": name, "version": version,
            "users": users.len(), "rows": rows}


@task(name="recommend-part", task_run_name="recommend-part-{part:05d}", retries=1,
      cache_policy=NO_CACHE)
def recommend_part(bundle: Path, users_file: Path, part: int, start: int, length: int, k: int
                   ) -> Path:
    """One contiguous part of the users answered from the downloaded bundle into a file."""
    serving = ServingModel.load(bundle)
    users = pl.read_parquet(users_file)[USER].slice(start, length)
    out = users_file.parent / f"part-{part:05d}.parquet"
    write_frames(recommend_chunks(serving, users, k), out)
    return out


@flow(name="recommend-on-cluster", log_prints=False)
def recommend_on_cluster(model_uri: str, tracking_uri: str, users_file: str | None, k: int,
                         out: str | None, workers: int, resolved: tuple[str, str]
                         ) -> dict[str, Any]:
    """:func:`batch_recommend` with the users cut into parts on this subflow's task runner."""
    from tasks.release.release_shards import download_version

    client = MlflowClient(tracking_uri)
    name, version = resolved
    path = output_path(out, name, version)
    work = path.parent / f".{path.name}.parts-{uuid.uuid4().hex[:12]}"
    try:
        _, bundle = download_version(client, name, version, work / "model")
        serving = ServingModel.load(bundle)
        checked_k(serving, k)
        users = read_users(Path(users_file)) if users_file else serving.users
        pl.DataFrame({USER: users}).write_parquet(work / "users.parquet")
        n = max(2 * max(workers, 1), math.ceil(users.len() / PART_USERS))
        size = max(math.ceil(users.len() / n), 1)
        starts = list(range(0, max(users.len(), 1), size))
        files = gather(recommend_part.map(unmapped(bundle), unmapped(work / "users.parquet"),
                                          list(range(len(starts))), starts, unmapped(size),
                                          unmapped(k)))
        frames = (pl.read_parquet(file) for file in files)
        _, rows = write_stamped(frames, path, name, version, model_uri)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"path": str(path.resolve()), "model": name, "version": version,
            "users": users.len(), "rows": rows, "parts": len(starts)}


@flow(name="recommend", log_prints=False)
def recommend(
    users_file: str | None = None,
    k: int = 10,
    out: str | None = None,
    model_uri: str = "models:/shoprank@champion",
    tracking_uri: str | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Write top-``k`` recommendations of all known users (or those of ``users_file``).

    Args:
        users_file: Parquet/CSV with a ``user_id`` column, or a text file of ids; empty means
            every user the model knows.
        k: List length per user.
        out: Output Parquet path; default ``outputs/recommendations/NAME-vVERSION.parquet``.
        model_uri: Registered model to use (``models:/NAME@ALIAS`` or ``models:/NAME/N``).
        tracking_uri: MLflow store; MLFLOW_TRACKING_URI or ./mlruns when empty.
        dask_address: For a version the engine made, the cluster to use instead of its run's:
            ``tcp://HOST:PORT``, or ``local`` for a LocalCluster here.
    """
    from flows.cluster import dask_runner, shard_sizing
    from flows.promote import engine_cluster

    uri = tracking_uri or tracking.tracking_uri()
    client = MlflowClient(uri)
    resolved = resolve_model(model_uri, client)  # once: an alias moved meanwhile changes nothing
    cluster = engine_cluster(client, *resolved, dask_address)
    if cluster is not None:  # an engine's version: its parts on that run's cluster
        result = recommend_on_cluster.with_options(task_runner=dask_runner(cluster))(
            model_uri, uri, users_file, k, out, shard_sizing(cluster).workers, resolved)
    else:
        result = batch_recommend(model_uri, uri, users_file, k, out, resolved)
    get_run_logger().info("wrote %d rows for %d users from %s v%s to %s", result["rows"],
                          result["users"], result["model"], result["version"], result["path"])
    return result
