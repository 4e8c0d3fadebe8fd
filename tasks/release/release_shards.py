"""The release on the engine: the lists of a model scored shard by shard, packaged and registered.

``engine: dask`` never holds the split in one process, so its release works from what the per-shard
tasks wrote:

* **the evaluated copy** (:func:`register_evaluated`): each family's test score tasks write their
  users' lists ``serve.max_k`` + :data:`models.serving.EXCLUDE_SLACK` deep, a Parquet part per
  shard (:func:`list_parts`); the best family's parts are merged, a part at a time, into the
  memory-mapped lists of a serving bundle (:meth:`models.serving.ServingModel.build_from_lists`),
  with the known users' history items read shard by shard, the test stage's trending items and
  co-visitation neighbours (the session model) that the baselines' reduce tasks wrote, and the
  session weight chosen on validation shard by shard (:func:`session_weight`). The bundle
  holds no model: the lists answer every request. It is registered with alias
  ``challenger`` like the local engine's copy, tagged with the engine (:data:`ENGINE_TAG`) and
  the sharded split's folder (it is not uploaded: the run folder must be on a path every host
  of the release reads).
* **the gate** (:func:`compare_on_engine`): the champion's recipe refitted on the challenger's
  sharded split on the cluster (:func:`refit_recipe`: each family's sharded stage with the
  recipe's settings and no study) and its test users' lists scored shard by shard, against the
  challenger's test metrics of its run, on the same (sampled) test users. A known user whose
  request brings no new session items is answered with its list, so these are the served
  answers' figures; the test window's live sessions (each test user's first event there) and
  its daily sessions (as ``shoprank monitor`` scores the days after a release) are answered by
  each side's bundle shard by shard (:func:`sessions_shard`), and the p99 latency of both sides
  is measured through their pyfuncs on the same mix of requests drawn from the first shard's
  test users.
* **the release** (:func:`release_on_engine`): each shard's split moved on by one window
  (:func:`tasks.release.recipes.release_split`, a task per shard) and the winning recipe
  refitted on it on the cluster, every user's list written per shard and merged into the
  released copy's bundle.

Both write under the run folder (``release/<attempt>/``: a path every worker reads), a fresh
folder per attempt, removed once the copy is registered. Memory of the flow process: one
shard's lists and history, the item vocabulary and the users' offsets (8 bytes a user).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
from mlflow import MlflowClient
from prefect import task, unmapped

from models.baselines import baseline_factories
from models.columns import ITEM, TIMESTAMP, USER
from models.errors import ConfigError, DataError, ShoprankError
from models.metrics import merge_partials, partial_metrics
from models.serving import EXCLUDE_SLACK, MANIFEST, ServingModel
from models.session_blend import DEFAULT_WEIGHTS, WeightParts, pick_weight, session_weight_parts
from models.user_lists import UserItems, UserLists
from tasks.checks.validate_shards import gather
from tasks.data.shards import BUCKETS, host_cores, shard_file
from tasks.evaluation.evaluate_shards import read_neighbours
from tasks.release.packaging import (
    RECIPE_TAG,
    SESSION_WEIGHT_TAG,
    SPLIT_DIR_TAG,
    PackagedModel,
    ReleaseRun,
    evaluated_tags,
    package_and_register,
    registered_copy,
    select_best,
)
from tasks.release.recipes import read_recipe, release_split
from tasks.release.sessions import validation_sessions
from tasks.splitting.split import Split
from tasks.splitting.split_shards import (
    TABLES,
    read_split_shard,
    shard_number,
    split_shard_files,
)

logger = logging.getLogger(__name__)

ENGINE_TAG = "shoprank.engine"
EVENTS_TAG = "shoprank.events_dir"  # the folder of event shards a release refits on
ITEMS_TAG = "shoprank.items_path"
N_ITEMS_TAG = "shoprank.n_items"
METRICS_PATH = "gate/test_metrics.json"  # the evaluated copy's test metrics, as the gate reads
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


def valid_list_part(work: Path, family: str, shard: int) -> Path:
    """The file of ``family``'s validation lists of one shard (the selection's users)."""
    folder = {"lgbm_ranker": work / RANKER / "lists" / "w0",
              "transformer": work / TRANSFORMER / "lists" / "valid"}.get(
        family, work / BASELINES / "valid-lists" / family)
    return shard_file(folder, shard)


@task(name="session-weight", task_run_name="session-weight-{shard:05d}", retries=1)
def session_weight_shard(split_dir: Path, events: Path, shard: int, lists: Path,
                         neighbours: Path, metric: str, session_items: int
                         ) -> WeightParts | None:
    """One shard's replay of live sessions on the validation window at every weight.

    As :func:`tasks.release.sessions.chosen_weight` replays the whole split; None without
    validation lists or sessions with a later target in this shard.
    """
    if not lists.is_file():
        return None
    split = read_split_shard(split_dir, shard)
    mine = pl.read_parquet(lists)
    every = pl.read_parquet(shard_file(events, shard), columns=[USER, ITEM, TIMESTAMP])
    sessions, targets = validation_sessions(split, every, mine[USER].unique())
    if targets.is_empty():
        return None
    return session_weight_parts(mine, read_neighbours(neighbours, sessions),
                                split.train.select(USER, ITEM), sessions, targets, DEFAULT_WEIGHTS,
                                metric=metric, session_items=session_items)


def session_weight(run: ReleaseRun, family: str, metric: str) -> dict[str, Any] | None:
    """The family's session weight chosen on validation shard by shard (call inside a flow).

    The local engine's choice (:func:`tasks.release.sessions.chosen_weight`), from the
    validation lists the score tasks wrote and the validation stage's co-visitation
    neighbours; every family, since the engine's bundle blends every live session. None
    without a time split, or without any session to choose on.
    """
    if run.protocol != "time" or run.events is None:
        return None
    work, session_items = run.model_root, int(run.config.get("serve", {}).get("session_items", 5))
    shards = split_shard_files(run.split_dir)
    parts = gather(session_weight_shard.map(
        unmapped(run.split_dir), unmapped(run.events), shards,
        [valid_list_part(work, family, shard) for shard in shards],
        unmapped(work / BASELINES / "valid" / "neighbours.parquet"), unmapped(metric),
        unmapped(session_items)))
    parts = [part for part in parts if part is not None]
    if not parts:
        return None
    choice = pick_weight(parts, DEFAULT_WEIGHTS, metric)
    sessions = int(choice.table["users"][0])
    logger.info("session weight %.1f chosen on %d validation sessions (%d blended)",
                choice.weight, sessions, choice.blended)
    return {"weight": choice.weight, "metric": choice.metric, "blended": choice.blended,
            "sessions": sessions, "table": choice.table.to_dicts()}


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
                      config: dict[str, Any], session_weight: float | None = None,
                      **settings: Any) -> Path:
    """A lists-only serving bundle in ``folder`` from the lists' parts of an engine's stage.

    The parts are merged in a scratch folder beside ``folder`` (moved into the bundle).

    ``history_table``: the split table each shard's users were scored from (their known items);
    ``baselines``: the work folder of the baselines of the same stage (``test/``: trending
    items, co-visitation neighbours, every history item). ``session_weight``: the one chosen
    on validation (default: ``serve.session_weight``).
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
        trending=stage / "popularity_recent.parquet", neighbours=stage / "neighbours.parquet",
        items=items, config=config,
        default_k=serve.get("default_k", 10), max_k=serve.get("max_k", 200),
        session_items=serve.get("session_items", 5),
        session_weight=session_weight if session_weight is not None else serve.get(
            "session_weight", 0.5), **settings)
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
    model_name = cfg.get("registry", {}).get("model_name", "shoprank")
    client = MlflowClient(run.tracking_uri)
    done = registered_copy(client, model_name, run.run_id)
    if done is not None:
        return done
    family = select_best(scores, metric, cfg.get("registry", {}).get("families"))
    info = json.loads((run.split_dir / "info.json").read_text())["summary"]
    tags = {**evaluated_tags(client, scores, family, run, read_recipe(family_folder(work, family)),
                             last_of(run.split_dir / "test_history"),
                             last_of(run.events or run.split_dir / "test_history"),
                             info.get("t_test")),
            ENGINE_TAG: "dask", SPLIT_DIR_TAG: str(run.split_dir),
            EVENTS_TAG: str(run.events or ""), ITEMS_TAG: str(run.items or ""),
            N_ITEMS_TAG: str(run.n_items)}
    client.log_dict(run.run_id, scores[family]["test"], METRICS_PATH)
    choice = session_weight(run, family, metric)
    weight = None
    if choice is not None:
        client.log_dict(run.run_id, choice, f"session_weight/{family}.json")
        weight = float(choice["weight"])
        tags[SESSION_WEIGHT_TAG] = f"{weight:g}"
    description = (
        f"{family} chosen on validation {metric} = {scores[family]['valid'][metric]:.4f} "
        f"(test {scores[family]['test'][metric]:.4f}) among {', '.join(scores)}, scored shard "
        f"by shard (engine dask); data {run.data_name} ({run.fingerprint[:12]}), protocol "
        f"{run.protocol}, run {run.run_id}.")
    with tempfile.TemporaryDirectory(prefix="serving-bundle-", dir=work) as tmp:
        bundle = bundle_from_parts(
            Path(tmp) / "bundle", family=family, parts=list_parts(work, family),
            split_dir=run.split_dir, history_table="test_history", baselines=work / BASELINES,
            items_path=run.items, config=cfg, session_weight=weight,
            exclude_seen=run.exclude_seen, model_name=family, run_id=run.run_id)
        packaged = package_and_register(
            run.run_id, bundle, None, family=family, model_name=model_name,
            tracking_uri=run.tracking_uri, tags=tags, description=description,
            example=request_example(run.split_dir, "test_history"))
    return family, packaged


