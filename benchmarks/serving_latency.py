"""Latency of the served model and throughput of batch recommendations, on this machine.

Builds the default demo shop (200,000 events), fits and scores the baselines, registers the best
one on validation in a temporary MLflow store (as ``shoprank train`` does, without Prefect), serves
it with ``shoprank serve`` on 127.0.0.1 and sends single-user top-10 requests one after another
over one keep-alive connection (a bounded loop). Then times the ``recommend`` flow's core function
(:func:`flows.recommend.recommend_all`) over every known user.

    .venv/bin/python benchmarks/serving_latency.py                  # 500 requests
    .venv/bin/python benchmarks/serving_latency.py --requests 2000 --events 1000000
    .venv/bin/python benchmarks/serving_latency.py --tracking-uri sqlite:///mlruns/mlflow.db \\
        --model-uri models:/shoprank@champion                      # an existing model
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.config import load_config  # noqa: E402
from flows.recommend import recommend_all  # noqa: E402
from tasks import tracking  # noqa: E402
from tasks.data.demo_data import write_demo_shop  # noqa: E402
from tasks.data.prepare import write_split  # noqa: E402
from tasks.evaluation.evaluate import baseline_factories, score_model  # noqa: E402
from tasks.release.packaging import ReleaseRun, load_serving, register_best  # noqa: E402
from tasks.splitting.split import cut_times, time_split  # noqa: E402

BIN = Path(sys.executable).parent


def register_demo_model(workdir: Path, uri: str, n_events: int, seed: int) -> str:
    """Fit the baselines on a demo shop, register the best on validation; returns the URI."""
    from mlflow import MlflowClient

    shop = workdir / "shop"
    write_demo_shop(shop, n_events=n_events, seed=seed)
    events = pl.read_parquet(shop / "events.parquet")
    split = time_split(events, *cut_times(events))
    write_split(split, shop / "split")
    scores = {}
    for name, factory in baseline_factories(7.0).items():
        scores[name], model = score_model(factory, split, [10, 20], events["item_id"].n_unique(),
                                          False)
        model.save(workdir / "models" / name)
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.ensure_experiment("demo", uri)).info.run_id
    config = load_config(None).model_dump(mode="json")
    family, packaged = register_best(scores, ReleaseRun(
        run_id, uri, shop / "split", workdir / "models", "demo", "-" * 64, "time", False, config))
    client.set_terminated(run_id, "FINISHED")
    client.set_registered_model_alias(packaged.name, "champion", packaged.version)
    print(f"registered {family} as version {packaged.version} "
          f"({packaged.artifact_bytes / 1e6:.1f} MB, loads in {packaged.load_seconds:.2f} s)")
    return f"models:/{packaged.name}@champion"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"shoprank serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start in time")


def time_requests(port: int, users: list[str], n: int, seed: int) -> np.ndarray:
    """Milliseconds of ``n`` single-user top-10 requests, sent one after another."""
    rng = np.random.default_rng(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    times = []
    for i, user in enumerate(rng.choice(users, size=n + 20)):
        body = json.dumps({"dataframe_records": [{"user_id": str(user), "k": 10}]})
        start = time.perf_counter()
        conn.request("POST", "/invocations", body, headers)
        response = conn.getresponse()
        payload = response.read()
        elapsed = (time.perf_counter() - start) * 1000
        if response.status != 200 or len(json.loads(payload)["predictions"]) != 10:
            raise SystemExit(f"bad answer {response.status}: {payload[:300]!r}")
        if i >= 20:  # the first 20 warm the server up
            times.append(elapsed)
    conn.close()
    return np.asarray(times)


def serve_and_measure(model_uri: str, uri: str, users: list[str], n: int, seed: int
                      ) -> np.ndarray:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen([str(BIN / "shoprank"), "serve", "--port", str(port), "--model-uri",
                             model_uri], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        return time_requests(port, users, n, seed)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracking-uri", help="existing store (default: a temporary one)")
    parser.add_argument("--model-uri", help="existing model (default: a fresh demo model)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoprank-bench-") as tmp:
        uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        model_uri = args.model_uri or register_demo_model(Path(tmp), uri, args.events, args.seed)
        _, serving = load_serving(model_uri, uri)
        users = serving.users.to_list()
        times = serve_and_measure(model_uri, uri, users, args.requests, args.seed)
        batch = []
        for _ in range(3):
            start = time.perf_counter()
            frame = recommend_all(serving, serving.users, 10)
            batch.append(time.perf_counter() - start)
    print(f"\nserved {serving.manifest['family']} ({len(users)} known users, "
          f"{serving.items.len()} items); {len(times)} single-user top-10 requests:")
    print("| p50 ms | p90 ms | p99 ms | mean ms | max ms |\n|---:|---:|---:|---:|---:|")
    print(f"| {np.percentile(times, 50):.1f} | {np.percentile(times, 90):.1f} | "
          f"{np.percentile(times, 99):.1f} | {times.mean():.1f} | {times.max():.1f} |")
    best = min(batch)
    print(f"\nbatch: {len(users)} users x top-10 ({frame.height} rows) in {best:.2f} s "
          f"(best of 3) = {len(users) / best:,.0f} users/s")


if __name__ == "__main__":
    main()
