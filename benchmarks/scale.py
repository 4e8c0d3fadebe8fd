"""The ``dask`` engine at scale: the built-in shop at 10M, 30M, 100M events on this machine.

For each size: the demo shop is streamed into user shards (``shoprank demo-data --shards``), a
``distributed.LocalCluster`` is started on 127.0.0.1 (``--workers`` worker processes, one thread
each), and ``shoprank train --engine dask --dask-address ...`` runs on it as a child process. The
table gives each stage's wall time (from the run's log), the CPU time and peak resident memory of
every process (the demo writer, the flow process, each Dask worker, the scheduler) and the
test NDCG@10 of co-visitation, the transformer and the ranker (``--ranker-trials N``; left out
with 0). ``--release`` turns the release on (registry ``scale-<events>-<workers>``, promoted at
once): its stage time joins the table, with the released bundle's size and users (then
``benchmarks/load.py --model-uri models:/scale-<events>-<workers>@champion`` serves it).
``--local`` also runs ``engine: local`` with the same settings on the same shop for the quality
comparison (``--local-only``: that run alone). ``--settings FILE`` lays a YAML file of train
settings over the benchmark's (a cascade, the transformer's graph, ...). Results are appended to
``benchmarks/results/scale.json``.

A run longer than one sitting goes on with ``--resume`` (same command, same ``--workdir``): a
shop written completely is reused, and ``shoprank train --resume`` continues the unfinished run
from its finished shards and stages (their results persist under ``$PREFECT_HOME``; keep it the
same, and run from the same code, since the cache keys include the tasks' source). Each attempt
is recorded: its stage lines, and every 15 s its elapsed time and each process's CPU time and
peak memory so far, so an attempt that is killed still counts. A stage's time is the sum over
attempts; the stage an attempt was killed in is charged up to its last sample.

    .venv/bin/python benchmarks/scale.py --events 10000000 30000000 100000000 --workdir /tmp/scale
    .venv/bin/python benchmarks/scale.py --events 10000000 --workers 1 2 --local
    .venv/bin/python benchmarks/scale.py --events 1000000 --ranker-trials 2 --transformer --release
    .venv/bin/python benchmarks/scale.py --events 100000000 --ranker-trials 2 --transformer \
        --keep --workdir /work/scale100 --resume
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
from collections.abc import Callable
from itertools import zip_longest
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
STAGES = ["load", "validate", "split", "baselines", "transformer", "ranker", "release"]
STAGE = re.compile(r"stage (\w+) done in ([\d.]+) s")
NDCG = re.compile(r"^\| (\w+) \| ([\d.]+)(?: ± [\d.]+)? \|", re.MULTILINE)  # mean ± se
SAMPLE_EVERY_S = 15.0


def run_measured(command: list[str], log: Path, record: Path | None = None,
                 sample: Callable[[], dict] | None = None, check: bool = True) -> dict:
    """Run a command; its wall time, CPU time, peak RSS (its own process, from wait4), exit code.

    With ``record``, every ``SAMPLE_EVERY_S`` seconds the elapsed time (and ``sample()``: the
    other processes' usage so far) is written there, so that a killed run leaves its figures.
    """
    start = next_record = time.time()
    others = None
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if record is not None and time.time() >= next_record:
                try:
                    others = sample() if sample else None
                except Exception as error:  # a worker lost: keep its last figures
                    print(f"usage sample failed: {error}", flush=True)
                # written aside, then renamed: a kill never leaves half a record
                partial = record.with_suffix(".partial")
                partial.write_text(json.dumps({"start": start, "last_seen": time.time(),
                                               "flow": proc_usage(proc.pid),
                                               "others": others}))
                partial.replace(record)
                next_record = time.time() + SAMPLE_EVERY_S
            time.sleep(1.0)
    code = os.waitstatus_to_exitcode(status)
    if check and code != 0:
        sys.exit(f"{' '.join(command)} failed (exit {code}); see {log}")
    return {"wall_s": time.time() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "exit_code": code}


def proc_usage(pid: int) -> dict[str, float]:
    """A running process's CPU time and peak resident set so far, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    peak = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / ticks,
            "peak_rss_mib": int(peak[1]) / 1024 if peak else None}


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
    registry = {"enabled": args.release, "model_name": f"scale-{run}"}
    config = {"registry": registry, "ranker": ranker, "transformer": transformer,
              "evaluation": {"test_user_share": args.test_user_share}}
    if args.settings:
        from flows.config import merge_settings

        config = merge_settings(config, yaml.safe_load(args.settings.read_text()) or {})
    path.write_text(json.dumps(config))
    return path


def train_command(shop: Path, out: Path, config: Path, resume: bool) -> list[str]:
    return [str(BIN / "shoprank"), "train", "--data", str(shop), "--format", "parquet",
            "--config", str(config), "--output-dir", str(out), *(["--resume"] if resume else [])]