# ---- the gate and the release on the engine -------------------------------------------------

@dataclass
class EngineRun:
    """What the engine's gate and release read of an evaluated copy's run (tags and config)."""

    run_id: str
    split_dir: Path
    events: Path
    items: Path | None
    n_items: int
    ks: list[int]
    exclude_seen: bool
    config: dict[str, Any]

    @classmethod
    def of(cls, client: MlflowClient, version: Any) -> EngineRun:
        """The engine run behind an evaluated copy registered by :func:`register_evaluated`."""
        from tasks.release.gate import run_config

        tags = version.tags
        split_dir = Path(tags.get(SPLIT_DIR_TAG, ""))
        if not (split_dir / "info.json").is_file():
            raise DataError(
                f"the sharded split of version {version.version} is not at {split_dir} (tag "
                f"{SPLIT_DIR_TAG}): the engine's gate and release read the run folder where it "
                "was trained; put it back on that path, or train again.")
        return cls(version.run_id, split_dir, Path(tags[EVENTS_TAG]),
                   Path(tags[ITEMS_TAG]) if tags.get(ITEMS_TAG) else None,
                   int(tags.get(N_ITEMS_TAG) or 0),
                   [int(k) for k in tags.get("ks", "10,20").split(",")],
                   tags.get("exclude_seen", "false") == "true", run_config(client, version.run_id))

    def workers(self) -> int:
        """The Dask workers the run was configured with (for the ranker's trials' shares)."""
        return int(self.config.get("dask", {}).get("workers") or host_cores())


