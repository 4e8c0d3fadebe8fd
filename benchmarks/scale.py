"""The ``dask`` engine at scale: the built-in shop at 10M, 30M, 100M events on this machine.

For each size: the demo shop is streamed into user shards (``shoprank demo-data --shards``), a
``distributed.LocalCluster`` is started on 127.0.0.1 (``--workers`` worker processes, one thread
each), and ``shoprank train --engine dask --dask-address ...`` runs on it as a child process. The
table gives each stage's wall time (from the run's log), the CPU time and peak resident memory of
every process (the demo writer, the flow process, each Dask worker, the scheduler) and the
test NDCG@10 of co-visitation and of the ranker (``--ranker-trials N``; left out with 0).
``--local`` also runs ``engine: local`` with the same settings on the same shop for the quality
comparison. Results are appended to ``benchmarks/results/scale.json``.

    .venv/bin/python benchmarks/scale.py --events 10000000 30000000 100000000 --workdir /tmp/scale
    .venv/bin/python benchmarks/scale.py --events 10000000 --workers 1 2 --local
    .venv/bin/python benchmarks/scale.py --events 3000000 --ranker-trials 4 --local
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
STAGE = re.compile(r"stage (\w+) done in ([\d.]+) s")
NDCG = re.compile(r"^\| (\w+) \| ([\d.]+) \|", re.MULTILINE)


def run_measured(command: list[str], log: Path, env: dict[str, str] | None = None
                 ) -> dict[str, float]:
    """Run a command; its wall time, CPU time and peak RSS (its own process, from wait4)."""
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed; see {log}")
    return {"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024}


def _usage() -> dict[str, float]:
    mine = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": mine.ru_utime + mine.ru_stime, "peak_rss_mib": mine.ru_maxrss / 1024}


def write_config(path: Path, args: argparse.Namespace, run: str) -> Path:
    """The run's settings: nothing registered; the ranker's budget when it runs.

    Each run (``run``: size, workers, engine) has an Optuna storage of its own, so that no run
    resumes the studies of another and every run times its trials.
    """
    ranker = {"enabled": bool(args.ranker_trials), "n_trials": max(args.ranker_trials, 1),
              "storage": f"sqlite:///{args.workdir / f'optuna-{run}.db'}",
              "extra": {"extra_windows": args.extra_windows,
                        "sample_groups": args.sample_groups}}
    transformer = {"enabled": args.transformer, "candidates": False,
                   "storage": ranker["storage"]}
    path.write_text(json.dumps({"registry": {"enabled": False}, "ranker": ranker,
                                "transformer": transformer}))
    return path


def train_on_cluster(shop: Path, out: Path, workers: int, log: Path, config: Path) -> dict:
    """``shoprank train --engine dask`` on a fresh LocalCluster; every process's usage."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        flow = run_measured(
            [str(BIN / "shoprank"), "train", "--data", str(shop), "--format", "parquet",
             "--engine", "dask", "--dask-address", cluster.scheduler_address,
             "--config", str(config), "--output-dir", str(out)], log)
        workers_usage = list(client.run(_usage).values())
        scheduler = client.run_on_scheduler(_usage)
    text = log.read_text()
    return {"flow": flow, "workers": workers_usage, "scheduler": scheduler,
            "stages": {m[1]: float(m[2]) for m in STAGE.finditer(text)},
            "test_ndcg@10": _test_ndcg(text)}


def _test_ndcg(text: str) -> dict[str, float]:
    """Test NDCG@10 per model from the metrics table the run prints."""
    section = text.split("## Test metrics", 1)[-1].split("## Validation metrics", 1)[0]
    return {m[1]: float(m[2]) for m in NDCG.finditer(section) if m[1] != "model"}


