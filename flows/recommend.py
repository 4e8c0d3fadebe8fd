"""The ``recommend`` flow: batch top-K lists for every known user (or a given list) to Parquet.

The lists come from a registered model (default ``models:/shoprank@champion``) and are stamped
with the model version that produced them: a ``model_version`` column and Parquet metadata
(``shoprank.model_name``, ``shoprank.model_version``, ``shoprank.model_uri``,
``shoprank.created_at``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from models.columns import USER
from models.errors import ConfigError, DataError
from models.serving import ServingModel
from tasks import tracking
from tasks.release.registry import load_version, resolve_model

MODEL_VERSION = "model_version"
CHUNK = 20_000


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    writer, rows = None, 0
    try:
        for frame in frames:
            table = frame.with_columns(pl.lit(version).alias(MODEL_VERSION)).to_arrow()
            if writer is None:
                schema = table.schema.with_metadata({**(table.schema.metadata or {}), **meta})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.cast(writer.schema))
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    return path, rows


@task(name="batch-recommend", cache_policy=NO_CACHE)
def batch_recommend(model_uri: str, tracking_uri: str, users_file: str | None, k: int,
                    out: str | None) -> dict[str, Any]:
    """Load the model, answer every user and write the stamped Parquet file."""
    client = MlflowClient(tracking_uri)
    name, version = resolve_model(model_uri, client)
    serving = load_version(client, name, version).unwrap_python_model().serving
    if not 1 <= k <= serving.max_k:
        raise ConfigError(f"--k must be from 1 to {serving.max_k}; got {k}.")
    users = read_users(Path(users_file)) if users_file else serving.users
    path = Path(out) if out else Path("outputs") / "recommendations" / f"{name}-v{version}.parquet"
    _, rows = write_stamped(recommend_chunks(serving, users, k), path, name, version, model_uri)
    return {"path": str(path.resolve()), "model": name, "version": version,
            "users": users.len(), "rows": rows}


@flow(name="recommend", log_prints=False)
def recommend(
    users_file: str | None = None,
    k: int = 10,
    out: str | None = None,
    model_uri: str = "models:/shoprank@champion",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Write top-``k`` recommendations of all known users (or those of ``users_file``).

    Args:
        users_file: Parquet/CSV with a ``user_id`` column, or a text file of ids; empty means
            every user the model knows.
        k: List length per user.
        out: Output Parquet path; default ``outputs/recommendations/NAME-vVERSION.parquet``.
        model_uri: Registered model to use (``models:/NAME@ALIAS`` or ``models:/NAME/N``).
        tracking_uri: MLflow store; MLFLOW_TRACKING_URI or ./mlruns when empty.
    """
    result = batch_recommend(model_uri, tracking_uri or tracking.tracking_uri(), users_file, k,
                             out)
    get_run_logger().info("wrote %d rows for %d users from %s v%s to %s", result["rows"],
                          result["users"], result["model"], result["version"], result["path"])
    return result