def cluster_attempt(command: list[str], workers: int, log: Path, record: Path) -> dict:
    """One ``train --engine dask`` attempt on a fresh LocalCluster; every process's usage."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def sample() -> dict:
            return {"workers": list(client.run(_usage).values()),
                    "scheduler": client.run_on_scheduler(_usage)}

        flow = run_measured([*command, "--engine", "dask", "--dask-address",
                             cluster.scheduler_address], log, record, sample)
        return {"flow": flow, **sample()}


def attempt_stages(text: str, wall_s: float, finished: bool) -> dict[str, float]:
    """The stage seconds one attempt logged; a killed attempt's last stage up to its last sample."""
    stages = {m[1]: float(m[2]) for m in STAGE.finditer(text)}
    if not finished:
        pending = [s for s in STAGES if s not in stages]
        if pending:
            stages[pending[0]] = max(wall_s - sum(stages.values()), 0.0)
    return stages


def train_on_cluster(shop: Path, out: Path, workers: int, stem: Path, config: Path,
                     resume: bool) -> dict:
    """Every attempt of one dask run (earlier killed ones from their records), merged."""
    attempts = []
    for record in sorted(stem.parent.glob(f"{stem.name}.attempt-*.json")):
        saved = json.loads(record.read_text())
        if "last_seen" in saved:  # killed: its last sample
            saved = {"flow": {**saved["flow"], "wall_s": saved["last_seen"] - saved["start"]},
                     **(saved["others"] or {}), "finished": False}
            saved["stages"] = attempt_stages(record.with_suffix(".log").read_text(),
                                             saved["flow"]["wall_s"], False)
        attempts.append(saved)
    if not resume:
        for old in stem.parent.glob(f"{stem.name}.attempt-*"):
            old.unlink()
        attempts = []
    record = stem.parent / f"{stem.name}.attempt-{len(attempts) + 1:02d}.json"
    log = record.with_suffix(".log")
    row = cluster_attempt(train_command(shop, out, config, resume), workers, log, record)
    text = log.read_text()
    row["stages"] = attempt_stages(text, row["flow"]["wall_s"], True)
    row["finished"] = True
    record.write_text(json.dumps(row))
    attempts.append(row)
    return merge_attempts(attempts, text)