def refit_recipe(recipe: dict[str, Any], split_dir: Path, work: Path, run: EngineRun,
                 every_user: bool) -> dict[str, Any]:
    """Fit ``recipe`` on a sharded split on the cluster, as the engine's training fits it.

    The baselines' test stage always runs (trending items and neighbours of the bundle; their
    lists of every user only when the recipe is a baseline's); then the recipe's family with
    its settings and no study (:func:`evaluate_transformer_sharded`,
    :func:`evaluate_ranker_sharded`, the ranker's transformer source first). Lists
    ``serve.max_k`` + slack deep are written for the test users, or with ``every_user`` for
    every user of the test history. Returns ``test`` (metrics; empty without targets) and
    ``parts`` (the lists' files). Call inside a flow (its tasks run on its task runner).
    """
    from tasks.evaluation.evaluate_shards import evaluate_baselines_sharded
    from tasks.ranking.rank_shards import evaluate_ranker_sharded
    from tasks.ranking.reranker import RankerConfig
    from tasks.transformer.sequence import SequenceConfig
    from tasks.transformer.sequence_shards import evaluate_transformer_sharded

    family = recipe["family"]
    if recipe.get("content") or family == "content":
        raise ConfigError(f"the {family} recipe reads the catalogue's text (content "
                          "candidates or the content model), which the engine does not encode "
                          "yet: release it from an engine local run.")
    depth = list_depth(int(run.config.get("serve", {}).get("max_k", 200)))
    recent = float(run.config.get("baselines", {}).get("recent_days", 7.0))
    buckets = int(run.config.get("dask", {}).get("buckets") or BUCKETS)
    baselines = work / BASELINES
    scores = evaluate_baselines_sharded(
        split_dir, run.ks, run.n_items, run.exclude_seen,
        float(recipe.get("recent_days", recent)) if "recent_days" in recipe else recent,
        baselines, None, depth, stages=("test",), n_buckets=buckets,
        every_user=every_user and family in baseline_factories(recent))
    common = {"split_dir": split_dir, "items_path": run.items, "ks": run.ks,
              "n_items": run.n_items, "run_id": None, "tracking_uri": "",
              "list_depth": depth, "every_user": every_user}
    if family == "transformer":
        result = evaluate_transformer_sharded(
            config=SequenceConfig.model_validate(recipe["config"]),
            exclude_seen=bool(recipe["exclude_seen"]), work=work / TRANSFORMER,
            baselines=baselines, recipe=recipe, **common)
        return {"test": result.get("test", {}), "parts": list_parts(work, family)}
    if family == "lgbm_ranker":
        source = recipe.get("source")
        sequence = sequence_config = None
        if source:
            sequence_config = SequenceConfig.model_validate(source["config"])
            sequence = evaluate_transformer_sharded(
                config=sequence_config, exclude_seen=bool(source["exclude_seen"]),
                work=work / TRANSFORMER, baselines=baselines, recipe=source, score=False,
                **common)
        result = evaluate_ranker_sharded(
            config=RankerConfig.model_validate(recipe["config"]),
            exclude_seen=bool(recipe["exclude_seen"]),
            ordered_only=bool(recipe.get("ordered_only")), work=work / RANKER,
            workers=run.workers(), baselines=baselines, transformer=sequence,
            transformer_config=sequence_config, recipe=recipe, n_buckets=buckets, **common)
        return {"test": result.get("test", {}), "parts": list_parts(work, family)}
    if family not in baseline_factories(recent):
        raise ConfigError(f"the engine cannot refit a recipe of family {family!r}: expected "
                          f"lgbm_ranker, transformer or one of "
                          f"{', '.join(baseline_factories(recent))}.")
    return {"test": scores.get(family, {}).get("test", {}), "parts": list_parts(work, family)}


