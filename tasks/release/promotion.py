"""The release as a restartable state machine on MLflow: decide, release, move, record, announce.

One decision on an evaluated version goes through these steps, each idempotent, so that a
process killed at any line leaves a state that the next ``promote`` (or ``train --resume``)
completes:

1. **decide** (:func:`judge`): the freshness guard (a release never serves data older than the
   champion it replaces: ``stale``), then the gate (:func:`tasks.release.gate.compare`). The
   decision, its numbers and its plan (which recipe to release) are written on the version with
   ``promotion.state`` ``deciding`` first and ``pending`` last: ``pending`` is the commit point.
   A version left ``deciding`` is decided again; one left ``pending`` is completed.
2. **release**: the winning recipe refitted on every event, registered as a new version under an
   artifact path no other version uses (``released/<decision>-<attempt>``) and tagged with the
   decision's id, so a rerun finds the copy it registered instead of registering another.
3. **move the alias**, compare-and-set: ``champion`` moves only if it still points at the
   champion the decision was made against, and never to data older than today's champion.
4. **record**: the decision's tags and description line (once), ``replaced_by`` on the champion
   it replaced, and an immutable record of the decision as a run artifact
   (``promotions/v<N>/<decision>.json``).
5. **announce**: ``shoprank.model.promoted`` (or ``.rejected``) with an id derived from the
   decision, so a rerun's second send is the same event to Prefect; then ``promotion.state``
   ``complete``.

Every step runs under :func:`tasks.release.registry.registry_lock`, and each promotion first
completes every pending decision of the model (oldest first) before it decides anything new.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from pathlib import Path

import polars as pl
from mlflow import MlflowClient

from models.errors import ConfigError, ShoprankError
from tasks.data.prepare import read_split, write_split
from tasks.release.gate import (
    COPIED_TAGS,
    EVALUATED_TAG,
    chosen_weight_of,
    compare,
    fit_bundle,
    gate_split,
    parse_time,
    recipe_at,
    run_config,
)
from tasks.release.packaging import (
    CHALLENGER,
    CHAMPION,
    DATA_END_TAG,
    KIND_TAG,
    LAST_EVENT_TAG,
    RECIPE_TAG,
    SESSION_WEIGHT_TAG,
    input_example,
    package_and_register,
)
from tasks.release.recipes import last_event, release_split
from tasks.release.registry import (
    DECISION_TAG,
    PROMOTED,
    REJECTED,
    Decision,
    PromotionPolicy,
    alias_version,
    emit_model_event,
    get_version,
    record,
    registry_lock,
    version_tagged,
)
from tasks.release.release_shards import (
    ENGINE_TAG,
    EVENTS_TAG,
    ITEMS_TAG,
    N_ITEMS_TAG,
    compare_on_engine,
    release_on_engine,
)

logger = logging.getLogger(__name__)

STATE_TAG = "promotion.state"  # deciding | pending | complete
EXPECTED_TAG = "promotion.expected_champion"  # the champion the decision was made against
PLAN_TAG = "promotion.release_kind"  # challenger | refresh | as_is | none
PLAN_RECIPE_TAG = "promotion.release_recipe"  # runs:/... of the recipe the release refits
RELEASE_DECISION_TAG = "release.decision_id"  # on a released copy: the decision that made it
HISTORY_TAG = "promotion.history"  # every decision id on this version, oldest first


def settled(tags: dict[str, str]) -> bool:
    """Whether a version carries a completed decision (decided before states existed: yes)."""
    return DECISION_TAG in tags and tags.get(STATE_TAG, "complete") == "complete"


def data_end(tags: dict[str, str]) -> str | None:
    """The last event a release of this version would have seen (None when not recorded)."""
    if tags.get(KIND_TAG, "evaluated") != "evaluated":
        return tags.get(LAST_EVENT_TAG)
    return tags.get(DATA_END_TAG)


def older(ours: str | None, theirs: str | None) -> bool:
    """Whether the moment ``ours`` is before ``theirs`` (both ISO 8601; unknown: not older)."""
    mine, other = parse_time(ours), parse_time(theirs)
    return mine is not None and other is not None and mine < other


def staleness(client: MlflowClient, model_name: str, version: str, champion: str | None
              ) -> str | None:
    """Why releasing ``version`` would serve older data than the champion's, or None."""
    if champion is None:
        return None
    ours = data_end(get_version(client, model_name, version).tags)
    theirs = get_version(client, model_name, champion).tags.get(LAST_EVENT_TAG)
    if not older(ours, theirs):
        return None
    return (f"v{version}'s data ends at {ours}, before the champion v{champion}'s last event "
            f"({theirs}): releasing it (or refitting the champion's recipe on its events) "
            "would serve older data than today's champion. Train on data at least as recent "
            "(shoprank train) instead")


