"""The promotion gate: the challenger against the champion's recipe on the same split.

A challenger is registered as the *evaluated copy* of its run's best model: fitted on the events
before the test window (``t_test``), with alias ``challenger``. The gate (:func:`compare`):

1. scores the challenger on every user of its run's test targets (the user's last items of the
   test history as ``recent_items``; the seen items as ``exclude`` when the protocol removes
   them; ``k`` the largest cut-off);
2. refits the champion's recipe (:mod:`tasks.release.recipes`: family and chosen settings, no study)
   on the challenger's training history and scores it on the same requests. A champion without a
   recipe is scored as served only when the last event it saw is before the challenger's ``t_test``;
   otherwise the decision is ``incomparable`` and nothing moves. A champion of another shop (tag
   ``data.name``), or whose recipe this version of shoprank cannot refit, is ``incomparable``;
3. decides with :func:`tasks.release.registry.decide` (margin on the primary metric, coverage,
   latency, live-session and cold-target guardrails). Both sides are served through the same
   MLflow pyfunc path and timed on the same mix of requests (every cut-off, with and without a
   live session, unknown visitors).

The release that follows a decision is :mod:`tasks.release.promotion`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
from mlflow import MlflowClient

from models.columns import ITEM, TIMESTAMP, USER
from models.errors import ConfigError
from models.metrics import evaluate
from tasks.data.prepare import read_split
from tasks.release.packaging import (
    DATA_TAG,
    GATE_DATA_TAG,
    KIND_TAG,
    LAST_EVENT_TAG,
    RECIPE_TAG,
    SESSION_WEIGHT_TAG,
    SPLIT_DIR_TAG,
    T_TEST_TAG,
    build_bundle,
    input_example,
    save_pyfunc,
)
from tasks.release.recipes import fit_recipe
from tasks.release.registry import (
    LATENCY,
    Decision,
    PromotionPolicy,
    decide,
    get_version,
    load_pyfunc,
    load_version,
)
from tasks.release.sessions import between, window_sessions
from tasks.splitting.split import Split

logger = logging.getLogger(__name__)

EVALUATED_TAG = "release.evaluated_version"
COPIED_TAGS = ("model.family", DATA_TAG, "data.fingerprint", "protocol", "primary_metric", "ks",
               "exclude_seen", T_TEST_TAG)


def request_records(split: Split, n_recent: int, exclude_seen: bool, k: int) -> pd.DataFrame:
    """One request per test user for ``k`` items, with its recent and (maybe) seen items.

    ``recent_items`` are the user's last ``n_recent`` history items; ``exclude`` its seen items
    when the protocol removes them; ``k`` is the largest cut-off scored, so that every metric
    sees a full list.
    """
    users = split.test_targets.select(USER).unique().sort(USER)
    last = (split.test_history.join(users, on=USER, how="semi")
            .group_by(USER, ITEM).agg(pl.col(TIMESTAMP).max())
            .sort([USER, TIMESTAMP, ITEM])
            .group_by(USER, maintain_order=True)
            .agg(pl.col(ITEM).tail(n_recent).alias("recent_items"), pl.col(ITEM).alias("seen")))
    frame = users.join(last, on=USER, how="left")
    columns = [USER, "recent_items"] + (["seen"] if exclude_seen else [])
    frame = frame.select(columns).rename({"seen": "exclude"}, strict=False)
    frame = frame.with_columns(pl.lit(k, pl.Int64).alias("k"))
    return pd.DataFrame({name: frame[name].to_list() for name in frame.columns})


def request_mix(records: pd.DataFrame, ks: list[int], n: int, seed: int = 0) -> list[dict]:
    """``n`` single-user requests as a server sees them, the same for both sides of the gate.

    Drawn (seeded) from the test users' records: ``k`` from every cut-off scored and the
    serving default (10); half with the user's recent items as a live session; one in ten from
    an unknown visitor with a session (the session model's path).
    """
    rng = np.random.default_rng(seed)
    rows = records.to_dict("records")
    choices = sorted({10, *ks})
    mix = []
    for i, row in enumerate(rng.choice(len(rows), size=n, replace=True)):
        chosen = rows[int(row)]
        request = {USER: chosen[USER], "k": int(rng.choice(choices))}
        session = chosen.get("recent_items")
        draw = rng.random()
        if session is not None and len(session) and draw < 0.5:
            request["recent_items"] = list(session)
            if draw < 0.1:
                request[USER] = f"gate-visitor-{i}"
        mix.append(request)
    return mix


def latency_ms(pyfunc: Any, requests: list[dict]) -> dict[str, float]:
    """p50 and p99 of single-user requests through ``pyfunc.predict`` (in-process)."""
    for request in requests[:5]:  # warm-up
        pyfunc.predict(pd.DataFrame([request]))
    times = []
    for request in requests:
        start = time.perf_counter()
        pyfunc.predict(pd.DataFrame([request]))
        times.append((time.perf_counter() - start) * 1000)
    return {"latency_p50_ms": float(np.percentile(times, 50)),
            LATENCY: float(np.percentile(times, 99))}


def test_window(split: Split, events: pl.DataFrame | None) -> pl.DataFrame | None:
    """The test users' events of the test window, or None without a time split or events."""
    if split.protocol != "time" or events is None or not split.info.get("t_test"):
        return None
    return between(events, split.info["t_test"]).join(
        split.test_targets.select(USER).unique(), on=USER, how="semi")


def live_sessions(split: Split, window: pl.DataFrame, exclude_seen: bool, k: int
                  ) -> tuple[pd.DataFrame, pl.DataFrame] | None:
    """Live sessions on the test window: ``(requests, targets)``, or None without any.

    Each test user's first test-window event is its session (``recent_items``, as a shop front
    end sends it); its targets are its test targets among the items of its later test-window
    events (:func:`tasks.release.sessions.window_sessions`).
    """
    sessions, targets = window_sessions(window, split.test_targets)
    if sessions.is_empty():
        return None
    first = sessions.select(USER, pl.concat_list(ITEM).alias("recent_items"))
    if exclude_seen:
        seen = split.test_history.group_by(USER).agg(pl.col(ITEM).unique().alias("exclude"))
        first = first.join(seen, on=USER, how="left")
    first = first.with_columns(pl.lit(k, pl.Int64).alias("k"))
    return pd.DataFrame({name: first[name].to_list() for name in first.columns}), targets


def daily_sessions(pyfunc: Any, window: pl.DataFrame, ks: list[int]) -> dict[str, float]:
    """The test window scored as ``shoprank monitor`` scores the days after a release.

    Each day, each test user's first event of the day is its session and the rest of its day
    the targets (:func:`tasks.monitoring.realised.realised_quality`); ``daily.<metric>`` is the
    users-weighted mean over the window's days, the figure the monitor compares with.
    """
    from tasks.monitoring.realised import realised_quality
    from tasks.monitoring.verdict import pooled

    daily = realised_quality(pyfunc.predict, window, ks=ks)
    values = {name: pooled(daily, name, daily.height)[0] for name in daily.columns
              if "@" in name}
    return {f"daily.{name}": value for name, value in values.items() if value is not None}


def measure(pyfunc: Any, split: Split, ks: list[int], n_items: int, exclude_seen: bool,
            policy: PromotionPolicy, events: pl.DataFrame | None = None) -> dict[str, float]:
    """A pyfunc's served answers scored on the split's test window, and its latency.

    *Returning* users (the plain metric names): every test user, its last known items as
    ``recent_items``; *live* sessions (``live.<metric>``): :func:`live_sessions`.
    """
    records = request_records(split, policy.session_items, exclude_seen, max(ks))
    popularity = split.test_history.group_by(ITEM).len("count")
    recs = pl.from_pandas(pyfunc.predict(records))
    metrics = evaluate(recs, split.test_targets, ks=ks, n_items=n_items,
                       item_popularity=popularity)
    window = test_window(split, events)
    live = None if window is None else live_sessions(split, window, exclude_seen, max(ks))
    if live is not None:
        answers = pl.from_pandas(pyfunc.predict(live[0]))
        metrics.update({f"live.{name}": value for name, value in evaluate(
            answers, live[1], ks=ks, n_items=n_items).items()})
        metrics.update(daily_sessions(pyfunc, window, ks))
    requests = request_mix(records, ks, policy.latency_requests)
    return {**metrics, **latency_ms(pyfunc, requests)}


def n_items_of(split_dir: Path, split: Split) -> int:
    """Catalogue size of a run: items of its events and catalogue (as training counts them)."""
    ids = [split.test_history[ITEM], split.test_targets[ITEM]]
    for name in ("events.parquet", "items.parquet"):
        if (split_dir.parent / name).is_file():
            ids.append(pl.read_parquet(split_dir.parent / name, columns=[ITEM])[ITEM])
    return pl.concat(ids).n_unique()


def run_artifact(uri: str) -> tuple[str, str]:
    """``(run_id, artifact path)`` of a ``runs:/RUN_ID/PATH`` tag (empty strings when unset)."""
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    return run_id, path


def gate_split(client: MlflowClient, model_name: str, version: str, split_dir: Path | None,
               work: Path) -> Path:
    """The local split folder the gate scores ``version`` on (its tables in the parent folder).

    ``split_dir`` when given; else the run's gate artifacts (tag ``shoprank.gate_data``),
    downloaded through the tracking server into ``work`` once; else, for a version registered
    before they were logged, the folder its tag ``shoprank.split_dir`` names.
    """
    if split_dir is not None:
        folder = Path(split_dir)
    else:
        tags = get_version(client, model_name, version).tags
        run_id, path = run_artifact(tags.get(GATE_DATA_TAG, ""))
        local = work / "gate-data" / version
        if run_id and path and not (local / path).is_dir():
            local.mkdir(parents=True, exist_ok=True)
            client.download_artifacts(run_id, path, str(local))
        folder = local / path / "split" if run_id and path else Path(tags.get(SPLIT_DIR_TAG, ""))
    if not (folder / "test_targets.parquet").is_file():
        raise ConfigError(
            f"the test split of {model_name} version {version} was not found (looked in "
            f"{folder}; tags {GATE_DATA_TAG}, {SPLIT_DIR_TAG}). Give the split folder of its "
            "training run (--split DIR), or register the version again with shoprank train.")
    return folder


def version_settings(client: MlflowClient, model_name: str, version: str) -> tuple[list[int], bool]:
    """Cut-offs and ``exclude_seen`` a version was evaluated with (from its tags)."""
    tags = get_version(client, model_name, version).tags
    ks = [int(k) for k in tags.get("ks", "10,20").split(",")]
    return ks, tags.get("exclude_seen", "false").lower() == "true"


def bundle_pyfunc(bundle: Path, split_dir: Path, family: str) -> Any:
    """A serving bundle on local disk saved and loaded as the pyfunc it would be served as.

    The gate scores and times the challenger through its registered pyfunc; the champion's
    refitted recipe goes through the same MLflow pyfunc path, so the two are timed alike.
    """
    path = bundle.parent / "pyfunc"
    save_pyfunc(bundle, path, family, input_example(split_dir))
    return load_pyfunc(str(path))


def recipe_at(client: MlflowClient, uri: str) -> dict[str, Any] | None:
    """The recipe a ``runs:/RUN_ID/PATH`` URI names (None for an empty URI)."""
    run_id, path = run_artifact(uri)
    if not run_id or not path:
        return None
    with tempfile.TemporaryDirectory(prefix="shoprank-recipe-") as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


def version_recipe(client: MlflowClient, model_name: str, version: str) -> dict[str, Any] | None:
    """The recipe a version was made with (tag ``shoprank.recipe``), or None without one."""
    return recipe_at(client, get_version(client, model_name, version).tags.get(RECIPE_TAG, ""))


def run_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The resolved config a training run logged (``config.json``; empty if it has none)."""
    with tempfile.TemporaryDirectory(prefix="shoprank-config-") as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, "config.json", tmp))
                              .read_text())
        except Exception:  # an older run: the bundle's defaults apply
            return {}


def fit_bundle(recipe: dict[str, Any], split_dir: Path, folder: Path, config: dict[str, Any],
               run_id: str, session_weight: float | None = None) -> Path:
    """Fit ``recipe`` on the split in ``split_dir`` and package it as a serving bundle.

    ``session_weight``: the weight chosen for the recipe's version (its tag), else the config's.
    """
    split = read_split(split_dir)
    items_path = split_dir.parent / "items.parquet"
    items = pl.read_parquet(items_path) if items_path.is_file() else None
    family = recipe["family"]
    model_dir = fit_recipe(recipe, split, items, folder / "models" / family)
    return build_bundle(folder / "bundle", family=family, model_dir=model_dir,
                        model_root=folder / "models", split_dir=split_dir, config=config,
                        exclude_seen=bool(recipe.get("exclude_seen")),
                        session_weight=session_weight, model_name=family, run_id=run_id)


def chosen_weight_of(tags: dict[str, str]) -> float | None:
    """The session weight chosen on validation for a version (tag), or None."""
    value = tags.get(SESSION_WEIGHT_TAG)
    return float(value) if value else None


def parse_time(value: str | None) -> dt.datetime | None:
    """An ISO 8601 tag as an aware datetime (UTC when it names no zone); None if unreadable."""
    try:
        moment = dt.datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment


def champion_refusal(client: MlflowClient, model_name: str, version: str, champion: str
                     ) -> str | None:
    """Why the champion cannot be compared with ``version`` at all (another shop), or None."""
    shop = get_version(client, model_name, version).tags.get(DATA_TAG)
    their_shop = get_version(client, model_name, champion).tags.get(DATA_TAG)
    if shop and their_shop and shop != their_shop:
        return (f"the champion v{champion} was trained on the shop {their_shop!r}, this "
                f"version on {shop!r}: one champion per shop. Register each shop under "
                "its own registry.model_name")
    return None


def champion_side(client: MlflowClient, model_name: str, version: str, champion: str,
                  split_dir: Path, work: Path) -> tuple[Any, str]:
    """The champion to score on the challenger's split: ``(pyfunc, how)``.

    ``(None, reason)`` when the two cannot be compared fairly.
    """
    ours = get_version(client, model_name, version)
    theirs = get_version(client, model_name, champion).tags
    refusal = champion_refusal(client, model_name, version, champion)
    if refusal is not None:
        return None, refusal
    recipe = version_recipe(client, model_name, champion)
    if recipe is not None:
        try:
            bundle = fit_bundle(recipe, split_dir, work, run_config(client, ours.run_id),
                                ours.run_id, chosen_weight_of(theirs))
        except Exception as err:  # a recipe of an older shoprank: renamed field or family
            logger.warning("the champion's recipe cannot be refitted", exc_info=True)
            return None, (f"the recipe of the champion v{champion} "
                          f"({recipe.get('family', '?')}) cannot be refitted by this version of "
                          f"shoprank: {type(err).__name__}: {str(err)[:300]}. Promote with "
                          "--force to replace it")
        return (bundle_pyfunc(bundle, split_dir, recipe["family"]),
                f"its recipe ({recipe['family']}) refitted on this split")
    seen, t_test = parse_time(theirs.get(LAST_EVENT_TAG)), parse_time(ours.tags.get(T_TEST_TAG))
    if seen is not None and t_test is not None and seen < t_test:
        return load_version(client, model_name, champion), "as served (it saw nothing after " \
            f"{seen.isoformat()}, before this test window)"
    return None, (f"the champion v{champion} has no recipe to refit and may have seen this test "
                  f"window (its last event: {theirs.get(LAST_EVENT_TAG, 'unknown')}; the test "
                  f"window starts: {ours.tags.get(T_TEST_TAG) or 'per user (leave-one-out)'}). "
                  "Promote with --force to replace it anyway")


def gate_keys(policy: PromotionPolicy) -> tuple[str, ...]:
    """The figures the gate keeps of each side (the decision's numbers)."""
    return (policy.primary_metric, f"coverage@{policy.guard_k}", LATENCY, "latency_p50_ms",
            f"live.{policy.primary_metric}", "live.users", "users",
            f"daily.{policy.primary_metric}", policy.cold_metric,
            f"cold{policy.cold_threshold}.users")


def compare(client: MlflowClient, model_name: str, version: str, champion: str | None,
            split_dir: Path | None, policy: PromotionPolicy, work: Path) -> Decision:
    """Score the challenger and the champion's recipe on the challenger's test window; decide."""
    tags = get_version(client, model_name, version).tags
    kind = tags.get(KIND_TAG, "evaluated")
    if kind != "evaluated":  # a released copy has seen its own test window
        evaluated = tags.get(EVALUATED_TAG, "?")
        return Decision(model_name, version, "incomparable",
                        f"v{version} is a released copy ({kind}) that has seen its test window; "
                        f"decide on its evaluated version v{evaluated} instead",
                        policy.primary_metric, policy.margin, champion_version=champion)
    folder = gate_split(client, model_name, version, split_dir, work)
    ks, exclude_seen = version_settings(client, model_name, version)
    split = read_split(folder)
    n_items = n_items_of(folder, split)
    ks = sorted({*ks, policy.guard_k, policy.cold_k})
    keep = gate_keys(policy)
    every = folder.parent / "events.parquet"
    events = pl.read_parquet(every, columns=[USER, ITEM, TIMESTAMP]) if every.is_file() else None

    def score(pyfunc: Any) -> dict[str, float]:
        values = measure(pyfunc, split, ks, n_items, exclude_seen, policy, events)
        return {m: values[m] for m in keep if m in values}

    ours = score(load_version(client, model_name, version))
    theirs, how = None, "no champion yet"
    if champion is not None:
        pyfunc, how = champion_side(client, model_name, version, champion, folder,
                                    work / "champion")
        if pyfunc is None:
            return Decision(model_name, version, "incomparable", how, policy.primary_metric,
                            policy.margin, ours, None, champion)
        theirs = score(pyfunc)
    promote, reason = decide(ours, theirs, policy)
    if theirs is not None:
        reason = f"{reason} (champion v{champion}: {how})"
    return Decision(model_name, version, "promoted" if promote else "rejected", reason,
                    policy.primary_metric, policy.margin, ours, theirs, champion)