def attempt_folder(run: EngineRun, what: str) -> Path:
    """A fresh folder for one attempt of the gate or the release, under the run folder."""
    folder = run.split_dir.parent / "release" / f"{what}-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    return folder


def pyfunc_of(bundle: Path, family: str, example: pd.DataFrame) -> Any:
    """A bundle saved and loaded as the MLflow pyfunc it would be served as (for timing)."""
    from tasks.release.packaging import save_pyfunc
    from tasks.release.registry import load_pyfunc

    path = bundle.parent / "pyfunc"
    save_pyfunc(bundle, path, family, example)
    return load_pyfunc(str(path))


def latency_requests(run: EngineRun, policy: Any) -> list[dict]:
    """The mix of single-user requests both sides are timed on: the first shard's test users."""
    from tasks.release.gate import request_mix, request_records

    split = read_split_shard(run.split_dir, split_shard_files(run.split_dir)[0])
    records = request_records(split, policy.session_items, run.exclude_seen, max(run.ks))
    return request_mix(records, run.ks, policy.latency_requests)


def download_version(client: MlflowClient, model_name: str, version: str, folder: Path
                     ) -> tuple[Path, Path]:
    """A registered version downloaded once into ``folder`` (a shared path).

    Returns its pyfunc's folder and the serving bundle inside it.
    """
    from mlflow.artifacts import download_artifacts

    folder.mkdir(parents=True, exist_ok=True)
    local = Path(download_artifacts(
        artifact_uri=client.get_model_version_download_uri(model_name, version),
        dst_path=str(folder), tracking_uri=client.tracking_uri))
    return local, next(path.parent for path in local.rglob(MANIFEST))


