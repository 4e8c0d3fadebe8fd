"""Package a trained model as one self-contained MLflow pyfunc and register it.

The pyfunc holds a serving bundle (:mod:`models.serving`): the chosen model's saved folder, the
trending fallback, the co-visitation session model, the known users and items and the resolved
config. It is saved with a signature, an input example, explicit pip requirements (so logging does
not spend seconds inferring them) and the project's ``models`` and ``tasks`` code, then logged to
the training run and registered as a new version of the registered model with alias
``challenger``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import pandas as pd
import polars as pl
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    ErrorCode,
)
from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

from models.baselines import CoVisitation, Popularity
from models.columns import ITEM, TIMESTAMP, USER
from models.errors import ConfigError
from models.requests import RequestError
from models.serving import (
    DEFAULT_MAX_K,
    DEFAULT_SESSION_WEIGHT,
    FAMILIES,
    ServingModel,
    family_class,
    register_family,
)
from tasks.release.recipes import last_event, read_recipe
from tasks.release.registry import REGISTRY_ID_TAG, load_pyfunc
from tasks.tracking import PROJECT_ROOT, fingerprint, log_dataset

logger = logging.getLogger(__name__)
# the LightGBM re-ranker that is served, with its candidate and feature state
register_family("lgbm_ranker", "tasks.ranking.reranker:RankingPipeline")

CHALLENGER = "challenger"
CHAMPION = "champion"
ARTIFACT_PATH = "model"
BASE_REQUIREMENTS = ("mlflow", "polars", "pandas", "numpy", "pyarrow", "pydantic")
OPTIONAL_REQUIREMENTS = ("torch", "lightgbm")
SPLIT_DIR_TAG = "shoprank.split_dir"  # versions registered before the gate data was logged
GATE_DATA_TAG = "shoprank.gate_data"
GATE_ARTIFACTS = "gate"
DATA_TAG = "data.name"
RECIPE_TAG = "shoprank.recipe"
LAST_EVENT_TAG = "shoprank.last_event"
DATA_END_TAG = "shoprank.data_last_event"  # the last event of the run's data (the release's)
T_TEST_TAG = "shoprank.t_test"
KIND_TAG = "release.kind"
SESSION_WEIGHT_TAG = "serve.session_weight"  # chosen on validation for the version's family


class ShoprankPyfunc(mlflow.pyfunc.PythonModel):
    """The served model: request records in, ranked items out (see :mod:`models.serving`)."""

    def load_context(self, context: Any) -> None:
        """Load the serving bundle stored as the artifact ``bundle``."""
        self.serving = ServingModel.load(Path(context.artifacts["bundle"]))

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Answer request records (a DataFrame, or a list of dicts when called directly).

        Returns:
            ``user_id, item_id, score, rank``, one row per recommended item.

        Raises:
            MlflowException: ``INVALID_PARAMETER_VALUE`` (HTTP 400) naming the malformed field.
        """
        if isinstance(model_input, pd.DataFrame):  # column-wise: faster than to_dict("records")
            columns = {name: model_input[name].tolist() for name in model_input.columns}
            rows = zip(*columns.values(), strict=True)
            records = [dict(zip(columns, row, strict=True)) for row in rows]
        elif isinstance(model_input, dict):
            records = [model_input]
        else:
            records = list(model_input)
        try:
            return pd.DataFrame(self.serving.predict(records).to_dict(as_series=False))
        except RequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err


