"""Promotion: alias ``champion`` moves to the challenger only when it is measurably better.

Both models are loaded as the pyfuncs a user would serve and answer the same requests: every user
of the challenger run's test targets, with the user's last items of the test history as
``recent_items`` (and the seen items as ``exclude`` when the protocol removes them). Their lists
are scored by :func:`models.metrics.evaluate` against the same targets. The challenger wins when
its primary metric beats the champion's by the relative ``margin`` and no guardrail regresses:
``coverage@10`` may drop by at most ``coverage_tolerance`` (relative) and the p99 latency of
single-user requests, measured in-process, may grow by at most ``latency_tolerance`` (relative)
plus ``latency_slack_ms``. The first model becomes champion.

The compare-and-set runs under an exclusive file lock (``fcntl.flock``) beside the local store,
and the champion is read again inside the lock, so two runs finishing together never leave the
aliases inconsistent. The decision and its numbers are written on the model version (tags and
description) and sent as a Prefect event.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import polars as pl
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from models.columns import ITEM, TIMESTAMP, USER
from models.errors import ConfigError, ShoprankError
from models.metrics import evaluate
from tasks.packaging import CHALLENGER, CHAMPION, SPLIT_DIR_TAG
from tasks.prepare import read_split
from tasks.split import Split
from tasks.tracking import metric_key

logger = logging.getLogger(__name__)

EVALUATED = "shoprank.model.evaluated"
PROMOTED = "shoprank.model.promoted"
REJECTED = "shoprank.model.rejected"
DECISION_TAG = "promotion.decision"
LATENCY = "latency_p99_ms"
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


@dataclass
class Decision:
    """The outcome of one promotion, with the numbers it rests on."""

    model_name: str
    version: str
    decision: str  # promoted | rejected | unchanged
    reason: str
    metric: str
    margin: float
    challenger: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] | None = None
    champion_version: str | None = None

    @property
    def promoted(self) -> bool:
        """Whether the champion alias now points at this version because of this decision."""
        return self.decision == "promoted"

    def tags(self) -> dict[str, str]:
        """Model-version tags that record the decision."""
        tags = {DECISION_TAG: self.decision, "promotion.reason": self.reason[:4000],
                "promotion.metric": self.metric, "promotion.margin": str(self.margin),
                "promotion.champion_version": self.champion_version or "none",
                "promotion.decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        for role, values in (("challenger", self.challenger), ("champion", self.champion or {})):
            for name, value in values.items():
                tags[f"promotion.{role}.{name.replace('@', '_at_')}"] = f"{value:.6g}"
        return tags

    def payload(self) -> dict[str, Any]:
        """The Prefect event payload."""
        return {"model": self.model_name, "version": self.version, "decision": self.decision,
                "reason": self.reason, "metric": self.metric, "margin": self.margin,
                "champion_version": self.champion_version, "challenger": self.challenger,
                "champion": self.champion}


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
    return True, (f"{metric} {ours:.4f} beats the champion's {theirs:.4f} by more than "
                  f"{policy.margin:.1%}; {cov} {challenger[cov]:.4f} and p99 latency "
                  f"{challenger[LATENCY]:.1f} ms within their guardrails")


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


def lock_path(tracking_uri: str, model_name: str) -> Path:
    """The lock file beside a local SQLite store; in the temp folder for other stores."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / f".{model_name}.lock"
    digest = hashlib.sha256(f"{tracking_uri}|{model_name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"shoprank-registry-{digest}.lock"


@contextmanager
def registry_lock(tracking_uri: str, model_name: str, timeout_s: float = 900.0) -> Iterator[None]:
    """Hold an exclusive lock on the aliases of ``model_name`` in the store at ``tracking_uri``."""
    path = lock_path(tracking_uri, model_name)
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
                        f"{model_name!r} holds it. Retry later, or remove the file if no "
                        "shoprank process is running.") from err
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
    return mlflow.pyfunc.load_model(client.get_model_version_download_uri(model_name, version))