def plan(client: MlflowClient, model_name: str, version: str, champion: str | None,
         decision: Decision) -> tuple[str, str]:
    """What a decision releases: ``(kind, recipe URI)``.

    ``challenger``: the version's recipe refitted on every event; ``refresh``: the champion's
    recipe refitted on them (the challenger lost); ``as_is``: the version itself (a released
    copy, or one without a recipe); ``none``: nothing moves.
    """
    tags = get_version(client, model_name, version).tags
    if decision.promoted:
        if tags.get(KIND_TAG, "evaluated") == "evaluated" and tags.get(RECIPE_TAG):
            return "challenger", tags[RECIPE_TAG]
        return "as_is", ""
    if decision.decision == "rejected" and champion is not None:
        recipe = get_version(client, model_name, champion).tags.get(RECIPE_TAG)
        if recipe:
            return "refresh", recipe
    return "none", ""


def judge(client: MlflowClient, model_name: str, version: str, champion: str | None,
          split_dir: Path | None, policy: PromotionPolicy, work: Path, force: bool
          ) -> Decision:
    """Decide on ``version``: the freshness guard, then the gate; ``force`` overrides the gate.

    ``force`` promotes whatever the gate decided (its numbers and reason are kept), but never
    past the freshness guard: data older than the champion's is ``stale``, forced or not.
    """
    stale = staleness(client, model_name, version, champion)
    if stale is not None:
        return Decision(model_name, version, "stale", stale, policy.primary_metric,
                        policy.margin, champion_version=champion)
    tags = get_version(client, model_name, version).tags
    if tags.get(ENGINE_TAG) == "dask" and tags.get(KIND_TAG, "evaluated") == "evaluated":
        decision = compare_on_engine(client, model_name, version, champion, policy)
    else:
        decision = compare(client, model_name, version, champion, split_dir, policy, work)
    if force and not decision.promoted:
        decision.reason = f"forced (the gate said {decision.decision}): {decision.reason}"
        decision.decision = "promoted"
    return decision


def write_pending(client: MlflowClient, decision: Decision, kind: str, recipe: str) -> None:
    """Write the decision and its plan on the version; ``pending`` is written last."""
    name, version = decision.model_name, decision.version
    client.set_model_version_tag(name, version, STATE_TAG, "deciding")
    tags = {**decision.tags(), EXPECTED_TAG: decision.champion_version or "none",
            PLAN_TAG: kind, PLAN_RECIPE_TAG: recipe}
    if kind == "as_is":
        tags["promotion.released_version"] = version
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, STATE_TAG, "pending")


