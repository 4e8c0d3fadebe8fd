"""Three retraining policies on a shop that changes on day D (`retraining.py --shift-day`).

The built-in shop with ``shift_day=D`` arrives day by day from day ``start``. Each policy keeps
its own champion (its own shop name and registered model, one MLflow store) and serves each day
with it; the day's realised NDCG@10 is measured as ``shoprank monitor`` measures it (each active
user's first event of the day as the live session, the rest of its day as targets). At the end of
each day a policy may retrain on every event so far (``train``, its gate and release):

* ``cron``: every ``every`` days, whatever happens;
* ``monitor``: when ``shoprank monitor`` on the events since the champion's data flags decay or
  drift (exit 3);
* ``both``: either.

Results: one row per policy and day (NDCG@10, users, champion, retrained), a summary per policy
(retrainings, mean NDCG@10 before and after D, the first day after D back within 10% of the
policy's mean before D), and a plot.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import polars as pl

POLICIES = ("cron", "monitor", "both")


def day_folder(events: pl.DataFrame, items: pl.DataFrame, first: dt.datetime, day: int,
               root: Path) -> Path:
    """The shop as seen at the start of ``day`` (events before it), written once."""
    folder = root / f"until-day-{day:03d}"
    if not (folder / "events.parquet").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        events.filter(pl.col("timestamp") < first + dt.timedelta(days=day)).write_parquet(
            folder / "events.parquet")
        items.write_parquet(folder / "items.parquet")
    return folder


def served_ndcg(client: Any, name: str, day_events: pl.DataFrame, cache: dict) -> dict:
    """The champion's realised metrics on one day's events (as the monitor scores them)."""
    from tasks.monitoring.realised import realised_quality
    from tasks.release.registry import alias_version, load_version

    version = alias_version(client, name, "champion")
    if (name, version) not in cache:
        cache[(name, version)] = load_version(client, name, version)
    daily = realised_quality(cache[(name, version)].predict, day_events, ks=[10, 20])
    row = daily.row(0, named=True) if daily.height else {"users": 0, "ndcg@10": float("nan")}
    family = client.get_model_version(name, version).tags.get("model.family")
    return {"champion": version, "family": family, "users": row["users"],
            "ndcg@10": row["ndcg@10"]}


def simulate(policy: str, args: Any, events: pl.DataFrame, items: pl.DataFrame) -> list[dict]:
    """One policy over the days from ``args.start`` to the end; a row per day."""
    from mlflow import MlflowClient

    from flows.config import load_config
    from flows.monitor import monitor
    from flows.train import train

    first = events["timestamp"].min()
    name = f"shift-{policy}"
    common = {"output_dir": str(args.workdir / "outputs"), "data__format": "parquet",
              "data__name": name, "registry__model_name": name, "ranker__enabled": False,
              "transformer__enabled": False, "registry__latency_requests": 50}
    client, cache, rows = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), {}, []
    folders = args.workdir / "days"
    train(load_config(None, data__path=str(day_folder(events, items, first, args.start,
                                                      folders)), **common))
    for day in range(args.start, args.days):
        today = events.filter((pl.col("timestamp") >= first + dt.timedelta(days=day))
                              & (pl.col("timestamp") < first + dt.timedelta(days=day + 1)))
        row = {"policy": policy, "day": day, **served_ndcg(client, name, today, cache)}
        seen = day_folder(events, items, first, day + 1, folders)
        flagged = False
        if policy in ("monitor", "both"):
            flagged = monitor(load_config(None, data__path=str(seen), **common))["flagged"]
        due = policy in ("cron", "both") and (day + 1 - args.start) % args.every == 0
        row.update(flagged=flagged, retrained=flagged or due)
        if row["retrained"]:
            release = train(load_config(None, data__path=str(seen), **common))["release"] or {}
            row.update(decision=release.get("decision"), reason=release.get("reason"))
        print(row, flush=True)  # noqa: T201
        rows.append(row)
    return rows


def summary(rows: list[dict], shift_day: int) -> list[dict]:
    """Per policy: retrainings, mean NDCG@10 before and after the shift, days to recover."""
    frame = pl.DataFrame(rows)
    out = []
    for policy in frame["policy"].unique(maintain_order=True):
        mine = frame.filter(pl.col("policy") == policy)
        before = mine.filter(pl.col("day") < shift_day)["ndcg@10"].mean()
        after = mine.filter(pl.col("day") >= shift_day)
        back = after.filter(pl.col("ndcg@10") >= 0.9 * before)["day"]
        out.append({"policy": policy, "retrainings": int(mine["retrained"].sum()) + 1,
                    "ndcg_before": before, "ndcg_after": after["ndcg@10"].mean(),
                    "shift_day_ndcg": after["ndcg@10"][0],
                    "recovered_day": int(back[0]) if len(back) else None,
                    "days_to_recover": int(back[0]) - shift_day if len(back) else None})
    return out


def plot(rows: list[dict], shift_day: int, path: Path) -> Path:
    """Realised NDCG@10 per day of each policy, retrainings marked, the shift day drawn."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    frame = pl.DataFrame(rows)
    figure = Figure(figsize=(9, 4.5), dpi=110)
    ax = figure.subplots()
    for policy in frame["policy"].unique(maintain_order=True):
        mine = frame.filter(pl.col("policy") == policy)
        line = ax.plot(mine["day"], mine["ndcg@10"], marker=".", label=policy)[0]
        again = mine.filter(pl.col("retrained"))
        ax.scatter(again["day"], again["ndcg@10"], marker="v", s=50, color=line.get_color())
    ax.axvline(shift_day, color="grey", linestyle="--", label=f"shift (day {shift_day})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("day (retraining at the end of a day marked ▼)")
    ax.set_ylabel("realised NDCG@10 (live sessions)")
    ax.set_title("Retraining policies on a shop that changes on day "
                 f"{shift_day}: what the shop was served")
    ax.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def print_tables(rows: list[dict], totals: list[dict]) -> None:
    """The Markdown tables of BENCHMARKS.md."""
    print("\n| policy | retrainings | NDCG@10 before D | on day D | after D | back within "  # noqa: T201
          "10% on day | days after D |")
    print("|---|---:|---:|---:|---:|---:|---:|")  # noqa: T201
    for t in totals:
        print(f"| {t['policy']} | {t['retrainings']} | {t['ndcg_before']:.4f} | "  # noqa: T201
              f"{t['shift_day_ndcg']:.4f} | {t['ndcg_after']:.4f} | {t['recovered_day']} | "
              f"{t['days_to_recover']} |")
    days = sorted({r["day"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["policy"], r["day"]): r for r in rows}
    print("\n| day | " + " | ".join(policies) + " |")  # noqa: T201
    print("|---:|" + "---:|" * len(policies))  # noqa: T201
    for day in days:
        cells = [f"{by[(p, day)]['ndcg@10']:.3f}{' ▼' if by[(p, day)]['retrained'] else ''}"
                 for p in policies]
        print(f"| {day} | " + " | ".join(cells) + " |")  # noqa: T201
