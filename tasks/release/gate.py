"""The promotion gate: the challenger against the champion's recipe on the same split; the release.

A challenger is registered as the *evaluated copy* of its run's best model: fitted on the events
before the test window (``t_test``), with alias ``challenger``. The gate:

1. scores the challenger on every user of its run's test targets (the user's last items of the
   test history as ``recent_items``; the seen items as ``exclude`` when the protocol removes
   them; ``k`` the largest cut-off);
2. refits the champion's recipe (:mod:`tasks.release.recipes`: family and chosen settings, no study)
   on the challenger's training history and scores it on the same requests. A champion without a
   recipe is scored as served only when the last event it saw is before the challenger's ``t_test``;
   otherwise the decision is ``incomparable`` and nothing moves. A champion of another shop (tag
   ``data.name``) is never compared: ``incomparable``;
3. decides with :func:`tasks.release.registry.decide` (margin on the primary metric, coverage and
   latency guardrails);
4. releases the winning recipe refitted on every event (the test window included) as a new
   version with alias ``champion``: the challenger's recipe when it wins (``release.kind``
   ``challenger``), else the champion's (``refresh``). The released version carries the
   evaluated copy's metric tags.

The compare-and-set runs under :func:`tasks.release.registry.registry_lock`, the champion read again
inside it, so two runs finishing together never leave the aliases inconsistent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
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
from models.serving import ServingModel
from tasks.data.prepare import read_split, write_split
from tasks.release.packaging import (
    CHALLENGER,
    CHAMPION,
    DATA_TAG,
    GATE_DATA_TAG,
    KIND_TAG,
    LAST_EVENT_TAG,
    RECIPE_TAG,
    SPLIT_DIR_TAG,
    T_TEST_TAG,
    ShoprankPyfunc,
    build_bundle,
    package_and_register,
)
from tasks.release.recipes import fit_recipe, last_event, release_split
from tasks.release.registry import (
    DECISION_TAG,
    LATENCY,
    Decision,
    PromotionPolicy,
    alias_version,
    decide,
    get_version,
    load_version,
    record,
    registry_lock,
)
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


def latency_ms(pyfunc: Any, users: list[str], n: int, seed: int = 0) -> dict[str, float]:
    """p50 and p99 of single-user top-10 requests through ``pyfunc.predict`` (in-process)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.asarray(users, dtype=object), size=n, replace=True)
    for user in chosen[:5]:  # warm-up
        pyfunc.predict(pd.DataFrame([{USER: user, "k": 10}]))
    times = []
    for user in chosen:
        start = time.perf_counter()
        pyfunc.predict(pd.DataFrame([{USER: user, "k": 10}]))
        times.append((time.perf_counter() - start) * 1000)
    return {"latency_p50_ms": float(np.percentile(times, 50)),
            LATENCY: float(np.percentile(times, 99))}


def measure(pyfunc: Any, split: Split, ks: list[int], n_items: int, exclude_seen: bool,
            policy: PromotionPolicy) -> dict[str, float]:
    """Metrics of a pyfunc's answers on the split's test window, plus its latency."""
    records = request_records(split, policy.session_items, exclude_seen, max(ks))
    recs = pl.from_pandas(pyfunc.predict(records))
    popularity = split.test_history.group_by(ITEM).len("count")
    metrics = evaluate(recs, split.test_targets, ks=ks, n_items=n_items,
                       item_popularity=popularity)
    users = records[USER].tolist()
    return {**metrics, **latency_ms(pyfunc, users, policy.latency_requests)}


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


class BundlePyfunc:
    """A serving bundle on local disk, answering like a loaded pyfunc (no MLflow round trip)."""

    def __init__(self, bundle: Path) -> None:
        self.model = ShoprankPyfunc()
        self.model.serving = ServingModel.load(bundle)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The pyfunc's answer to request records."""
        return self.model.predict(None, frame)


def version_recipe(client: MlflowClient, model_name: str, version: str) -> dict[str, Any] | None:
    """The recipe a version was made with (tag ``shoprank.recipe``), or None without one."""
    run_id, path = run_artifact(get_version(client, model_name, version).tags.get(RECIPE_TAG, ""))
    if not run_id or not path:
        return None
    with tempfile.TemporaryDirectory(prefix="shoprank-recipe-") as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