def model_signature() -> ModelSignature:
    """Input: ``user_id`` (required), ``k``, ``recent_items``, ``exclude``; output: ranked items.

    The optional fields are typed ``Any`` so that records may leave them out (MLflow would turn a
    missing integer into NaN and reject it); the model validates them and names the field.
    """
    inputs = Schema([
        ColSpec(DataType.string, USER),
        ColSpec(AnyType(), "k", required=False),
        ColSpec(AnyType(), "recent_items", required=False),
        ColSpec(AnyType(), "exclude", required=False),
    ])
    outputs = Schema([ColSpec(DataType.string, USER), ColSpec(DataType.string, ITEM),
                      ColSpec(DataType.double, "score"), ColSpec(DataType.long, "rank")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements(family: str) -> list[str]:
    """Pinned requirements of the pyfunc: the base stack plus what the family's module imports."""
    module = __import__(family_class(family).__module__, fromlist=["_"])
    imported = {value.__name__.split(".")[0] for value in vars(module).values()
                if isinstance(value, ModuleType)}
    names = list(BASE_REQUIREMENTS) + [n for n in OPTIONAL_REQUIREMENTS if n in imported]
    return [f"{name}=={metadata.version(name)}" for name in names]


def _load_or_fit(folder: Path, factory: Any, history: pl.DataFrame) -> Any:
    if (folder / "params.json").is_file():
        return type(factory).load(folder)
    logger.info("%s not found; fitting %s on the test history", folder, type(factory).__name__)
    return factory.fit(history)


def build_bundle(
    folder: Path, *, family: str, model_dir: Path, model_root: Path, split_dir: Path,
    config: dict[str, Any], exclude_seen: bool, session_weight: float | None = None,
    **settings: Any,
) -> Path:
    """Write the serving bundle of the model saved in ``model_dir`` (fitted on the test history).

    The fallback and session models are the run's ``recent_popularity`` and ``covisitation``
    baselines under ``model_root`` (fitted on the test history when missing); the known users
    and items come from the test history and the catalogue beside the split, and each known
    user's history items tell its new session items from known ones. ``session_weight``: the
    weight chosen for the family on validation (default: ``serve.session_weight``).
    """
    history = pl.read_parquet(split_dir / "test_history.parquet")
    recent_days = config.get("baselines", {}).get("recent_days", 7.0)
    trending = _load_or_fit(model_root / "recent_popularity", Popularity(window_days=recent_days),
                            history).popularity_
    neighbours = _load_or_fit(model_root / "covisitation", CoVisitation(), history).neighbours_
    items = history[ITEM]
    catalogue = split_dir.parent / "items.parquet"
    if catalogue.is_file():
        items = pl.concat([items, pl.read_parquet(catalogue, columns=[ITEM])[ITEM]])
    serve = config.get("serve", {})
    return ServingModel.build(
        folder, family=family, model_dir=model_dir, trending=trending, neighbours=neighbours,
        users=history[USER], items=items, config=config, exclude_seen=exclude_seen,
        default_k=serve.get("default_k", 10), max_k=serve.get("max_k", DEFAULT_MAX_K),
        session_items=serve.get("session_items", 5), history=history.select(USER, ITEM),
        session_weight=session_weight if session_weight is not None else serve.get(
            "session_weight", DEFAULT_SESSION_WEIGHT), **settings)


def input_example(split_dir: Path, n_recent: int = 3) -> pd.DataFrame:
    """Two request records: a known user, and an unknown user with a live session."""
    history = pl.read_parquet(split_dir / "test_history.parquet", columns=[USER, ITEM, TIMESTAMP])
    last = history.sort(TIMESTAMP).tail(n_recent)
    return pd.DataFrame([
        {USER: last[USER][-1], "k": 10, "recent_items": None, "exclude": None},
        {USER: "a-new-visitor", "k": 5, "recent_items": last[ITEM].to_list(), "exclude": []},
    ])


@dataclass
class PackagedModel:
    """A registered version and what it costs to ship."""

    name: str
    version: str
    model_uri: str
    artifact_bytes: int
    load_seconds: float


def save_pyfunc(bundle: Path, path: Path, family: str, example: pd.DataFrame) -> None:
    """Save the bundle as an MLflow pyfunc model in the new folder ``path``."""
    mlflow.pyfunc.save_model(  # models-from-code: the model is the file, not a pickle
        path=str(path), python_model=str(PROJECT_ROOT / "tasks" / "release" / "served_model.py"),
        artifacts={"bundle": str(bundle)},
        signature=model_signature(), input_example=example,
        pip_requirements=pip_requirements(family),
        code_paths=[str(PROJECT_ROOT / "models"), str(PROJECT_ROOT / "tasks")],
    )


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def check_shop(client: MlflowClient, name: str, shop: str | None) -> None:
    """Raise :class:`ConfigError` when the registered model ``name`` belongs to another shop.

    One registered model holds one shop's champion: the first registration binds it to its
    data name (registered-model tag ``data.name``).
    """
    try:
        bound = client.get_registered_model(name).tags.get(DATA_TAG)
    except MlflowException:
        return  # not registered yet: this shop will own it
    if shop and bound and bound != shop:
        raise ConfigError(
            f"the registered model {name!r} holds the champion of the shop {bound!r}, not "
            f"{shop!r}: one registered model per shop. Set registry.model_name (for example "
            f"--model-name shoprank-{shop}) or registry.enabled: false.")


def ensure_registered_model(client: MlflowClient, name: str, shop: str | None = None) -> None:
    """Create the registered model ``name`` for ``shop`` unless it exists (safe when raced).

    Raises:
        ConfigError: If it exists for another shop (:func:`check_shop`).
    """
    tags = {REGISTRY_ID_TAG: uuid.uuid4().hex, **({DATA_TAG: shop} if shop else {})}
    try:
        client.create_registered_model(
            name, tags=tags,
            description="shoprank top-K recommender of one shop; aliases champion and "
            "challenger.")
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        check_shop(client, name, shop)


def package_and_register(
    run_id: str, bundle: Path, split_dir: Path | None, *, family: str, model_name: str,
    tracking_uri: str, tags: dict[str, str], description: str, alias: str | None = CHALLENGER,
    artifact_path: str = ARTIFACT_PATH, example: pd.DataFrame | None = None,
) -> PackagedModel:
    """Save, log (to ``run_id``) and register the bundle; point ``alias`` (if any) at it.

    The pyfunc's input example is ``example``, else one from the split (:func:`input_example`).
    """
    client = MlflowClient(tracking_uri)
    if example is None:
        if split_dir is None:
            raise ConfigError("package_and_register needs the split folder or an example.")
        example = input_example(split_dir)
    with tempfile.TemporaryDirectory(prefix="shoprank-pyfunc-") as tmp:
        local = Path(tmp) / ARTIFACT_PATH
        save_pyfunc(bundle, local, family, example)
        size = folder_bytes(local)
        start = time.perf_counter()
        load_pyfunc(str(local))
        load_seconds = time.perf_counter() - start
        client.log_artifacts(run_id, str(local), artifact_path)
    client.log_metric(run_id, "serving.artifact_bytes", size)
    client.log_metric(run_id, "serving.load_seconds", load_seconds)
    ensure_registered_model(client, model_name, tags.get(DATA_TAG))
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(
        model_name, source, run_id=run_id, description=description,
        tags={**tags, "serving.artifact_bytes": str(size),
              "serving.load_seconds": f"{load_seconds:.3f}"},
    ).version
    if alias:
        client.set_registered_model_alias(model_name, alias, version)
    logger.info("registered %s version %s (%s, %.1f MB, loads in %.2f s)", model_name, version,
                family, size / 1e6, load_seconds)
    return PackagedModel(model_name, str(version), f"models:/{model_name}/{version}", size,
                         load_seconds)


def log_gate_data(client: MlflowClient, run_id: str, split_dir: Path) -> str:
    """Log what the gate needs of a run as its artifacts ``gate/``; returns their URI.

    ``gate/split/`` holds the split (the test window and the histories a recipe is refitted
    on), ``gate/events.parquet`` and ``gate/items.parquet`` the tables the release refits on.
    They travel through the tracking server, so a promotion needs no path on the training
    machine. The split is also recorded as the run's dataset input of context ``evaluation``.
    """
    client.log_artifacts(run_id, str(split_dir), f"{GATE_ARTIFACTS}/split")
    for name in ("events.parquet", "items.parquet"):
        if (split_dir.parent / name).is_file():
            client.log_artifact(run_id, str(split_dir.parent / name), GATE_ARTIFACTS)
    run = client.get_run(run_id)
    log_dataset(run_id, f"{run.data.tags.get(DATA_TAG, 'data')}-split",
                f"{run.info.artifact_uri}/{GATE_ARTIFACTS}/split", fingerprint([split_dir]),
                "evaluation", client)
    return f"runs:/{run_id}/{GATE_ARTIFACTS}"


def load_serving(model_uri: str, tracking_uri: str) -> tuple[Any, ServingModel]:
    """Load ``models:/NAME/N`` or ``models:/NAME@ALIAS`` from the store at ``tracking_uri``.

    Returns the pyfunc and the :class:`ServingModel` inside it. The global MLflow tracking URI is
    left alone.
    """
    from tasks.release.registry import load_version, resolve_model

    client = MlflowClient(tracking_uri)
    name, version = resolve_model(model_uri, client)
    pyfunc = load_version(client, name, version)
    return pyfunc, pyfunc.unwrap_python_model().serving


@dataclass
class ReleaseRun:
    """What the release step needs to know about the training run that produced the models."""

    run_id: str
    tracking_uri: str
    split_dir: Path
    model_root: Path
    data_name: str
    fingerprint: str
    protocol: str
    exclude_seen: bool
    config: dict[str, Any]
    engine: str = "local"  # dask: split_dir is sharded, model_root the stages' work folder
    events: Path | None = None  # the folder of event shards (engine dask)
    items: Path | None = None  # the catalogue (engine dask)
    n_items: int = 0  # items that can be recommended (engine dask)


def select_best(scores: dict[str, dict[str, dict[str, float]]], metric: str,
                families: list[str] | None = None) -> str:
    """The servable model with the best validation ``metric`` (the first one on ties)."""
    unknown = [name for name in scores if name not in FAMILIES]
    if unknown:
        logger.warning("not servable, left out of the selection: %s (register them with "
                       "models.serving.register_family)", ", ".join(unknown))
    allowed = [n for n in scores if n in FAMILIES and (families is None or n in families)]
    if not allowed:
        raise ConfigError(
            f"no servable model to register among {', '.join(scores) or '(none)'} "
            f"(registry.families = {families}). Allow one of {', '.join(sorted(FAMILIES))}.")
    missing = [n for n in allowed if metric not in scores[n].get("valid", {})]
    if missing:
        known = ", ".join(scores[missing[0]].get("valid", {}))
        raise ConfigError(f"evaluation.primary_metric {metric!r} was not computed for "
                          f"{', '.join(missing)}; choose one of {known}.")
    return max(allowed, key=lambda name: scores[name]["valid"][metric])


def session_choice(client: MlflowClient, run: ReleaseRun, family: str, metric: str
                   ) -> float | None:
    """The family's session weight chosen on validation (:mod:`tasks.release.sessions`).

    Logged on the run (``session_weight/<family>.json``: every weight's figures); None when it
    cannot be chosen (no validation lists, no sessions) or the family reads sessions itself.
    """
    from tasks.data.prepare import read_split
    from tasks.release.sessions import chosen_weight

    if getattr(family_class(family), "recommend_session", None) is not None:
        return None
    serve = run.config.get("serve", {})
    choice = chosen_weight(read_split(run.split_dir), run.split_dir.parent / "events.parquet",
                           run.model_root / family, metric, serve.get("session_items", 5))
    if choice is None:
        return None
    client.log_dict(run.run_id, choice, f"session_weight/{family}.json")
    return float(choice["weight"])


def registered_of_run(client: MlflowClient, model_name: str, run_id: str) -> Any | None:
    """The evaluated version a training run already registered (a resumed release), or None."""
    try:
        found = client.search_model_versions(f"run_id='{run_id}'")
    except MlflowException:
        return None
    mine = [v for v in found if v.name == model_name and v.tags.get(KIND_TAG) == "evaluated"]
    return min(mine, key=lambda v: int(v.version)) if mine else None


def registered_copy(client: MlflowClient, model_name: str, run_id: str
                    ) -> tuple[str, PackagedModel] | None:
    """``(family, version)`` of the evaluated copy the run registered already, or None."""
    done = registered_of_run(client, model_name, run_id)
    if done is None:
        return None
    logger.info("%s version %s was registered by this run already: kept as it is",
                model_name, done.version)
    return done.tags["model.family"], PackagedModel(
        model_name, str(done.version), f"models:/{model_name}/{done.version}",
        int(float(done.tags.get("serving.artifact_bytes", 0))),
        float(done.tags.get("serving.load_seconds", 0.0)))


def evaluated_tags(client: MlflowClient, scores: dict[str, dict[str, dict[str, float]]],
                   family: str, run: ReleaseRun, recipe: dict[str, Any] | None, last: str,
                   data_end: str, t_test: str | None) -> dict[str, str]:
    """The tags of an evaluated copy (either engine); its recipe is logged to the run.

    ``last``: the last event it was fitted on; ``data_end``: the run's last event; ``t_test``:
    the test window's start (none for leave-one-out).
    """
    metric = run.config.get("evaluation", {}).get("primary_metric", "ndcg@10")
    key = metric.replace("@", "_at_")
    tags = {LAST_EVENT_TAG: last, DATA_END_TAG: data_end,
            T_TEST_TAG: dt.datetime.fromisoformat(t_test).isoformat() if t_test else "",
            KIND_TAG: "evaluated", "model.family": family, DATA_TAG: run.data_name,
            "data.fingerprint": run.fingerprint, "protocol": run.protocol,
            "primary_metric": metric, f"valid.{key}": f"{scores[family]['valid'][metric]:.6g}",
            f"test.{key}": f"{scores[family]['test'][metric]:.6g}",
            "ks": ",".join(str(k) for k in run.config.get("evaluation", {}).get("ks", [10, 20])),
            "exclude_seen": str(run.exclude_seen).lower()}
    if recipe is not None:
        path = f"recipes/{family}.json"
        client.log_dict(run.run_id, recipe, path)
        tags[RECIPE_TAG] = f"runs:/{run.run_id}/{path}"
    return tags


def register_best(scores: dict[str, dict[str, dict[str, float]]], run: ReleaseRun
                  ) -> tuple[str, PackagedModel]:
    """Package the best model on validation and register it; returns its family and version.

    Idempotent: a run that registered its evaluated copy already (killed after registering,
    then resumed) gets that version back, unchanged.
    """
    cfg = run.config
    metric = cfg.get("evaluation", {}).get("primary_metric", "ndcg@10")
    model_name = cfg.get("registry", {}).get("model_name", "shoprank")
    client = MlflowClient(run.tracking_uri)
    done = registered_copy(client, model_name, run.run_id)
    if done is not None:
        return done
    family = select_best(scores, metric, cfg.get("registry", {}).get("families"))
    history = pl.read_parquet(run.split_dir / "test_history.parquet", columns=[TIMESTAMP])
    every = run.split_dir.parent / "events.parquet"
    events = pl.read_parquet(every, columns=[TIMESTAMP]) if every.is_file() else history
    info = json.loads((run.split_dir / "info.json").read_text())["summary"]
    tags = {**evaluated_tags(client, scores, family, run, read_recipe(run.model_root / family),
                             last_event(history), last_event(events), info.get("t_test")),
            GATE_DATA_TAG: log_gate_data(client, run.run_id, run.split_dir)}
    description = (
        f"{family} chosen on validation {metric} = {scores[family]['valid'][metric]:.4f} "
        f"(test {scores[family]['test'][metric]:.4f}) among {', '.join(scores)}; data "
        f"{run.data_name} ({run.fingerprint[:12]}), protocol {run.protocol}, run {run.run_id}.")
    weight = session_choice(client, run, family, metric)
    if weight is not None:
        tags[SESSION_WEIGHT_TAG] = f"{weight:g}"
    # a fresh folder per attempt: a killed attempt's leftover never blocks the next one
    with tempfile.TemporaryDirectory(prefix="serving-bundle-", dir=run.split_dir.parent) as tmp:
        bundle = build_bundle(
            Path(tmp) / "bundle", family=family, model_dir=run.model_root / family,
            model_root=run.model_root, split_dir=run.split_dir, config=cfg,
            exclude_seen=run.exclude_seen, session_weight=weight, model_name=family,
            run_id=run.run_id)
        packaged = package_and_register(
            run.run_id, bundle, run.split_dir, family=family, model_name=model_name,
            tracking_uri=run.tracking_uri, tags=tags, description=description)
    return family, packaged
