"""The release on the engine: the lists of a model scored shard by shard, packaged and registered.

``engine: dask`` never holds the split in one process, so its release works from what the per-shard
tasks wrote:

* **the evaluated copy** (:func:`register_evaluated`): each family's test score tasks write their
  users' lists ``serve.max_k`` + :data:`models.serving.EXCLUDE_SLACK` deep, a Parquet part per
  shard (:func:`list_parts`); the best family's parts are merged, a part at a time, into the
  memory-mapped lists of a serving bundle (:meth:`models.serving.ServingModel.build_from_lists`),
  with the known users' history items read shard by shard, the test stage's trending items and
  co-visitation neighbours (the session model) that the baselines' reduce tasks wrote. The
  bundle holds no model: the lists answer every request. It is registered with alias
  ``challenger`` like the local engine's copy, tagged with the engine (:data:`ENGINE_TAG`) and
  the sharded split's folder (it is not uploaded: the run folder must be on a path every host
  of the release reads).

Memory of the flow process: one shard's lists and history, the item vocabulary and the users'
offsets (8 bytes a user).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
from mlflow import MlflowClient

from models.columns import ITEM, TIMESTAMP, USER
from models.errors import DataError
from models.serving import EXCLUDE_SLACK, ServingModel
from models.user_lists import UserItems, UserLists
from tasks.data.shards import shard_file
from tasks.release.packaging import (
    DATA_END_TAG,
    KIND_TAG,
    LAST_EVENT_TAG,
    RECIPE_TAG,
    SPLIT_DIR_TAG,
    T_TEST_TAG,
    PackagedModel,
    ReleaseRun,
    package_and_register,
    registered_of_run,
    select_best,
)
from tasks.release.recipes import read_recipe
from tasks.splitting.split_shards import shard_number

logger = logging.getLogger(__name__)

ENGINE_TAG = "shoprank.engine"
BASELINES, RANKER, TRANSFORMER = "baselines", "ranker", "transformer"
"""The work folders of the engine's stages (beside the split)."""


def list_depth(max_k: int) -> int:
    """How deep the engine's score tasks write lists for a bundle serving up to ``max_k``."""
    return max_k + EXCLUDE_SLACK


def family_folder(work: Path, family: str) -> Path:
    """The folder of ``family``'s saved model and recipe in an engine run's ``work`` folder."""
    if family == "lgbm_ranker":
        return work / RANKER / "model"
    if family == "transformer":
        return work / TRANSFORMER / "model"
    return work / BASELINES / "models" / family


def list_parts(work: Path, family: str) -> list[Path]:
    """The Parquet parts (one per shard, in shard order) of ``family``'s test lists."""
    folder = {"lgbm_ranker": work / RANKER / "lists",
              "transformer": work / TRANSFORMER / "lists" / "test"}.get(
        family, work / BASELINES / "lists" / family)
    parts = sorted(folder.glob("shard-*.parquet"), key=shard_number)
    if not parts:
        raise DataError(f"no lists of {family} in {folder}: the engine's test stage writes them "
                        "when registry.enabled is true; train again with it.")
    return parts


def last_of(folder: Path) -> str:
    """The latest timestamp of a folder of Parquet shards, ISO 8601."""
    value = pl.scan_parquet(folder / "*.parquet").select(pl.col(TIMESTAMP).max()).collect().item()
    return value.isoformat() if value is not None else ""


def _histories(parts: list[Path], split_dir: Path, table: str
               ) -> Iterator[tuple[pl.Series, pl.DataFrame]]:
    """Each part's users (their order in the merged lists) and their shard's history."""
    for part in parts:
        users = pl.read_parquet(part, columns=[USER])[USER].cast(pl.String)
        history = pl.read_parquet(shard_file(split_dir / table, shard_number(part)),
                                  columns=[USER, ITEM])
        yield users.unique(maintain_order=True), history


def bundle_from_parts(folder: Path, *, family: str, parts: list[Path], split_dir: Path,
                      history_table: str, baselines: Path, items_path: Path | None,
                      config: dict[str, Any], **settings: Any) -> Path:
    """A lists-only serving bundle in ``folder`` from the lists' parts of an engine's stage.

    The parts are merged in a scratch folder beside ``folder`` (moved into the bundle).

    ``history_table``: the split table each shard's users were scored from (their known items);
    ``baselines``: the work folder of the baselines of the same stage (``test/``: trending
    items, co-visitation neighbours, every history item).
    """
    folder = Path(folder)
    scratch = folder.parent / f".{folder.name}-parts"
    stage = baselines / "test"
    items = pl.read_parquet(stage / "counts.parquet", columns=[ITEM])[ITEM].cast(pl.String)
    if items_path is not None:
        items = pl.concat([items, pl.read_parquet(items_path, columns=[ITEM])[ITEM]
                           .cast(pl.String)]).unique(maintain_order=True)
    lists = UserLists.merge_parts(parts, items, scratch / "lists")
    UserItems.merge_parts(_histories(parts, split_dir, history_table), items,
                          scratch / "history")
    logger.info("merged the lists of %d users from %d parts (%.1f MB)", len(lists), len(parts),
                lists.nbytes / 1e6)
    serve = config.get("serve", {})
    bundle = ServingModel.build_from_lists(
        folder, family=family, lists=scratch / "lists", history=scratch / "history",
        trending=pl.read_parquet(stage / "popularity_recent.parquet"),
        neighbours=pl.read_parquet(stage / "neighbours.parquet"), items=items, config=config,
        default_k=serve.get("default_k", 10), max_k=serve.get("max_k", 200),
        session_items=serve.get("session_items", 5),
        session_weight=serve.get("session_weight", 0.5), **settings)
    return bundle


