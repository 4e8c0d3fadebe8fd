"""Load test of ``shoprank serve`` with locust, headless, on 127.0.0.1 only.

Starts ``shoprank serve`` for a registered model, times its start-up (until ``/ping`` and a first
answer), then runs ``benchmarks/locustfile.py`` at each concurrency (1, 8 and 32 users by default),
each run bounded in time (``--seconds``) and count (``--max-requests``). The mix: known and
unknown users, ``k`` in {1, 10, 50, 200}, with and without ``recent_items`` and ``exclude``, 10%
malformed requests (which must be 4xx). After the runs it checks the server still answers, reads
the memory of its processes, stops it and prints one table; results go to
``benchmarks/results/load-<label>.json``.

    .venv/bin/shoprank train                                   # the champion of make run
    .venv/bin/python benchmarks/load.py --label demo
    .venv/bin/python benchmarks/load.py --label 10m --tracking-uri sqlite:////tmp/10m/mlflow.db
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, records: list[dict]) -> tuple[int, bytes]:
    body = json.dumps({"dataframe_records": records}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_ready(base: str, proc: subprocess.Popen, user: str, timeout: float) -> float:
    """Seconds from now until ``/ping`` answers and a request is answered."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2):
                if post(f"{base}/invocations", [{"user_id": user, "k": 10}])[0] == 200:
                    return time.perf_counter() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    sys.exit(f"the server did not answer within {timeout:.0f} s")


def group_memory_mib(pgid: int) -> dict[str, float]:
    """Summed RSS and PSS (shared pages split between processes) of a process group."""
    rss = pss = 0.0
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
            count += 1
        except (OSError, ProcessLookupError):
            continue
    return {"rss_mib": rss, "pss_mib": pss, "processes": count}


def sample_ids(model_uri: str, tracking_uri: str, n: int, seed: int) -> dict[str, list[str]]:
    """Known users and items (those with session neighbours) of the served model."""
    from tasks.release.packaging import load_serving

    _, serving = load_serving(model_uri, tracking_uri)
    rng = random.Random(seed)
    users = serving.users.to_list()
    items = serving.neighbours["item_id"].unique().sort().to_list()
    return {"users": rng.sample(users, min(n, len(users))),
            "items": rng.sample(items, min(n, len(items)))}


def run_locust(base: str, users: int, seconds: int, max_requests: int, ids: Path,
               prefix: Path) -> list[dict[str, str]]:
    env = {**os.environ, "SHOPRANK_LOAD_IDS": str(ids), "SHOPRANK_LOAD_MAX": str(max_requests)}
    command = [str(BIN / "locust"), "-f", str(ROOT / "benchmarks" / "locustfile.py"),
               "--headless", "-u", str(users), "-r", str(users), "--run-time", f"{seconds}s",
               "--host", base, "--csv", str(prefix), "--only-summary", "--stop-timeout", "5",
               "--loglevel", "WARNING"]
    subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL)
    with open(f"{prefix}_stats.csv") as handle:
        return list(csv.DictReader(handle))


def summarise(rows: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    out = {}
    for row in rows:
        out[row["Name"]] = {
            "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "rps": float(row["Requests/s"]), "p50_ms": float(row["50%"] or 0),
            "p99_ms": float(row["99%"] or 0), "max_ms": float(row["Max Response Time"] or 0)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="demo", help="name of the results file")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    parser.add_argument("--model-uri", default="models:/shoprank@champion")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=int, default=30, help="length of each run (30)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per run (20000)")
    parser.add_argument("--workers", type=int, help="server workers (one per core)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ids = sample_ids(args.model_uri, args.tracking_uri, 2000, args.seed)
    work = Path(tempfile.mkdtemp(prefix="shoprank-load-"))
    (work / "ids.json").write_text(json.dumps(ids))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(BIN / "shoprank"), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model-uri", args.model_uri, "--tracking-uri", args.tracking_uri]
    if args.workers:
        command += ["--workers", str(args.workers)]
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    runs = {}
    try:
        startup = wait_ready(base, proc, ids["users"][0], 600)
        idle = group_memory_mib(proc.pid)
        for users in args.concurrency:
            stats = run_locust(base, users, args.seconds, args.max_requests, work / "ids.json",
                               work / f"u{users}")
            runs[str(users)] = summarise(stats)
            total = runs[str(users)]["Aggregated"]
            print(f"{users:>3} users: {total['rps']:.0f} req/s, p50 {total['p50_ms']:.0f} ms, "
                  f"p99 {total['p99_ms']:.0f} ms, {total['failures']} failures", flush=True)
        alive = post(f"{base}/invocations", [{"user_id": ids["users"][0], "k": 5}])[0] == 200
        loaded = group_memory_mib(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    result = {"label": args.label, "date": dt.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "model_uri": args.model_uri, "startup_s": startup, "memory_idle": idle,
              "memory_after": loaded, "alive_after": alive, "runs": runs,
              "seconds": args.seconds, "max_requests": args.max_requests}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"load-{args.label}.json").write_text(json.dumps(result, indent=2))
    print_table(result)


def print_table(result: dict) -> None:
    print(f"\n{result['label']}: start-up {result['startup_s']:.1f} s; server memory after the "
          f"runs: RSS {result['memory_after']['rss_mib']:.0f} MiB, PSS "
          f"{result['memory_after']['pss_mib']:.0f} MiB over "
          f"{result['memory_after']['processes']} processes; alive after: "
          f"{result['alive_after']}\n")
    names = ["k=1", "k=10", "k=50", "k=200", "k=1 +recent", "k=10 +recent", "k=50 +recent",
             "k=200 +recent"]
    print("| users | req/s | p50 ms | p99 ms | failures | malformed 4xx | "
          + " | ".join(f"p99 {n}" for n in names) + " |")
    print("|---" * (6 + len(names)) + "|")
    for users, stats in result["runs"].items():
        total, bad = stats["Aggregated"], stats.get("malformed", {})
        cells = [f"{stats.get(n, {}).get('p99_ms', float('nan')):.0f}" for n in names]
        print(f"| {users} | {total['rps']:.0f} | {total['p50_ms']:.0f} | {total['p99_ms']:.0f} | "
              f"{total['failures']} | {bad.get('requests', 0) - bad.get('failures', 0)}/"
              f"{bad.get('requests', 0)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