@task(name="gate-sessions", task_run_name="gate-sessions-{shard:05d}", retries=1)
def sessions_shard(split_dir: Path, events: Path, shard: int, bundle: Path, ks: list[int],
                   exclude_seen: bool) -> dict[str, Any] | None:
    """One shard's live sessions and daily sessions on the test window, answered by a bundle.

    As :func:`tasks.release.gate.measure` scores them on the whole split: ``live``, the partial
    metrics of each test user's first test-window event as its session; ``daily``, the users-
    weighted sums of :func:`tasks.monitoring.realised.realised_quality` per metric, with their
    ``users``. None without a test window.
    """
    from tasks.monitoring.realised import USERS, realised_quality
    from tasks.release.gate import live_sessions, test_window

    split = read_split_shard(split_dir, shard)
    every = pl.read_parquet(shard_file(events, shard), columns=[USER, ITEM, TIMESTAMP])
    window = test_window(split, every)
    if window is None:
        return None
    serving = ServingModel.load(bundle)

    def predict(frame: pd.DataFrame) -> pl.DataFrame:
        return serving.predict(frame.to_dict("records"))

    live = live_sessions(split, window, exclude_seen, max(ks))
    daily = realised_quality(predict, window, ks)
    return {"live": None if live is None else partial_metrics(predict(live[0]), live[1], ks),
            "daily": {name: float((daily[name] * daily[USERS]).sum())
                      for name in daily.columns if "@" in name},
            "users": int(daily[USERS].sum())}


def session_figures(run: EngineRun, bundle: Path, keep: tuple[str, ...]) -> dict[str, float]:
    """The ``live.*`` and ``daily.*`` figures in ``keep`` of a bundle, shard by shard.

    ``daily.<metric>``: the users-weighted mean over every day and shard (the local gate's
    figure); both left out, as there, when no test user has a live session. Call inside a flow.
    """
    parts = gather(sessions_shard.map(unmapped(run.split_dir), unmapped(run.events),
                                      split_shard_files(run.split_dir), unmapped(bundle),
                                      unmapped(run.ks), unmapped(run.exclude_seen)))
    parts = [part for part in parts if part is not None]
    live = [part["live"] for part in parts if part["live"] is not None]
    if not live:
        return {}
    figures = {f"live.{name}": value
               for name, value in merge_partials(live, run.n_items).items()}
    users = sum(part["users"] for part in parts)
    if users:
        figures.update({f"daily.{name}": sum(part["daily"][name] for part in parts) / users
                        for name in parts[0]["daily"]})
    return {name: value for name, value in figures.items() if name in keep}


def compare_on_engine(client: MlflowClient, model_name: str, version: str,
                      champion: str | None, policy: Any) -> Any:
    """The gate for an evaluated copy of the engine (see the module docstring): a Decision."""
    from tasks.release.gate import (
        champion_refusal,
        chosen_weight_of,
        gate_keys,
        latency_ms,
        recipe_at,
    )
    from tasks.release.registry import Decision, decide, get_version, load_pyfunc

    source = get_version(client, model_name, version)
    run = EngineRun.of(client, source)
    keep = gate_keys(policy)
    with tempfile.TemporaryDirectory(prefix="shoprank-metrics-") as tmp:
        ours = json.loads(Path(client.download_artifacts(run.run_id, METRICS_PATH, tmp))
                          .read_text())
    requests = latency_requests(run, policy)
    ours = {m: ours[m] for m in keep if m in ours}
    theirs, how = None, "no champion yet"
    work = attempt_folder(run, f"gate-v{version}")
    try:  # the challenger downloaded once: timed as a pyfunc, its bundle read by the shards
        served, bundle = download_version(client, model_name, version, work / "challenger")
        ours.update(latency_ms(load_pyfunc(str(served)), requests))
        if champion is not None:
            refusal = champion_refusal(client, model_name, version, champion)
            if refusal is None and not get_version(client, model_name, champion).tags.get(
                    RECIPE_TAG):
                refusal = (f"the champion v{champion} has no recipe that the engine could "
                           "refit on this split. Promote with --force to replace it")
            if refusal is not None:
                return Decision(model_name, version, "incomparable", refusal,
                                policy.primary_metric, policy.margin, ours, None, champion)
        ours.update(session_figures(run, bundle, keep))
        if champion is not None:
            tags = get_version(client, model_name, champion).tags
            recipe = recipe_at(client, tags[RECIPE_TAG])
            try:
                fitted = refit_recipe(recipe, run.split_dir, work / "champion", run,
                                      every_user=False)
            except ShoprankError as err:  # a recipe the engine cannot refit
                logger.warning("the champion's recipe cannot be refitted", exc_info=True)
                return Decision(
                    model_name, version, "incomparable",
                    f"the recipe of the champion v{champion} ({recipe.get('family', '?')}) "
                    f"cannot be refitted on the engine: {str(err)[:300]}. Promote with --force "
                    "to replace it", policy.primary_metric, policy.margin, ours, None, champion)
            bundle = bundle_from_parts(
                work / "champion" / "bundle", family=recipe["family"], parts=fitted["parts"],
                split_dir=run.split_dir, history_table="test_history",
                baselines=work / "champion" / BASELINES, items_path=run.items,
                config=run.config, session_weight=chosen_weight_of(tags),
                exclude_seen=bool(recipe.get("exclude_seen")), model_name=recipe["family"])
            theirs = {m: fitted["test"][m] for m in keep if m in fitted["test"]}
            theirs.update(session_figures(run, bundle, keep))
            theirs.update(latency_ms(pyfunc_of(bundle, recipe["family"], request_example(
                run.split_dir, "test_history")), requests))
            how = f"its recipe ({recipe['family']}) refitted on this split on the engine"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    promote, reason = decide(ours, theirs, policy)
    if theirs is not None:
        reason = f"{reason} (champion v{champion}: {how})"
    return Decision(model_name, version, "promoted" if promote else "rejected", reason,
                    policy.primary_metric, policy.margin, ours, theirs, champion)