def request_example(split_dir: Path, table: str, n_recent: int = 3) -> pd.DataFrame:
    """The pyfunc's input example from the first shard (a known user, a new visitor)."""
    first = min(split_dir.joinpath(table).glob("shard-*.parquet"), key=shard_number)
    history = pl.read_parquet(first, columns=[USER, ITEM, TIMESTAMP]).sort(TIMESTAMP)
    last = history.tail(n_recent)
    return pd.DataFrame([
        {USER: last[USER][-1], "k": 10, "recent_items": None, "exclude": None},
        {USER: "a-new-visitor", "k": 5, "recent_items": last[ITEM].to_list(), "exclude": []},
    ])


def register_evaluated(scores: dict[str, dict[str, dict[str, float]]], run: ReleaseRun
                       ) -> tuple[str, PackagedModel]:
    """Register the engine run's best model on validation as its evaluated copy (challenger).

    ``run.split_dir`` is the sharded split, ``run.model_root`` the engine's work folder (its
    stages' folders), ``run.events`` the folder of event shards. Idempotent like
    :func:`tasks.release.packaging.register_best`: a resumed run gets its version back.
    """
    cfg, work = run.config, run.model_root
    metric = cfg.get("evaluation", {}).get("primary_metric", "ndcg@10")
    registry = cfg.get("registry", {})
    model_name = registry.get("model_name", "shoprank")
    client = MlflowClient(run.tracking_uri)
    done = registered_of_run(client, model_name, run.run_id)
    if done is not None:
        logger.info("%s version %s was registered by this run already: kept as it is",
                    model_name, done.version)
        return done.tags["model.family"], PackagedModel(
            model_name, str(done.version), f"models:/{model_name}/{done.version}",
            int(float(done.tags.get("serving.artifact_bytes", 0))),
            float(done.tags.get("serving.load_seconds", 0.0)))
    family = select_best(scores, metric, registry.get("families"))
    key = metric.replace("@", "_at_")
    info = json.loads((run.split_dir / "info.json").read_text())["summary"]
    tags = {LAST_EVENT_TAG: last_of(run.split_dir / "test_history"),
            DATA_END_TAG: last_of(run.events or run.split_dir / "test_history"),
            T_TEST_TAG: info.get("t_test") or "",
            KIND_TAG: "evaluated", ENGINE_TAG: "dask", SPLIT_DIR_TAG: str(run.split_dir),
            "model.family": family, "data.name": run.data_name,
            "data.fingerprint": run.fingerprint, "protocol": run.protocol,
            "primary_metric": metric, f"valid.{key}": f"{scores[family]['valid'][metric]:.6g}",
            f"test.{key}": f"{scores[family]['test'][metric]:.6g}",
            "ks": ",".join(str(k) for k in cfg.get("evaluation", {}).get("ks", [10, 20])),
            "exclude_seen": str(run.exclude_seen).lower()}
    recipe = read_recipe(family_folder(work, family))
    if recipe is not None:
        path = f"recipes/{family}.json"
        client.log_dict(run.run_id, recipe, path)
        tags[RECIPE_TAG] = f"runs:/{run.run_id}/{path}"
    description = (
        f"{family} chosen on validation {metric} = {scores[family]['valid'][metric]:.4f} "
        f"(test {scores[family]['test'][metric]:.4f}) among {', '.join(scores)}, scored shard "
        f"by shard (engine dask); data {run.data_name} ({run.fingerprint[:12]}), protocol "
        f"{run.protocol}, run {run.run_id}.")
    with tempfile.TemporaryDirectory(prefix="serving-bundle-", dir=work) as tmp:
        bundle = bundle_from_parts(
            Path(tmp) / "bundle", family=family, parts=list_parts(work, family),
            split_dir=run.split_dir, history_table="test_history", baselines=work / BASELINES,
            items_path=run.items, config=cfg, exclude_seen=run.exclude_seen,
            model_name=family, run_id=run.run_id)
        packaged = package_and_register(
            run.run_id, bundle, None, family=family, model_name=model_name,
            tracking_uri=run.tracking_uri, tags=tags, description=description,
            example=request_example(run.split_dir, "test_history"))
    return family, packaged