def release(client: MlflowClient, decision: Decision, kind: str, recipe_uri: str,
            split_dir: Path | None, work: Path, tracking_uri: str) -> str:
    """Register the planned recipe refitted on every event of the decided version's run.

    The version's metric tags are the evaluated copy's (for a refresh: the champion's recipe as
    the gate scored it on this split). Its artifacts go to a path of their own. A version of
    the engine (tag ``shoprank.engine``) is refitted on the cluster
    (:func:`tasks.release.release_shards.release_on_engine`).
    """
    name, evaluated = decision.model_name, decision.version
    source = get_version(client, name, evaluated)
    run_id, recipe = source.run_id, recipe_at(client, recipe_uri)
    weights_of = source if kind == "challenger" else get_version(
        client, name, decision.champion_version or evaluated)
    weight = chosen_weight_of(weights_of.tags)
    engine = None
    if source.tags.get(ENGINE_TAG) == "dask":
        bundle, example, n_events, last, engine = release_on_engine(client, source, recipe,
                                                                    weight)
    else:
        folder = gate_split(client, name, evaluated, split_dir, work)  # the gate's download
        events = pl.read_parquet(folder.parent / "events.parquet")
        work = work / "release"
        shifted = work / "split"
        write_split(release_split(read_split(folder, sampled=False), events), shifted)
        if (folder.parent / "items.parquet").is_file():
            shutil.copy(folder.parent / "items.parquet", work / "items.parquet")
        bundle = fit_bundle(recipe, shifted, work, run_config(client, run_id), run_id, weight)
        example, n_events, last = input_example(shifted), events.height, last_event(events)
    path = f"released/{decision.decision_id[:12]}-{uuid.uuid4().hex[:8]}"
    client.log_dict(run_id, recipe, f"{path}/recipe.json")
    tags = {key: source.tags[key] for key in COPIED_TAGS if key in source.tags}
    if kind == "challenger":  # the evaluated copy's validation and test metrics
        tags.update({key: value for key, value in source.tags.items()
                     if key.startswith(("valid.", "test."))})
    else:
        tags.update({f"test.{m.replace('@', '_at_')}": f"{v:.6g}"
                     for m, v in (decision.champion or {}).items() if "@" in m})
    tags.update({"model.family": recipe["family"], RECIPE_TAG: f"runs:/{run_id}/{path}/recipe.json",
                 LAST_EVENT_TAG: last, KIND_TAG: kind, EVALUATED_TAG: evaluated,
                 RELEASE_DECISION_TAG: decision.decision_id,
                 **({SESSION_WEIGHT_TAG: f"{weight:g}"} if weight is not None else {})})
    if engine is not None:
        tags.update({key: source.tags[key] for key in (ENGINE_TAG, EVENTS_TAG, ITEMS_TAG,
                                                       N_ITEMS_TAG) if key in source.tags})
    description = (f"{recipe['family']} refitted on every event ({n_events:,}, last "
                   f"{tags[LAST_EVENT_TAG]}) after the decision on v{evaluated}: {kind}.")
    version = package_and_register(
        run_id, bundle, None, family=recipe["family"], model_name=name,
        tracking_uri=tracking_uri, tags=tags, description=description, alias=None,
        artifact_path=f"{path}/model", example=example).version
    if engine is not None:
        shutil.rmtree(engine, ignore_errors=True)
    return version


def move_alias(client: MlflowClient, model_name: str, expected: str | None, released: str
               ) -> str | None:
    """Compare-and-set ``champion`` from ``expected`` to ``released``; why not, or None.

    Moves only if the alias still points at ``expected`` (the champion the decision was made
    against) and ``released`` has seen no less than that champion.
    """
    current = alias_version(client, model_name, CHAMPION)
    if current == released:
        return None
    if current != expected:
        return (f"the champion moved from v{expected or '(none)'} to v{current or '(none)'} "
                "while this decision was pending; decide again with --force")
    if current is not None:
        ours = get_version(client, model_name, released).tags.get(LAST_EVENT_TAG)
        theirs = get_version(client, model_name, current).tags.get(LAST_EVENT_TAG)
        if older(ours, theirs):
            return (f"v{released} has seen events up to {ours} only, the champion v{current} up "
                    f"to {theirs}: a release never serves older data")
    client.set_registered_model_alias(model_name, CHAMPION, released)
    return None


def announce(decision: Decision) -> None:
    """Send the decision as ``shoprank.model.promoted`` (or ``.rejected``), once per decision."""
    event = PROMOTED if decision.promoted else REJECTED
    emit_model_event(event, decision.model_name, decision.version, decision.payload(),
                     key=decision.decision_id)


def keep_record(client: MlflowClient, decision: Decision) -> None:
    """An immutable copy of the decision (a run artifact of its own) and the version's history."""
    name, version = decision.model_name, decision.version
    source = client.get_model_version(name, version)
    client.log_dict(source.run_id, {**decision.tags(), "decision": decision.payload()},
                    f"promotions/v{version}/{decision.decision_id}.json")
    history = [h for h in source.tags.get(HISTORY_TAG, "").split(",") if h]
    if decision.decision_id not in history:
        history.append(decision.decision_id)
        client.set_model_version_tag(name, version, HISTORY_TAG, ",".join(history[-40:]))


