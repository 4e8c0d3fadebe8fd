"""A retraining backtest: the built-in shop arriving day by day, the gate deciding each time.

The demo shop (``--events`` over ``--days`` days; its items launch over time) is cut at day
``--start`` and then every ``--every`` days. At each cut, ``train`` runs on the events seen so far
(the same shop name, one registered model, one MLflow store, one Optuna storage) and its release
step decides: the challenger's evaluated copy against the champion's recipe refitted on the
challenger's split, then the winning recipe is refitted on every event and served as
``@champion``. At the retrainings listed in ``--worse-at`` a worse recipe is offered
(``--no-ranker --no-transformer``, popularity only): it must lose and the champion's recipe be
refreshed instead.

For each retraining the table gives the decision, both scores on the challenger's test window,
the served version, its kind and the last event it saw, and how many of the items first seen
since the previous retraining appear in the served lists (top 20 of the users active in the last
7 days) against the evaluated copy's lists. Results go to ``benchmarks/results/retraining.json``.

With ``--out-of-order`` the retrainings only register their evaluated copies
(``registry.promote: false``), and the promotions arrive afterwards in reverse order (the newest
first), one of them retried and one forced, as a deployment backlog or an operator would send
them. The table gives, after each promotion, the champion and the last event it has seen: it
must never go back in time.

    .venv/bin/python benchmarks/retraining.py --workdir /tmp/backtest
    .venv/bin/python benchmarks/retraining.py --events 40000 --start 30 --every 4 --worse-at 3 5
    .venv/bin/python benchmarks/retraining.py --out-of-order --start 44 --every 4 --trials 1

With ``--shift-day D`` the shop changes regime on day D (``demo-data --shift-day``) and three
retraining policies are run on it side by side (:mod:`shift_policies`: a fixed cron, ``shoprank
monitor``-triggered, both), each serving every day with its own champion; results go to
``benchmarks/results/shift_policies.json`` with a plot beside it.

    .venv/bin/python benchmarks/retraining.py --shift-day 48 --start 40 --every 4

With ``--catalogue-updates`` every day between two retrainings runs ``catalogue update``
(:func:`tasks.release.catalogue.update_champion`) with the catalogue of that day (the items
seen so far), and the day's served lists are scored with and without it: the items first seen
since the last retraining that appear in the lists (top 20 of the users active that day),
Recall@20 of the day's items for those users, and that recall on the day's new items only.
Results: ``benchmarks/results/catalogue_updates.json``.

    .venv/bin/python benchmarks/retraining.py --catalogue-updates --worse-at
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "retraining.json"
CATALOGUE_RESULTS = ROOT / "benchmarks" / "results" / "catalogue_updates.json"
WORSE = {"ranker__enabled": False, "transformer__enabled": False,
         "registry__families": ["popularity"]}


def lists_with(pyfunc, users: list[str], items: set[str], k: int = 20) -> int:
    """How many of ``items`` appear in the top-``k`` lists of ``users``."""
    import pandas as pd

    recs = pyfunc.predict(pd.DataFrame({"user_id": users, "k": [k] * len(users)}))
    return len(items & set(recs["item_id"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shoprank-backtest"))
    parser.add_argument("--events", type=int, default=60_000, help="events of the whole shop")
    parser.add_argument("--days", type=int, default=60, help="days of the whole shop")
    parser.add_argument("--start", type=int, default=32, help="day of the first retraining")
    parser.add_argument("--every", type=int, default=4, help="days between retrainings")
    parser.add_argument("--worse-at", type=int, nargs="*", default=[3, 5],
                        help="retrainings (from 1) offered the worse recipe")
    parser.add_argument("--trials", type=int, default=2, help="ranker trials per study")
    parser.add_argument("--transformer-trials", type=int, default=1)
    parser.add_argument("--out-of-order", action="store_true",
                        help="register every retraining, then promote them newest first")
    parser.add_argument("--shift-day", type=int, metavar="D",
                        help="a regime change on day D; compare three retraining policies")
    parser.add_argument("--policies", nargs="*", default=["cron", "monitor", "both"],
                        help="with --shift-day: the policies to run (cron monitor both)")
    parser.add_argument("--catalogue-updates", action="store_true",
                        help="a catalogue update every day between retrainings, scored against "
                        "no update")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    os.environ.update(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
                      DO_NOT_TRACK="true")  # before anything imports prefect
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.workdir / 'mlruns' / 'mlflow.db'}"
    (args.workdir / "mlruns").mkdir()

    import polars as pl
    from mlflow import MlflowClient

    from flows.config import load_config
    from flows.train import train
    from tasks.data.demo_data import generate_shop
    from tasks.release.packaging import KIND_TAG, LAST_EVENT_TAG, load_serving

    events, items = generate_shop(args.events, seed=7, n_days=args.days,
                                  shift_day=args.shift_day)
    if args.shift_day is not None:
        compare_policies(args, events, items)
        return
    first = events["timestamp"].min()
    storage = f"sqlite:///{args.workdir / 'optuna.db'}"
    common = {"output_dir": str(args.workdir / "outputs"), "data__format": "parquet",
              "data__name": "backtest", "registry__model_name": "backtest",
              "registry__latency_requests": 50, "ranker__n_trials": args.trials,
              "ranker__storage": storage, "transformer__n_trials": args.transformer_trials,
              "transformer__storage": storage}
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    if args.out_of_order:
        common["registry__promote"] = False
    rows, previous, daily = [], None, []
    day = args.start
    retraining = 0
    while day <= args.days:
        retraining += 1
        cut = first + dt.timedelta(days=day)
        seen = events.filter(pl.col("timestamp") < cut)
        folder = args.workdir / f"day-{day:03d}"
        folder.mkdir()
        seen.write_parquet(folder / "events.parquet")
        items.join(seen.select("item_id").unique(), on="item_id", how="semi").write_parquet(
            folder / "items.parquet")
        worse = retraining in args.worse_at
        start = time.perf_counter()
        result = train(load_config(None, data__path=str(folder), **common,
                                   **(WORSE if worse else {})))
        seconds = time.perf_counter() - start
        release = result["release"]
        if args.out_of_order:
            rows.append({"day": day, "version": release["version"], "seconds": seconds})
            previous, day = cut, day + args.every
            continue
        evaluated = client.get_model_version("backtest", release["version"]).tags
        served_version = release["champion"]
        served = client.get_model_version("backtest", served_version).tags
        firsts = seen.group_by("item_id").agg(pl.col("timestamp").min())
        new = set(firsts.filter(pl.col("timestamp") >= previous)["item_id"]) if previous \
            else set()
        active = seen.filter(pl.col("timestamp") >= cut - dt.timedelta(days=7))
        users = active["user_id"].unique().sort().to_list()
        row = {"retraining": retraining, "day": day, "events": seen.height,
               "offered": release["family"] + (" (worse recipe)" if worse else ""),
               "decision": release["decision"],
               "challenger": float(evaluated.get("promotion.challenger.ndcg_at_10", "nan")),
               "champion": float(evaluated.get("promotion.champion.ndcg_at_10", "nan")),
               "served_version": served_version, "served_kind": served.get(KIND_TAG),
               "served_family": served.get("model.family"),
               "served_last_event": served.get(LAST_EVENT_TAG), "seconds": round(seconds, 1),
               "new_items": len(new)}
        if new:
            row["new_in_served"] = lists_with(
                load_serving(f"models:/backtest/{served_version}", client.tracking_uri)[0],
                users, new)
            row["new_in_evaluated"] = lists_with(
                load_serving(f"models:/backtest/{release['version']}", client.tracking_uri)[0],
                users, new)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.catalogue_updates:
            daily += catalogue_days(args, events, items, cut, day, served_version, client)
        previous, day = cut, day + args.every
    if args.out_of_order:
        rows = promote_out_of_order(client, [r["version"] for r in rows])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    results.append({"date": dt.date.today().isoformat(), "commit": commit,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    if args.out_of_order:
        print_order_table(rows)
    else:
        print_table(rows)
    if daily:
        updates = CATALOGUE_RESULTS
        saved = json.loads(updates.read_text()) if updates.is_file() else []
        saved.append({"date": dt.date.today().isoformat(), "commit": commit,
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "args": {k: str(v) for k, v in vars(args).items()}, "days": daily})
        updates.write_text(json.dumps(saved, indent=2))
        print_catalogue_table(daily)


def catalogue_days(args, events, items, trained, day: int, champion: str, client) -> list[dict]:
    """The days after a retraining at ``day``: served lists with and without a catalogue update.

    On each day ``d`` until the next retraining, the catalogue of the items seen before ``d``
    updates the champion (no retraining); the users active on ``d`` are asked for their top 20
    by the retraining's champion and by the updated one, scored on their items of that day.
    """
    import polars as pl

    from tasks.release.catalogue import update_champion
    from tasks.release.packaging import load_serving

    first = events["timestamp"].min()
    plain = load_serving(f"models:/backtest/{champion}", client.tracking_uri)[0]
    firsts = events.group_by("item_id").agg(pl.col("timestamp").min().alias("first"))
    out = []
    for d in range(day + 1, min(day + args.every, args.days + 1)):
        start, end = first + dt.timedelta(days=d), first + dt.timedelta(days=d + 1)
        known = firsts.filter(pl.col("first") < start)
        catalogue = items.join(known, on="item_id", how="semi")
        began = time.perf_counter()
        update = update_champion(catalogue, model_name="backtest",
                                 tracking_uri=client.tracking_uri, encoder="wordllama",
                                 cache_dir=args.workdir / "item-vectors")
        seconds = time.perf_counter() - began
        updated = load_serving(f"models:/backtest/{update['version']}", client.tracking_uri)[0]
        today = events.filter((pl.col("timestamp") >= start) & (pl.col("timestamp") < end))
        new = set(known.filter(pl.col("first") >= trained)["item_id"])
        users = today["user_id"].unique().sort().to_list()
        targets = today.select("user_id", "item_id").unique()
        row = {"day": d, "since_training": d - day, "users": len(users),
               "new_items": len(new), "update_s": round(seconds, 1),
               "users_reached": int(update["catalogue"].get("users_reached", 0))}
        for name, pyfunc in (("without", plain), ("with", updated)):
            recs = pl.from_pandas(pyfunc.predict(
                pl.DataFrame({"user_id": users, "k": [20] * len(users)}).to_pandas()))
            row[f"new_in_lists_{name}"] = len(new & set(recs["item_id"]))
            row[f"recall20_{name}"] = _recall(recs, targets)
            row[f"new_recall20_{name}"] = _recall(
                recs, targets.filter(pl.col("item_id").is_in(list(new))))
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def _recall(recs, targets) -> float | None:
    """Mean over users with a target of the share of their targets in their list."""

    if targets.is_empty():
        return None
    hits = targets.join(recs.select("user_id", "item_id"), on=["user_id", "item_id"], how="semi")
    per_user = targets.group_by("user_id").len("n").join(
        hits.group_by("user_id").len("hit"), on="user_id", how="left").fill_null(0)
    n_items = per_user["n"].clip(upper_bound=20)
    return float((per_user["hit"] / n_items).mean())


def print_catalogue_table(days: list[dict]) -> None:
    """The Markdown table of the days between retrainings, with and without catalogue update."""
    print("\n| day | days since training | users | new items | in lists without / with "
          "update | Recall@20 without / with | Recall@20 on new items without / with | "
          "update s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    def pair(r: dict, key: str) -> str:
        a, b = r[f"{key}_without"], r[f"{key}_with"]
        return "- / -" if a is None else (f"{a:.4f} / {b:.4f}" if isinstance(a, float)
                                         else f"{a} / {b}")

    for r in days:
        print(f"| {r['day']} | {r['since_training']} | {r['users']} | {r['new_items']} | "
              f"{pair(r, 'new_in_lists')} | {pair(r, 'recall20')} | {pair(r, 'new_recall20')} | "
              f"{r['update_s']:.1f} |")


def compare_policies(args, events, items) -> None:
    """``--shift-day``: the three policies of :mod:`shift_policies` on the same shifted shop."""
    import shift_policies

    rows = [row for policy in args.policies
            for row in shift_policies.simulate(policy, args, events, items)]
    totals = shift_policies.summary(rows, args.shift_day)
    figure = shift_policies.plot(rows, args.shift_day,
                                 RESULTS.parent / f"shift_policies_day{args.shift_day}.png")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    path = RESULTS.parent / "shift_policies.json"
    results = json.loads(path.read_text()) if path.is_file() else []
    results.append({"date": dt.date.today().isoformat(), "commit": commit,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "args": {k: str(v) for k, v in vars(args).items()}, "summary": totals,
                    "rows": rows, "plot": str(figure.relative_to(ROOT))})
    path.write_text(json.dumps(results, indent=2, default=str))
    shift_policies.print_tables(rows, totals)


def promote_out_of_order(client, versions: list[str]) -> list[dict]:
    """Promote ``versions`` newest first, the second one twice and the oldest forced.

    After each promotion: the decision, the champion and the last event it has seen, and
    whether that went back in time against the champion before it.
    """
    from flows.promote import promote
    from tasks.release.packaging import LAST_EVENT_TAG

    order = [(v, False) for v in reversed(versions)]
    order.insert(2, (order[1][0], False))  # a retry, as a redelivered event sends it
    order.append((versions[0], True))  # an operator forcing the oldest one
    rows, last = [], None
    for step, (version, force) in enumerate(order, start=1):
        start = time.perf_counter()
        result = promote(version=version, model_name="backtest", force=force,
                         tracking_uri=client.tracking_uri)
        champion = client.get_model_version_by_alias("backtest", "champion")
        served = champion.tags.get(LAST_EVENT_TAG, "")
        data = client.get_model_version("backtest", version).tags
        row = {"step": step, "version": version, "force": force,
               "data_until": data.get("shoprank.data_last_event")
               or data.get(LAST_EVENT_TAG, ""),
               "decision": result["decision"], "champion": champion.version,
               "champion_last_event": served, "back_in_time": bool(last and served < last),
               "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        last = max(last or served, served)
    return rows


def print_order_table(rows: list[dict]) -> None:
    """The Markdown table of the out-of-order promotions."""
    print("\n| step | promoted | its data until | decision | champion | champion's last event "
          "| back in time | s |")
    print("|---:|---|---|---|---|---|---|---:|")
    for r in rows:
        print(f"| {r['step']} | v{r['version']}{' --force' if r['force'] else ''} | "
              f"{r['data_until'][:16]} | {r['decision']} | v{r['champion']} | "
              f"{r['champion_last_event'][:16]} | {'**yes**' if r['back_in_time'] else 'no'} "
              f"| {r['seconds']:.0f} |")


def print_table(rows: list[dict]) -> None:
    """The Markdown table of BENCHMARKS.md."""
    print("\n| # | day | events | offered | decision | challenger NDCG@10 | champion NDCG@10 "
          "(refitted) | served | served last event | new items | in served lists | in "
          "evaluated copy's | s |")
    print("|---:|---:|---:|---|---|---:|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['retraining']} | {r['day']} | {r['events']:,} | {r['offered']} | "
              f"{r['decision']} | {r['challenger']:.4f} | {r['champion']:.4f} | "
              f"v{r['served_version']} {r['served_family']} ({r['served_kind']}) | "
              f"{(r['served_last_event'] or '')[:16]} | {r['new_items']} | "
              f"{r.get('new_in_served', '-')} | {r.get('new_in_evaluated', '-')} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