def run_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The resolved config a training run logged (``config.json``; empty if it has none)."""
    with tempfile.TemporaryDirectory(prefix="shoprank-config-") as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, "config.json", tmp))
                              .read_text())
        except Exception:  # an older run: the bundle's defaults apply
            return {}


def fit_bundle(recipe: dict[str, Any], split_dir: Path, folder: Path, config: dict[str, Any],
               run_id: str) -> Path:
    """Fit ``recipe`` on the split in ``split_dir`` and package it as a serving bundle."""
    split = read_split(split_dir)
    items_path = split_dir.parent / "items.parquet"
    items = pl.read_parquet(items_path) if items_path.is_file() else None
    family = recipe["family"]
    model_dir = fit_recipe(recipe, split, items, folder / "models" / family)
    return build_bundle(folder / "bundle", family=family, model_dir=model_dir,
                        model_root=folder / "models", split_dir=split_dir, config=config,
                        exclude_seen=bool(recipe.get("exclude_seen")), model_name=family,
                        run_id=run_id)


def _time(value: str | None) -> dt.datetime | None:
    """An ISO 8601 tag as an aware datetime (UTC when it names no zone); None if unreadable."""
    try:
        moment = dt.datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment


def champion_side(client: MlflowClient, model_name: str, version: str, champion: str,
                  split_dir: Path, work: Path) -> tuple[Any, str]:
    """The champion to score on the challenger's split: ``(pyfunc, how)``.

    ``(None, reason)`` when the two cannot be compared fairly.
    """
    ours = get_version(client, model_name, version)
    theirs = get_version(client, model_name, champion).tags
    shop, their_shop = ours.tags.get(DATA_TAG), theirs.get(DATA_TAG)
    if shop and their_shop and shop != their_shop:
        return None, (f"the champion v{champion} was trained on the shop {their_shop!r}, this "
                      f"version on {shop!r}: one champion per shop. Register each shop under "
                      "its own registry.model_name")
    recipe = version_recipe(client, model_name, champion)
    if recipe is not None:
        bundle = fit_bundle(recipe, split_dir, work, run_config(client, ours.run_id), ours.run_id)
        return BundlePyfunc(bundle), f"its recipe ({recipe['family']}) refitted on this split"
    seen, t_test = _time(theirs.get(LAST_EVENT_TAG)), _time(ours.tags.get(T_TEST_TAG))
    if seen is not None and t_test is not None and seen < t_test:
        return load_version(client, model_name, champion), "as served (it saw nothing after " \
            f"{seen.isoformat()}, before this test window)"
    return None, (f"the champion v{champion} has no recipe to refit and may have seen this test "
                  f"window (its last event: {theirs.get(LAST_EVENT_TAG, 'unknown')}; the test "
                  f"window starts: {ours.tags.get(T_TEST_TAG) or 'per user (leave-one-out)'}). "
                  "Promote with --force to replace it anyway")


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
    if policy.guard_k not in ks:
        ks = sorted({*ks, policy.guard_k})
    keep = (policy.primary_metric, f"coverage@{policy.guard_k}", LATENCY, "latency_p50_ms")

    def score(pyfunc: Any) -> dict[str, float]:
        values = measure(pyfunc, split, ks, n_items, exclude_seen, policy)
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


def release(client: MlflowClient, model_name: str, evaluated: str, recipe: dict[str, Any],
            kind: str, split_dir: Path, metrics: dict[str, float] | None, work: Path,
            tracking_uri: str) -> str:
    """Register ``recipe`` refitted on every event of the evaluated version's run; its number.

    ``kind``: ``challenger`` (the evaluated version won) or ``refresh`` (the champion's recipe
    won, refitted on today's events). The version's metric tags are the evaluated copy's
    (``metrics``: the gate's scores of the refitted champion for a refresh).
    """
    source = get_version(client, model_name, evaluated)
    run_id = source.run_id
    events = pl.read_parquet(split_dir.parent / "events.parquet")
    shifted = work / "split"
    write_split(release_split(read_split(split_dir), events), shifted)
    if (split_dir.parent / "items.parquet").is_file():
        shutil.copy(split_dir.parent / "items.parquet", work / "items.parquet")
    bundle = fit_bundle(recipe, shifted, work, run_config(client, run_id), run_id)
    path = f"recipes/{kind}-of-v{evaluated}.json"
    client.log_dict(run_id, recipe, path)
    tags = {name: source.tags[name] for name in COPIED_TAGS if name in source.tags}
    if kind == "challenger":  # the evaluated copy's validation and test metrics
        tags.update({key: value for key, value in source.tags.items()
                     if key.startswith(("valid.", "test."))})
    else:  # a refresh: the champion's recipe as the gate scored it on this split
        tags.update({f"test.{m.replace('@', '_at_')}": f"{v:.6g}"
                     for m, v in (metrics or {}).items()})
    tags.update({"model.family": recipe["family"], RECIPE_TAG: f"runs:/{run_id}/{path}",
                 LAST_EVENT_TAG: last_event(events), KIND_TAG: kind, EVALUATED_TAG: evaluated})
    description = (f"{recipe['family']} refitted on every event ({events.height:,}, last "
                   f"{tags[LAST_EVENT_TAG]}) after the decision on v{evaluated}: {kind}.")
    packaged = package_and_register(
        run_id, bundle, shifted, family=recipe["family"], model_name=model_name,
        tracking_uri=tracking_uri, tags=tags, description=description, alias=None,
        artifact_path=f"released-of-v{evaluated}")
    return packaged.version


def promote_version(
    model_name: str, version: str | None, tracking_uri: str, policy: PromotionPolicy,
    split_dir: Path | None = None, force: bool = False,
) -> Decision:
    """Decide on ``version`` (default: alias ``challenger``); release the winner as champion.

    A version that already carries a decision is left alone unless ``force``; ``force`` also
    promotes a challenger that cannot be compared with the champion.
    """
    client = MlflowClient(tracking_uri)
    version = version or alias_version(client, model_name, CHALLENGER)
    if version is None:
        raise ConfigError(f"{model_name!r} has no version with alias {CHALLENGER!r}: train a "
                          "model first or give --version N.")
    version = str(version)
    recorded = get_version(client, model_name, version).tags.get(DECISION_TAG)
    if recorded and not force:
        return Decision(model_name, version, "unchanged", f"already {recorded} earlier",
                        policy.primary_metric, policy.margin)
    with registry_lock(tracking_uri, model_name, policy.lock_timeout_s), \
            tempfile.TemporaryDirectory(prefix="shoprank-gate-") as tmp:
        tags = client.get_model_version(model_name, version).tags
        recorded = tags.get(DECISION_TAG)
        if recorded and not force:  # decided while this one waited for the lock
            return Decision(model_name, version, "unchanged", f"already {recorded} earlier",
                            policy.primary_metric, policy.margin)
        champion = alias_version(client, model_name, CHAMPION)  # read again inside the lock
        if champion == version or (champion and get_version(
                client, model_name, champion).tags.get(EVALUATED_TAG) == version):
            return Decision(model_name, version, "unchanged", "already the champion",
                            policy.primary_metric, policy.margin, champion_version=champion)
        decision = compare(client, model_name, version, champion, split_dir, policy, Path(tmp))
        if decision.decision == "incomparable" and force:
            decision.decision, decision.reason = "promoted", f"forced: {decision.reason}"
        winner, kind, metrics = None, None, None
        released_copy = tags.get(KIND_TAG, "evaluated") != "evaluated"
        if decision.promoted and not released_copy:  # (a forced released copy is served as is)
            winner, kind = version_recipe(client, model_name, version), "challenger"
        elif decision.decision == "rejected" and champion is not None:
            winner, kind = version_recipe(client, model_name, champion), "refresh"
            metrics = decision.champion
        released = version if decision.promoted else None  # a version without a recipe
        if winner is not None:
            folder = gate_split(client, model_name, version, split_dir, Path(tmp))
            released = release(client, model_name, version, winner, kind, folder,
                               {m: v for m, v in (metrics or {}).items() if "@" in m},
                               Path(tmp) / "release", tracking_uri)
        if released is not None:
            client.set_registered_model_alias(model_name, CHAMPION, released)
        decision.released_version = released
        record(client, decision)
    logger.info("%s version %s %s: %s", model_name, version, decision.decision, decision.reason)
    return decision