@task(name="release-split", task_run_name="release-split-{shard:05d}", retries=1)
def release_shard(split_dir: Path, events: Path, shard: int, end: dt.datetime, out: Path
                  ) -> int:
    """One shard's split moved on by one window (:func:`release_split`); its events count."""
    info = json.loads((split_dir / "info.json").read_text())
    tables = {name: pl.read_parquet(shard_file(split_dir / name, shard)) for name in TABLES}
    split = Split(protocol=info["protocol"], info=info["summary"], **tables)
    every = pl.read_parquet(shard_file(events, shard))
    moved = release_split(split, every)
    if split.protocol == "time":  # the whole log's end, not this shard's
        moved.info.update(t_test=(end + dt.timedelta(microseconds=1)).isoformat())
    for name in TABLES:
        path = shard_file(out / name, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        getattr(moved, name).write_parquet(path)
    if shard == min(info["shards"]):
        (out / "info.json").write_text(json.dumps(
            {"protocol": info["protocol"], "summary": {**info["summary"], **moved.info},
             "shards": info["shards"]}, indent=2, default=str))
    return every.height


def release_on_engine(client: MlflowClient, source: Any, recipe: dict[str, Any],
                      session_weight: float | None = None
                      ) -> tuple[Path, pd.DataFrame, int, str, Path]:
    """The winning recipe refitted on every event on the cluster, as a bundle (call in a flow).

    ``session_weight``: the weight chosen for the recipe's version (its tag).

    Returns the bundle, the pyfunc's input example, the number of events, the last event's
    time and the attempt's folder (removed by the caller once the bundle is registered).
    """
    run = EngineRun.of(client, source)
    work = attempt_folder(run, f"release-v{source.version}")
    end = dt.datetime.fromisoformat(last_of(run.events))
    shards = split_shard_files(run.split_dir)
    moved = work / "split"
    events = sum(gather(release_shard.map(unmapped(run.split_dir), unmapped(run.events), shards,
                                          unmapped(end), unmapped(moved))))
    fitted = refit_recipe(recipe, moved, work, run, every_user=True)
    bundle = bundle_from_parts(
        work / "bundle", family=recipe["family"], parts=fitted["parts"], split_dir=moved,
        history_table="test_history", baselines=work / BASELINES, items_path=run.items,
        config=run.config, session_weight=session_weight,
        exclude_seen=bool(recipe.get("exclude_seen")), model_name=recipe["family"],
        run_id=run.run_id)
    return bundle, request_example(moved, "test_history"), events, end.isoformat(), work