def merge_attempts(attempts: list[dict], last_log: str) -> dict:
    """Stage times and CPU summed over attempts, peaks the largest; metrics of the last attempt."""
    def total(key: str) -> float:
        return sum(a["flow"][key] or 0.0 for a in attempts)

    by_worker = zip_longest(*(a.get("workers") or [] for a in attempts))  # worker i of each
    workers = [{"cpu_s": sum(w["cpu_s"] for w in same if w),
                "peak_rss_mib": max(w["peak_rss_mib"] for w in same if w)}
               for same in by_worker]
    schedulers = [a["scheduler"] for a in attempts if a.get("scheduler")]
    stages: dict[str, float] = {}
    for a in attempts:
        for stage, seconds in a["stages"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    peaks = [a["flow"]["peak_rss_mib"] for a in attempts if a["flow"]["peak_rss_mib"]]
    return {"flow": {"wall_s": total("wall_s"), "cpu_s": total("cpu_s"),
                     "peak_rss_mib": max(peaks)},
            "workers": workers,
            "scheduler": {"cpu_s": sum(s["cpu_s"] for s in schedulers),
                          "peak_rss_mib": max(s["peak_rss_mib"] for s in schedulers)},
            "stages": stages, "attempts": len(attempts),
            "test_ndcg@10": _test_ndcg(last_log)}


def _test_ndcg(text: str) -> dict[str, float]:
    """Test NDCG@10 per model from the metrics table the run prints."""
    section = text.split("## Test metrics", 1)[-1].split("## Validation metrics", 1)[0]
    return {m[1]: float(m[2]) for m in NDCG.finditer(section) if m[1] != "model"}


def train_local(shop: Path, out: Path, log: Path, config: Path) -> dict:
    """``shoprank train`` (engine local, same settings) on the same shop; a failure is recorded."""
    flow = run_measured(train_command(shop, out, config, False), log, check=False)
    text = log.read_text()
    return {"flow": flow, "stages": attempt_stages(text, flow["wall_s"], flow["exit_code"] == 0),
            "test_ndcg@10": _test_ndcg(text)}


def released_bundle(name: str) -> dict:
    """The champion of ``name``: its version, kind, bundle bytes, users and bytes per user."""
    from mlflow import MlflowClient

    from tasks.release.packaging import load_serving

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(name, "champion")
    _, serving = load_serving(f"models:/{name}@champion", os.environ["MLFLOW_TRACKING_URI"])
    size = int(float(version.tags["serving.artifact_bytes"]))
    return {"version": version.version, "kind": version.tags.get("release.kind"),
            "artifact_bytes": size, "users": len(serving.lists),
            "lists_bytes": serving.lists.nbytes,
            "bytes_per_user": size / max(len(serving.lists), 1)}


def demo_shop(n: int, shards: int, workdir: Path) -> tuple[Path, dict]:
    """The demo shop of ``n`` events in ``shards`` user shards; one written completely is reused."""
    shop, done = workdir / f"shop-{n}", workdir / f"demo-{n}.json"
    if shop.is_dir() and done.is_file():
        return shop, json.loads(done.read_text())
    shutil.rmtree(shop, ignore_errors=True)
    writer = run_measured([str(BIN / "shoprank"), "demo-data", "--out", str(shop),
                           "--events", str(n), "--shards", str(shards)],
                          workdir / f"demo-{n}.log")
    done.write_text(json.dumps(writer))
    return shop, writer


def engine_shards(n: int, workers: int) -> int:
    """The shards the engine sizes ``n`` events to on a LocalCluster of ``workers`` here."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flows.cluster import shard_sizing
    from flows.config import DaskConfig

    return shard_sizing(DaskConfig(workers=workers)).shards(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[10_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shoprank-scale"))
    parser.add_argument("--local", action="store_true", help="also run engine local")
    parser.add_argument("--local-only", action="store_true",
                        help="run engine local only (no Dask run)")
    parser.add_argument("--keep", action="store_true", help="keep the shops and outputs")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the unfinished dask run in --workdir (keeps outputs)")
    parser.add_argument("--ranker-trials", type=int, default=0,
                        help="Optuna trials of the LightGBM ranker; 0 leaves the ranker out")
    parser.add_argument("--extra-windows", type=int, default=3,
                        help="the ranker's earlier training windows")
    parser.add_argument("--sample-groups", type=int, default=40_000,
                        help="the ranker's training groups (engine dask)")
    parser.add_argument("--transformer", action="store_true",
                        help="also tune and test the transformer (default settings)")
    parser.add_argument("--release", action="store_true",
                        help="register, gate and release the best model (engine's release)")
    parser.add_argument("--shards", type=int, default=None,
                        help="user shards of the demo shop (default: the engine's, sized to "
                        "the workers and this machine's memory)")
    parser.add_argument("--test-user-share", type=float, default=1.0,
                        help="evaluation.test_user_share: the share of the test users scored")
    parser.add_argument("--settings", type=Path, default=None,
                        help="a YAML file of train settings laid over the benchmark's own (for "
                        "example ranker: {extra: {cascade_trees: 5}})")
    args = parser.parse_args()
    args.keep = args.keep or args.resume
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.workdir / 'mlflow.db'}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    for n in args.events:
        shards = args.shards or engine_shards(n, max(args.workers))
        shop, writer = demo_shop(n, shards, args.workdir)
        print(f"{n:,} events: demo shop in {writer['wall_s']:.0f} s, "
              f"{writer['peak_rss_mib']:.0f} MiB", flush=True)
        for workers in [] if args.local_only else args.workers:
            out = args.workdir / f"out-{n}-{workers}"
            config = write_config(args.workdir / "config.json", args, f"{n}-{workers}")
            row = train_on_cluster(shop, out, workers, args.workdir / f"train-{n}-{workers}",
                                   config, args.resume)
            row.update({"events": n, "shards": shards, "n_workers": workers, "writer": writer,
                        "ranker": json.loads(config.read_text())["ranker"],
                        "test_user_share": args.test_user_share,
                        "date": dt.date.today().isoformat(),
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores"})
            if args.release:
                row["release"] = released_bundle(f"scale-{n}-{workers}")
            print(json.dumps(row), flush=True)
            results.append(row)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        if args.local or args.local_only:
            config = write_config(args.workdir / "config.json", args, f"{n}-local")
            local = train_local(shop, args.workdir / f"local-{n}", args.workdir / f"local-{n}.log",
                                config)
            local.update({"events": n, "engine": "local", "date": dt.date.today().isoformat(),
                          "ranker": json.loads(config.read_text())["ranker"]})
            print(json.dumps(local), flush=True)
            results.append(local)
        if not args.keep:
            shutil.rmtree(shop, ignore_errors=True)
            (args.workdir / f"demo-{n}.json").unlink(missing_ok=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
    print_table([r for r in results if r.get("n_workers")])


def print_table(rows: list[dict]) -> None:
    print("\n| events | workers | " + " | ".join(f"{s} s" for s in STAGES)
          + " | flow CPU s | workers CPU s | peak RSS flow / max worker / scheduler MiB |"
          " NDCG@10 covisitation / transformer / ranker |")
    print("|---" * (5 + len(STAGES)) + "|")
    for r in rows:
        cells = [f"{r['stages'].get(s, float('nan')):.0f}" for s in STAGES]
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