def train_local(shop: Path, out: Path, log: Path, config: Path) -> dict:
    """``shoprank train`` (engine local, same settings) on the same shop."""
    flow = run_measured(
        [str(BIN / "shoprank"), "train", "--data", str(shop), "--format", "parquet",
         "--config", str(config), "--output-dir", str(out)], log)
    text = log.read_text()
    return {"flow": flow, "test_ndcg@10": _test_ndcg(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[10_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shoprank-scale"))
    parser.add_argument("--local", action="store_true", help="also run engine local")
    parser.add_argument("--keep", action="store_true", help="keep the shops and outputs")
    parser.add_argument("--ranker-trials", type=int, default=0,
                        help="Optuna trials of the LightGBM ranker; 0 leaves the ranker out")
    parser.add_argument("--extra-windows", type=int, default=3,
                        help="the ranker's earlier training windows")
    parser.add_argument("--sample-groups", type=int, default=40_000,
                        help="the ranker's training groups (engine dask)")
    parser.add_argument("--transformer", action="store_true",
                        help="also tune and test the transformer (default settings)")
    args = parser.parse_args()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{args.workdir / 'mlflow.db'}"}
    os.environ.update(env)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    for n in args.events:
        shop = args.workdir / f"shop-{n}"
        shards = max(2, -(-n // 1_000_000))
        writer = run_measured([str(BIN / "shoprank"), "demo-data", "--out", str(shop),
                               "--events", str(n), "--shards", str(shards)],
                              args.workdir / f"demo-{n}.log")
        print(f"{n:,} events: demo shop in {writer['wall_s']:.0f} s, "
              f"{writer['peak_rss_mib']:.0f} MiB", flush=True)
        for workers in args.workers:
            out = args.workdir / f"out-{n}-{workers}"
            config = write_config(args.workdir / "config.json", args, f"{n}-{workers}")
            row = train_on_cluster(shop, out, workers, args.workdir / f"train-{n}-{workers}.log",
                                   config)
            row.update({"events": n, "shards": shards, "n_workers": workers, "writer": writer,
                        "ranker": json.loads(config.read_text())["ranker"],
                        "date": dt.date.today().isoformat(),
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores"})
            print(json.dumps(row), flush=True)
            results.append(row)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        if args.local:
            config = write_config(args.workdir / "config.json", args, f"{n}-local")
            local = train_local(shop, args.workdir / f"local-{n}", args.workdir / f"local-{n}.log",
                                config)
            local.update({"events": n, "engine": "local", "date": dt.date.today().isoformat(),
                          "ranker": json.loads(config.read_text())["ranker"]})
            print(json.dumps(local), flush=True)
            results.append(local)
        if not args.keep:
            shutil.rmtree(shop, ignore_errors=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
    print_table([r for r in results if r.get("n_workers")])


def print_table(rows: list[dict]) -> None:
    stages = ["load", "validate", "split", "baselines", "transformer", "ranker"]
    print("\n| events | workers | " + " | ".join(f"{s} s" for s in stages)
          + " | flow CPU s | workers CPU s | peak RSS flow / max worker / scheduler MiB |"
          " NDCG@10 covisitation / transformer / ranker |")
    print("|---" * (5 + len(stages)) + "|")
    for r in rows:
        cells = [f"{r['stages'].get(s, float('nan')):.0f}" for s in stages]
        workers_cpu = sum(w["cpu_s"] for w in r["workers"])
        peak = max(w["peak_rss_mib"] for w in r["workers"])
        print(f"| {r['events']:,} | {r['n_workers']} | " + " | ".join(cells)
              + f" | {r['flow']['cpu_s']:.0f} | {workers_cpu:.0f} | "
              f"{r['flow']['peak_rss_mib']:.0f} / {peak:.0f} / "
              f"{r['scheduler']['peak_rss_mib']:.0f} | "
              + " / ".join(f"{r['test_ndcg@10'].get(m, float('nan')):.4f}"
                           for m in ("covisitation", "transformer", "lgbm_ranker")) + " |")


if __name__ == "__main__":
    main()
