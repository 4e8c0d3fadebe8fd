"""The ``monitor`` flow: how the shop's champion does on the events that arrived after its data.

It reads the shop's events (the same ``--data`` / ``--format`` / ``--name`` as ``train``), keeps
those after the champion's last event, and measures:

* the champion's *realised* quality per day (:mod:`tasks.monitoring.realised`): the served pyfunc
  answers each active user with its first event of the day as the live session, scored on what
  the user did next that day; against the figure the gate recorded for it on live sessions;
* drift between the champion's training window and the new events
  (:mod:`tasks.monitoring.drift`): event-type mix, unknown users and items, top items, category
  mix, price.

Every day's figures go to one MLflow run per champion version (``monitor-v<N>`` in the shop's
experiment, a time series re-logged on each run of the flow), with the plot and the checks; a
Prefect markdown artifact shows them in the UI. When the champion decayed or the shop drifted,
the event ``shoprank.model.decayed`` is sent (its id derives from the champion and the last day
seen, so a repeated run on the same data triggers nothing twice); the ``train`` deployment is
triggered by it (:mod:`flows.deploy`).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.config import TrainConfig, data_name
from models.columns import ITEM, TIMESTAMP, USER
from models.errors import ConfigError
from tasks import tracking
from tasks.data.adapters import load_raw
from tasks.monitoring.drift import daily_drift, drift_checks
from tasks.monitoring.plot import plot_monitor
from tasks.monitoring.realised import realised_quality
from tasks.monitoring.verdict import Verdict, verdict
from tasks.release.gate import EVALUATED_TAG, parse_time
from tasks.release.packaging import CHAMPION, DATA_TAG, KIND_TAG, LAST_EVENT_TAG
from tasks.release.registry import DECAYED, alias_version, emit_model_event, load_version

MONITOR_TAG = "shoprank.monitor_of"


def gate_figure(client: MlflowClient, model_name: str, champion: str, metric: str
                ) -> tuple[float | None, str]:
    """The figure the gate recorded for the champion, measured as the monitor measures.

    ``(value, where)``: the test window's days scored like the days after the release (each
    user's first event of the day as the session: ``daily.<metric>``), else the live-session or
    the returning-user figure of versions decided before it existed. A release of the
    challenger's recipe: the challenger's figure on its decision; a refresh: the champion's
    recipe's figure on that decision.
    """
    tags = client.get_model_version(model_name, champion).tags
    decided = tags.get(EVALUATED_TAG, champion)
    role = "champion" if tags.get(KIND_TAG) == "refresh" else "challenger"
    decision = client.get_model_version(model_name, decided).tags
    key = metric.replace("@", "_at_")
    for name in (f"promotion.{role}.daily.{key}", f"promotion.{role}.live.{key}",
                 f"promotion.{role}.{key}"):
        if name in decision:
            return float(decision[name]), f"v{decided} {name}"
    return None, "no gate figure recorded"


def shop_events(config: TrainConfig) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """The shop's canonical events and catalogue, read as ``train`` reads them."""
    from tasks.data.prepare import demo_source

    cfg = config.data
    if cfg.path is None:
        source = demo_source(Path(config.output_dir).resolve(), cfg.demo_events, cfg.demo_seed)
        raw = load_raw(source, "parquet")
    else:
        raw = load_raw(cfg.path, cfg.format, column_map=cfg.column_map or None,
                       event_map=cfg.event_map or None)
    return raw.events, raw.items


@task(name="monitor-measure", cache_policy=NO_CACHE)
def measure(config: TrainConfig, champion: str, last_event: dt.datetime, uri: str
            ) -> dict[str, Any]:
    """Realised quality per day and drift of the events after ``last_event``."""
    events, items = shop_events(config)
    moment = pl.lit(last_event).cast(events[TIMESTAMP].dtype)
    reference, new = events.filter(pl.col(TIMESTAMP) <= moment), events.filter(
        pl.col(TIMESTAMP) > moment)
    pyfunc = load_version(MlflowClient(uri), config.registry.model_name, champion)
    ks = config.evaluation.ks
    settings = config.monitor
    live = realised_quality(pyfunc.predict, new, ks=ks)
    returning = realised_quality(pyfunc.predict, new, ks=ks, session=False)
    return {"new_events": new.height, "new_users": new[USER].n_unique(),
            "new_items": new[ITEM].n_unique(), "live": live, "returning": returning,
            "checks": drift_checks(reference, new, items, settings),
            "daily_drift": daily_drift(reference, new, items, settings)}


def monitor_run(client: MlflowClient, experiment_id: str, model_name: str, champion: str) -> str:
    """The MLflow run that holds the champion's monitoring series (created on first use)."""
    key = f"{model_name}/{champion}"
    found = client.search_runs([experiment_id], f"tags.`{MONITOR_TAG}` = '{key}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=f"monitor-v{champion}",
                             tags={MONITOR_TAG: key, "shoprank.model_version": champion,
                                   "mlflow.note.content": f"Monitoring of {key}"}).info.run_id