def complete(client: MlflowClient, model_name: str, version: str, tracking_uri: str,
             split_dir: Path | None, work: Path) -> Decision:
    """Carry a pending decision on ``version`` to its end (every step idempotent)."""
    tags = client.get_model_version(model_name, version).tags
    decision = Decision.from_tags(model_name, version, tags)
    kind = tags.get(PLAN_TAG, "none")
    if kind in ("challenger", "refresh") and decision.released_version is None:
        try:
            released = version_tagged(client, model_name, RELEASE_DECISION_TAG,
                                      decision.decision_id) or release(
                client, decision, kind, tags[PLAN_RECIPE_TAG], split_dir, work, tracking_uri)
        except ShoprankError as err:  # not transient (another error is retried by a rerun)
            logger.warning("%s v%s: the release failed", model_name, version, exc_info=True)
            released = None
            decision.decision = "incomparable"
            decision.reason = (f"{decision.reason}; not released: refitting the {kind} recipe "
                               f"failed: {str(err)[:300]}")
        if released is not None:
            client.set_model_version_tag(model_name, version, "promotion.released_version",
                                         released)
        decision.released_version = released
    if decision.released_version is not None:
        expected = tags.get(EXPECTED_TAG, "none")
        why_not = move_alias(client, model_name, None if expected == "none" else expected,
                             decision.released_version)
        if why_not is not None:
            logger.warning("%s v%s: %s", model_name, version, why_not)
            decision.decision, decision.released_version = "stale", None
            decision.reason = f"{decision.reason}; not released: {why_not}"
    record(client, decision)
    keep_record(client, decision)
    announce(decision)
    client.set_model_version_tag(model_name, version, STATE_TAG, "complete")
    return decision


def serves(client: MlflowClient, model_name: str, champion: str, version: str) -> bool:
    """Whether the champion is ``version`` or its own recipe released (not a refresh on it)."""
    tags = get_version(client, model_name, champion).tags
    return champion == version or (tags.get(KIND_TAG) == "challenger"
                                   and tags.get(EVALUATED_TAG) == version)


def pending_versions(client: MlflowClient, model_name: str) -> list[str]:
    """Versions of ``model_name`` whose decision is pending, oldest first."""
    found = client.search_model_versions(f"name='{model_name}'")
    return sorted((str(v.version) for v in found if v.tags.get(STATE_TAG) == "pending"), key=int)


def promote_version(
    model_name: str, version: str | None, tracking_uri: str, policy: PromotionPolicy,
    split_dir: Path | None = None, force: bool = False,
) -> Decision:
    """Decide on ``version`` (default: alias ``challenger``); release the winner as champion.

    A version that already carries a complete decision is left alone unless ``force``; a
    pending one (a crash mid-release) is completed. ``force`` decides again and promotes
    whatever the gate says, except data older than the champion's (``stale``).
    """
    client = MlflowClient(tracking_uri)
    version = version or alias_version(client, model_name, CHALLENGER)
    if version is None:
        raise ConfigError(f"{model_name!r} has no version with alias {CHALLENGER!r}: train a "
                          "model first or give --version N.")
    version = str(version)
    tags = get_version(client, model_name, version).tags
    if settled(tags) and not force:
        return Decision(model_name, version, "unchanged", f"already {tags[DECISION_TAG]} earlier",
                        policy.primary_metric, policy.margin)
    with registry_lock(tracking_uri, model_name, policy.lock_timeout_s), \
            tempfile.TemporaryDirectory(prefix="shoprank-gate-") as tmp:
        work = Path(tmp)
        completed = {}
        for pending in pending_versions(client, model_name):  # a crash mid-release, finished
            completed[pending] = complete(client, model_name, pending, tracking_uri,
                                          split_dir if pending == version else None,
                                          work / f"pending-{pending}")
        if version in completed:
            return completed[version]
        tags = client.get_model_version(model_name, version).tags
        if settled(tags) and not force:  # decided while this one waited for the lock
            return Decision(model_name, version, "unchanged",
                            f"already {tags[DECISION_TAG]} earlier", policy.primary_metric,
                            policy.margin)
        champion = alias_version(client, model_name, CHAMPION)  # read again inside the lock
        if champion is not None and serves(client, model_name, champion, version):
            return Decision(model_name, version, "unchanged", "already the champion",
                            policy.primary_metric, policy.margin, champion_version=champion)
        decision = judge(client, model_name, version, champion, split_dir, policy, work, force)
        kind, recipe = plan(client, model_name, version, champion, decision)
        write_pending(client, decision, kind, recipe)
        decision = complete(client, model_name, version, tracking_uri, split_dir, work)
    logger.info("%s version %s %s: %s", model_name, version, decision.decision, decision.reason)
    return decision