def version_settings(client: MlflowClient, model_name: str, version: str,
                     split_dir: Path | None) -> tuple[Path, list[int], bool]:
    """Split folder, cut-offs and ``exclude_seen`` a version was evaluated with (from its tags)."""
    tags = get_version(client, model_name, version).tags
    folder = Path(split_dir or tags.get(SPLIT_DIR_TAG, ""))
    if not (folder / "test_targets.parquet").is_file():
        raise ConfigError(
            f"the test split of {model_name} version {version} was not found at {folder or '?'} "
            f"(tag {SPLIT_DIR_TAG}). Give the split folder of its training run (--split DIR).")
    ks = [int(k) for k in tags.get("ks", "10,20").split(",")]
    return folder, ks, tags.get("exclude_seen", "false").lower() == "true"


def compare(client: MlflowClient, model_name: str, version: str, champion: str | None,
            split_dir: Path | None, policy: PromotionPolicy) -> Decision:
    """Score challenger and champion on the challenger's test window and decide."""
    folder, ks, exclude_seen = version_settings(client, model_name, version, split_dir)
    split = read_split(folder)
    n_items = n_items_of(folder, split)
    if policy.guard_k not in ks:
        ks = sorted({*ks, policy.guard_k})
    scores = {}
    for role, ver in (("challenger", version), ("champion", champion)):
        if ver is not None:
            pyfunc = load_version(client, model_name, ver)
            scores[role] = measure(pyfunc, split, ks, n_items, exclude_seen, policy)
    promote, reason = decide(scores["challenger"], scores.get("champion"), policy)
    keep = (policy.primary_metric, f"coverage@{policy.guard_k}", LATENCY, "latency_p50_ms")
    pick = {role: {m: values[m] for m in keep if m in values} for role, values in scores.items()}
    return Decision(model_name, version, "promoted" if promote else "rejected", reason,
                    policy.primary_metric, policy.margin, pick["challenger"],
                    pick.get("champion"), champion)


def record(client: MlflowClient, decision: Decision) -> None:
    """Write the decision on the model version: tags and a line of its description."""
    name, version, tags = decision.model_name, decision.version, decision.tags()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    before = client.get_model_version(name, version).description or ""
    line = (f"Promotion {tags['promotion.decided_at']}: {decision.decision.upper()} "
            f"against champion {decision.champion_version or '(none)'}. {decision.reason}.")
    client.update_model_version(name, version, description=f"{before}\n\n{line}".strip())
    if decision.promoted and decision.champion_version:
        client.set_model_version_tag(name, decision.champion_version, "promotion.replaced_by",
                                     version)


def promote_version(
    model_name: str, version: str | None, tracking_uri: str, policy: PromotionPolicy,
    split_dir: Path | None = None, force: bool = False,
) -> Decision:
    """Decide on ``version`` (default: alias ``challenger``) and move ``champion`` if it wins.

    A version that already carries a decision is left alone unless ``force``.
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
    with registry_lock(tracking_uri, model_name, policy.lock_timeout_s):
        recorded = client.get_model_version(model_name, version).tags.get(DECISION_TAG)
        if recorded and not force:  # decided while this one waited for the lock
            return Decision(model_name, version, "unchanged", f"already {recorded} earlier",
                            policy.primary_metric, policy.margin)
        champion = alias_version(client, model_name, CHAMPION)  # read again inside the lock
        if champion == version:
            return Decision(model_name, version, "unchanged", "already the champion",
                            policy.primary_metric, policy.margin, champion_version=champion)
        decision = compare(client, model_name, version, champion, split_dir, policy)
        if decision.promoted:
            client.set_registered_model_alias(model_name, CHAMPION, version)
        record(client, decision)
    logger.info("%s version %s %s: %s", model_name, version, decision.decision, decision.reason)
    return decision


def emit_model_event(event: str, model_name: str, version: str, payload: dict[str, Any]) -> None:
    """Send a Prefect event about a model version (a no-op when no Prefect API is reachable)."""
    from prefect.events import emit_event

    emit_event(
        event=event,
        resource={"prefect.resource.id": f"mlflow.model-version.{model_name}.{version}",
                  "prefect.resource.name": f"{model_name} v{version}",
                  "shoprank.model.name": model_name, "shoprank.model.version": str(version)},
        payload=payload,
    )


def metrics_payload(scores: dict[str, dict[str, dict[str, float]]], name: str
                    ) -> dict[str, float]:
    """The named model's test metrics with MLflow-safe keys (for tags and event payloads)."""
    return {metric_key(name, "test", m): float(v) for m, v in scores[name]["test"].items()}