def log_series(client: MlflowClient, run_id: str, result: dict[str, Any], verdict_: Verdict,
               plot: Path) -> None:
    """Every day's figures as a time series (step: days since the epoch), the plot, the checks."""
    for prefix, table in (("realised", result["live"]), ("returning", result["returning"]),
                          ("drift", result["daily_drift"])):
        for row in table.iter_rows(named=True):
            day = row.pop("day")
            step = (day - dt.date(1970, 1, 1)).days
            stamp = int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp() * 1000)
            for name, value in row.items():
                if isinstance(value, int | float) and value == value:  # not NaN
                    client.log_metric(run_id, f"{prefix}.{name.replace('@', '_at_')}",
                                      float(value), timestamp=stamp, step=step)
    client.log_artifact(run_id, str(plot), "monitor")
    client.log_dict(run_id, {"checks": [vars(c) for c in verdict_.checks],
                             "flagged": verdict_.flagged}, f"monitor/{plot.stem}.json")
    client.set_tag(run_id, "monitor.flagged", str(verdict_.flagged).lower())


def markdown(champion: str, gate: tuple[float | None, str], result: dict[str, Any],
             verdict_: Verdict, plot: Path) -> str:
    """The Prefect artifact: the checks as a table and the plot inline."""
    rows = "\n".join(f"| {c.name} | {'n/a' if c.value is None else f'{c.value:.4f}'} | "
                     f"{'<=' if c.bound == 'max' else '>='} {c.threshold:.4f} | {c.status} | "
                     f"{c.detail} |" for c in verdict_.checks)
    image = base64.b64encode(plot.read_bytes()).decode()
    return (f"# Champion v{champion}: {'FLAGGED' if verdict_.flagged else 'OK'}\n\n"
            f"{result['new_events']:,} new events, {result['new_users']:,} users; gate figure "
            f"{gate[0] if gate[0] is not None else 'n/a'} ({gate[1]}).\n\n"
            f"| check | value | bound | status | detail |\n|---|---:|---|---|---|\n{rows}\n\n"
            f"![realised quality and drift](data:image/png;base64,{image})\n")


@flow(name="monitor", log_prints=False)
def monitor(config: TrainConfig | None = None) -> dict[str, Any]:
    """Measure the shop's champion on the events since its data; flag decay and drift.

    Args:
        config: The shop's settings (``data``, ``registry.model_name``, ``evaluation.ks``,
            ``monitor`` thresholds), as for ``train``.

    Returns:
        ``flagged``, ``lines`` (one per check), ``champion``, ``run_id`` and figures.
    """
    config = config or TrainConfig()
    logger = get_run_logger()
    uri = tracking.tracking_uri(config.tracking_uri)
    client, name = MlflowClient(uri), config.registry.model_name
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        raise ConfigError(f"{name!r} has no champion in {uri} to monitor: train and promote a "
                          "model first (shoprank train), or give --model-name.")
    tags = client.get_model_version(name, champion).tags
    shop = data_name(config)
    if tags.get(DATA_TAG) and tags[DATA_TAG] != shop:
        raise ConfigError(f"the champion v{champion} of {name!r} serves the shop "
                          f"{tags[DATA_TAG]!r}, not {shop!r}: give that shop's --data and "
                          "--name, or its --model-name.")
    last_event = parse_time(tags.get(LAST_EVENT_TAG))
    if last_event is None:
        raise ConfigError(f"the champion v{champion} records no last event "
                          f"({LAST_EVENT_TAG}): register it again with shoprank train.")
    result = measure(config, champion, last_event, uri)
    gate = gate_figure(client, name, champion, config.monitor.decay_metric)
    outcome = verdict(result["live"], gate[0], result["checks"], config.monitor)
    for line in outcome.lines:
        logger.info("%s", line)
    experiment = tracking.ensure_experiment(shop, uri)
    run_id = monitor_run(client, experiment, name, champion)
    with tempfile.TemporaryDirectory(prefix="shoprank-monitor-") as tmp:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        plot = plot_monitor(result["live"], gate[0], Path(tmp) / f"monitor-{stamp}.png",
                            config.monitor, result["daily_drift"], result["returning"])
        log_series(client, run_id, result, outcome, plot)
        create_markdown_artifact(markdown(champion, gate, result, outcome, plot),
                                 key=f"monitor-{name}".lower().replace("_", "-"),
                                 description=f"Monitoring of {name} v{champion}")
    days = result["live"]["day"].to_list()
    if outcome.flagged:
        emit_model_event(DECAYED, name, champion, {
            "model": name, "version": champion, "decayed": outcome.decayed,
            "drifted": outcome.drifted, "checks": [c.line() for c in outcome.checks],
            "last_day": str(days[-1]) if days else None}, key=f"{days[-1] if days else 'none'}")
    return {"flagged": outcome.flagged, "decayed": outcome.decayed, "drifted": outcome.drifted,
            "lines": outcome.lines, "champion": champion, "run_id": run_id,
            "new_events": result["new_events"], "days": [str(d) for d in days],
            "gate": gate[0], "checks": json.loads(json.dumps(
                [vars(c) for c in outcome.checks], default=str))}
