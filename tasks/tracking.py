"""MLflow helpers: where the store lives, what every run records, and data fingerprints.

Every function takes an explicit ``run_id`` and uses :class:`mlflow.MlflowClient`, so logging works
from any thread a task runs in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

logger = logging.getLogger(__name__)

PACKAGES = (
    "shoprank", "prefect", "mlflow", "great-expectations", "lightgbm", "optuna", "torch",
    "polars", "pandas", "numpy", "pyarrow",
)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
_CREDENTIALS = re.compile(r"(\w[\w+.-]*://[^/:@\s]*:)[^@/\s]+@")


def tracking_uri(configured: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else ``configured``, else a SQLite store in ``./mlruns``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    store = Path.cwd() / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifact folder beside a local SQLite store (``mlruns/artifacts``); None for servers."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def ensure_experiment(name: str, uri: str) -> str:
    """Id of experiment ``name`` in the store at ``uri``, created if missing.

    Safe when raced: two runs of one shop starting together on a shared tracking server both
    find no experiment; the one whose creation is refused reads the other's.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = artifact_root(uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        raced = client.get_experiment_by_name(name)
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS) or raced is None:
            raise
        return raced.experiment_id


def fingerprint(paths: list[Path]) -> str:
    """SHA-256 over the names and bytes of ``paths`` (files, or every file under folders)."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def git_commit() -> str | None:
    """The project's current git commit, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
            check=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def log_run_context(
    run_id: str, config: dict[str, Any], data_name: str, source: Path, digest: str,
    rows: dict[str, int],
) -> None:
    """Log the resolved config, package versions, git commit and the input dataset."""
    client = MlflowClient()
    config = redacted(config)  # no credential of a storage URL reaches a param or artifact
    client.log_dict(run_id, config, "config.json")
    client.log_dict(run_id, package_versions(), "package_versions.json")
    for key, value in _flatten(config).items():
        client.log_param(run_id, key, str(value)[:6000])
    commit = git_commit()
    if commit:
        client.set_tag(run_id, "mlflow.source.git.commit", commit)
    client.set_tag(run_id, "data.fingerprint", digest)
    client.set_tag(run_id, "data.name", data_name)
    for table, count in rows.items():
        client.log_param(run_id, f"rows.{table}", count)
    log_dataset(run_id, data_name, str(source.resolve()), digest, "training")


def log_dataset(run_id: str, name: str, source: str, digest: str, context: str,
                client: MlflowClient | None = None) -> None:
    """Record a dataset (a path or an artifact URI, and its digest) as an input of the run.

    Nothing is recorded for a source MLflow has no dataset source class for (an artifact
    proxied by a tracking server, ``mlflow-artifacts:``).
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # a local path matches two equivalent source classes
        warnings.simplefilter("ignore", UserWarning)
        try:
            dataset_source = resolve_dataset_source(source)
        except MlflowException:
            logger.debug("no MLflow dataset source for %s; not recorded as an input", source)
            return
    dataset = MetaDataset(dataset_source, name=name, digest=digest[:36])
    tag = InputTag(key="mlflow.data.context", value=context)
    inputs = [DatasetInput(dataset._to_mlflow_entity(), [tag])]
    client = client or MlflowClient()
    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException:  # another run recorded the same dataset at the same instant
        logger.info("recording dataset %s as an input of run %s raced; retrying once", name,
                    run_id)
        client.log_inputs(run_id, datasets=inputs)


def metric_key(model: str, stage: str, metric: str) -> str:
    """MLflow-safe metric name, e.g. ``covisitation.test.ndcg_at_10``."""
    return f"{model}.{stage}.{metric.replace('@', '_at_')}"


def log_metrics(run_id: str, model: str, stage: str, metrics: dict[str, float]) -> None:
    """Log ``metrics`` of ``model`` on ``stage`` (valid or test) to the run."""
    client = MlflowClient()
    for name, value in metrics.items():
        client.log_metric(run_id, metric_key(model, stage, name), float(value))


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    """Write ``text`` as an artifact of the run."""
    MlflowClient().log_text(run_id, text, artifact_file)


def log_json(run_id: str, payload: Any, artifact_file: str) -> None:
    """Write ``payload`` as a JSON artifact of the run."""
    MlflowClient().log_text(run_id, json.dumps(redacted(payload), indent=2, default=str),
                            artifact_file)


def log_figure(run_id: str, figure: Any, artifact_file: str) -> None:
    """Save a matplotlib figure as a PNG artifact of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        figure.savefig(path, dpi=110, bbox_inches="tight")
        MlflowClient().log_artifact(run_id, str(path), str(Path(artifact_file).parent or ""))


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(r"\g<1>***@", text)


def redacted(tree: Any) -> Any:
    """A copy of a JSON-like tree with :func:`redact` applied to every string."""
    if isinstance(tree, dict):
        return {key: redacted(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [redacted(value) for value in tree]
    return redact(tree) if isinstance(tree, str) else tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
