"""Registry primitives: the promotion policy and decision, aliases, versions and the lock.

The gate that uses them (scoring, recipes, the release) is :mod:`tasks.release.gate`. The challenger
wins when its primary metric beats the champion's by the relative ``margin`` and no guardrail
regresses: ``coverage@10`` may drop by at most ``coverage_tolerance`` (relative) and the p99
latency of single-user requests, measured in-process, may grow by at most ``latency_tolerance``
(relative) plus ``latency_slack_ms``; live sessions may score at most ``margin`` below the
champion's; and on cold targets (test targets whose item had at most ``cold_threshold`` events
before the test window, :mod:`models.metrics`) ``recall@cold_k`` may drop by at most
``cold_tolerance`` (relative), checked when both sides have ``cold_min_users`` users with one
(fewer make the figure noise). The first model becomes champion.

The compare-and-set runs under a lock (:func:`registry_lock`) named after the registered model's
own id (tag ``shoprank.registry_id``, written when the model is created), so every spelling of
the store's address takes the same lock: with a Prefect server configured (``PREFECT_API_URL``),
a Prefect global concurrency limit of one slot, held by every host that talks to that server;
without one, an exclusive file lock (``fcntl.flock``) beside the local store, which holds on this
host only. The decision and its numbers are written on the model version (tags and description)
and sent as a Prefect event whose id derives from the decision, so a rerun that sends it again is
recognised by Prefect as the same event (stored once, acted on once).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from models.errors import ConfigError, ShoprankError
from tasks.tracking import metric_key

logger = logging.getLogger(__name__)

EVALUATED = "shoprank.model.evaluated"
PROMOTED = "shoprank.model.promoted"
REJECTED = "shoprank.model.rejected"
DECAYED = "shoprank.model.decayed"
DECISION_TAG = "promotion.decision"
DECISION_ID_TAG = "promotion.decision_id"
REGISTRY_ID_TAG = "shoprank.registry_id"
LATENCY = "latency_p99_ms"
LOCK_LEASE_S = 60.0
"""Lease of the Prefect lock (the server's least): a holder renews it while it lives; the slot of
a holder that died (SIGKILL, a lost machine) is free again about a minute later."""
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


@dataclass
class PromotionPolicy:
    """When a challenger may replace the champion (see the module docstring)."""

    primary_metric: str = "ndcg@10"
    margin: float = 0.0
    coverage_tolerance: float = 0.1
    latency_tolerance: float = 0.5
    latency_slack_ms: float = 25.0
    latency_requests: int = 200
    guard_k: int = 10
    session_items: int = 5
    lock_timeout_s: float = 900.0
    cold_threshold: int = 5
    cold_k: int = 20
    cold_tolerance: float = 0.2
    cold_min_users: int = 50

    @property
    def cold_metric(self) -> str:
        """The guarded cold-target metric, e.g. ``cold5.recall@20``."""
        return f"cold{self.cold_threshold}.recall@{self.cold_k}"


@dataclass
class Decision:
    """The outcome of one promotion, with the numbers it rests on."""

    model_name: str
    version: str
    decision: str  # promoted | rejected | incomparable | unchanged
    reason: str
    metric: str
    margin: float
    challenger: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] | None = None
    champion_version: str | None = None
    released_version: str | None = None  # the version the champion alias moved to
    decision_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    decided_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    @classmethod
    def from_tags(cls, model_name: str, version: str, tags: dict[str, str]) -> Decision:
        """The decision recorded in a version's ``promotion.*`` tags (see :meth:`tags`)."""
        scores: dict[str, dict[str, float]] = {"challenger": {}, "champion": {}}
        for key, value in tags.items():
            role, _, name = key.removeprefix("promotion.").partition(".")
            if key.startswith("promotion.") and role in scores and name:
                scores[role][name.replace("_at_", "@")] = float(value)
        versions = {role: tags.get(f"promotion.{role}_version", "none")
                    for role in ("champion", "released")}
        return cls(model_name, version, tags[DECISION_TAG], tags.get("promotion.reason", ""),
                   tags.get("promotion.metric", "ndcg@10"),
                   float(tags.get("promotion.margin", 0.0)), scores["challenger"],
                   scores["champion"] or None,
                   None if versions["champion"] == "none" else versions["champion"],
                   None if versions["released"] == "none" else versions["released"],
                   tags.get(DECISION_ID_TAG, ""), tags.get("promotion.decided_at", ""))

    @property
    def promoted(self) -> bool:
        """Whether the champion alias now points at this version because of this decision."""
        return self.decision == "promoted"

    def tags(self) -> dict[str, str]:
        """Model-version tags that record the decision."""
        tags = {DECISION_TAG: self.decision, "promotion.reason": self.reason[:4000],
                "promotion.metric": self.metric, "promotion.margin": str(self.margin),
                "promotion.champion_version": self.champion_version or "none",
                "promotion.released_version": self.released_version or "none",
                "promotion.decided_at": self.decided_at, DECISION_ID_TAG: self.decision_id}
        for role, values in (("challenger", self.challenger), ("champion", self.champion or {})):
            for name, value in values.items():
                tags[f"promotion.{role}.{name.replace('@', '_at_')}"] = f"{value:.6g}"
        return tags

    def payload(self) -> dict[str, Any]:
        """The Prefect event payload."""
        return {"model": self.model_name, "version": self.version, "decision": self.decision,
                "reason": self.reason, "metric": self.metric, "margin": self.margin,
                "champion_version": self.champion_version,
                "released_version": self.released_version, "challenger": self.challenger,
                "champion": self.champion, "decision_id": self.decision_id}


def decide(challenger: dict[str, float], champion: dict[str, float] | None,
           policy: PromotionPolicy) -> tuple[bool, str]:
    """Apply the policy to two metric dicts; returns ``(promote, reason)``."""
    metric, cov = policy.primary_metric, f"coverage@{policy.guard_k}"
    if champion is None:
        return True, "no champion yet: the first model becomes champion"
    ours, theirs = challenger[metric], champion[metric]
    needed = theirs * (1 + policy.margin)
    if not ours > needed:
        return False, (f"{metric} {ours:.4f} does not beat the champion's {theirs:.4f} by the "
                       f"margin {policy.margin:.1%} (needs > {needed:.4f})")
    floor = champion[cov] * (1 - policy.coverage_tolerance)
    if challenger[cov] < floor:
        return False, (f"{metric} wins ({ours:.4f} vs {theirs:.4f}) but the guardrail {cov} "
                       f"regresses: {challenger[cov]:.4f} < {floor:.4f}")
    ceiling = champion[LATENCY] * (1 + policy.latency_tolerance) + policy.latency_slack_ms
    if challenger[LATENCY] > ceiling:
        return False, (f"{metric} wins ({ours:.4f} vs {theirs:.4f}) but the guardrail p99 latency "
                       f"regresses: {challenger[LATENCY]:.1f} ms > {ceiling:.1f} ms")
    live = f"live.{metric}"
    if live in challenger and live in champion:
        least = champion[live] * (1 - policy.margin)
        if challenger[live] < least:
            return False, (f"{metric} wins for returning users ({ours:.4f} vs {theirs:.4f}) but "
                           f"the guardrail of live sessions regresses: {challenger[live]:.4f} < "
                           f"{least:.4f}")
    cold, users = policy.cold_metric, f"cold{policy.cold_threshold}.users"
    guarded = (cold in challenger and cold in champion
               and min(challenger.get(users, 0), champion.get(users, 0)) >= policy.cold_min_users)
    if guarded and challenger[cold] < champion[cold] * (1 - policy.cold_tolerance):
        return False, (f"{metric} wins ({ours:.4f} vs {theirs:.4f}) but the guardrail of cold "
                       f"targets regresses: {cold} {challenger[cold]:.4f} < "
                       f"{champion[cold] * (1 - policy.cold_tolerance):.4f} (items with at most "
                       f"{policy.cold_threshold} events before the test window)")
    cold_note = f", {cold} {challenger[cold]:.4f}" if guarded else ""
    return True, (f"{metric} {ours:.4f} beats the champion's {theirs:.4f} by more than "
                  f"{policy.margin:.1%}; {cov} {challenger[cov]:.4f}, p99 latency "
                  f"{challenger[LATENCY]:.1f} ms, live sessions "
                  f"{challenger.get(live, float('nan')):.4f}{cold_note} within their guardrails")


def registry_id(client: MlflowClient, model_name: str) -> str:
    """The registered model's own id: the same whichever address of the store a host uses.

    Tag ``shoprank.registry_id`` (a random id written when the model is created); for a model
    registered before it existed, a digest of its name and creation time, as stable.
    """
    model = client.get_registered_model(model_name)
    found = model.tags.get(REGISTRY_ID_TAG)
    if found:
        return found
    return hashlib.sha256(f"{model_name}|{model.creation_timestamp}".encode()).hexdigest()[:32]


def lock_name(lock_id: str) -> str:
    """The name of the lock on the registered model whose :func:`registry_id` is ``lock_id``."""
    return f"shoprank-registry-{lock_id[:16]}"


def lock_path(tracking_uri: str, model_name: str, lock_id: str) -> Path:
    """The lock file beside a local SQLite store; in the temp folder for other stores."""
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return store.parent / f".{model_name}.lock"
    return Path(tempfile.gettempdir()) / f"{lock_name(lock_id)}.lock"


def prefect_server() -> str | None:
    """The configured Prefect API URL (a server every host can reach), or None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextmanager
def registry_lock(tracking_uri: str, model_name: str, timeout_s: float = 900.0,
                  lock_id: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the aliases of ``model_name`` in the store at ``tracking_uri``.

    A Prefect global concurrency limit when a Prefect server is configured (it holds across
    hosts, and a holder that dies loses its lease); else a file lock on this host. Both are
    named after ``lock_id`` (default: the model's :func:`registry_id`), not after the store's
    address, so ``http://localhost:5000`` and ``http://127.0.0.1:5000/`` share one lock.

    Raises:
        ShoprankError: The lock was not obtained within ``timeout_s``.
    """
    lock_id = lock_id or registry_id(MlflowClient(tracking_uri), model_name)
    server = prefect_server()
    if server:
        with _server_lock(server, lock_name(lock_id), model_name, timeout_s):
            yield
        return
    if not tracking_uri.startswith("sqlite:///"):
        logger.warning("no Prefect server configured (PREFECT_API_URL): the promotion lock of "
                       "%s holds on this host only; set PREFECT_API_URL when promotions run "
                       "on several hosts", model_name)
    with _file_lock(lock_path(tracking_uri, model_name, lock_id), model_name, timeout_s):
        yield


@contextmanager
def _server_lock(server: str, name: str, model_name: str, timeout_s: float) -> Iterator[None]:
    """One slot of the global concurrency limit ``name`` (limit 1, created when missing)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name,
                                                                            limit=1))
    with ExitStack() as held:
        try:
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s,
                                           lease_duration=LOCK_LEASE_S, strict=True))
        except TimeoutError as err:
            raise ShoprankError(
                f"could not lock {model_name!r} within {timeout_s:.0f} s: another promotion "
                f"holds the global concurrency limit {name!r} of the Prefect server {server}. "
                f"Retry later; if no promotion runs, free it with `prefect gcl update {name} "
                "--active-slots 0`.") from err
        yield


@contextmanager
def _file_lock(path: Path, model_name: str, timeout_s: float) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released by the kernel if this process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with path.open("a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as err:
                if time.monotonic() > deadline:
                    raise ShoprankError(
                        f"could not lock {path} within {timeout_s:.0f} s: another promotion of "
                        f"{model_name!r} holds it. Retry later.") from err
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when it is not set."""
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def version_tagged(client: MlflowClient, model_name: str, tag: str, value: str) -> str | None:
    """The lowest version of ``model_name`` whose ``tag`` is ``value``, or None.

    How a step that registers finds what it registered before a crash: it tags the version
    with its own id and looks for it before registering again.
    """
    found = [v for v in client.search_model_versions(f"name='{model_name}'")
             if v.tags.get(tag) == value]
    return str(min(int(v.version) for v in found)) if found else None


def resolve_model(model_uri: str, client: MlflowClient) -> tuple[str, str]:
    """``(name, version)`` of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""
    match = _URI.match(model_uri)
    if not match:
        raise ConfigError(f"model URI {model_uri!r} is not models:/NAME/VERSION or "
                          "models:/NAME@ALIAS (e.g. models:/shoprank@champion).")
    name, version, alias = match["name"], match["version"], match["alias"]
    if version:
        return name, version
    try:
        return name, str(client.get_model_version_by_alias(name, alias).version)
    except Exception as err:
        raise ConfigError(
            f"{model_uri} does not resolve in the MLflow store {client.tracking_uri}: "
            f"{name!r} has no version with alias {alias!r}. Train (shoprank train) and promote "
            "a model first, or give another --model-uri.") from err


def get_version(client: MlflowClient, model_name: str, version: str) -> Any:
    """The model version, or a :class:`ConfigError` listing the versions that exist."""
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as err:
        try:
            known = sorted(int(v.version) for v in client.search_model_versions(
                f"name='{model_name}'"))
        except MlflowException:
            known = []
        raise ConfigError(
            f"{model_name!r} has no version {version} in the MLflow store {client.tracking_uri}; "
            f"existing versions: {', '.join(map(str, known)) or 'none'}.") from err


def load_version(client: MlflowClient, model_name: str, version: str) -> Any:
    """Load a registered version as a pyfunc, without touching the global tracking URI."""
    return load_pyfunc(client.get_model_version_download_uri(model_name, version))


def load_pyfunc(uri: str) -> Any:
    """Load a pyfunc, leaving ``sys.path`` as it was.

    MLflow puts the model's code folder (a copy of ``models/`` and ``tasks/``) first on
    ``sys.path``; left there, a Dask worker started later by this process (a LocalCluster's
    worker restarted after a crash) would import that copy, which lacks the project's other
    files (the expectation suites), instead of the project.
    """
    kept = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(uri)
    finally:
        sys.path[:] = kept


def record(client: MlflowClient, decision: Decision) -> None:
    """Write the decision on the model version: tags and a line of its description.

    Idempotent: the line names the decision's id and is written once; ``replaced_by`` goes on
    the champion it replaced.
    """
    name, version, tags = decision.model_name, decision.version, decision.tags()
    released = decision.released_version
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    before = client.get_model_version(name, version).description or ""
    if f"[{decision.decision_id[:12]}]" not in before:
        line = (f"Promotion {decision.decided_at} [{decision.decision_id[:12]}]: "
                f"{decision.decision.upper()} against champion "
                f"{decision.champion_version or '(none)'}. {decision.reason}."
                + (f" Released as v{released}." if released and released != version else ""))
        client.update_model_version(name, version, description=f"{before}\n\n{line}".strip())
    if released and decision.champion_version and released != decision.champion_version:
        client.set_model_version_tag(name, decision.champion_version, "promotion.replaced_by",
                                     released)


def event_id(*parts: str) -> uuid.UUID:
    """A stable event id for what ``parts`` name: Prefect stores and acts on one id once."""
    return uuid.uuid5(uuid.NAMESPACE_URL, "shoprank:" + "/".join(parts))


def emit_model_event(event: str, model_name: str, version: str, payload: dict[str, Any],
                     key: str | None = None) -> None:
    """Send a Prefect event about a model version (a no-op when no Prefect API is reachable).

    ``key`` makes the event's id stable (:func:`event_id`), so sending it again after a crash is
    the same event to Prefect: stored once, and an automation reacts to it once.
    """
    from prefect.events import emit_event

    emit_event(
        event=event,
        resource={"prefect.resource.id": f"mlflow.model-version.{model_name}.{version}",
                  "prefect.resource.name": f"{model_name} v{version}",
                  "shoprank.model.name": model_name, "shoprank.model.version": str(version)},
        payload=payload, id=event_id(event, model_name, str(version), key) if key else None,
    )


def metrics_payload(scores: dict[str, dict[str, dict[str, float]]], name: str
                    ) -> dict[str, float]:
    """The named model's test metrics with MLflow-safe keys (for tags and event payloads)."""
    return {metric_key(name, "test", m): float(v) for m, v in scores[name]["test"].items()}
